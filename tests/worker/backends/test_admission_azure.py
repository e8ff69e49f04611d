"""Admission on Azure Batch (worker/admission.py) against the local Batch peer: the
stats poll's capacity (node counts, resize errors, allocation state, autoscale, slots
per node, fanout's pending tasks), the reasons, the request budget, and the whole worker
pausing over the limit and resuming as tasks complete."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from azure.core.credentials import AzureNamedKeyCredential

from tests.fakes.batch_peer import BatchPeer
from worker.admission import view
from worker.backends.azure import AzureBatchBackend
from worker.backends.base import META_HANDLER
from worker.config import Settings

from ..harness import RunningWorker

MakePeer = Callable[..., BatchPeer]
StartWorker = Callable[..., RunningWorker]
OURS = {META_HANDLER: "sweep"}


def backend_for(peer: BatchPeer) -> AzureBatchBackend:
    return AzureBatchBackend(endpoint=peer.url,
                             credential=AzureNamedKeyCredential(peer.account, peer.key),
                             default_pool="fanout")


@pytest.fixture
def start_worker(make_settings: Callable[..., Settings]) -> Iterator[StartWorker]:
    started: list[RunningWorker] = []

    def start(peer: BatchPeer, limit: float, **overrides: Any) -> RunningWorker:
        settings = make_settings(
            backend={"kind": "azure"},
            batch={"account_url": peer.url, "account_name": peer.account, "pool": "fanout",
                   "poll_interval": 0.1},
            consumer={"receive_wait": 0.2, "unready_backoff": 0.1, "concurrency": 1},
            admission={"max_backlog_per_slot": limit}, **overrides)
        running = RunningWorker(settings, backend=backend_for(peer)).start()
        started.append(running)
        return running

    yield start
    for running in started:
        if running.thread.is_alive():
            running.stop()


def sweep(stop: int, key: str) -> dict[str, Any]:
    return {"handler": "sweep", "id": key, "params": {"program": "pi", "parameters": {
        "samples": [100], "seed": {"start": 0, "stop": stop}}}}


def completed(w: RunningWorker) -> float:
    return w.sample("fanout_messages_total", {"handler": "sweep", "outcome": "completed"})


def paused(w: RunningWorker) -> bool:
    return w.app.consumer.admission is not None and w.app.consumer.admission.paused


def readyz(w: RunningWorker) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{w.app.metrics_port}/readyz",
                                    timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_backlog_over_the_limit_pauses_and_resumes_as_tasks_complete(
        make_peer: MakePeer, start_worker: StartWorker) -> None:
    """Two nodes of one slot, limit 1: a 5-task sweep leaves 5 pending, so the worker
    stops receiving (the next message stays in the queue, /readyz says why, /healthz
    stays 200); as the peer completes the tasks it resumes and takes the next one."""
    peer = make_peer()
    w = start_worker(peer, 1)
    w.send(sweep(5, "first"))
    w.wait_until(lambda: paused(w), what="admission paused")
    w.wait_until(lambda: w.app.consumer.receiving == 0, what="no receive in flight")
    w.send(sweep(1, "second"))
    status, text = readyz(w)
    assert status == 503
    assert text == ("not ready: waiting for capacity: pool fanout: backlog: 5 pending tasks "
                    "over 1 per slot x 2 slots\n")
    with urllib.request.urlopen(f"http://127.0.0.1:{w.app.metrics_port}/healthz",
                                timeout=5) as answer:
        assert answer.status == 200
    assert w.sample("fanout_admission_paused", {"pool": "fanout", "reason": "backlog"}) == 1
    assert w.sample("fanout_pool_pending_tasks", {"pool": "fanout"}) == 5
    assert w.depth()["active"] == 1 and completed(w) == 1
    (job,) = peer.jobs()
    for i in range(3):  # 2 left pending: 2 <= 1 x 2 slots
        peer.set_task_state(job.id, str(i), "completed")
    w.wait_until(lambda: completed(w) == 2, what="the second message received")
    assert w.sample("fanout_admission_paused", {"pool": "fanout", "reason": "backlog"}) == 0
    assert len(peer.jobs()) == 2 and peer.undocumented == []


def test_job_quota_reads_as_waiting_for_capacity(make_peer: MakePeer,
                                                 start_worker: StartWorker) -> None:
    """A full active-job quota (the service's ``ActiveJobAndScheduleQuotaReached`` on
    create) holds the message with /readyz ``waiting for capacity: account: job_quota``;
    once a slot frees the message completes."""
    peer = make_peer(max_active_jobs=1)
    peer.seed_job("someone-elses", tasks=1)
    w = start_worker(peer, 100)
    w.send(sweep(2, "quota"))
    w.wait_until(lambda: w.sample("fanout_admission_paused",
                                  {"pool": "*", "reason": "job_quota"}) == 1,
                 what="the job quota counted")
    status, text = readyz(w)
    assert status == 503 and text.startswith(
        "not ready: waiting for capacity: account: job_quota: create job")
    assert "ActiveJobAndScheduleQuotaReached" in text
    assert w.depth()["dead_letter"] == 0
    peer.max_active_jobs = None  # the quota is raised (or a job ends)
    w.wait_until(lambda: completed(w) == 1, what="the message completed")
    w.wait_until(lambda: w.sample("fanout_admission_paused",
                                  {"pool": "*", "reason": "job_quota"}) == 0,
                 what="the job quota cleared")


# -- what the stats poll reads, and why a pool is short -----------------------------------

CORE = ("AccountCoreQuotaReached", "The specified account has reached its core quota.")


@pytest.mark.parametrize(("setup", "reason"), [
    ({"target_dedicated": 4, "resize_errors": [CORE]}, "core_quota"),
    ({"target_dedicated": 4, "resize_errors": [("AllocationTimedOut", "no VMs")]},
     "resize_error"),
    ({"dedicated": {"idle": 1, "startTaskFailed": 1}}, "start_task_failed"),
    ({"dedicated": {"idle": 1, "unusable": 1}}, "unusable_nodes"),
    ({"dedicated": {}, "target_dedicated": 0}, "no_nodes"),
    ({"dedicated": {}, "target_dedicated": 0, "enable_auto_scale": True}, "backlog"),
    # stale: the pool reached its target since the failed resize
    ({"resize_errors": [CORE]}, "backlog"),
])
def test_the_reason_comes_from_the_pool(peer: BatchPeer, setup: dict[str, Any],
                                        reason: str) -> None:
    peer.set_pool("fanout", **setup)
    peer.seed_job("busy", tasks=50, metadata=OURS)
    with _Closing(backend_for(peer)) as backend:
        cap = backend.stats().pools["fanout"]
    assert cap.pending == 50
    wait = view(cap, 1).wait
    assert wait is not None and wait.reason == reason
    assert peer.undocumented == []


class _Closing:
    def __init__(self, backend: AzureBatchBackend) -> None:
        self.backend = backend

    def __enter__(self) -> AzureBatchBackend:
        return self.backend

    def __exit__(self, *exc: object) -> None:
        self.backend.close()


def test_stats_read_capacity_without_extra_requests(peer: BatchPeer) -> None:
    """One stats read: node counts (one page), get pool (one, ``$select`` grown), the
    active-job listing (``poolInfo`` added) and task counts per active fanout job, as
    before admission. Pending counts only fanout's jobs on the pool; slots per node,
    autoscale, the allocation state and its transition time are read; a resize error
    of a pool short of its target is current, and a new resize makes it history."""
    peer.set_pool("fanout", dedicated={"idle": 1, "running": 1, "starting": 1},
                  target_dedicated=4, resize_errors=[CORE], task_slots_per_node=4)
    peer.seed_job("ours", tasks=7, counts={"active": 7, "running": 2}, metadata=OURS)
    peer.seed_job("not-ours", tasks=30)
    with _Closing(backend_for(peer)) as backend:
        before = sum(peer.requests.values())
        stats = backend.stats()
        assert sum(peer.requests.values()) - before == 4  # nodecounts, pool, jobs, counts
        cap = stats.pools["fanout"]
        assert (cap.pending, cap.running, cap.slots_per_node) == (7, 2, 4)
        assert cap.nodes["idle"] == 1 and cap.nodes["starting"] == 1
        assert (cap.current, cap.target, cap.allocation_state) == (3, 4, "steady")
        assert cap.allocation_changed is not None and not cap.autoscale
        assert [(e.code, e.message) for e in cap.resize_errors] == [CORE]
        seen = view(cap, 0.5)
        assert seen.slots == 12 and [e.code for e in seen.resize_errors] == [CORE[0]]
        assert seen.wait is not None and seen.wait.reason == "core_quota"
        assert "AccountCoreQuotaReached: The specified account" in seen.wait.detail
        first = cap.allocation_changed
        peer.set_pool("fanout", allocation_state="resizing")  # a new resize
        cap = backend.stats().pools["fanout"]
        assert cap.resize_errors == [] and cap.allocation_state == "resizing"
        assert cap.allocation_changed is not None and cap.allocation_changed >= first
        assert view(cap, 0.5).slots == (3 + 1) * 4  # the node the resize still adds
    assert peer.undocumented == []


def test_status_pools_names_the_cause_on_azure(peer: BatchPeer, tmp_path: Path) -> None:
    """``fanout status --pools`` against the peer: the pool's wait and its current resize
    error; the account's active jobs."""
    from click.testing import CliRunner

    from worker.cli import main

    peer.set_pool("fanout", target_dedicated=5, resize_errors=[CORE])
    peer.seed_job("busy", tasks=9, metadata=OURS)
    config = tmp_path / "fanout.toml"
    config.write_text(f'home = "{tmp_path / "home"}"\n[batch]\naccount_url = "{peer.url}"\n'
                      f'account_name = "{peer.account}"\npool = "fanout"\n'
                      "[admission]\nmax_backlog_per_slot = 2\n")
    result = CliRunner().invoke(main, ["--config", str(config), "status", "--pools"],
                                env={"FANOUT_BATCH__ACCOUNT_KEY": peer.key})
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert ("waiting for capacity: pool fanout: core_quota: AccountCoreQuotaReached: The "
            "specified account has reached its core quota. (9 pending tasks over 2 per slot "
            "x 2 slots)") in text
    assert "resize error fanout AccountCoreQuotaReached:" in text
    assert "account: 1 active jobs" in text
    assert peer.key not in result.output
