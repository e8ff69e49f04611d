"""Spot preemption: count the tasks preempted nodes were running, and optionally move a
task preempted too often to a dedicated pool.

How Batch exposes it (REST spec ``BatchService.json``, api-version 2025-06-01): a
Spot/low-priority node that is preempted enters the node state ``preempted`` ("Tasks
which were running on the Compute Node when it was preempted will be rescheduled when
another Compute Node becomes available", ``BatchNodeState``), and the node's
``recentTasks`` names the tasks that ran on it. The task itself carries no preemption
counter: ``executionInfo.requeueCount`` counts requeues "as the result of a user
request" (a pool shrunk, or a job disabled, with ``requeue``) and ``retryCount`` counts
retries after a non-zero exit. So the job monitor lists, once a poll and per pool of
its active jobs, the pool's nodes with ``$filter=state eq 'preempted'`` and
``$select=id,state,stateTransitionTime,recentTasks``: one request per pool, whatever
the number of tasks. A preemption is named by its node and the time the node entered
the state, so a node seen preempted by several polls (or replicas) counts once.

State lives in the job (``fanout-preemption`` metadata, compact JSON), like the rest
of the monitor's: any replica can carry on where another stopped.

The policy (``preemption.max_per_task`` with ``preemption.dedicated_pool``): a Batch
task cannot change pools (the pool belongs to the job), so a task preempted that many
times is ended in its job and a copy of it (same id, same command, files and
constraints; its logs still go to the original job's location) is added to the
job's *companion* on the dedicated pool, whose id derives from the job's
(:func:`companion_id`). The intent is written first (``p``), then the task is ended,
then copied, then recorded as moved (``m``): every step is idempotent (the companion
exists, the copy exists, the task is already ended), so a replica killed midway, or
two replicas at once, still copy it exactly once. Only jobs without task dependencies
and with ``onTaskFailure`` ``noaction`` lose tasks: a dependent of the ended task
would run (or block) on its end, and a job action would end the whole job.

The original job reports for both: its completion event waits for the companion
(sealed once the original is terminal), counts each moved task by how its copy ended,
lists the copy's failure if it failed, and says what moved in ``data.preemptions``. The
companion (``fanout-moved-from`` metadata) publishes no event of its own; it is marked
reported with its original and deleted with the same retention.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from worker.backends.base import (
    META_HANDLER,
    META_LOGS,
    META_MOVED_FROM,
    META_PREEMPTION,
    META_REPORTED,
    META_TASKS,
    REASON_ALL_COMPLETE,
    REASON_CANCELLED,
    Backend,
    FailedTask,
    JobRecord,
    Preemption,
    TaskCounts,
)
from worker.config import PreemptionConfig
from worker.metrics import Metrics

log = structlog.get_logger(__name__)

#: Preemptions remembered per job (older ones are no longer on a preempted node).
MAX_EVENTS = 32
#: Tasks whose preemption counts a job's metadata keeps (the total counts them all): the
#: metadata comes back with every job listing, so it stays a few KB.
MAX_TASKS = 200
#: Tasks a completion event lists by id (``tasks_omitted`` says how many more).
MAX_EVENT_TASKS = 100
#: The suffix of a companion job's id.
COMPANION_SUFFIX = "-dp"

Call = Callable[..., Awaitable[Any]]


def companion_id(job_id: str) -> str:
    """The id of the job's companion on the dedicated pool: ``<job>-dp``, or for a job
    id too long for that, its first 48 characters, a digest of the whole id and ``-dp``
    (Batch ids are at most 64 characters, compared case-insensitively)."""
    if len(job_id) + len(COMPANION_SUFFIX) <= 64:
        return job_id + COMPANION_SUFFIX
    digest = hashlib.sha256(job_id.lower().encode()).hexdigest()[:12]
    return f"{job_id[:48]}-{digest}{COMPANION_SUFFIX}"


@dataclass(slots=True)
class PreemptionState:
    """What a job's ``fanout-preemption`` metadata holds: ``total`` preemptions of its
    tasks, ``tasks`` per task (at most :data:`MAX_TASKS`), the ``events`` already
    counted (a digest of node, time and task each), and the policy's ``pending``,
    ``moved`` and ``kept`` tasks (kept: ended by themselves first, or in a job that
    cannot lose a task)."""

    total: int = 0
    tasks: dict[str, int] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    moved: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, metadata: Mapping[str, str]) -> PreemptionState:
        raw = metadata.get(META_PREEMPTION)
        if not raw:
            return cls()
        try:
            data = json.loads(raw)
        except ValueError:
            return cls()
        if not isinstance(data, dict):
            return cls()
        return cls(total=int(data.get("n") or 0),
                   tasks={str(k): int(v) for k, v in (data.get("t") or {}).items()},
                   events=[str(e) for e in data.get("e") or []],
                   pending=[str(t) for t in data.get("p") or []],
                   moved=[str(t) for t in data.get("m") or []],
                   kept=[str(t) for t in data.get("k") or []])

    def dump(self) -> str:
        data: dict[str, Any] = {"n": self.total, "t": self.tasks, "e": self.events[-MAX_EVENTS:]}
        for key, items in (("p", self.pending), ("m", self.moved), ("k", self.kept)):
            if items:
                data[key] = items
        return json.dumps(data, separators=(",", ":"))

    def record(self, events: Sequence[Preemption]) -> list[Preemption]:
        """Count the events not counted before; return those."""
        seen = set(self.events)
        new: list[Preemption] = []
        for event in events:
            key = _digest(f"{event.key}/{event.task_id.lower()}")
            if key in seen:
                continue
            seen.add(key)
            self.events.append(key)
            self.total += 1
            task = _known(self.tasks, event.task_id)
            if task in self.tasks or len(self.tasks) < MAX_TASKS:
                self.tasks[task] = self.tasks.get(task, 0) + 1
            new.append(event)
        self.events = self.events[-MAX_EVENTS:]
        return new

    def decided(self, task_id: str) -> bool:
        low = task_id.lower()
        return any(t.lower() == low for t in (*self.moved, *self.kept))

    def event_json(self, companion: str | None, pool: str | None) -> dict[str, Any]:
        """``data.preemptions`` of the completion event."""
        ranked = sorted(self.tasks.items(), key=lambda kv: (-kv[1], kv[0]))
        return {"total": self.total, "tasks": dict(ranked[:MAX_EVENT_TASKS]),
                "tasks_omitted": max(0, len(ranked) - MAX_EVENT_TASKS),
                "moved": list(self.moved),
                "companion_job": companion if self.moved else None,
                "companion_pool": pool if self.moved else None}


def report_json(job_id: str, metadata: Mapping[str, str],
                dedicated_pool: str | None) -> dict[str, Any] | None:
    """``data.preemptions`` from the job's metadata (for ``fanout status JOB``, while the
    job runs too); None for a job never preempted."""
    state = PreemptionState.load(metadata)
    if not state.total and not state.moved:
        return None
    return state.event_json(companion_id(job_id), dedicated_pool)


def summary_line(data: Mapping[str, Any]) -> str:
    """``data.preemptions`` in one line, as ``fanout status JOB`` prints it."""
    total = int(data.get("total") or 0)
    tasks = dict(data.get("tasks") or {})
    top = list(tasks.items())[:5]
    text = f"{total} preemption{'s' if total != 1 else ''}"
    if top:
        more = len(tasks) > len(top) or data.get("tasks_omitted")
        text += " (" + ", ".join(f"task {t}: {n}" for t, n in top)
        text += ", ...)" if more else ")"
    moved = list(data.get("moved") or [])
    if moved:
        text += (f"; {len(moved)} task{'s' if len(moved) != 1 else ''} moved to "
                 f"{data.get('companion_job')} on {data.get('companion_pool') or '?'}")
    return text


def summary(job_id: str, metadata: Mapping[str, str],
            dedicated_pool: str | None = None) -> str | None:
    """The status line of a job's preemptions; None for a job never preempted."""
    data = report_json(job_id, metadata, dedicated_pool)
    return None if data is None else summary_line(data)


@dataclass(slots=True)
class Fold:
    """A job's report with its companion's tasks folded in."""

    counts: TaskCounts
    failed: list[FailedTask]
    data: dict[str, Any] | None
    companion: str | None = None


class Preemptions:
    """The monitor's preemption step (one per :class:`worker.monitor.JobMonitor`)."""

    def __init__(self, *, backend: Backend, config: PreemptionConfig, metrics: Metrics,
                 call: Call) -> None:
        self.backend = backend
        self.config = config
        self.metrics = metrics
        self._call = call

    async def poll(self, records: Sequence[JobRecord], result: Any) -> None:
        """Count new preemptions of active jobs' tasks; move tasks over the limit."""
        if not self.config.count:
            return
        active = [j for j in records if j.state != "completed"
                  and META_MOVED_FROM not in j.metadata]
        pools = sorted({j.pool for j in active if j.pool}, key=str.lower)
        events: dict[str, list[Preemption]] = {}
        for pool in pools:
            found = await self._call(result, "list_nodes", self.backend.preempted_tasks, pool)
            for event in found:
                events.setdefault(event.job_id.lower(), []).append(event)
        for job in active:
            state = PreemptionState.load(job.metadata)
            new = state.record(events.get(job.id.lower(), ()))
            if new:
                await self._save(job, state, result)
                for event in new:
                    self.metrics.tasks_preempted.labels(event.pool).inc()
                log.info("preemption.counted", job_id=job.id, pool=job.pool,
                         tasks=sorted({e.task_id for e in new}), total=state.total)
            if self.config.moves and job.state == "active":
                await self._moves(job, state, result)

    async def _moves(self, job: JobRecord, state: PreemptionState, result: Any) -> None:
        limit = self.config.max_per_task or 0
        due = [t for t, n in state.tasks.items() if n >= limit and not state.decided(t)]
        for task in dict.fromkeys([*state.pending, *due]):
            if state.decided(task):
                continue
            await self._move(job, state, task, result)

    async def _move(self, job: JobRecord, state: PreemptionState, task: str,
                    result: Any) -> None:
        pool = self.config.dedicated_pool
        assert pool is not None
        if task not in state.pending:
            state.pending.append(task)
            await self._save(job, state, result)  # the intent, before the task is ended
        companion = companion_id(job.id)
        meta = {META_HANDLER: job.metadata.get(META_HANDLER, "unknown"),
                META_MOVED_FROM: job.id}
        if META_LOGS in job.metadata:
            meta[META_LOGS] = job.metadata[META_LOGS]
        outcome = await self._call(result, "move_task", self.backend.move_task, job.id, task,
                                   to_job=companion, pool=pool, metadata=meta)
        if outcome == "pending":
            return  # still being ended: the next poll asks again
        state.pending = [t for t in state.pending if t != task]
        (state.moved if outcome in ("moved", "exists") else state.kept).append(task)
        await self._save(job, state, result)
        if outcome == "moved":
            self.metrics.tasks_moved.labels(pool).inc()
        log.info("preemption.task_moved" if outcome == "moved" else "preemption.task_kept",
                 job_id=job.id, task_id=task, outcome=outcome, to_job=companion,
                 pool=pool, preemptions=state.tasks.get(task))

    async def _save(self, job: JobRecord, state: PreemptionState, result: Any) -> None:
        marked = {**job.metadata, META_PREEMPTION: state.dump()}
        await self._call(result, "update_metadata", self.backend.update_job_metadata,
                         job.id, marked)
        job.metadata = marked

    # -- reporting -----------------------------------------------------------------

    async def fold(self, job: JobRecord, counts: TaskCounts, failed: list[FailedTask],
                   result: Any, *, limit: int, tail_bytes: int) -> Fold | None:
        """The job's counts and failed tasks with its companion's folded in, and
        ``data.preemptions``; None while the companion has not ended (it is sealed, or
        terminated with a job ended otherwise than by its tasks, so it will)."""
        state = PreemptionState.load(job.metadata)
        if META_PREEMPTION not in job.metadata:
            return Fold(counts, failed, None)
        if state.pending and self.config.moves:
            for task in list(state.pending):
                await self._move(job, state, task, result)
            if state.pending:
                return None
        if not state.moved:
            return Fold(counts, failed, state.event_json(None, None))
        companion_job = companion_id(job.id)
        other = await self._call(result, "get_job", self.backend.get_job, companion_job)
        if other is None:
            return Fold(counts, failed, state.event_json(companion_job,
                                                         self.config.dedicated_pool))
        if other.state != "completed":
            if other.state != "active":
                return None  # terminating (or disabled by someone): wait for its end
            if job.terminate_reason not in (None, REASON_ALL_COMPLETE):
                # the original was cancelled, timed out or ended otherwise: so is its
                # companion, with the same reason
                await self._call(result, "terminate_job", self.backend.terminate_job,
                                 companion_job, job.terminate_reason or REASON_CANCELLED)
            elif not other.sealed:
                marked = {**other.metadata, META_TASKS: str(len(state.moved))}
                await self._call(result, "update_metadata", self.backend.update_job_metadata,
                                 companion_job, marked)
                await self._call(result, "seal_job", self.backend.seal_job, companion_job)
            return None
        theirs = await self._call(result, "task_counts", self.backend.task_counts,
                                  companion_job)
        if theirs is None:
            theirs = TaskCounts()
        if theirs.running or theirs.total < len(state.moved):
            return None  # counts not caught up yet
        moved = {t.lower() for t in state.moved}
        folded = TaskCounts(
            active=counts.active + theirs.active, running=counts.running + theirs.running,
            completed=max(0, counts.completed - len(moved)) + theirs.completed,
            succeeded=counts.succeeded + theirs.succeeded,
            failed=max(0, counts.failed - len(moved)) + theirs.failed)
        kept = [f for f in failed if f.id.lower() not in moved]
        if theirs.failed and len(kept) < limit:
            copies = await self._call(result, "failed_tasks", self.backend.failed_tasks,
                                      companion_job, limit - len(kept))
            for copy in copies:
                if copy.logs:  # the copy uploads its logs where the original would
                    copy.logs = copy.logs.replace(f"/{companion_job}/", f"/{job.id}/")
                if tail_bytes:
                    copy.stderr_tail = await self._call(
                        result, "log_tail", self.backend.task_log_tail, job.id, copy.id,
                        "stderr.txt", tail_bytes)
            kept += copies
        return Fold(folded, kept, state.event_json(companion_job, self.config.dedicated_pool),
                    companion=companion_job)

    async def reported(self, fold: Fold, event_id: str, result: Any) -> None:
        """Mark the companion reported (before its original, so a replica killed in
        between leaves both to the next poll)."""
        if fold.companion is None:
            return
        other = await self._call(result, "get_job", self.backend.get_job, fold.companion)
        if other is None or META_REPORTED in other.metadata:
            return
        await self._call(result, "update_metadata", self.backend.update_job_metadata,
                         fold.companion, {**other.metadata, META_REPORTED: event_id})


def _digest(text: str) -> str:
    """A preemption's short name in the metadata (node, time and task, hashed)."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _known(tasks: Mapping[str, int], task_id: str) -> str:
    """The spelling already counted for this task (ids are case-insensitive)."""
    low = task_id.lower()
    return next((t for t in tasks if t.lower() == low), task_id)
