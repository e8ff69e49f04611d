"""Three `fanout run` replicas over one Batch account: every job is reported exactly once.

Real daemon processes (Service Bus through the AMQP peer, Azure Batch through the HTTP
peer) each run the job monitor. The first replica is killed with SIGKILL between
publishing a job's event and marking the job reported (the marker's PATCH is held up
by the peer); the other two then report every job, including that one again, and the
events queue's duplicate detection drops the repeat: one event per job survives.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.batch_peer import BatchPeer, FaultPlan
from tests.fakes.servicebus_peer import ServiceBusPeer
from worker.backends.base import META_REPORTED
from worker.events import event_id

from .daemon import Daemon, wait_for

JOBS = 12


@pytest.fixture
def peers() -> Iterator[tuple[BatchPeer, ServiceBusPeer]]:
    batch = BatchPeer().start()
    batch.add_pool("fanout", dedicated={"idle": 2})
    bus = ServiceBusPeer(queues=["work", "events"], duplicate_detection={"events": 600.0})
    bus.start()
    try:
        yield batch, bus
    finally:
        bus.stop()
        batch.stop()


def replica(root: Path, batch: BatchPeer, bus: ServiceBusPeer) -> Daemon:
    config: dict[str, Any] = {
        "servicebus": {"connection_string": bus.connection_string, "queue": "work",
                       "emulator_admin_port": bus.admin_port or 5300},
        "batch": {"account_url": batch.url, "account_name": batch.account,
                  "account_key": batch.key, "pool": "fanout", "poll_interval": 5.0},
        "jobs": {"poll_interval": 0.3},
        "events": {"queue": "events"},
        "consumer": {"receive_wait": 1.0},
    }
    root.mkdir(parents=True, exist_ok=True)
    return Daemon(root, config)


def reported(batch: BatchPeer) -> set[str]:
    return {j.id for j in batch.jobs()
            if any(m.get("name") == META_REPORTED for m in j.body.get("metadata") or [])}


@pytest.mark.slow
def test_a_replica_killed_mid_report_leaves_the_job_to_the_others(
        tmp_path: Path, peers: tuple[BatchPeer, ServiceBusPeer]) -> None:
    batch, bus = peers
    ids = [f"sweep-replica-{i}" for i in range(JOBS)]
    for job_id in ids:
        batch.seed_job(job_id, state="completed", tasks=3,
                       on_all_tasks_complete="terminatejob",
                       metadata={"fanout-handler": "sweep", "fanout-key": job_id})
    # The marker's PATCH takes 3 s: the first replica publishes, then hangs there.
    batch.set_faults(FaultPlan(latency=3.0, operations=frozenset({"update_job"})))
    first = replica(tmp_path / "a", batch, bus).start()
    others = [replica(tmp_path / name, batch, bus) for name in ("b", "c")]
    try:
        first.wait_started()
        wait_for(lambda: len(bus.messages("events")) >= 1, 30, "the first event published")
        first.kill()
        published_by_first = {m.message_id for m in bus.messages("events")}
        assert not reported(batch) & set(ids), "the killed replica marked no job"
        batch.set_faults(FaultPlan())
        for daemon in others:
            daemon.start().wait_started()
        wait_for(lambda: reported(batch) >= set(ids), 60, "every job reported")
    finally:
        for daemon in [first, *others]:
            daemon.close()
    stored = bus.messages("events")
    per_job = Counter(json.loads(m.body)["subject"] for m in stored)
    assert per_job == Counter({job_id: 1 for job_id in ids})
    assert {m.message_id for m in stored} == {event_id(j) for j in ids}
    # the killed replica's event was published again by another replica, and dropped
    assert published_by_first <= {event_id(j) for j in ids}
    assert bus.duplicates_dropped >= len(published_by_first)
