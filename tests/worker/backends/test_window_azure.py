"""Window jobs on Azure Batch: the whole worker against the Batch peer.

Events of one window make one job, created once, its tasks added across events (ids
prefixed with the event's digest, dependencies rewritten), sealed by the monitor after
the window (never by a submitter), reported once with the failed event named; a late
event of the completed window job runs in a job of its own, and one whose tasks are
already in it adds nothing."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import jsonschema
import pytest
from azure.core.credentials import AzureNamedKeyCredential

from handlers.base import BlobRef
from tests.fakes.batch_peer import BatchPeer, Runner
from tests.worker.harness import RunningWorker
from tests.worker.test_window import REGISTRY, blob_event, rule
from worker.backends.azure import AzureBatchBackend
from worker.config import Settings
from worker.context import job_id_for
from worker.events import schema
from worker.storage.local import LocalStorage
from worker.window import task_prefix, window_for

MakePeer = Callable[..., BatchPeer]


@pytest.fixture
def start_worker(make_settings: Callable[..., Settings]
                 ) -> Iterator[Callable[..., RunningWorker]]:
    started: list[RunningWorker] = []

    def start(peer: BatchPeer, **route: Any) -> RunningWorker:
        settings = make_settings(
            backend={"kind": "azure"},
            batch={"account_url": peer.url, "account_name": peer.account, "pool": "fanout",
                   "poll_interval": 0.5},
            consumer={"receive_wait": 0.2, "unready_backoff": 0.1},
            submit={"backoff_base": 0.001, "backoff_max": 0.01},
            jobs={"poll_interval": 0.3},
            routes=[{"handler": "blobtask", "container": "uploads", "job": "window",
                     "window": "PT3S", "seal_after": "PT1S", "name": "peer", **route}])
        backend = AzureBatchBackend(endpoint=peer.url, credential=AzureNamedKeyCredential(
            peer.account, peer.key), default_pool="fanout", connections=10)
        running = RunningWorker(settings, backend=backend, handlers=REGISTRY).start()
        started.append(running)
        return running

    yield start
    for running in started:
        if running.thread.is_alive():
            running.stop()


def events_of(worker: RunningWorker) -> list[dict[str, Any]]:
    sink = worker.app.monitor.sink if worker.app.monitor else None
    assert sink is not None
    return [json.loads(p.body) for p in worker.call(sink.peek(100))]


def test_window_job_on_the_batch_peer(make_peer: MakePeer,
                                      start_worker: Callable[..., RunningWorker]) -> None:
    """12 events x 2 tasks (the second depends on the first): one job of 24 tasks,
    created once, sealed by the monitor, reported with the failed event; then a late
    event runs on its own and a redelivered one adds nothing."""
    fail = task_prefix("ev-3") + "0"
    peer = make_peer(runner=Runner(delay=0.02, exit_codes={fail: 1}))
    w = start_worker(peer, params={"tasks": 2})
    storage = w.app.storage
    assert isinstance(storage, LocalStorage)
    # a window ahead: sealed a window plus seal_after after the job's creation
    when = (datetime.now(UTC) + timedelta(seconds=3)).isoformat()
    win = window_for(rule(window="PT3S", name="peer", params={"tasks": 2}), event_id="x",
                     event_time_text=when, ref=BlobRef("uploads", "x"))
    assert win is not None
    job_id = job_id_for("blobtask", win.key)
    for i in range(12):
        w.send(blob_event(storage, f"clip-{i}.bin", f"ev-{i}", when))
    w.wait_idle(12)
    job = peer.job(job_id)
    assert job is not None and len(peer.tasks(job_id)) == 24
    assert sorted(peer.task_json(job_id, task_prefix("ev-5") + "1")["dependsOn"]["taskIds"]) \
        == [task_prefix("ev-5") + "0"]
    w.wait_until(lambda: bool(events_of(w)), timeout=20, what="the window job's event")
    (event,) = events_of(w)
    jsonschema.validate(event, schema())
    data = event["data"]
    assert event["subject"] == job_id and data["tasks"]["total"] == 24
    assert data["outcome"] == "failed" and data["window"]["failed_events"] == 1
    # the failed task, and its dependent that it blocked (the monitor then ended the
    # sealed job: every remaining task waited on a failed dependency)
    assert data["terminate_reason"] == "FanoutBlocked"
    assert [(f["task_id"], f["category"]) for f in data["failed_tasks"]] == [
        (fail, "exit_code"), (task_prefix("ev-3") + "1", "dependency_failed")]
    for failed in data["failed_tasks"]:
        assert failed["event_id"] == "ev-3" and failed["blob"] == "uploads/clip-3.bin"
    assert (job.on_all_tasks_complete, job.state) == ("terminatejob", "completed")
    # late: the window job has completed
    w.send(blob_event(storage, "late.bin", "ev-late", when))
    w.send(blob_event(storage, "clip-0.bin", "ev-0", when))  # redelivered: already there
    w.wait_idle(14)
    own = job_id_for("blobtask", "ev-late")
    assert peer.job(own) is not None and len(peer.tasks(own)) == 2
    assert peer.job(job_id_for("blobtask", "ev-0")) is None
    assert {j.id for j in peer.jobs()} == {job_id, own}
    assert len(peer.tasks(job_id)) == 24
