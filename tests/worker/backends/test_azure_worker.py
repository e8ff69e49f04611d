"""Whole-worker tests on Azure Batch: the App (queue, consumer, planner, submitter,
pollers) with the Azure backend talking to the local Batch peer over HTTP."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from azure.core.credentials import AzureNamedKeyCredential

from tests.fakes.batch_peer import BatchPeer, FaultPlan, PeerError
from worker.backends.azure import AzureBatchBackend
from worker.config import Settings

from ..harness import RunningWorker

MakePeer = Callable[..., BatchPeer]  # the make_peer fixture (conftest.py)


def sweep(stop: int, samples: int = 100, **extra: Any) -> dict[str, Any]:
    return {"handler": "sweep", **extra, "params": {"program": "pi", "parameters": {
        "samples": [samples], "seed": {"start": 0, "stop": stop}}}}


StartWorker = Callable[..., RunningWorker]




@pytest.fixture
def start_worker(make_settings: Callable[..., Settings]) -> Iterator[StartWorker]:
    """Run workers whose backend is Azure Batch on the given peer; stop them afterwards."""
    started: list[RunningWorker] = []

    def start(peer: BatchPeer, *, key: str | None = None, **overrides: Any) -> RunningWorker:
        settings = make_settings(
            backend={"kind": "azure"},
            batch={"account_url": peer.url, "account_name": peer.account, "pool": "fanout",
                   "poll_interval": 0.2},
            consumer={"receive_wait": 0.2, "unready_backoff": 0.1,
                      **overrides.pop("consumer", {})},
            submit={"backoff_base": 0.001, "backoff_max": 0.01, **overrides.pop("submit", {})},
            **overrides)
        backend = AzureBatchBackend(
            endpoint=peer.url, credential=AzureNamedKeyCredential(peer.account, key or peer.key),
            default_pool="fanout", connections=settings.submit.concurrency + 2)
        running = RunningWorker(settings, backend=backend).start()
        started.append(running)
        return running

    yield start
    for running in started:
        if running.thread.is_alive():
            running.stop()


def completed(w: RunningWorker) -> float:
    return w.sample("fanout_messages_total", {"handler": "sweep", "outcome": "completed"})


def test_sweep_of_5000_tasks_under_faults_is_submitted_once(make_peer: MakePeer,
                                                            start_worker: StartWorker) -> None:
    """A 5,000-task sweep under 20% injected faults ends as one sealed job holding each
    task exactly once, and the message is completed."""
    peer = make_peer(faults=FaultPlan(throttle=0.05, unavailable=0.05, drop=0.05,
                                      drop_after=0.05, seed=5))
    w = start_worker(peer, submit={"concurrency": 8, "max_retries": 12})
    w.send(sweep(5000, id="big-sweep"))
    w.wait_until(lambda: completed(w) == 1, what="the sweep completed")
    (job,) = peer.jobs()
    assert sorted(t["id"] for t in peer.tasks(job.id)) == sorted(str(i) for i in range(5000))
    assert job.on_all_tasks_complete == "terminatejob"
    assert w.depth()["dead_letter"] == 0
    assert peer.outcomes["ok"] > 50 and sum(peer.outcomes.values()) > peer.outcomes["ok"]


def test_service_rejection_dead_letters_the_message(make_peer: MakePeer,
                                                    start_worker: StartWorker) -> None:
    """A task the service rejects dead-letters its message as ``BatchRejected`` with the
    service's code and message; other work goes on."""

    def rule(task: dict[str, Any]) -> PeerError | None:
        if "--samples 13 " in task["commandLine"]:
            return PeerError(400, "InvalidPropertyValue", "samples may not be 13")
        return None

    peer = make_peer(task_rule=rule)
    w = start_worker(peer)
    w.send(sweep(5, samples=13, id="unlucky"))
    w.send(sweep(5, id="fine"))
    w.wait_idle(2)
    (dead,) = w.dead_letters()
    assert dead.reason == "BatchRejected"
    assert "InvalidPropertyValue: samples may not be 13" in (dead.description or "")
    assert completed(w) == 1


def test_auth_failure_leaves_the_queue_intact(make_peer: MakePeer,
                                              start_worker: StartWorker) -> None:
    """With a refused key the worker goes unready and keeps every message; once the
    account accepts the key the messages complete."""
    peer = make_peer()
    rotated = "cm90YXRlZC1rZXktcm90YXRlZC1rZXk="
    w = start_worker(peer, key=rotated, queue={"max_delivery_count": 2})
    w.send(sweep(5, id="one"))
    w.send(sweep(5, id="two"))
    w.wait_until(lambda: not w.app.health.ready, what="unready")
    w.wait_until(lambda: peer.outcomes["auth_failed"] >= 4, what="several refused probes")
    assert w.depth()["dead_letter"] == 0
    assert peer.jobs() == []
    peer.key = rotated  # the operator rotates the account key to the one configured
    w.wait_until(lambda: completed(w) == 2, what="both messages completed")
    assert w.app.health.ready and w.depth()["dead_letter"] == 0
    assert len(peer.jobs()) == 2


def test_redelivered_message_adds_no_duplicates(make_peer: MakePeer,
                                                start_worker: StartWorker) -> None:
    """A delivery that added every task but failed to seal is abandoned; the next one
    finds every task existing, adds nothing twice and seals the job."""
    peer = make_peer(faults=FaultPlan(unavailable=1.0, operations=frozenset({"update_job"})))
    w = start_worker(peer, submit={"max_retries": 0})
    w.send(sweep(250, id="half-done"))
    w.wait_until(lambda: peer.requests["update_job", "unavailable"] >= 1, what="a failed seal")
    peer.set_faults(FaultPlan())
    w.wait_until(lambda: completed(w) == 1, what="completed on redelivery")
    (job,) = peer.jobs()
    assert len(peer.tasks(job.id)) == 250
    assert peer.task_outcomes["added"] == 250
    assert peer.task_outcomes["TaskExists"] >= 250
    assert w.sample("fanout_messages_total", {"handler": "sweep", "outcome": "abandoned"}) >= 1
    assert w.sample("fanout_tasks_existing_total", {"handler": "sweep"}) >= 250


def test_pool_and_job_metrics_come_from_the_peer(make_peer: MakePeer,
                                                 start_worker: StartWorker) -> None:
    """The poller fills pool nodes by state, pool sizes, active jobs and job task counts."""
    peer = make_peer()
    peer.add_pool("fanout", dedicated={"idle": 3, "running": 1},
                  low_priority={"preempted": 2}, target_dedicated=10)
    w = start_worker(peer)
    w.send(sweep(7, id="metrics"))
    w.wait_until(lambda: completed(w) == 1, what="the sweep completed")
    (job,) = peer.jobs()
    peer.set_task_state(job.id, "0", "running")

    def nodes(state: str) -> float:
        return w.sample("fanout_pool_nodes", {"pool": "fanout", "state": state})

    w.wait_until(lambda: w.sample("fanout_job_tasks", {"state": "running"}) == 1,
                 what="task counts polled")
    assert (nodes("idle"), nodes("running"), nodes("lowpriority_preempted")) == (3, 1, 2)
    assert w.sample("fanout_pool_size", {"pool": "fanout", "which": "target_dedicated"}) == 10
    assert w.sample("fanout_pool_size", {"pool": "fanout", "which": "current_dedicated"}) == 4
    assert w.sample("fanout_active_jobs") == 1
    assert w.sample("fanout_job_tasks", {"state": "active"}) == 6


def test_missing_pool_makes_the_worker_unready_until_it_exists(
        make_peer: MakePeer, start_worker: StartWorker) -> None:
    """The service would accept a job for a missing pool and its tasks would wait
    forever; the worker instead goes unready with a reason naming the pool, creates no
    job and keeps the message; once the pool exists the message completes."""
    peer = make_peer()
    peer.remove_pool("fanout")
    w = start_worker(peer)
    w.send(sweep(3, id="no-pool"))
    w.wait_until(lambda: not w.app.health.ready and "fanout" in w.app.health.reason,
                 what="unready naming the pool")
    assert "PoolNotFound" in w.app.health.reason
    w.wait_until(lambda: peer.requests["get_pool", "PoolNotFound"] >= 3,
                 what="the pool probed again")
    assert peer.jobs() == [] and w.depth()["dead_letter"] == 0
    peer.add_pool("fanout", dedicated={"idle": 1})
    w.wait_until(lambda: completed(w) == 1, what="completed once the pool exists")
    (job,) = peer.jobs()
    assert len(peer.tasks(job.id)) == 3 and w.app.health.ready
    assert peer.undocumented == []
