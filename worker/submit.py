"""JobSpec -> backend: job lifecycle, chunking, bounded concurrency, retries.

The submitter streams a job's lazy task iterator in chunks (never all tasks in
memory), keeps a bounded number of add-task requests in flight on a thread pool,
and retries transient faults with exponential backoff and full jitter, up to a
bound. Submission is idempotent: the job id and task ids are derived, and
"already exists" counts as success, so a message delivered twice or a worker
killed mid-submit ends with one job and one copy of each task.

Lifecycle (docs/azure-batch.md): create the job with on-all-tasks-complete = no
action, add every task, then seal it (terminate when all tasks complete). A job an
earlier delivery already sealed has every task: nothing is added again.

A window job (:class:`worker.window.WindowJob`: one event's share of a route's job per
window) is different: it is created if absent and never sealed here (the job monitor
seals it once its window has passed), "already sealed" does not mean "every task is
there", and a submission that stops does not terminate it (other events' tasks are in
it). When the window job has completed before the event's tasks were added, the event
runs in a job of its own, the one its route makes without a window; an event whose
tasks are all in the completed window job already is done.

Every job ends: a submission that stops for good (the service rejects a task, the
handler yields a bad task) terminates the job it created (``FanoutSubmitFailed``), so
it never holds one of the account's active-job slots; the job monitor then reports it
as ``failed``. A job that exists already was built from the same request, or the
message is an ``IdempotencyConflict`` (the request hash kept in the job's metadata).
"""

from __future__ import annotations

import contextvars
import itertools
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TypeVar

import structlog
from opentelemetry.trace import SpanKind

from handlers.base import JobSpec, TaskSpec
from worker.backends.base import META_REQUEST, REASON_SUBMIT_FAILED, AddResult, Backend
from worker.config import SubmitConfig
from worker.errors import BatchRejected, ConfigFault, IdempotencyConflict, SystemFault
from worker.metrics import Metrics
from worker.tracing import Tracing
from worker.window import WindowJob, window_task_ids

log = structlog.get_logger(__name__)
T = TypeVar("T")


class Cancelled(SystemFault):
    """Raised when a shutdown interrupts a submission; the message is abandoned."""


@dataclass(slots=True)
class SubmitResult:
    """What one job's submission did."""

    job_id: str
    added: int = 0
    existed: int = 0
    requests: int = 0
    retries: int = 0
    already_sealed: bool = False
    seconds: float = 0.0
    #: The window job the event's tasks went to (or, with ``late``, were bound for).
    window_job: str | None = None
    #: The window job had completed: the event ran in a job of its own (``job_id``).
    late: bool = False


class Submitter:
    """Submits jobs to one backend; safe to use from several threads at once."""

    def __init__(self, *, backend: Backend, config: SubmitConfig, metrics: Metrics,
                 rng: Callable[[], float] = random.random,
                 tracing: Tracing | None = None) -> None:
        self.backend = backend
        self.config = config
        self.metrics = metrics
        self.tracing = tracing or Tracing.off()
        self._rng = rng
        self._pool = ThreadPoolExecutor(max_workers=config.concurrency,
                                        thread_name_prefix="fanout-submit")

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def submit(self, job: JobSpec, *, handler: str,
               cancel: threading.Event | None = None) -> SubmitResult:
        """Create, fill and seal ``job``; raise a fault that says what to do with the
        message (``SystemFault``: abandon, ``BatchRejected``: dead-letter, ...).

        Traced as ``fanout.submit``, whose context the job's metadata and every task's
        ``TRACEPARENT`` carry (worker/tracing.py)."""
        with self.tracing.span("fanout.submit", kind=SpanKind.PRODUCER, attributes={
                "fanout.job.id": job.id, "fanout.handler": handler,
                "fanout.job.pool": job.pool, "fanout.job.task_count": job.task_count,
                "fanout.job.window": isinstance(job, WindowJob)}) as span:
            self.tracing.stamp(job)
            result = self._submit(job, handler, cancel)
            if self.tracing.enabled:
                span.set_attributes({
                    "fanout.tasks.added": result.added, "fanout.tasks.existed": result.existed,
                    "fanout.submit.requests": result.requests,
                    "fanout.submit.retries": result.retries,
                    "fanout.job.already_sealed": result.already_sealed})
            return result

    def _submit(self, job: JobSpec, handler: str,
                cancel: threading.Event | None) -> SubmitResult:
        stop = cancel or threading.Event()
        if isinstance(job, WindowJob):
            return self._submit_window(job, handler, stop)
        started = time.monotonic()
        result = SubmitResult(job_id=job.id)
        state = self._retrying(lambda: self.backend.create_job(job), stop, result)
        if state != "created":
            self._check_same_request(job, stop, result)
        if state == "sealed":
            result.already_sealed = True
            result.existed = job.task_count
            log.info("job.already_sealed", job_id=job.id, tasks=job.task_count)
            return result
        try:
            self._add_all(job, handler, stop, result)
            self._retrying(lambda: self.backend.seal_job(job.id), stop, result)
        except (SystemFault, ConfigFault):
            raise  # a redelivery goes on where this one stopped
        except Exception as exc:
            self._terminate(job.id, exc)
            raise
        result.seconds = time.monotonic() - started
        self.metrics.submit_seconds.labels(handler).observe(result.seconds)
        log.info("job.submitted", job_id=job.id, tasks=job.task_count, pool=job.pool,
                 added=result.added, existed=result.existed, requests=result.requests,
                 retries=result.retries, seconds=round(result.seconds, 3))
        return result

    def _submit_window(self, job: WindowJob, handler: str,
                       stop: threading.Event) -> SubmitResult:
        """Add one event's tasks to its window's job, created if absent, never sealed."""
        started = time.monotonic()
        result = SubmitResult(job_id=job.id, window_job=job.id)
        state = self._retrying(lambda: self.backend.create_job(job), stop, result)
        if state != "created":
            self._check_same_request(job, stop, result)
        try:
            # a sealed window job still takes tasks until it completes
            self._add_all(job, handler, stop, result)
        except BatchRejected as exc:
            if exc.reason != "JobCompleted":
                raise  # the message is dead-lettered; the window job goes on
            return self._late(job, handler, stop, result)
        result.seconds = time.monotonic() - started
        self.metrics.submit_seconds.labels(handler).observe(result.seconds)
        log.info("job.submitted", job_id=job.id, tasks=job.task_count, pool=job.pool,
                 window=True, state=state, added=result.added, existed=result.existed,
                 requests=result.requests, retries=result.retries,
                 seconds=round(result.seconds, 3))
        return result

    def _late(self, job: WindowJob, handler: str, stop: threading.Event,
              result: SubmitResult) -> SubmitResult:
        """The window job completed before this event's tasks were all added: done if
        they are all in it (an earlier delivery added them), else the event's own job."""
        assert job.fallback is not None and job.window is not None
        ids = window_task_ids(job.fallback().tasks, job.prefix)
        present = self._retrying(lambda: self.backend.existing_tasks(job.id, ids),
                                 stop, result)
        if len(present) == len(ids):
            result.existed = len(ids)
            log.info("window.tasks_present", job_id=job.id, tasks=len(ids),
                     event_id=job.window.event_id)
            return result
        own = job.fallback()
        log.warning("window.late_event", window_job=job.id, job_id=own.id,
                    event_id=job.window.event_id, blob=job.window.blob,
                    seal_at=job.window.seal_at.isoformat(), present=len(present),
                    note="the window job had completed: the event runs in a job of its own"
                    + ("; some of its tasks ran in the window job" if present else ""))
        own_result = self.submit(own, handler=handler, cancel=stop)
        own_result.window_job = job.id
        own_result.late = True
        own_result.requests += result.requests
        own_result.retries += result.retries
        return own_result

    def _check_same_request(self, job: JobSpec, stop: threading.Event,
                            result: SubmitResult) -> None:
        """``IdempotencyConflict`` when the existing job came from another request."""
        wanted = job.metadata.get(META_REQUEST)
        existing = self._retrying(lambda: self.backend.get_job(job.id), stop, result)
        had = existing.metadata.get(META_REQUEST) if existing is not None else None
        if wanted and had and had != wanted:
            raise IdempotencyConflict(
                f"job {job.id} already exists for this idempotency key, built from a "
                f"different request (request hash {had}, this message's {wanted}); "
                "send it with a new id to run it as a new job")

    def _terminate(self, job_id: str, cause: BaseException) -> None:
        """End a job whose submission stopped for good; never raises."""
        try:
            self.backend.terminate_job(job_id, REASON_SUBMIT_FAILED)
        except Exception as exc:  # the job's wall clock still ends it
            log.warning("job.terminate_failed", job_id=job_id, error=str(exc),
                        note="the job's max wall clock ends it")
            return
        self.metrics.jobs_terminated.labels(REASON_SUBMIT_FAILED).inc()
        log.warning("job.terminated", job_id=job_id, reason=REASON_SUBMIT_FAILED,
                    cause=f"{type(cause).__name__}: {cause}"[:300])

    def _add_all(self, job: JobSpec, handler: str, stop: threading.Event,
                 result: SubmitResult) -> None:
        size = min(self.config.chunk_size, self.backend.max_tasks_per_request)
        in_flight: set[Future[AddResult]] = set()
        limit = self.config.concurrency
        count = 0
        try:
            for chunk in _chunks(job.tasks, size):
                if stop.is_set():
                    raise Cancelled("shutdown interrupted the submission")
                count += len(chunk)
                if count > job.task_count:
                    raise RuntimeError(f"the handler yielded more than the {job.task_count} "
                                       "tasks it declared")
                if job.task_count <= size:
                    # the whole job is one request: added here, not handed to the pool
                    # and waited for (a hop and a wait cost more than a small add)
                    self._tally(self._add_chunk(job.id, chunk, stop, result), handler,
                                result)
                    continue
                if len(in_flight) >= limit:
                    in_flight = self._collect(in_flight, handler, result, FIRST_COMPLETED)
                ctx = contextvars.copy_context()
                in_flight.add(self._pool.submit(ctx.run, self._add_chunk, job.id, chunk,
                                                stop, result))
            if in_flight:
                self._collect(in_flight, handler, result, None)
        except BaseException:
            stop_others = [f for f in in_flight if not f.done()]
            for fut in stop_others:
                fut.cancel()
            wait(stop_others)
            raise
        if count != job.task_count:
            raise RuntimeError(f"the handler declared {job.task_count} tasks but yielded "
                               f"{count}")

    def _collect(self, futures: set[Future[AddResult]], handler: str,
                 result: SubmitResult, until: str | None) -> set[Future[AddResult]]:
        done, pending = wait(futures, return_when=until or "ALL_COMPLETED")
        for fut in done:
            self._tally(fut.result(), handler, result)  # re-raises the chunk's fault
        return set(pending)

    def _tally(self, added: AddResult, handler: str, result: SubmitResult) -> None:
        """Count one chunk's added and existing tasks in the result and the metrics."""
        result.added += added.added
        result.existed += added.existed
        self.metrics.tasks_submitted.labels(handler).inc(added.added)
        self.metrics.tasks_existing.labels(handler).inc(added.existed)

    def _add_chunk(self, job_id: str, chunk: Sequence[TaskSpec], stop: threading.Event,
                   result: SubmitResult) -> AddResult:
        """Add one chunk, retrying what failed transiently; raise on anything else."""
        total = AddResult()
        pending = chunk
        for attempt in range(self.config.max_retries + 1):
            if attempt:
                result.retries += 1
                self.metrics.submit_retries.inc()
            try:
                result.requests += 1
                added = self.backend.add_tasks(job_id, pending)
            except SystemFault as fault:
                self.metrics.submit_requests.labels("transient_error").inc()
                if attempt == self.config.max_retries:
                    raise
                self._backoff(attempt, fault.retry_after, stop)
                continue
            except BatchRejected:
                self.metrics.submit_requests.labels("rejected").inc()
                raise
            total.added += added.added
            total.existed += added.existed
            fatal = [e for e in added.errors if not e.transient]
            if fatal:
                self.metrics.submit_requests.labels("rejected").inc()
                first = fatal[0]
                raise BatchRejected(f"task {first.task_id}: {first.code}: {first.message}"
                                    + (f" (and {len(fatal) - 1} more)" if len(fatal) > 1
                                       else ""))
            retry_ids = {e.task_id for e in added.errors}
            self.metrics.submit_requests.labels("ok" if not retry_ids else "partial").inc()
            if not retry_ids:
                return total
            pending = [t for t in pending if t.id in retry_ids]
            if attempt < self.config.max_retries:
                self._backoff(attempt, None, stop)
        raise SystemFault(f"{len(pending)} tasks still failing after "
                          f"{self.config.max_retries} retries")

    def _retrying(self, call: Callable[[], T], stop: threading.Event,
                  result: SubmitResult) -> T:
        for attempt in range(self.config.max_retries + 1):
            try:
                return call()
            except SystemFault as fault:
                if attempt == self.config.max_retries:
                    raise
                result.retries += 1
                self.metrics.submit_retries.inc()
                self._backoff(attempt, fault.retry_after, stop)
        raise AssertionError("unreachable")

    def _backoff(self, attempt: int, retry_after: float | None, stop: threading.Event) -> None:
        """Sleep with full jitter, at least ``retry_after``; wake early on shutdown."""
        cap = min(self.config.backoff_max, self.config.backoff_base * 2 ** attempt)
        delay = max(cap * self._rng(), retry_after or 0.0)
        if stop.wait(min(delay, self.config.backoff_max)):
            raise Cancelled("shutdown interrupted the submission")


def _chunks(tasks: Iterable[TaskSpec], size: int) -> Iterator[list[TaskSpec]]:
    it = iter(tasks)
    while chunk := list(itertools.islice(it, size)):
        yield chunk
