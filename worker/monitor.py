"""The job monitor: the second loop. It follows every job fanout created to its end.

A peer of the consumer, not part of it: it reads the backend and writes events, and
never touches messages. Each poll (the backend section's ``monitor_interval``: on
Azure by default ``jobs.poll_interval``):

1. one listing of fanout's jobs (a ``$filter``ed, ``$select``ed page per 1,000 jobs on
   Azure; on the local executor pages of 1,000 too, each followed through steps 2 to 4
   before the next is read, so a backlog of queued jobs does not raise the poll's peak
   memory): every job not yet completed, and the completed ones whose state changed
   within ``jobs.lookback`` (every ``jobs.full_sweep_interval``: every completed one);
   a window job (a route's job per window, worker/window.py) whose time to be sealed
   has come is sealed: one task-counts request, its count kept in ``fanout-tasks``,
   then the seal (several replicas may do it at once: harmless);
2. per active job, one task-counts request; when no task runs, some failed and some
   are still active, one look at the active tasks: if every one is blocked by a
   failed dependency the job can never end by itself, so it is terminated
   (``FanoutBlocked``, outcome ``failed``);
3. per completed job without the ``fanout-reported`` marker: its final counts (read
   after the job is terminal: counts are eventually consistent), its failed tasks
   (one filtered listing, only when the counts show failures) with their stderr
   tails, then one completion event, then the marker patched onto the job;
4. in a full sweep, reported jobs whose end lies ``jobs.retention`` back are deleted,
   at most ``jobs.delete_batch`` a poll; a sweep that reached that bound makes the
   next poll a full sweep too, so deletions keep up with a busy account.

Steps 2 to 4 run ``jobs.monitor_concurrency`` jobs at a time, each in a thread of the
monitor's own pool: a burst of completed jobs costs a few requests each in sequence
(counts, usage, marker), so one job at a time a thousand of them would take minutes
of round trips. Each job's own steps stay in order: its event is published before its
marker is written. The deletion bound is reserved before each delete, so jobs in
flight together never exceed it.

State lives in the jobs, not here: any replica can report any job, and one killed
mid-report leaves the job to the next poll of any replica. Events therefore go out at
least once; their id derives from the job id and is the Service Bus message id, so
the events queue's duplicate detection drops repeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import structlog

from worker.backends.base import (
    META_HANDLER,
    META_MOVED_FROM,
    META_REPLY_TO,
    META_REPORTED,
    META_SEAL_AT,
    META_TASKS,
    META_WINDOW,
    REASON_ALL_COMPLETE,
    REASON_BLOCKED,
    REASON_SUBMIT_FAILED,
    Backend,
    FailedTask,
    JobRecord,
    TaskCounts,
)
from worker.config import CostConfig, EventsConfig, JobsConfig, PreemptionConfig
from worker.cost import JobCost, price, tags_of
from worker.errors import ConfigFault, SystemFault
from worker.events import JobReport, build_event, encode, event_id, outcome_of
from worker.handoff import LoopThreads
from worker.logs import redact
from worker.metrics import Metrics
from worker.preemption import Preemptions
from worker.sinks.base import EventSink
from worker.tracing import META_TRACEPARENT, Tracing, context_of, current_span
from worker.window import seal_due

log = structlog.get_logger(__name__)

#: How long after a job's end its counts may still be settling (Batch's task counts
#: are eventually consistent); a job ended by "all tasks complete" whose counts still
#: show unfinished tasks is re-read on the next poll until this has passed.
COUNTS_SETTLE = timedelta(minutes=2)

#: Jobs per page on a backend that lists in pages (``list_fanout_jobs_page``: the
#: local executor), as Azure's listing returns 1,000-job pages.
PAGE = 1000

_T = TypeVar("_T")


@dataclass(slots=True)
class PollResult:
    """What one poll did, for logs and tests."""

    listed: int = 0
    active: int = 0
    reported: list[str] = field(default_factory=list)
    terminated: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    sealed: list[str] = field(default_factory=list)
    requests: Counter[str] = field(default_factory=Counter)
    errors: int = 0


class JobMonitor:
    """Polls the backend for fanout's jobs; terminates, reports and deletes them."""

    def __init__(self, *, backend: Backend, sink: EventSink | None, jobs: JobsConfig,
                 events: EventsConfig, metrics: Metrics, interval: float | None = None,
                 tracing: Tracing | None = None,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 cost: CostConfig | None = None,
                 preemption: PreemptionConfig | None = None) -> None:
        self.backend = backend
        #: ``[cost]``: whether and how a terminal job's usage is read and priced.
        self.cost = cost if cost is not None else CostConfig()
        self.sink = sink if events.enabled else None
        self.jobs = jobs
        self.events = events
        self.metrics = metrics
        self.tracing = tracing or Tracing.off()
        self.interval = interval if interval is not None else jobs.poll_interval
        self._clock = clock
        self._last_full: float | None = None
        self._stopping = asyncio.Event()
        #: The threads backend calls run in (``jobs.monitor_concurrency``), started on
        #: first use; the monitor's own, not the consumer's.
        self._threads = LoopThreads(jobs.monitor_concurrency, "fanout-monitor")
        #: Request counts are kept from worker threads too (:func:`collect_failed`).
        self._counting = threading.Lock()
        #: ``[preemption]``: counting preempted tasks and moving them (None: neither).
        self.preemption = (Preemptions(backend=backend, config=preemption, metrics=metrics,
                                       call=self._call)
                           if preemption is not None and preemption.count else None)

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """Poll until ``stop()`` (or cancelled); a failed poll is logged and counted."""
        try:
            await self._run()
        finally:
            self._threads.stop()

    async def _run(self) -> None:
        # Replicas start together on a rollout: a random first delay spreads their polls.
        await self._sleep(random.uniform(0, min(self.interval, 5.0)))
        while not self._stopping.is_set():
            started = time.monotonic()
            try:
                result = await self.poll()
                if result.reported or result.terminated or result.deleted or result.sealed:
                    log.info("monitor.poll", listed=result.listed, active=result.active,
                             reported=len(result.reported), terminated=len(result.terminated),
                             sealed=len(result.sealed),
                             deleted=len(result.deleted), requests=sum(result.requests.values()))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.metrics.monitor_errors.inc()
                log.warning("monitor.poll_failed", error=_describe(exc),
                            retry_in=self.interval)
            await self._sleep(max(0.0, self.interval - (time.monotonic() - started)))

    async def poll(self) -> PollResult:
        """One poll over every job of fanout's (see the module docstring)."""
        result = PollResult()
        now = self._clock()
        full = self._last_full is None or (
            time.monotonic() - self._last_full >= self.jobs.full_sweep_interval.total_seconds())
        since = None if full else now - self.jobs.lookback
        paged = getattr(self.backend, "list_fanout_jobs_page", None)
        if paged is None:
            records = await self._call(result, "list_jobs", self.backend.list_fanout_jobs,
                                       completed_since=since)
            after: int | None = None
        else:
            records, after = await self._call(result, "list_jobs", paged,
                                              completed_since=since, after=0, limit=PAGE)
        if full:
            self._last_full = time.monotonic()
        unreported = await self._follow_page(records, now, full, result)
        while paged is not None and after is not None:
            del records  # the followed page goes before the next is read
            records, after = await self._call(result, "list_jobs", paged,
                                              completed_since=since, after=after, limit=PAGE)
            unreported += await self._follow_page(records, now, full, result)
        if len(result.deleted) >= self.jobs.delete_batch:
            self._last_full = None  # more may be due: the next poll sweeps again
        self.metrics.jobs_monitored.set(unreported)
        return result

    async def _follow_page(self, records: list[JobRecord], now: datetime, full: bool,
                           result: PollResult) -> int:
        """Preemptions, then every job's step, for one listing (or page of it);
        returns how many of its jobs are still unreported."""
        result.listed += len(records)
        if self.preemption is not None:
            try:
                await self.preemption.poll(records, result)
            except (SystemFault, ConfigFault, OSError) as exc:
                result.errors += 1
                self.metrics.monitor_errors.inc()
                log.warning("monitor.preemption_failed", error=_describe(exc))
        return await self._follow_all(records, now, full, result)

    async def _follow_all(self, records: list[JobRecord], now: datetime, full: bool,
                          result: PollResult) -> int:
        """Every job's step, ``jobs.monitor_concurrency`` at a time (workers taking the
        next job as they finish one); returns how many are still unreported. A job's
        failure is its own; anything else ends the poll, the other workers cancelled."""
        pending = iter(records)
        counted = [0]
        workers = min(self.jobs.monitor_concurrency, len(records))
        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(workers):
                    group.create_task(self._follow_each(pending, now, full, result, counted))
        except BaseExceptionGroup as grouped:
            raise grouped.exceptions[0] from None
        return counted[0]

    async def _follow_each(self, pending: Iterator[JobRecord], now: datetime, full: bool,
                           result: PollResult, counted: list[int]) -> None:
        """One worker of :meth:`_follow_all`: the shared iterator hands each job out once."""
        for job in pending:
            try:
                counted[0] += await self._follow(job, now, full, result)
            except (SystemFault, ConfigFault, OSError) as exc:
                result.errors += 1
                self.metrics.monitor_errors.inc()
                log.warning("monitor.job_failed", job_id=job.id, error=_describe(exc))

    async def _follow(self, job: JobRecord, now: datetime, full: bool,
                      result: PollResult) -> int:
        """One job's step; returns 1 while the job is still unreported."""
        if job.state != "completed":
            result.active += 1
            if not job.sealed and META_SEAL_AT in job.metadata:
                await self._seal_window(job, now, result)
            await self._check_active(job, result)
            return 1
        if META_REPORTED not in job.metadata:
            if META_MOVED_FROM in job.metadata:
                return 1  # a companion: its original reports for both and marks it
            return 0 if await self._report(job, now, result) else 1
        if full and len(result.deleted) < self.jobs.delete_batch:
            ended = job.end_time or job.state_changed
            if ended is not None and now - ended >= self.jobs.retention:
                await self._delete(job, ended, result)
        return 0

    async def _delete(self, job: JobRecord, ended: datetime, result: PollResult) -> None:
        """Delete a reported job past retention. Its place in ``result.deleted`` is
        taken before the request, so deletions in flight together keep to
        ``jobs.delete_batch``; a failed one gives its place back."""
        result.deleted.append(job.id)
        try:
            await self._call(result, "delete_job", self.backend.delete_job, job.id)
        except BaseException:
            result.deleted.remove(job.id)
            raise
        self.metrics.jobs_deleted.inc()
        log.info("monitor.job_deleted", job_id=job.id, ended=ended.isoformat())

    async def _seal_window(self, job: JobRecord, now: datetime, result: PollResult) -> None:
        """Seal a window job whose window (plus its seal delay) has passed.

        Its task count goes into ``fanout-tasks`` first, so the report waits for final
        counts that add up at least to it (a late event may still add tasks to the
        sealed job while it runs; Batch's counts are eventually consistent)."""
        if job.state != "active" or not seal_due(job.metadata, job.created, now):
            return
        counts = await self._call(result, "task_counts", self.backend.task_counts, job.id)
        if counts is None:
            return  # deleted meanwhile
        marked = {**job.metadata, META_TASKS: str(counts.total)}
        await self._call(result, "update_metadata", self.backend.update_job_metadata,
                         job.id, marked)
        await self._call(result, "seal_job", self.backend.seal_job, job.id)
        job.metadata, job.sealed = marked, True
        result.sealed.append(job.id)
        log.info("monitor.window_sealed", job_id=job.id, tasks=counts.total,
                 window=job.metadata.get(META_WINDOW))

    async def _check_active(self, job: JobRecord, result: PollResult) -> None:
        """Terminate the job when every task still to run is blocked for good."""
        if job.state != "active" or not job.sealed:
            return  # terminating, disabled, or still being filled by its submitter
        counts = await self._call(result, "task_counts", self.backend.task_counts, job.id)
        if counts is None or counts.running or not counts.failed or not counts.active:
            return
        if counts.active > self.jobs.blocked_check_limit:
            return
        blocked = await self._call(result, "blocked_tasks", self.backend.blocked_tasks,
                                   job.id, self.jobs.blocked_check_limit)
        if blocked is None or len(blocked) < counts.active:
            return
        await self._call(result, "terminate_job", self.backend.terminate_job, job.id,
                         REASON_BLOCKED)
        result.terminated.append(job.id)
        self.metrics.jobs_terminated.labels(REASON_BLOCKED).inc()
        log.warning("monitor.job_blocked", job_id=job.id, blocked=blocked[:10],
                    failed=counts.failed,
                    detail="every remaining task waits on a failed dependency; terminated")

    async def _report(self, job: JobRecord, now: datetime, result: PollResult) -> bool:
        """Publish the job's event and mark it reported; False to try again later.

        Traced as ``fanout.monitor.report``, a child of the job's submit span (its
        ``fanout-traceparent``), so the report ends the message's trace and the event
        it publishes carries that trace on (worker/tracing.py)."""
        if not self.tracing.enabled:
            return await self._report_job(job, now, result)
        with self.tracing.span("fanout.monitor.report",
                               parent=context_of(job.metadata.get(META_TRACEPARENT)),
                               attributes={"fanout.job.id": job.id,
                                           "fanout.handler": job.metadata.get(META_HANDLER),
                                           "fanout.job.state": job.state}) as span:
            reported = await self._report_job(job, now, result)
            span.set_attribute("fanout.job.reported", reported)
            return reported

    async def _report_job(self, job: JobRecord, now: datetime, result: PollResult) -> bool:
        counts = await self._call(result, "task_counts", self.backend.task_counts, job.id)
        if counts is None:
            return True  # deleted meanwhile: nothing left to report on
        ended = job.end_time or job.state_changed or now
        if not settled(job, counts) and now - ended < COUNTS_SETTLE:
            return False  # the job is terminal but its counts have not caught up yet
        failed = await self._failed(job, counts, result)
        fold = None
        if self.preemption is not None:
            # a job whose tasks moved to the dedicated pool waits for its companion and
            # reports the moved tasks as their copies ended (worker/preemption.py)
            fold = await self.preemption.fold(job, counts, failed, result,
                                              limit=self.events.max_failed_tasks,
                                              tail_bytes=self.events.stderr_tail_bytes)
            if fold is None:
                return False
            counts, failed = fold.counts, fold.failed
        usage = await self._usage(job, counts, result)
        report = JobReport(job=job, counts=counts, failed=failed, usage=usage,
                           preemptions=fold.data if fold is not None else None)
        event = build_event(report, source=self.events.source, now=now)
        if not await self._publish(job, event):
            return False
        if fold is not None and self.preemption is not None:
            await self.preemption.reported(fold, event["id"], result)
        marked = {**job.metadata, META_REPORTED: event["id"]}
        await self._call(result, "update_metadata", self.backend.update_job_metadata,
                         job.id, marked)
        self._count(job, counts, failed, ended)
        self._count_cost(job, usage)
        result.reported.append(job.id)
        current_span().set_attribute("fanout.job.outcome", event["data"]["outcome"])
        log.info("monitor.job_reported", job_id=job.id, outcome=event["data"]["outcome"],
                 failed=counts.failed, event_id=event["id"])
        return True

    async def _failed(self, job: JobRecord, counts: TaskCounts,
                      result: PollResult) -> list[FailedTask]:
        """The failed tasks an event lists (see :func:`collect_failed`)."""
        return await self._in_thread(
            collect_failed, self.backend, job, counts, limit=self.events.max_failed_tasks,
            tail_bytes=self.events.stderr_tail_bytes,
            count=lambda operation: self._count_request(result, operation))

    async def _usage(self, job: JobRecord, counts: TaskCounts,
                     result: PollResult) -> JobCost | None:
        """The job's usage and estimated cost (worker/cost.py), read once at its report:
        one listing of its completed tasks (a page per 1,000, counted as
        ``usage_tasks``), none with ``cost.node_seconds = "off"``, for a job with more
        than ``cost.max_tasks_listed`` completed tasks, or on a backend without
        ``job_usage``."""
        read = getattr(self.backend, "job_usage", None)
        if self.cost.node_seconds == "off" or read is None:
            return None
        if counts.completed > self.cost.max_tasks_listed:
            log.info("monitor.usage_skipped", job_id=job.id, completed=counts.completed,
                     limit=self.cost.max_tasks_listed, why="cost.max_tasks_listed")
            return None
        for _ in range(max(1, -(-counts.completed // 1000))):
            self._count_request(result, "usage_tasks")
        # the backend reads a pool's shape once for callers in flight together
        usage = await self._in_thread(read, job.id, job.pool)
        return price(usage, self.cost) if usage is not None else None

    def _count_cost(self, job: JobRecord, usage: JobCost | None) -> None:
        """Node-seconds and cost, labelled by handler and the allowed cost tags."""
        if usage is None:
            return
        handler = job.metadata.get(META_HANDLER, "unknown")
        tags = tags_of(job.metadata)
        labels = [handler, *(tags.get(key, "") for key in self.metrics.cost_tags)]
        if usage.node_seconds is not None:
            self.metrics.job_node_seconds.labels(*labels).inc(usage.node_seconds)
        if usage.estimated_cost is not None:
            self.metrics.job_cost.labels(*labels).inc(usage.estimated_cost)

    async def _publish(self, job: JobRecord, event: dict[str, Any]) -> bool:
        """Send the event to the configured destination and an allowed reply-to."""
        if self.sink is None:
            return True
        body = encode(event)
        props = {"job_id": job.id, "outcome": event["data"]["outcome"]}
        targets: list[tuple[str, str | None]] = [("configured", None)]
        reply_to = job.metadata.get(META_REPLY_TO)
        if reply_to and reply_to in self.events.allowed_reply_to:
            targets.append(("reply_to", reply_to))
        for kind, to in targets:
            try:
                await self.sink.publish(body, message_id=event_id(job.id), to=to,
                                        properties=props)
            except (SystemFault, ConfigFault, OSError) as exc:
                self.metrics.event_publish_errors.inc()
                log.warning("monitor.publish_failed", job_id=job.id, to=to or "configured",
                            error=_describe(exc), note="retried on the next poll")
                return False
            self.metrics.events_published.labels(kind).inc()
        return True

    def _count(self, job: JobRecord, counts: TaskCounts, failed: list[FailedTask],
               ended: datetime) -> None:
        handler = job.metadata.get(META_HANDLER, "unknown")
        self.metrics.jobs_completed.labels(handler, outcome_of(job, counts)).inc()
        start = job.start_time or job.created
        if start is not None:
            self.metrics.job_duration.labels(handler).observe(
                max(0.0, (ended - start).total_seconds()))
        for task in failed:
            self.metrics.tasks_failed.labels(handler, task.category).inc()

    async def _call(self, result: PollResult, operation: str, fn: Callable[..., Any],
                    *args: Any, **kwargs: Any) -> Any:
        """One backend call in a worker thread, counted by operation."""
        self._count_request(result, operation)
        return await self._in_thread(fn, *args, **kwargs)

    async def _in_thread(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """``fn`` in one of the monitor's threads, with this task's context (log
        bindings, the current span), as ``asyncio.to_thread`` would run it."""
        return await self._threads.run(fn, *args, **kwargs)

    def _count_request(self, result: PollResult, operation: str) -> None:
        with self._counting:
            result.requests[operation] += 1
        self.metrics.monitor_requests.labels(operation).inc()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)


def settled(job: JobRecord, counts: TaskCounts) -> bool:
    """Whether a terminal job's task counts can be final: no task runs, and they add up
    to the tasks it was given (``fanout-tasks``); every one completed if all did.

    Batch's task counts trail the job state: right after a job completes they may still
    show tasks running, or none at all. A window job's ``fanout-tasks`` is its count
    when the monitor sealed it: the final counts must reach it (late events may have
    added more)."""
    if counts.running:
        return False
    try:
        expected: int | None = int(job.metadata[META_TASKS])
    except (KeyError, ValueError):
        expected = None
    if job.terminate_reason in (None, REASON_ALL_COMPLETE):
        if expected is not None and META_WINDOW in job.metadata:
            # counted when sealed; a late event may have added tasks since
            return not counts.active and counts.completed >= expected
        return not counts.active and (expected is None or counts.completed == expected)
    if job.terminate_reason == REASON_SUBMIT_FAILED or expected is None:
        return True  # not every task was added: nothing to add up to
    if META_WINDOW in job.metadata:
        return counts.total >= expected
    return counts.total == expected


def collect_failed(backend: Backend, job: JobRecord, counts: TaskCounts, *, limit: int,
                   tail_bytes: int, count: Callable[[str], None] = lambda op: None
                   ) -> list[FailedTask]:
    """Up to ``limit`` failed tasks with their stderr tails, read with range reads; a
    job the monitor terminated for blocked tasks lists those as ``dependency_failed``.

    One failed-tasks listing only when the counts show failures; ``count`` is told of
    every backend request, by operation."""
    failed: list[FailedTask] = []
    if counts.failed and limit:
        count("failed_tasks")
        failed = backend.failed_tasks(job.id, limit)
    if counts.active and job.terminate_reason == REASON_BLOCKED and len(failed) < limit:
        count("blocked_tasks")
        blocked = backend.blocked_tasks(job.id, limit - len(failed))
        failed += [FailedTask(id=t, category="dependency_failed",
                              failure_message="a dependency failed, so it never ran")
                   for t in blocked or ()]
    if tail_bytes:
        for task in failed:
            if task.category != "dependency_failed":
                count("log_tail")
                task.stderr_tail = backend.task_log_tail(job.id, task.id, "stderr.txt",
                                                         tail_bytes)
    return failed


def _describe(exc: BaseException) -> str:
    text = getattr(exc, "description", None) or str(exc) or type(exc).__name__
    return redact(f"{type(exc).__name__}: {text}")[:500]
