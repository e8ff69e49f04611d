"""Every job ends and is reported, on Azure Batch: the whole worker against the Batch peer.

The peer's runner mode moves tasks on their own (running, then completed with the exit
code a test chooses) and applies Batch's exit conditions, dependency actions, job wall
clocks and terminations; the monitor reads only what the service would tell it. The
completion events land on the embedded events queue and are validated against the
shipped schema.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from azure.core.credentials import AzureNamedKeyCredential
from prometheus_client import CollectorRegistry

from tests.fakes.batch_peer import BatchPeer, PeerError, Runner
from worker.backends.azure import AzureBatchBackend
from worker.config import EventsConfig, JobsConfig, Settings
from worker.context import job_id_for
from worker.metrics import Metrics
from worker.monitor import JobMonitor

from ..harness import RunningWorker

MakePeer = Callable[..., BatchPeer]
StartWorker = Callable[..., RunningWorker]


def sweep(key: str, stop: int = 6, *, policy: str | None = None, **job: Any) -> dict[str, Any]:
    aggregate: dict[str, Any] = {"program": "pi-summary"}
    if policy:
        aggregate["on_dependency_failure"] = policy
    body: dict[str, Any] = {"handler": "sweep", "id": key, "params": {
        "program": "pi", "parameters": {"samples": [10], "seed": {"start": 0, "stop": stop}},
        "aggregate": aggregate}}
    if job:
        body["job"] = job
    return body


def backend_for(peer: BatchPeer) -> AzureBatchBackend:
    return AzureBatchBackend(endpoint=peer.url,
                             credential=AzureNamedKeyCredential(peer.account, peer.key),
                             default_pool="fanout", connections=10)


@pytest.fixture
def start_worker(make_settings: Callable[..., Settings]) -> Iterator[StartWorker]:
    started: list[RunningWorker] = []

    def start(peer: BatchPeer, **overrides: Any) -> RunningWorker:
        settings = make_settings(
            backend={"kind": "azure"},
            batch={"account_url": peer.url, "account_name": peer.account, "pool": "fanout",
                   "poll_interval": 0.5},
            consumer={"receive_wait": 0.2, "unready_backoff": 0.1,
                      **overrides.pop("consumer", {})},
            submit={"backoff_base": 0.001, "backoff_max": 0.01},
            jobs={"poll_interval": 0.3, **overrides.pop("jobs", {})}, **overrides)
        running = RunningWorker(settings, backend=backend_for(peer)).start()
        started.append(running)
        return running

    yield start
    for running in started:
        if running.thread.is_alive():
            running.stop()


def test_every_task_succeeds(make_peer: MakePeer, start_worker: StartWorker) -> None:
    """All tasks exit 0: succeeded, no failed task, and the job is marked reported."""
    peer = make_peer(runner=Runner(delay=0.02))
    w = start_worker(peer)
    w.send(sweep("az-good", 4))
    job_id = job_id_for("sweep", "az-good")
    event = w.wait_event(job_id)
    data = event["data"]
    assert data["outcome"] == "succeeded" and data["failed_tasks"] == []
    assert data["tasks"] == {"total": 5, "succeeded": 5, "failed": 0, "not_run": 0}
    assert data["message_id"] and data["idempotency_key"] == "az-good"
    job = peer.job(job_id)
    assert job is not None
    meta = {m["name"]: m["value"] for m in job.body["metadata"]}

    def marked() -> bool:
        current = peer.job(job_id)
        return current is not None and "fanout-reported" in {
            m["name"] for m in (current.body.get("metadata") or [])}

    w.wait_until(marked, what="the marker patched")
    assert meta["fanout-handler"] == "sweep" and len(meta["fanout-request"]) == 32


def test_failed_task_with_aggregate_run(make_peer: MakePeer, start_worker: StartWorker) -> None:
    """Task 3 exits 1; its exit conditions satisfy the aggregate, which runs; the job
    completes and its event names task 3 with Batch's failure code."""
    peer = make_peer(runner=Runner(delay=0.05, exit_codes={"3": 1}))
    w = start_worker(peer)
    w.send(sweep("az-run"))
    job_id = job_id_for("sweep", "az-run")
    data = w.wait_event(job_id)["data"]
    assert data["outcome"] == "failed" and data["terminate_reason"] == "AllTasksComplete"
    assert data["tasks"] == {"total": 7, "succeeded": 6, "failed": 1, "not_run": 0}
    (failed,) = data["failed_tasks"]
    assert (failed["task_id"], failed["exit_code"], failed["failure_code"],
            failed["category"]) == ("3", 1, "FailureExitCode", "exit_code")
    aggregate = peer.task(job_id, "aggregate")
    assert aggregate is not None and aggregate.state == "completed"
    upstream = {t["id"]: t for t in peer.tasks(job_id)}["3"]
    assert upstream["exitConditions"]["default"] == {"dependencyAction": "satisfy"}


def test_failed_task_with_aggregate_skip(make_peer: MakePeer,
                                         start_worker: StartWorker) -> None:
    """With skip Batch blocks the aggregate; the monitor terminates the job."""
    peer = make_peer(runner=Runner(delay=0.05, exit_codes={"2": 7}))
    w = start_worker(peer)
    w.send(sweep("az-skip", policy="skip"))
    job_id = job_id_for("sweep", "az-skip")
    data = w.wait_event(job_id)["data"]
    assert data["outcome"] == "failed" and data["terminate_reason"] == "FanoutBlocked"
    by_id = {f["task_id"]: f for f in data["failed_tasks"]}
    assert by_id["2"]["exit_code"] == 7
    assert by_id["aggregate"]["category"] == "dependency_failed"
    aggregate = peer.task(job_id, "aggregate")
    assert aggregate is not None and aggregate.state == "active"
    assert w.sample("fanout_jobs_terminated_total", {"reason": "FanoutBlocked"}) == 1


def test_job_wall_clock_times_out(make_peer: MakePeer, start_worker: StartWorker) -> None:
    """A job whose max wall clock passes while its tasks run is timed_out."""
    peer = make_peer(runner=Runner(delay=30))
    w = start_worker(peer)
    w.send(sweep("az-slow", 2, max_wall_clock="PT1S"))
    job_id = job_id_for("sweep", "az-slow")
    data = w.wait_event(job_id)["data"]
    assert data["outcome"] == "timed_out"
    assert data["terminate_reason"] == "MaxWallClockTimeExpiry"
    body = peer.job(job_id)
    assert body is not None and body.body["constraints"]["maxWallClockTime"] == "PT0H0M1S"


def test_cancel_running_job(make_peer: MakePeer, start_worker: StartWorker) -> None:
    """A cancel message terminates a running job; the event says cancelled."""
    peer = make_peer(runner=Runner(delay=30))
    w = start_worker(peer)
    w.send(sweep("az-cancel", 3))
    job_id = job_id_for("sweep", "az-cancel")
    w.wait_until(lambda: (j := peer.job(job_id)) is not None
                 and j.on_all_tasks_complete == "terminatejob", what="the job sealed")
    w.send({"cancel": job_id})
    data = w.wait_event(job_id)["data"]
    assert data["outcome"] == "cancelled" and data["terminate_reason"] == "FanoutCancelled"


def test_rejected_midway_terminates_the_partial_job(make_peer: MakePeer,
                                                    start_worker: StartWorker) -> None:
    """The service refuses task 150 of 300: the message is dead-lettered, the job that
    already holds 100+ tasks is terminated (no active job left) and reported failed."""
    def rule(task: dict[str, Any]) -> PeerError | None:
        return (PeerError(400, "InvalidPropertyValue", "refused by the test")
                if task["id"] == "150" else None)

    peer = make_peer(runner=Runner(delay=60), task_rule=rule)
    w = start_worker(peer)
    body = {"handler": "sweep", "id": "az-partial", "params": {
        "program": "pi", "parameters": {"samples": [10], "seed": {"start": 0, "stop": 300}}}}
    w.send(body)
    job_id = job_id_for("sweep", "az-partial")
    data = w.wait_event(job_id)["data"]
    assert data["outcome"] == "failed" and data["terminate_reason"] == "FanoutSubmitFailed"
    job = peer.job(job_id)
    assert job is not None and job.state == "completed"
    (dead,) = w.dead_letters()
    assert dead.reason == "BatchRejected"


def test_idempotency_conflict_names_the_job(make_peer: MakePeer,
                                            start_worker: StartWorker) -> None:
    """The same key with other params is dead-lettered, decided from the request hash
    kept in the Batch job's metadata; the first job is untouched."""
    peer = make_peer(runner=Runner(delay=0.05))
    w = start_worker(peer)
    w.send(sweep("az-key", 3))
    job_id = job_id_for("sweep", "az-key")
    w.wait_event(job_id)
    w.send(sweep("az-key", 4))
    w.wait_until(lambda: len(w.dead_letters()) == 1, what="the conflict dead-lettered")
    (dead,) = w.dead_letters()
    assert dead.reason == "IdempotencyConflict" and job_id in (dead.description or "")
    assert len(peer.tasks(job_id)) == 4


def test_300_failing_messages_within_an_active_job_quota_of_100(
        make_peer: MakePeer, start_worker: StartWorker) -> None:
    """Each of 300 jobs has a failing task; with the quota at 100 active jobs the worker
    waits whenever it is full, every job still ends, each is reported once, and the
    worker is ready at the end."""
    peer = make_peer(runner=Runner(delay=0.01, exit_codes={"1": 1}), max_active_jobs=100)
    w = start_worker(peer, consumer={"concurrency": 4})
    for i in range(300):
        w.send(sweep(f"q-{i}", 2))
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        found = w.events()
        if len(found) >= 300:
            break
        time.sleep(1.0)
    by_job = Counter(e["subject"] for e in found)
    assert len(by_job) == 300 and set(by_job.values()) == {1}
    assert {e["data"]["outcome"] for e in found} == {"failed"}
    assert all(j.state == "completed" for j in peer.jobs())
    w.wait_until(lambda: w.app.health.ready, what="the worker ready again")
    assert w.depth()["dead_letter"] == 0


def test_monitor_request_budget(make_peer: MakePeer) -> None:
    """200 active jobs of 10,000 tasks each cost one job listing and 200 task-counts
    requests per poll (docs/azure-batch.md): no task is ever listed."""
    peer = make_peer()
    for i in range(200):
        peer.seed_job(f"sweep-budget-{i}", tasks=10_000, on_all_tasks_complete="terminatejob",
                      counts={"active": 4000, "running": 2000, "succeeded": 4000},
                      metadata={"fanout-handler": "sweep"})
    peer.seed_job("someone-elses", tasks=10)  # not fanout's: never read beyond the listing
    backend = backend_for(peer)
    monitor = JobMonitor(backend=backend, sink=None, jobs=JobsConfig(lookback=timedelta(0)),
                         events=EventsConfig(enabled=False),
                         metrics=Metrics(registry=CollectorRegistry()))
    try:
        import asyncio

        before = Counter(op for op, _ in peer.log)
        result = asyncio.run(monitor.poll())
        after = Counter(op for op, _ in peer.log)
    finally:
        backend.close()
    made = after - before
    assert made == Counter({"list_jobs": 1, "get_task_counts": 200})
    assert result.active == 200 and result.terminated == []
    assert "list_tasks" not in made


def test_counts_that_lag_the_job_state_are_not_reported(
        make_peer: MakePeer, start_worker: StartWorker) -> None:
    """The peer's task counts trail the task states by 1.5 s (the service's counts are
    eventually consistent): the job reads completed first, and the event still carries
    the final counts, read once they have caught up."""
    peer = make_peer(runner=Runner(delay=0.05, exit_codes={"1": 3}), counts_lag=1.5)
    w = start_worker(peer)
    w.send(sweep("az-lag", 3))
    data = w.wait_event(job_id_for("sweep", "az-lag"))["data"]
    assert data["tasks"] == {"total": 4, "succeeded": 3, "failed": 1, "not_run": 0}
    assert [f["task_id"] for f in data["failed_tasks"]] == ["1"]
