"""Spot preemption on the Batch peer: counts per job and per pool (metric, completion
event, ``fanout status``), and the dedicated-pool policy (worker/preemption.py).

The peer's ``preempt_task`` knob does what the service does to a task on a preempted
Spot node: the node enters ``preempted`` with the task in its ``recentTasks`` and the
task is requeued (active again) with its ``retryCount`` and ``requeueCount`` unchanged.
The monitors are polled by hand (no timers), two of them where replicas matter.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from azure.core.credentials import AzureNamedKeyCredential
from click.testing import CliRunner
from prometheus_client import CollectorRegistry

from handlers.base import JobSpec, TaskSpec
from tests.fakes.batch_peer import BatchPeer, Runner
from worker.backends.azure import AzureBatchBackend
from worker.backends.azure.wire import parse_duration
from worker.cli import main
from worker.config import EventsConfig, JobsConfig, PreemptionConfig, Settings
from worker.context import job_id_for
from worker.events import schema
from worker.metrics import Metrics
from worker.monitor import JobMonitor
from worker.preemption import PreemptionState, companion_id, summary

from ..harness import RunningWorker

POLICY = PreemptionConfig(max_per_task=2, dedicated_pool="cpu-dedicated")


class Sink:
    """Collects published events (the events queue's duplicate detection, by id)."""

    def __init__(self) -> None:
        self.events: dict[str, dict[str, Any]] = {}
        self.sent = 0

    async def publish(self, body: bytes, *, message_id: str, to: str | None = None,
                      properties: dict[str, Any] | None = None) -> None:
        self.sent += 1
        self.events.setdefault(message_id, json.loads(body))

    async def close(self) -> None:
        return None


def backend_for(peer: BatchPeer) -> AzureBatchBackend:
    return AzureBatchBackend(endpoint=peer.url,
                             credential=AzureNamedKeyCredential(peer.account, peer.key),
                             default_pool="fanout", connections=10)


def monitor_for(backend: AzureBatchBackend, sink: Sink | None = None,
                preemption: PreemptionConfig | None = None) -> JobMonitor:
    return JobMonitor(backend=backend, sink=sink,  # type: ignore[arg-type]
                      jobs=JobsConfig(lookback=timedelta(hours=1)),
                      events=EventsConfig(enabled=sink is not None),
                      metrics=Metrics(registry=CollectorRegistry()),
                      preemption=preemption or PreemptionConfig())


def submit(backend: AzureBatchBackend, job_id: str, tasks: int, *,
           dependencies: bool = False, wall_clock: timedelta | None = None) -> None:
    specs = [TaskSpec(id=str(i), command_line=f"python3 -c 'print({i})'",
                      environment={"SEED": str(i)}) for i in range(tasks)]
    if dependencies:
        specs.append(TaskSpec(id="aggregate", command_line="true",
                              depends_on_ranges=((0, tasks - 1),)))
    job = JobSpec(tasks=specs, task_count=len(specs), id=job_id, pool="fanout",
                  metadata={"fanout-handler": "sweep", "fanout-tasks": str(len(specs))},
                  uses_task_dependencies=dependencies, max_wall_clock=wall_clock)
    assert backend.create_job(job) == "created"
    backend.add_tasks(job_id, specs)
    backend.seal_job(job_id)


def poll(*monitors: JobMonitor) -> None:
    async def go() -> None:
        await asyncio.gather(*(m.poll() for m in monitors))
    asyncio.run(go())


def preempt(peer: BatchPeer, job_id: str, task_id: str, node: str | None = None) -> str:
    peer.set_task_state(job_id, task_id, "running")
    return peer.preempt_task(job_id, task_id, node)


def finish(peer: BatchPeer, job_id: str, *, exit_codes: dict[str, int] | None = None) -> None:
    job = peer.job(job_id)
    assert job is not None
    for task in list(job.tasks.values()):
        if task.state != "completed":
            peer.set_task_state(job_id, task.id, "completed",
                                exit_code=(exit_codes or {}).get(task.id, 0))


def state_of(peer: BatchPeer, job_id: str) -> PreemptionState:
    job = peer.job(job_id)
    assert job is not None
    return PreemptionState.load({m["name"]: m["value"] for m in job.body.get("metadata") or []})


@pytest.fixture
def spot_peer(make_peer: Any) -> BatchPeer:
    peer: BatchPeer = make_peer()
    peer.add_pool("fanout", dedicated={"idle": 1}, low_priority={"idle": 4})
    peer.add_pool("cpu-dedicated", dedicated={"idle": 2})
    return peer


def test_requeued_task_keeps_its_counters(spot_peer: BatchPeer) -> None:
    """What the peer's knob does, held to the spec: the task is active again, its
    retryCount and requeueCount unchanged (neither counts a preemption), and the node
    lists as preempted with the task in recentTasks; the pool counts follow."""
    backend = backend_for(spot_peer)
    try:
        submit(backend, "sweep-p0", 2)
        node = preempt(spot_peer, "sweep-p0", "1")
        task = spot_peer.task_json("sweep-p0", "1")
        assert task["state"] == "active"
        info = task["executionInfo"]
        assert (info["retryCount"], info["requeueCount"]) == (0, 0)
        (found,) = backend.preempted_tasks("fanout")
        assert (found.node_id, found.job_id, found.task_id, found.pool) == (
            node, "sweep-p0", "1", "fanout")
        assert backend.preempted_tasks("cpu-dedicated") == []
        stats = backend.stats()
        assert stats.pool_nodes["fanout", "lowpriority_preempted"] == 1
        spot_peer.restore_node("fanout", node)
        assert backend.preempted_tasks("fanout") == []
    finally:
        backend.close()
    assert spot_peer.undocumented == []


def test_counts_in_metric_event_and_status(spot_peer: BatchPeer, tmp_path: Path) -> None:
    """Task 1 preempted twice (two nodes), task 3 once: the job's metadata, the pool
    metric, ``fanout status JOB`` and the completion event count 3; a node still
    preempted at the next polls counts once; a job never preempted has no
    ``preemptions``."""
    backend = backend_for(spot_peer)
    sink = Sink()
    monitor = monitor_for(backend, sink)
    try:
        submit(backend, "sweep-p1", 4)
        submit(backend, "sweep-calm", 2)
        preempt(spot_peer, "sweep-p1", "1", "tvm-a")
        preempt(spot_peer, "sweep-p1", "3", "tvm-b")
        poll(monitor)
        poll(monitor)  # the same preempted nodes again: not counted twice
        preempt(spot_peer, "sweep-p1", "1", "tvm-c")
        poll(monitor)
        state = state_of(spot_peer, "sweep-p1")
        assert (state.total, state.tasks) == (3, {"1": 2, "3": 1})
        registry = monitor.metrics.registry
        assert registry.get_sample_value("fanout_tasks_preempted_total", {"pool": "fanout"}) == 3
        line = summary("sweep-p1", {"fanout-preemption": state.dump()})
        assert line == "3 preemptions (task 1: 2, task 3: 1)"
        config = tmp_path / "fanout.toml"
        config.write_text(f'home = "{tmp_path / "home"}"\n[batch]\naccount_url = "{spot_peer.url}"'
                          f'\naccount_name = "{spot_peer.account}"\npool = "fanout"\n')
        cli = CliRunner(env={"FANOUT_BATCH__ACCOUNT_KEY": spot_peer.key})
        shown = cli.invoke(main, ["--config", str(config), "status", "sweep-p1"])
        assert shown.exit_code == 0, shown.output
        assert "preempted 3 preemptions (task 1: 2, task 3: 1)" in shown.output
        calm = cli.invoke(main, ["--config", str(config), "status", "sweep-calm"])
        assert calm.exit_code == 0 and "preempted" not in calm.output
        finish(spot_peer, "sweep-p1")
        finish(spot_peer, "sweep-calm")
        poll(monitor)
    finally:
        backend.close()
    by_job = {e["subject"]: e for e in sink.events.values()}
    for event in by_job.values():
        jsonschema.validate(event, schema())
    data = by_job["sweep-p1"]["data"]
    assert data["outcome"] == "succeeded"
    assert data["preemptions"] == {"total": 3, "tasks": {"1": 2, "3": 1}, "tasks_omitted": 0,
                                   "moved": [], "companion_job": None, "companion_pool": None}
    assert "preemptions" not in by_job["sweep-calm"]["data"]
    assert spot_peer.undocumented == []


def test_budget_one_node_listing_per_pool(spot_peer: BatchPeer) -> None:
    """With counting on, a poll of 50 active jobs on one pool adds one request: the
    pool's preempted nodes, filtered and selected; no task is listed."""
    for i in range(50):
        spot_peer.seed_job(f"sweep-b{i}", tasks=10_000, on_all_tasks_complete="terminatejob",
                           counts={"active": 9000, "running": 1000},
                           metadata={"fanout-handler": "sweep"})
    backend = backend_for(spot_peer)
    monitor = monitor_for(backend)
    try:
        before = Counter(op for op, _ in spot_peer.log)
        poll(monitor)
        made = Counter(op for op, _ in spot_peer.log) - before
    finally:
        backend.close()
    assert made == Counter({"list_jobs": 1, "get_task_counts": 50, "list_nodes": 1})


def test_policy_moves_a_task_once_with_two_monitors(spot_peer: BatchPeer) -> None:
    """max_per_task = 2: task 2's second preemption moves it; two monitors polling at
    once end it in its job and copy it to the companion on the dedicated pool exactly
    once (same id, same command); the original's event waits for the companion, counts
    the moved task by its copy, and says what moved; the companion publishes nothing of
    its own and is marked reported."""
    backend_a, backend_b = backend_for(spot_peer), backend_for(spot_peer)
    sink = Sink()
    first = monitor_for(backend_a, sink, POLICY)
    second = monitor_for(backend_b, sink, POLICY)
    job_id = "sweep-p2"
    companion = companion_id(job_id)
    try:
        submit(backend_a, job_id, 4, wall_clock=timedelta(hours=2))
        preempt(spot_peer, job_id, "2", "tvm-a")
        poll(first, second)
        assert spot_peer.job(companion) is None  # one preemption: below the limit
        preempt(spot_peer, job_id, "2", "tvm-b")
        poll(first, second)
        poll(first, second)
        other = spot_peer.job(companion)
        assert other is not None and other.pool == "cpu-dedicated"
        # the companion gets what is left of the original's wall clock, not a fresh one
        left = parse_duration(other.body["constraints"]["maxWallClockTime"])
        assert left is not None and timedelta(hours=1) < left <= timedelta(hours=2)
        assert [t["id"] for t in spot_peer.tasks(companion)] == ["2"]
        copy = spot_peer.tasks(companion)[0]
        original = spot_peer.tasks(job_id)[2]
        assert copy["commandLine"] == original["commandLine"]
        assert copy["environmentSettings"] == original["environmentSettings"]
        assert spot_peer.requests["add_task_collection", "ok"] >= 2  # the original's, the copy's
        assert spot_peer.task(job_id, "2").state == "completed"  # ended in the original
        state = state_of(spot_peer, job_id)
        assert (state.moved, state.pending) == (["2"], [])
        # the rest of the original finishes; its event waits for the companion
        finish(spot_peer, job_id)
        poll(first, second)
        assert sink.events == {}
        job = spot_peer.job(companion)
        assert job is not None and job.on_all_tasks_complete == "terminatejob"
        finish(spot_peer, companion)
        poll(first, second)
        poll(first, second)
    finally:
        backend_a.close()
        backend_b.close()
    events = list(sink.events.values())
    assert [e["subject"] for e in events] == [job_id]
    data = events[0]["data"]
    jsonschema.validate(events[0], schema())
    assert data["outcome"] == "succeeded" and data["failed_tasks"] == []
    assert data["tasks"] == {"total": 4, "succeeded": 4, "failed": 0, "not_run": 0}
    assert data["preemptions"]["moved"] == ["2"]
    assert data["preemptions"]["companion_job"] == companion
    assert data["preemptions"]["companion_pool"] == "cpu-dedicated"
    assert data["preemptions"]["tasks"] == {"2": 2}
    companion_job = spot_peer.job(companion)
    assert companion_job is not None
    meta = {m["name"]: m["value"] for m in companion_job.body["metadata"]}
    assert meta["fanout-moved-from"] == job_id and "fanout-reported" in meta
    moved = sum(m.metrics.registry.get_sample_value(
        "fanout_tasks_moved_total", {"pool": "cpu-dedicated"}) or 0 for m in (first, second))
    assert moved == 1
    assert spot_peer.undocumented == []


def test_moved_task_that_fails_is_reported_as_failed(spot_peer: BatchPeer) -> None:
    """The copy exits 3 on the dedicated pool: the original's event is failed, lists
    task 3 once with the copy's exit code, and counts 1 failure, not 2."""
    backend = backend_for(spot_peer)
    sink = Sink()
    monitor = monitor_for(backend, sink, PreemptionConfig(max_per_task=1,
                                                          dedicated_pool="cpu-dedicated"))
    job_id = "sweep-p3"
    try:
        submit(backend, job_id, 4)
        preempt(spot_peer, job_id, "3")
        poll(monitor)
        finish(spot_peer, job_id)
        finish(spot_peer, companion_id(job_id), exit_codes={"3": 3})
        for _ in range(3):
            poll(monitor)
    finally:
        backend.close()
    (event,) = sink.events.values()
    data = event["data"]
    assert data["outcome"] == "failed"
    assert data["tasks"] == {"total": 4, "succeeded": 3, "failed": 1, "not_run": 0}
    assert [(f["task_id"], f["exit_code"]) for f in data["failed_tasks"]] == [("3", 3)]
    assert data["failed_tasks_omitted"] == 0


def test_job_with_dependencies_keeps_its_task(spot_peer: BatchPeer) -> None:
    """A job whose aggregate depends on its tasks cannot lose one (the aggregate would
    run, or block, on the ended task): the task is counted, kept, and runs on."""
    backend = backend_for(spot_peer)
    monitor = monitor_for(backend, None, PreemptionConfig(max_per_task=1,
                                                          dedicated_pool="cpu-dedicated"))
    try:
        submit(backend, "sweep-p4", 3, dependencies=True)
        preempt(spot_peer, "sweep-p4", "0")
        poll(monitor)
    finally:
        backend.close()
    state = state_of(spot_peer, "sweep-p4")
    assert (state.tasks, state.moved, state.kept) == ({"0": 1}, [], ["0"])
    assert spot_peer.job(companion_id("sweep-p4")) is None
    assert spot_peer.task("sweep-p4", "0").state == "active"


def test_companion_id_fits_batch_ids() -> None:
    assert companion_id("sweep-x") == "sweep-x-dp"
    long = "sweep-" + "a" * 58
    made = companion_id(long)
    assert len(made) == 64 and made.endswith("-dp") and made != companion_id(long[:-1] + "b")


def seed_state(peer: BatchPeer, job_id: str, state: PreemptionState) -> None:
    """The job's fanout-preemption as a replica killed midway left it."""
    job = peer.job(job_id)
    assert job is not None
    meta = [m for m in job.body.get("metadata") or [] if m["name"] != "fanout-preemption"]
    job.body["metadata"] = [*meta, {"name": "fanout-preemption", "value": state.dump()}]


def test_a_move_cut_short_after_the_terminate_is_finished(spot_peer: BatchPeer) -> None:
    """A replica wrote the intent, ended task 1 and died: the job has completed
    meanwhile (task 1 was its last), and the next poll, by another replica, copies the
    task, seals the companion and reports the job once the copy has run."""
    backend = backend_for(spot_peer)
    sink = Sink()
    monitor = monitor_for(backend, sink, POLICY)
    job_id = "sweep-p5"
    try:
        submit(backend, job_id, 3)
        spot_peer.set_task_state(job_id, "1", "running")
        seed_state(spot_peer, job_id, PreemptionState(total=2, tasks={"1": 2}, pending=["1"]))
        for task in ("0", "2"):
            spot_peer.set_task_state(job_id, task, "completed")
        backend._rest.call("POST", f"/jobs/{job_id}/tasks/1/terminate")
        job = spot_peer.job(job_id)
        assert job is not None and job.state == "completed"
        poll(monitor)
        assert [t["id"] for t in spot_peer.tasks(companion_id(job_id))] == ["1"]
        assert sink.events == {}
        finish(spot_peer, companion_id(job_id))
        poll(monitor)
        poll(monitor)
    finally:
        backend.close()
    (event,) = sink.events.values()
    assert event["data"]["outcome"] == "succeeded"
    assert event["data"]["tasks"]["succeeded"] == 3
    assert event["data"]["preemptions"]["moved"] == ["1"]
    assert state_of(spot_peer, job_id).pending == []


def test_a_cancelled_original_ends_its_companion(spot_peer: BatchPeer) -> None:
    """The original is cancelled while its moved task runs on the dedicated pool: the
    companion is terminated with the same reason and the one event says cancelled."""
    backend = backend_for(spot_peer)
    sink = Sink()
    monitor = monitor_for(backend, sink, PreemptionConfig(max_per_task=1,
                                                          dedicated_pool="cpu-dedicated"))
    job_id = "sweep-p6"
    try:
        submit(backend, job_id, 2)
        preempt(spot_peer, job_id, "0")
        poll(monitor)
        spot_peer.set_task_state(companion_id(job_id), "0", "running")
        backend.terminate_job(job_id, "FanoutCancelled")
        poll(monitor)
        other = spot_peer.job(companion_id(job_id))
        assert other is not None and other.state == "completed"
        assert other.terminate_reason == "FanoutCancelled"
        poll(monitor)
    finally:
        backend.close()
    (event,) = sink.events.values()
    assert event["data"]["outcome"] == "cancelled"
    assert event["data"]["preemptions"]["moved"] == ["0"]
    assert event["subject"] == job_id


def test_the_worker_counts_preemptions_by_default() -> None:
    """Settings turn counting on (the app's monitor gets ``[preemption]``); moving stays
    off until both keys are set."""
    from worker.config import Settings

    settings = Settings()
    assert settings.preemption.count and not settings.preemption.moves
    with pytest.raises(ValueError, match="set together"):
        PreemptionConfig(dedicated_pool="cpu-dedicated")


def test_the_whole_worker_moves_a_preempted_task(
        spot_peer: BatchPeer, make_settings: Callable[..., Settings]) -> None:
    """The worker on the peer in runner mode: a 4-task sweep (no aggregate), task 1
    preempted while it runs; with max_per_task = 1 the monitor moves it to the
    dedicated pool, where it runs and succeeds; the one event says so and the metrics
    count it."""
    spot_peer.set_runner(Runner(delay=1.0))
    settings = make_settings(
        backend={"kind": "azure"},
        batch={"account_url": spot_peer.url, "account_name": spot_peer.account,
               "pool": "fanout", "poll_interval": 0.5},
        consumer={"receive_wait": 0.2, "unready_backoff": 0.1},
        jobs={"poll_interval": 0.2},
        preemption={"max_per_task": 1, "dedicated_pool": "cpu-dedicated"})
    w = RunningWorker(settings, backend=backend_for(spot_peer)).start()
    try:
        w.send({"handler": "sweep", "id": "spot-1", "params": {
            "program": "pi", "parameters": {"samples": [10], "seed": {"start": 0, "stop": 4}}}})
        job_id = job_id_for("sweep", "spot-1")
        w.wait_until(lambda: spot_peer.job(job_id) is not None
                     and "1" in {t["id"] for t in spot_peer.tasks(job_id)}
                     and spot_peer.task(job_id, "1").state == "running",
                     what="task 1 running")
        spot_peer.preempt_task(job_id, "1")
        data = w.wait_event(job_id)["data"]
        assert data["outcome"] == "succeeded"
        assert data["tasks"] == {"total": 4, "succeeded": 4, "failed": 0, "not_run": 0}
        assert data["preemptions"]["moved"] == ["1"]
        assert data["preemptions"]["companion_pool"] == "cpu-dedicated"
        copy = spot_peer.task(companion_id(job_id), "1")
        assert copy.state == "completed" and copy.result == "success"
        assert w.sample("fanout_tasks_preempted_total", {"pool": "fanout"}) == 1
        assert w.sample("fanout_tasks_moved_total", {"pool": "cpu-dedicated"}) == 1
        assert [e["subject"] for e in w.events()] == [job_id]
    finally:
        w.stop()
