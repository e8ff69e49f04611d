"""Tests for the submitter: chunking, concurrency, retries, idempotency."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence

import pytest
from prometheus_client import CollectorRegistry

from handlers.base import JobSpec, TaskSpec
from worker.backends.base import AddResult
from worker.config import SubmitConfig
from worker.errors import BatchRejected, SystemFault
from worker.metrics import Metrics
from worker.submit import Cancelled, Submitter

from .doubles import MemoryBackend


def make_job(n: int, job_id: str = "job-1") -> JobSpec:
    def tasks() -> Iterator[TaskSpec]:
        for i in range(n):
            yield TaskSpec(id=str(i), command_line=f"echo {i}")
    return JobSpec(tasks=tasks(), task_count=n, id=job_id)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(registry=CollectorRegistry())


def submitter(backend: MemoryBackend, metrics: Metrics, **config: float) -> Submitter:
    cfg = SubmitConfig.model_validate({"backoff_base": 0.001, "backoff_max": 0.01, **config})
    return Submitter(backend=backend, config=cfg, metrics=metrics)


def test_all_tasks_added_once_in_chunks(metrics: Metrics) -> None:
    """5,050 tasks go in 51 requests of at most 100, then the job is sealed."""
    backend = MemoryBackend()
    result = submitter(backend, metrics).submit(make_job(5050), handler="sweep")
    assert result.added == 5050 and result.existed == 0
    assert len(backend.tasks["job-1"]) == 5050
    assert backend.add_calls == 51
    assert "job-1" in backend.sealed
    assert metrics.registry.get_sample_value(
        "fanout_tasks_submitted_total", {"handler": "sweep"}) == 5050


def test_requests_run_concurrently_within_the_bound(metrics: Metrics) -> None:
    """Several add requests are in flight at once, never more than configured."""
    backend = MemoryBackend()
    inner = backend.add_tasks
    lock = threading.Lock()
    now = [0]
    peak = [0]

    def add(job_id: str, tasks: Sequence[TaskSpec]) -> AddResult:
        with lock:
            now[0] += 1
            peak[0] = max(peak[0], now[0])
        time.sleep(0.02)
        with lock:
            now[0] -= 1
        return inner(job_id, tasks)

    backend.add_tasks = add  # type: ignore[method-assign]
    submitter(backend, metrics, concurrency=3).submit(make_job(2000), handler="sweep")
    assert peak[0] == 3


def record_threads(backend: MemoryBackend) -> list[int]:
    """The ident of the thread each of ``backend``'s add requests ran on."""
    inner = backend.add_tasks
    threads: list[int] = []

    def add(job_id: str, tasks: Sequence[TaskSpec]) -> AddResult:
        threads.append(threading.get_ident())
        return inner(job_id, tasks)

    backend.add_tasks = add  # type: ignore[method-assign]
    return threads


def test_a_job_of_one_request_is_added_in_the_calling_thread(metrics: Metrics) -> None:
    """A job whose tasks fit in one request skips the pool; its retries, counts and
    metrics are as a pooled chunk's."""
    backend = MemoryBackend(fail_rate=0.3, task_error_rate=0.1, seed=3)
    threads = record_threads(backend)
    result = submitter(backend, metrics, max_retries=30).submit(make_job(100),
                                                                handler="sweep")
    assert set(threads) == {threading.get_ident()}
    assert result.added == 100 and len(backend.tasks["job-1"]) == 100
    assert result.requests == len(threads) > 1  # it was retried
    assert metrics.registry.get_sample_value(
        "fanout_tasks_submitted_total", {"handler": "sweep"}) == 100
    assert "job-1" in backend.sealed


def test_a_job_of_several_requests_is_added_on_the_pool(metrics: Metrics) -> None:
    """A job of more than one request keeps its requests on the pool's threads."""
    backend = MemoryBackend()
    threads = record_threads(backend)
    submitter(backend, metrics).submit(make_job(101), handler="sweep")
    assert len(threads) == 2 and threading.get_ident() not in threads


def test_a_one_request_job_yielding_more_than_declared_fails(metrics: Metrics) -> None:
    """A job declared to fit in one request whose handler yields more is not sealed."""
    job = make_job(150)
    job.task_count = 100
    backend = MemoryBackend()
    with pytest.raises(RuntimeError, match="more than the 100"):
        submitter(backend, metrics).submit(job, handler="sweep")
    assert "job-1" not in backend.sealed


def test_transient_faults_are_retried_to_exactly_once(metrics: Metrics) -> None:
    """With 30% of calls failing and 10% of tasks busy, every task lands once."""
    backend = MemoryBackend(fail_rate=0.3, task_error_rate=0.1, seed=3)
    result = submitter(backend, metrics, max_retries=30).submit(make_job(3000),
                                                                handler="sweep")
    assert len(backend.tasks["job-1"]) == 3000
    assert result.added == 3000
    assert result.retries > 0
    assert metrics.registry.get_sample_value("fanout_submit_retries_total") == result.retries


def test_retries_are_bounded(metrics: Metrics) -> None:
    """A backend that always fails exhausts the retries and raises SystemFault."""
    backend = MemoryBackend(fail_rate=1.0)
    with pytest.raises(SystemFault):
        submitter(backend, metrics, max_retries=3).submit(make_job(10), handler="sweep")


def test_resubmission_is_idempotent(metrics: Metrics) -> None:
    """Submitting the same job again adds nothing; a sealed job is skipped."""
    backend = MemoryBackend()
    sub = submitter(backend, metrics)
    backend.create_job(make_job(0))  # an earlier delivery created it...
    sub.submit(make_job(300), handler="sweep")
    assert len(backend.tasks["job-1"]) == 300
    again = sub.submit(make_job(300), handler="sweep")
    assert again.already_sealed and again.added == 0
    assert len(backend.tasks["job-1"]) == 300


def test_partial_submission_then_redelivery(metrics: Metrics) -> None:
    """A crash mid-submit leaves some tasks; redelivery adds only the rest."""
    backend = MemoryBackend()
    backend.create_job(make_job(0))
    first = list(make_job(250).tasks)[:120]
    backend.add_tasks("job-1", first[:100])
    backend.add_tasks("job-1", first[100:])
    result = submitter(backend, metrics).submit(make_job(250), handler="sweep")
    assert (result.added, result.existed) == (130, 120)
    assert len(backend.tasks["job-1"]) == 250


def test_rejected_task_raises_batch_rejected(metrics: Metrics) -> None:
    """A task the backend rejects as invalid stops the submission with BatchRejected."""
    backend = MemoryBackend()
    backend.reject_ids = {"42"}
    with pytest.raises(BatchRejected, match="42"):
        submitter(backend, metrics).submit(make_job(200), handler="sweep")
    assert "job-1" not in backend.sealed


def test_cancel_interrupts(metrics: Metrics) -> None:
    """A set cancel event stops the submission before it adds more."""
    backend = MemoryBackend()
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        submitter(backend, metrics).submit(make_job(500), handler="sweep", cancel=cancel)
    assert "job-1" not in backend.sealed


def test_handler_count_mismatch_is_an_error(metrics: Metrics) -> None:
    """A handler yielding fewer tasks than it declared fails instead of sealing."""
    job = make_job(10)
    job.task_count = 11
    backend = MemoryBackend()
    with pytest.raises(RuntimeError, match="declared 11"):
        submitter(backend, metrics).submit(job, handler="sweep")
    assert "job-1" not in backend.sealed


def test_a_rejected_task_terminates_the_job_it_created(metrics: Metrics) -> None:
    """A submission that stops for good leaves no active job: it is terminated."""
    backend = MemoryBackend()
    backend.reject_ids = {"150"}
    with pytest.raises(BatchRejected):
        submitter(backend, metrics).submit(make_job(300), handler="sweep")
    assert backend.terminated == [("job-1", "FanoutSubmitFailed")]
    assert "job-1" not in backend.sealed
    assert metrics.registry.get_sample_value(
        "fanout_jobs_terminated_total", {"reason": "FanoutSubmitFailed"}) == 1


def test_a_transient_fault_leaves_the_job_for_the_redelivery(metrics: Metrics) -> None:
    """A system fault that outlasts the retries does not terminate: the redelivery
    adds the rest of the tasks to the same job."""
    backend = MemoryBackend()

    def unavailable(job_id: str, tasks: Sequence[TaskSpec]) -> AddResult:
        raise SystemFault("injected 503")

    backend.add_tasks = unavailable  # type: ignore[method-assign]
    with pytest.raises(SystemFault):
        submitter(backend, metrics, max_retries=1).submit(make_job(10), handler="sweep")
    assert backend.terminated == []


def test_same_key_with_another_request_is_a_conflict(metrics: Metrics) -> None:
    """The job exists with another request hash: IdempotencyConflict names the job."""
    from worker.errors import IdempotencyConflict

    backend = MemoryBackend()
    first = make_job(5)
    first.metadata["fanout-request"] = "aaaa"
    submitter(backend, metrics).submit(first, handler="sweep")
    again = make_job(5)
    again.metadata["fanout-request"] = "aaaa"
    assert submitter(backend, metrics).submit(again, handler="sweep").already_sealed
    other = make_job(5)
    other.metadata["fanout-request"] = "bbbb"
    with pytest.raises(IdempotencyConflict, match="job-1 already exists"):
        submitter(backend, metrics).submit(other, handler="sweep")
