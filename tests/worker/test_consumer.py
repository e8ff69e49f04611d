"""Tests for the consumer: settlement by outcome, idempotency, faults, renewal, drain."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

from handlers.base import JobSpec, TaskSpec
from worker.backends.base import AddResult, JobState
from worker.config import Settings
from worker.errors import ConfigFault, SystemFault
from worker.sources.local import LocalQueue

from .doubles import MemoryBackend
from .harness import RunningWorker

SWEEP = {"handler": "sweep", "params": {"program": "pi", "parameters": {
    "samples": [100], "seed": {"start": 0, "stop": 20}}}}


@pytest.fixture
def worker(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., RunningWorker]]:
    """Start workers with a MemoryBackend (or a given one); stop them after the test."""
    started: list[RunningWorker] = []

    def start(backend: Any = None, **overrides: Any) -> RunningWorker:
        overrides.setdefault("consumer", {})
        overrides["consumer"] = {"receive_wait": 0.2, "unready_backoff": 0.1,
                                 **overrides["consumer"]}
        overrides["submit"] = {"backoff_base": 0.001, "backoff_max": 0.01,
                               **overrides.get("submit", {})}
        running = RunningWorker(make_settings(**overrides),
                                backend=backend or MemoryBackend()).start()
        started.append(running)
        return running

    yield start
    for running in started:
        if running.thread.is_alive():
            running.stop()


def test_sweep_message_becomes_one_job(worker: Callable[..., RunningWorker]) -> None:
    """A 20-task sweep is submitted, sealed, completed and counted."""
    w = worker()
    w.send(SWEEP)
    w.wait_idle(1)
    backend = w.app.backend
    assert isinstance(backend, MemoryBackend)
    (job_id,) = backend.jobs
    assert len(backend.tasks[job_id]) == 20 and job_id in backend.sealed
    assert w.depth()["active"] == 0
    assert w.sample("fanout_messages_total", {"handler": "sweep", "outcome": "completed"}) == 1
    assert w.sample("fanout_tasks_submitted_total", {"handler": "sweep"}) == 20


POISON: list[tuple[bytes, str]] = [
    (b"not json", "InvalidJson"),
    (b"", "InvalidJson"),
    (b"\x00\x01\x02", "InvalidJson"),
    (b"[1, 2]", "InvalidEnvelope"),
    (b'{"params": {}}', "InvalidEnvelope"),
    (b'{"handler": "nope", "params": {}}', "UnknownHandler"),
    (json.dumps({"handler": "sweep", "params": {"program": "rm", "parameters": {
        "x": [1]}}}).encode(), "UnknownProgram"),
    (json.dumps({"handler": "sweep", "params": {"program": "pi", "parameters": {
        "samples": {"start": 0, "stop": 10, "step": 0}, "seed": [1]}}}).encode(),
     "InvalidParams"),
    (json.dumps({"handler": "sweep", "params": {"program": "pi", "parameters": {
        "samples": {"start": 0, "stop": 1000}, "seed": {"start": 0, "stop": 1000}}}}).encode(),
     "BudgetExceeded"),
    (json.dumps({"handler": "sweep", "job": {"priority": 999}, "params": {
        "program": "pi", "parameters": {"samples": [1], "seed": [1]}}}).encode(),
     "BudgetExceeded"),
]


def test_bad_messages_are_dead_lettered_and_work_goes_on(
        worker: Callable[..., RunningWorker]) -> None:
    """Each bad input lands in the DLQ with its reason; a good message still runs after."""
    w = worker(limits={"max_priority": 100})
    for body, _ in POISON:
        w.send(body)
    w.send(SWEEP)
    w.wait_idle(len(POISON) + 1)
    dead = {d.message_id: d for d in w.dead_letters()}
    assert len(dead) == len(POISON)
    reasons = sorted(d.reason or "" for d in dead.values())
    assert reasons == sorted(reason for _, reason in POISON)
    assert all(d.description for d in dead.values())
    assert w.sample("fanout_messages_total", {"handler": "sweep", "outcome": "completed"}) == 1
    assert w.sample("fanout_dead_letters_total", {"reason": "InvalidJson"}) == 3


def test_same_message_twice_makes_one_job(worker: Callable[..., RunningWorker]) -> None:
    """Two deliveries of one idempotency key end with one job and one copy of each task."""
    w = worker(consumer={"concurrency": 2})
    body = {**SWEEP, "id": "nightly-42"}
    w.send(body)
    w.send(body)
    w.wait_idle(2)
    backend = w.app.backend
    assert isinstance(backend, MemoryBackend)
    assert len(backend.jobs) == 1
    (tasks,) = backend.tasks.values()
    assert len(tasks) == 20


def test_system_fault_abandons_then_succeeds(worker: Callable[..., RunningWorker]) -> None:
    """A transient failure abandons the message; the redelivery completes it."""
    backend = MemoryBackend()
    calls = {"n": 0}
    create = backend.create_job

    def flaky(job: JobSpec) -> JobState:
        calls["n"] += 1
        if calls["n"] == 1:
            raise SystemFault("503 from the service")
        return create(job)

    backend.create_job = flaky  # type: ignore[method-assign]
    w = worker(backend, submit={"max_retries": 0})
    w.send(SWEEP)
    w.wait_idle(2)
    assert w.sample("fanout_messages_total", {"handler": "sweep", "outcome": "abandoned"}) == 1
    assert w.sample("fanout_messages_total", {"handler": "sweep", "outcome": "completed"}) == 1
    assert len(backend.sealed) == 1


def test_persistent_fault_ends_in_max_delivery(worker: Callable[..., RunningWorker]) -> None:
    """A message that fails every delivery is dead-lettered as MaxDeliveryExceeded."""
    w = worker(MemoryBackend(fail_rate=1.0), submit={"max_retries": 0},
               queue={"max_delivery_count": 3})
    w.send(SWEEP)
    w.wait_until(lambda: w.depth()["dead_letter"] == 1, what="dead letter")
    (dead,) = w.dead_letters()
    assert dead.reason == "MaxDeliveryExceeded"
    assert "injected 503" in (dead.description or "")


def test_config_fault_keeps_the_message_and_marks_unready(
        worker: Callable[..., RunningWorker]) -> None:
    """Auth refused: the worker goes unready, the message is not dead-lettered, and it
    completes once the fault is fixed."""
    backend = MemoryBackend()
    backend.config_fault = ConfigFault("403 AuthenticationFailed", code="AuthFailed")
    w = worker(backend, queue={"max_delivery_count": 2})
    for _ in range(3):
        w.send(SWEEP)
    w.wait_until(lambda: not w.app.health.ready, what="unready")
    time.sleep(1.0)  # many backoff cycles: nothing may be dead-lettered meanwhile
    assert w.depth()["dead_letter"] == 0
    assert w.sample("fanout_ready") == 0
    backend.config_fault = None
    w.wait_until(lambda: w.depth()["active"] == 0, what="queue drained")
    assert w.app.health.ready
    assert w.depth()["dead_letter"] == 0
    assert len(backend.sealed) == 3


def test_lock_is_renewed_during_long_work(worker: Callable[..., RunningWorker]) -> None:
    """Work lasting 3x the lock duration completes once, with no redelivery."""
    backend = MemoryBackend(create_delay=3.0)
    w = worker(backend, queue={"lock_duration": 1.0}, consumer={"concurrency": 2})
    w.send(SWEEP)
    w.wait_idle(1, timeout=20)
    assert w.sample("fanout_messages_total", {"handler": "sweep", "outcome": "completed"}) == 1
    assert w.sample("fanout_lock_lost_total") == 0
    assert w.depth()["active"] == 0


def test_shutdown_abandons_unfinished_work_within_grace(
        worker: Callable[..., RunningWorker]) -> None:
    """Stopping during a submission that outlasts the grace abandons the message: it is
    back on the queue, not lost, and the worker stopped within the grace period."""
    backend = MemoryBackend(add_delay=0.3)
    big = {"handler": "sweep", "params": {"program": "pi", "parameters": {
        "samples": [1], "seed": {"start": 0, "stop": 5000}}}}
    w = worker(backend, consumer={"drain_grace": 1.0}, submit={"concurrency": 1})
    w.send(big)
    w.wait_until(lambda: backend.add_calls > 0, what="submission started")
    started = time.monotonic()
    w.stop()
    assert time.monotonic() - started < 1.0 + 5.0
    assert reopened_depth(w) == {"active": 1, "dead_letter": 0, "scheduled": 0}


def reopened_depth(w: RunningWorker) -> dict[str, int]:
    """The queue's depth read through a fresh LocalQueue on the same file."""
    queue = LocalQueue(path=w.app.settings.home / "queue.db")

    async def read() -> dict[str, int]:
        try:
            return await queue.depth()
        finally:
            await queue.close()

    return asyncio.run(read())


def test_health_endpoints(worker: Callable[..., RunningWorker]) -> None:
    """/healthz, /readyz and /metrics answer on the metrics port."""
    w = worker()
    port = w.app.metrics_port
    # Ready once the backend and the queue have each been probed (at start).
    w.wait_until(lambda: w.app.health.ready, what="the first probes")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz") as resp:
        assert resp.status == 200
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz") as resp:
        assert resp.status == 200
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as resp:
        text = resp.read().decode()
    assert "fanout_inflight_messages" in text
    w.app.health.set_ready(False, "testing")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz")
    assert info.value.code == 503


def test_event_loop_stays_free_while_100k_tasks_are_built(
        worker: Callable[..., RunningWorker]) -> None:
    """Building and submitting 100,000 tasks (CPU-bound, in a worker thread) does not
    starve the loop: the 1 s lock is renewed throughout and the message completes once."""
    backend = MemoryBackend()
    inner = backend.add_tasks

    def cpu_bound(job_id: str, tasks: Sequence[TaskSpec]) -> AddResult:
        until = time.perf_counter() + 0.004  # pure-Python work holding the GIL, as
        while time.perf_counter() < until:   # serializing a request body does
            pass
        return inner(job_id, tasks)

    backend.add_tasks = cpu_bound  # type: ignore[method-assign]
    w = worker(backend, queue={"lock_duration": 1.0}, submit={"concurrency": 2})
    w.send({"handler": "sweep", "params": {"program": "pi", "parameters": {
        "samples": {"start": 1, "stop": 1001}, "seed": {"start": 0, "stop": 100}}}})
    beats: list[float] = []

    def beat_then_handled() -> bool:
        beats.append(w.app.health.since_beat())
        return w.app.consumer.handled >= 1

    w.wait_until(beat_then_handled, timeout=120, what="100k sweep handled")
    (tasks,) = backend.tasks.values()
    assert len(tasks) == 100_000
    assert w.sample("fanout_messages_total", {"handler": "sweep", "outcome": "completed"}) == 1
    assert w.sample("fanout_lock_lost_total") == 0
    assert max(beats) < w.app.settings.consumer.heartbeat_timeout


def test_same_key_different_params_is_dead_lettered_as_a_conflict(
        worker: Callable[..., RunningWorker]) -> None:
    """A second message with the key of an existing job but other params is an
    IdempotencyConflict naming that job; the first job keeps its 20 tasks."""
    w = worker()
    w.send({**SWEEP, "id": "nightly-7"})
    w.wait_idle(1)
    other = json.loads(json.dumps(SWEEP))
    other["params"]["parameters"]["samples"] = [200]
    w.send({**other, "id": "nightly-7"})
    w.wait_idle(2)
    (dead,) = w.dead_letters()
    backend = w.app.backend
    assert isinstance(backend, MemoryBackend)
    (job_id,) = backend.jobs
    assert dead.reason == "IdempotencyConflict" and job_id in (dead.description or "")
    assert len(backend.tasks[job_id]) == 20


def test_cancel_message_terminates_the_job(worker: Callable[..., RunningWorker]) -> None:
    """{"cancel": <job id>} terminates that job as cancelled; an unknown job is
    dead-lettered as UnknownJob."""
    w = worker()
    w.send({**SWEEP, "id": "to-cancel"})
    w.wait_idle(1)
    backend = w.app.backend
    assert isinstance(backend, MemoryBackend)
    (job_id,) = backend.jobs
    w.send({"cancel": job_id})
    w.send({"cancel": {"id": "to-cancel", "handler": "sweep"}})
    w.send({"cancel": "no-such-job"})
    w.wait_idle(4)
    assert backend.terminated == [(job_id, "FanoutCancelled")]
    (dead,) = w.dead_letters()
    assert dead.reason == "UnknownJob"


def test_unready_until_the_backend_probes_well_at_start(
        worker: Callable[..., RunningWorker]) -> None:
    """A backend whose probe fails (a wrong key) keeps /readyz unready from the start,
    before any message, with the reason; fixing it makes the worker ready."""
    backend = MemoryBackend()
    backend.config_fault = ConfigFault("the account key was refused", code="AuthFailed")
    w = worker(backend=backend)
    w.wait_until(lambda: "AuthFailed" in w.app.health.reason, what="the probe's reason")
    assert not w.app.health.ready
    backend.config_fault = None
    w.wait_until(lambda: w.app.health.ready, what="ready after the fix")


def test_source_probe_failure_keeps_the_worker_unready(
        worker: Callable[..., RunningWorker]) -> None:
    """Readiness needs the source's probe too: while it raises ConfigFault the worker
    stays unready although the backend probes well."""
    w = worker()
    w.wait_until(lambda: w.app.health.ready, what="ready at start")
    source = w.app.source
    calls = []

    async def refused() -> None:
        calls.append(1)
        raise ConfigFault("queue 'fanout' requires sessions", code="SessionRequired")

    original = source.probe
    source.probe = refused  # type: ignore[method-assign]
    # As a receive's ConfigFault would (on the worker's loop).
    w.loop.call_soon_threadsafe(w.app.consumer._set_ready, False, "testing")
    w.wait_until(lambda: len(calls) >= 2, what="probed twice")
    assert not w.app.health.ready and "SessionRequired" in w.app.health.reason
    source.probe = original  # type: ignore[method-assign]
    w.wait_until(lambda: w.app.health.ready, what="ready again")


def test_the_idempotency_key_property_wins_over_the_message_id(
        worker: Callable[..., RunningWorker]) -> None:
    """A resubmitted copy (new message id, original id in fanout-idempotency-key) of an
    envelope without "id" maps to the job of the original message id."""
    from worker.context import job_id_for

    w = worker()
    w.send(SWEEP, message_id="copy-1", properties={"fanout-idempotency-key": "orig-1"})
    w.wait_idle(1)
    backend = w.app.backend
    assert isinstance(backend, MemoryBackend)
    assert list(backend.jobs) == [job_id_for("sweep", "orig-1")]


class _HangsOnce(LocalQueue):
    """A queue whose first receive never answers (a half-open connection)."""

    hung = 0

    async def receive(self, max_messages: int, max_wait: float) -> list[Any]:
        if self.hung == 0:
            self.hung += 1
            await asyncio.Event().wait()
        return await super().receive(max_messages, max_wait)


def test_a_receive_that_never_answers_is_given_up_and_the_loop_goes_on(
        worker: Callable[..., RunningWorker], make_settings: Callable[..., Settings],
        monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """A receive past its bound is cancelled and counts as a failed receive; the loop
    receives again and handles the message."""
    monkeypatch.setattr("worker.consumer.SETTLE_TIMEOUT", 0.2)
    monkeypatch.setattr("worker.consumer.RECEIVE_ERROR_BACKOFF", 0.05)
    queue = _HangsOnce(path=tmp_path / "hangs.db")
    running = RunningWorker(make_settings(consumer={"receive_wait": 0.1, "concurrency": 1}),
                            backend=MemoryBackend(), source=queue).start()
    try:
        running.send(SWEEP)
        running.wait_idle(1)
        assert queue.hung == 1
        assert running.sample("fanout_messages_total",
                              {"handler": "sweep", "outcome": "completed"}) == 1
    finally:
        running.stop()
