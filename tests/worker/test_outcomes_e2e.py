"""Every job ends and is reported: the whole worker on the embedded default.

The real daemon (SQLite queue, local executor, local events queue) runs sweeps whose
tasks really exit non-zero, sleep past their wall clock or get cancelled; each test
reads the completion events back from the events queue, validates them against the
shipped JSON Schema and checks what they say.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from handlers.base import BuildContext, BuildRequest, JobSpec, TaskSpec
from worker.config import Settings
from worker.routing import HandlerRegistry

from .harness import RunningWorker

PY = sys.executable
#: Exits 1 for seed 3 (after writing to stderr), 0 otherwise.
FLAKY = (f"{PY} -c \"import sys; s = sys.argv[1]; print('seed', s); "
         f"sys.stderr.write('boom on seed ' + s + chr(10)); sys.exit(1 if s == '3' else 0)\" "
         "{seed}")
#: The aggregate: proves it ran by what it prints, and sees which inputs exist.
AGGREGATE = f"{PY} -c \"import os; print('aggregate over', os.environ['FANOUT_FAN_IN_RANGE'])\""


def sweep(stop: int = 6, *, policy: str | None = None, key: str, **job: Any) -> dict[str, Any]:
    aggregate: dict[str, Any] = {"program": "agg"}
    if policy:
        aggregate["on_dependency_failure"] = policy
    body: dict[str, Any] = {"handler": "sweep", "id": key, "params": {
        "program": "flaky", "parameters": {"seed": {"start": 0, "stop": stop}},
        "aggregate": aggregate}}
    if job:
        body["job"] = job
    return body


@pytest.fixture
def worker(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., RunningWorker]]:
    started: list[RunningWorker] = []

    def start(handlers: HandlerRegistry | None = None, **overrides: Any) -> RunningWorker:
        settings = make_settings(
            programs={"flaky": {"command": FLAKY}, "agg": {"command": AGGREGATE},
                      "nap": {"command": "sleep {seconds}"}},
            consumer={"receive_wait": 0.2}, local={"slots": 2, "poll_interval": 0.05},
            jobs={"poll_interval": 1.0}, **overrides)
        running = RunningWorker(settings, handlers=handlers).start()
        started.append(running)
        return running

    yield start
    for running in started:
        if running.thread.is_alive():
            running.stop()


def job_of(w: RunningWorker, key: str) -> str:
    from worker.context import job_id_for

    return job_id_for("sweep", key)


def test_a_failed_task_ends_the_job_and_the_aggregate_still_runs(
        worker: Callable[..., RunningWorker]) -> None:
    """Seed 3 exits 1: the aggregate runs anyway (on_dependency_failure = run), the job
    ends, and one event says failed, naming task 3 with its exit code and stderr."""
    w = worker()
    w.send(sweep(key="agg-run"))
    job_id = job_of(w, "agg-run")
    event = w.wait_event(job_id)
    data = event["data"]
    assert data["outcome"] == "failed" and data["handler"] == "sweep"
    assert data["idempotency_key"] == "agg-run" and data["job_id"] == job_id
    assert data["tasks"] == {"total": 7, "succeeded": 6, "failed": 1, "not_run": 0}
    (failed,) = data["failed_tasks"]
    assert failed["task_id"] == "3" and failed["exit_code"] == 1
    assert failed["category"] == "exit_code"
    assert "boom on seed 3" in failed["stderr_tail"]
    stdout = (w.app.settings.home / "tasks" / job_id / "aggregate" / "stdout.txt").read_text()
    assert stdout.strip() == "aggregate over 0-5"
    assert w.sample("fanout_jobs_completed_total",
                    {"handler": "sweep", "outcome": "failed"}) == 1
    assert w.sample("fanout_tasks_failed_total",
                    {"handler": "sweep", "category": "exit_code"}) == 1


def test_with_skip_the_blocked_aggregate_makes_the_monitor_end_the_job(
        worker: Callable[..., RunningWorker]) -> None:
    """on_dependency_failure = skip: the aggregate never runs; the monitor finds it
    blocked for good and terminates the job, reported failed."""
    w = worker()
    w.send(sweep(key="agg-skip", policy="skip"))
    job_id = job_of(w, "agg-skip")
    data = w.wait_event(job_id)["data"]
    assert data["outcome"] == "failed" and data["terminate_reason"] == "FanoutBlocked"
    by_id = {f["task_id"]: f for f in data["failed_tasks"]}
    assert by_id["3"]["category"] == "exit_code"
    assert by_id["aggregate"]["category"] == "dependency_failed"
    assert data["tasks"]["not_run"] == 1
    assert not (w.app.settings.home / "tasks" / job_id / "aggregate").exists()


def test_all_tasks_succeed(worker: Callable[..., RunningWorker]) -> None:
    """Seeds 0..2 never fail: outcome succeeded, no failed tasks, one event only."""
    w = worker()
    w.send(sweep(3, key="all-good"))
    job_id = job_of(w, "all-good")
    data = w.wait_event(job_id)["data"]
    assert data["outcome"] == "succeeded" and data["failed_tasks"] == []
    assert data["tasks"] == {"total": 4, "succeeded": 4, "failed": 0, "not_run": 0}
    time.sleep(2.5)  # two more monitor polls: still one event for the job
    assert [e["subject"] for e in w.events()].count(job_id) == 1


def test_a_job_past_its_wall_clock_is_timed_out(worker: Callable[..., RunningWorker]) -> None:
    """A job's max wall clock (from its message, within the operator's limit) ends it
    while its task sleeps; the event says timed_out."""
    w = worker()
    w.send({"handler": "sweep", "id": "slow", "job": {"max_wall_clock": "PT2S"},
            "params": {"program": "nap", "parameters": {"seconds": [60]}}})
    job_id = job_of(w, "slow")
    data = w.wait_event(job_id)["data"]
    assert data["outcome"] == "timed_out"
    assert data["terminate_reason"] == "MaxWallClockTimeExpiry"
    assert data["duration_seconds"] < 30


def test_a_cancel_message_ends_a_running_job_as_cancelled(
        worker: Callable[..., RunningWorker]) -> None:
    """{"cancel": {"id", "handler"}} stops the running task; the event says cancelled."""
    w = worker()
    w.send({"handler": "sweep", "id": "to-cancel",
            "params": {"program": "nap", "parameters": {"seconds": [60, 61, 62]}}})
    job_id = job_of(w, "to-cancel")
    backend = w.app.backend
    w.wait_until(lambda: (c := backend.task_counts(job_id)) is not None and c.running > 0)
    w.send({"cancel": {"id": "to-cancel", "handler": "sweep"}})
    data = w.wait_event(job_id, timeout=30)["data"]
    assert data["outcome"] == "cancelled" and data["terminate_reason"] == "FanoutCancelled"
    assert data["duration_seconds"] < 30
    assert {f["category"] for f in data["failed_tasks"]} <= {"cancelled"}


class _BadMidway:
    """A handler whose 150th task has an id Batch refuses: the job is left partial."""

    def build(self, request: BuildRequest, ctx: BuildContext) -> JobSpec:
        def tasks() -> Iterator[TaskSpec]:
            for i in range(300):
                yield TaskSpec(id="bad id!" if i == 150 else str(i), command_line="true")
        return JobSpec(tasks=tasks(), task_count=300)


def test_a_submission_rejected_midway_leaves_no_active_job(
        worker: Callable[..., RunningWorker]) -> None:
    """The backend refuses a task after 100 were added: the message is dead-lettered
    as BatchRejected and the partial job is terminated and reported failed."""
    w = worker(handlers=HandlerRegistry({"bad": _BadMidway()}))
    w.send({"handler": "bad", "id": "partial"})
    from worker.context import job_id_for

    job_id = job_id_for("bad", "partial")
    data = w.wait_event(job_id)["data"]
    assert data["outcome"] == "failed" and data["terminate_reason"] == "FanoutSubmitFailed"
    (dead,) = w.dead_letters()
    assert dead.reason == "BatchRejected"
    record = w.app.backend.get_job(job_id)
    assert record is not None and record.state == "completed"
