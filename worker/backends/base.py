"""The Backend protocol: a batch engine that takes jobs and tasks.

Implementations: ``local/`` (processes on this machine, the embedded default) and
``azure.py`` (Azure Batch). The submitter knows only this protocol. Methods are
synchronous: the submitter calls them from worker threads, several at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal, Protocol

from handlers.base import JobSpec, TaskSpec

JobState = Literal["created", "exists", "sealed"]

#: Task states, as Azure Batch names them.
TASK_STATES = ("active", "preparing", "running", "completed")
#: Job states that are final (Batch: ``completed``; a deleted job is gone).
TERMINAL_JOB_STATES = frozenset({"completed"})

#: How a job ended, the ``outcome`` of its completion event.
JobOutcome = Literal["succeeded", "failed", "cancelled", "timed_out"]
#: Why a task failed, the ``category`` of a failed task in a completion event.
FailureCategory = Literal["exit_code", "wall_clock_timeout", "resource_file_failure",
                          "output_upload_failure", "preempted", "node_unusable",
                          "start_task_failed", "dependency_failed", "cancelled"]
FAILURE_CATEGORIES: tuple[FailureCategory, ...] = (
    "exit_code", "wall_clock_timeout", "resource_file_failure", "output_upload_failure",
    "preempted", "node_unusable", "start_task_failed", "dependency_failed", "cancelled")

#: ``terminateReason`` values. Batch's own: a job's max wall clock ran out, a task's
#: exit options terminated it, every task completed (onAllTasksComplete), or a user
#: terminated it without a reason. fanout's: ``fanout cancel`` or a cancel message,
#: the monitor found every remaining task blocked, a submission stopped for good.
REASON_WALL_CLOCK = "MaxWallClockTimeExpiry"
REASON_TASK_FAILED = "TaskFailed"
REASON_ALL_COMPLETE = "AllTasksComplete"
REASON_USER = "UserTerminate"
REASON_CANCELLED = "FanoutCancelled"
REASON_BLOCKED = "FanoutBlocked"
REASON_SUBMIT_FAILED = "FanoutSubmitFailed"


@dataclass(frozen=True, slots=True)
class TaskError:
    """A task the backend did not add: ``transient`` ones may be retried."""

    task_id: str
    code: str
    message: str
    transient: bool = False


@dataclass(slots=True)
class AddResult:
    """The outcome of adding one chunk of tasks."""

    added: int = 0
    existed: int = 0
    errors: list[TaskError] = field(default_factory=list)


@dataclass(slots=True)
class JobStatus:
    """A job and its task counts by state, for ``fanout status`` and metrics."""

    id: str
    state: str
    pool: str | None
    display_name: str | None = None
    created: str | None = None
    counts: dict[str, int] = field(default_factory=dict)
    succeeded: int = 0
    failed: int = 0
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class JobRecord:
    """One job as the monitor reads it from a listing (only the fields it needs).

    ``metadata`` is where fanout keeps what it knows about the job (who asked for
    it, the request hash, whether its completion event went out); times are
    timezone-aware; ``terminate_reason`` is set once the job is terminal.
    """

    id: str
    state: str
    metadata: dict[str, str] = field(default_factory=dict)
    pool: str | None = None
    created: datetime | None = None
    start_time: datetime | None = None
    end_time: datetime | None = None
    terminate_reason: str | None = None
    state_changed: datetime | None = None
    #: Every task is added (Batch: ``onAllTasksComplete`` is ``terminatejob``); the
    #: monitor never ends a job for blocked tasks while its submitter may still add some.
    sealed: bool = False


@dataclass(slots=True)
class TaskCounts:
    """A job's task counts (Batch's task counts API: ``running`` includes preparing).

    Eventually consistent on Batch: read them again after the job is terminal."""

    active: int = 0
    running: int = 0
    completed: int = 0
    succeeded: int = 0
    failed: int = 0

    @property
    def total(self) -> int:
        return self.active + self.running + self.completed


@dataclass(slots=True)
class FailedTask:
    """A task that ended without success (or never ran), with why.

    ``failure_code``/``failure_message`` are Batch's ``failureInfo`` (or the local
    executor's equivalent); ``logs`` says where the task's full stdout/stderr are
    (a ``container/prefix`` blob reference on Azure, a directory locally).
    ``stderr_tail`` is filled by whoever reads the logs (at most 4 KB).
    """

    id: str
    category: FailureCategory
    exit_code: int | None = None
    failure_code: str | None = None
    failure_message: str | None = None
    start_time: datetime | None = None
    end_time: datetime | None = None
    retry_count: int = 0
    logs: str | None = None
    stderr_tail: str | None = None
    #: The task's display name (a window job's tasks name their event and blob there).
    display_name: str | None = None


@dataclass(slots=True)
class JobUsage:
    """What a terminal job's tasks took, for its cost (worker/cost.py).

    ``slot_seconds``: over the completed tasks that ran, the wall time of each one's
    last attempt (Batch's ``executionInfo.endTime - startTime``) times its
    ``requiredSlots``; ``tasks`` is how many tasks that counted. ``vm_size`` and
    ``slots_per_node`` are the pool's (Batch's ``vmSize`` and ``taskSlotsPerNode``;
    the local executor: ``local`` and its slots), None when the pool cannot be read."""

    slot_seconds: float
    tasks: int
    vm_size: str | None = None
    slots_per_node: int | None = None


#: Node states (Batch's, as the pool node counts API names them) whose nodes run tasks.
USABLE_NODE_STATES = ("idle", "running")
#: Node states of nodes on their way to being usable (booting, joining, restarting).
COMING_NODE_STATES = ("creating", "starting", "waitingForStartTask", "rebooting",
                      "reimaging")


@dataclass(slots=True)
class ResizeError:
    """One of a pool's ``resizeErrors`` (Batch's ``ResizeError``: code and message)."""

    code: str
    message: str = ""


@dataclass(slots=True)
class PoolCapacity:
    """One pool's free slots and fanout's backlog on it, for admission (worker/admission.py).

    - ``nodes``: node counts by Batch's state names, dedicated and spot summed (the
      local executor: its slots, as nodes of one slot);
    - ``slots_per_node``: Batch's ``taskSlotsPerNode`` (default 1);
    - ``pending``: active (not yet running) tasks of fanout's active jobs on the pool;
      ``running``: their running ones;
    - ``current``/``target``: dedicated plus spot sizes; ``allocation_state`` and
      ``allocation_changed`` are Batch's ``allocationState`` and
      ``allocationStateTransitionTime``; ``autoscale`` its ``enableAutoScale``;
    - ``resize_errors``: the pool's ``resizeErrors`` as read (stale ones are told apart
      by :func:`worker.admission.fresh_resize_errors`);
    - ``exists``: False when the pool could not be found.
    """

    pool: str
    nodes: dict[str, int] = field(default_factory=dict)
    slots_per_node: int = 1
    pending: int = 0
    running: int = 0
    current: int = 0
    target: int = 0
    current_dedicated: int = 0
    target_dedicated: int = 0
    current_low_priority: int = 0
    target_low_priority: int = 0
    allocation_state: str = "steady"
    allocation_changed: datetime | None = None
    autoscale: bool = False
    resize_errors: list[ResizeError] = field(default_factory=list)
    exists: bool = True

    def count(self, *states: str) -> int:
        return sum(self.nodes.get(s, 0) for s in states)

    @property
    def usable_nodes(self) -> int:
        """Nodes that can run tasks now (idle or running)."""
        return self.count(*USABLE_NODE_STATES)


def fresh_resize_errors(cap: PoolCapacity) -> list[ResizeError]:
    """The pool's resize errors that still explain a shortfall (worker/admission.py's
    module doc): none while it resizes or once it has reached its targets."""
    if cap.allocation_state != "steady" or not cap.resize_errors:
        return []
    short = (cap.current_dedicated < cap.target_dedicated
             or cap.current_low_priority < cap.target_low_priority)
    return list(cap.resize_errors) if short else []


def slots(cap: PoolCapacity) -> int:
    """Task slots the pool has or is about to have (worker/admission.py's module doc)."""
    nodes = cap.usable_nodes + cap.count(*COMING_NODE_STATES)
    if cap.allocation_state == "resizing" and not fresh_resize_errors(cap):
        nodes += max(0, cap.target - cap.current)
    return nodes * max(1, cap.slots_per_node)


@dataclass(slots=True)
class BackendStats:
    """What the metrics poller reads from a backend each interval.

    - ``pool_nodes``: nodes (local executor: slots) keyed by (pool, state), where
      state is Batch's node state, prefixed ``lowpriority_`` for spot nodes;
    - ``pool_size``: keyed by (pool, which) with which in ``current_dedicated``,
      ``target_dedicated``, ``current_low_priority``, ``target_low_priority``;
    - ``active_jobs``: jobs not yet completed (accounts have a quota of them);
    - ``job_tasks``: task counts by state summed over active jobs;
    - ``pools``: each reported pool's capacity and fanout's backlog on it (admission).
    """

    pool_nodes: dict[tuple[str, str], int] = field(default_factory=dict)
    pool_size: dict[tuple[str, str], int] = field(default_factory=dict)
    active_jobs: int = 0
    job_tasks: dict[str, int] = field(default_factory=dict)
    pools: dict[str, PoolCapacity] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Preemption:
    """A task that was running on a Spot/low-priority node when the node was preempted
    (Batch requeues such tasks; see worker/preemption.py).

    ``at`` is when the node entered the ``preempted`` state: with ``node_id`` it names
    one preemption, so a node seen preempted by several polls counts once."""

    pool: str
    node_id: str
    at: datetime | None
    job_id: str
    task_id: str

    @property
    def key(self) -> str:
        when = self.at.astimezone(UTC).strftime("%Y%m%dT%H%M%S.%f") if self.at else "-"
        return f"{self.node_id}@{when}"


#: What :meth:`Backend.move_task` did: this call copied the task to the companion job
#: (``moved``) or found the copy there already (``exists``: an earlier attempt or another
#: replica made it), the task had ended by itself first (``finished``), it is still
#: being ended (``pending``: ask again), or its job cannot lose a task (``unmovable``).
MoveResult = Literal["moved", "exists", "finished", "pending", "unmovable"]


class Backend(Protocol):
    """A batch engine. Methods raise ``SystemFault`` for transient failures,
    ``ConfigFault`` for configuration ones and ``BatchRejected`` for invalid input."""

    @property
    def max_tasks_per_request(self) -> int:
        """The largest chunk ``add_tasks`` takes (100 on Azure Batch)."""
        ...

    def start(self) -> None:
        """Start what runs in this process before the worker serves (the local
        executor's scheduler; nothing on Azure Batch, whose service runs the tasks).
        ``fanout run`` calls it once; ``ConfigFault`` when it cannot start (another
        process already runs the local scheduler on the same home)."""
        ...

    def probe(self) -> None:
        """A cheap call that raises ``ConfigFault`` while auth, pool or quota are
        wrong; the consumer calls it to decide when it is ready again."""
        ...

    def create_job(self, job: JobSpec) -> JobState:
        """Create the job with on-all-tasks-complete = no action.

        Return ``"created"``, ``"exists"`` (an earlier delivery created it: add the
        tasks again, duplicates count as existing) or ``"sealed"`` (an earlier
        delivery added every task and sealed it: nothing left to do)."""
        ...

    def add_tasks(self, job_id: str, tasks: Sequence[TaskSpec]) -> AddResult:
        """Add one chunk; a task that already exists counts in ``existed``.

        As Batch's add-collection answers: a malformed task (an invalid id) refuses the
        whole chunk, ``BatchRejected``, nothing added; a missing job is a
        ``SystemFault`` (a redelivery creates it again); a completed job is
        ``BatchRejected`` with reason ``JobCompleted``, unless it was sealed (an earlier
        delivery added every task): then the chunk counts as existing. A window job
        (``fanout-window``) is sealed by the monitor, not by its submitters, so a
        completed one is always ``JobCompleted`` (the event then runs in a job of its
        own)."""
        ...

    def seal_job(self, job_id: str) -> None:
        """Declare that every task is added: the job terminates when they complete.
        A job completed already is done; a missing job is a ``SystemFault``."""
        ...

    def job_status(self, job_id: str) -> JobStatus | None:
        """One job's state and task counts, None if there is no such job."""
        ...

    def list_jobs(self, limit: int = 50) -> list[JobStatus]:
        """Recent jobs, newest first, for ``fanout status``. ``counts`` (and
        ``succeeded``/``failed``) may be left empty: Azure reads none here (one request
        per page of the job listing, none per job), the local executor fills them as
        they cost it nothing; ``job_status`` reads one job's counts on every backend."""
        ...

    def stats(self) -> BackendStats:
        """Pool nodes, pool sizes, active jobs and task counts, for metrics; and each
        pool's capacity and fanout's pending tasks on it, for admission."""
        ...

    # -- what the job monitor needs (docs/events.md, docs/azure-batch.md) -----------------

    def list_fanout_jobs(self, *, completed_since: datetime | None = None
                         ) -> list[JobRecord]:
        """fanout's jobs (those whose metadata has ``fanout-handler``): every one not
        yet completed, plus the completed ones whose state changed at or after
        ``completed_since`` (every completed one when it is None). One request per
        page on Azure (``$filter`` + ``$select``), never one per job."""
        ...

    def get_job(self, job_id: str) -> JobRecord | None:
        """One job, None if there is no such job."""
        ...

    def task_counts(self, job_id: str) -> TaskCounts | None:
        """One request: the job's task counts; None if there is no such job."""
        ...

    def failed_tasks(self, job_id: str, limit: int) -> list[FailedTask]:
        """Up to ``limit`` completed tasks whose result is failure, with their category,
        exit code and failure info (Azure: one filtered, ``$select``ed listing)."""
        ...

    def job_usage(self, job_id: str, pool: str | None = None) -> JobUsage | None:
        """A terminal job's slot-seconds and its pool's (``pool``, the job's) VM size
        and slots per node (Azure: one listing of its completed tasks, ``$select``ed, a
        page per 1,000, plus one read of the pool per hour); None if there is no such
        job."""
        ...

    def existing_tasks(self, job_id: str, task_ids: Sequence[str]) -> set[str]:
        """Which of ``task_ids`` the job has (one request per id on Azure; used only for
        an event that arrives after its window job completed)."""
        ...

    def blocked_tasks(self, job_id: str, limit: int) -> list[str] | None:
        """The ids of the job's active tasks that can never run because a dependency
        ended with dependency action ``block``; None when the job has more than
        ``limit`` active tasks (too many to decide cheaply). The monitor calls it
        only when no task is running and some have failed."""
        ...

    def terminate_job(self, job_id: str, reason: str) -> None:
        """End the job now (running tasks are stopped) with ``reason`` as its
        terminate reason; a job already completed or gone is left as it is."""
        ...

    def delete_job(self, job_id: str) -> None:
        """Delete the job and its tasks (locally: records and task directories);
        a job already gone is no error."""
        ...

    def update_job_metadata(self, job_id: str, metadata: dict[str, str]) -> None:
        """Replace the job's metadata with ``metadata`` (Batch's PATCH replaces the
        whole list); allowed on completed jobs. Like terminate and delete, a job that is
        gone is no error and is left as it is (Batch: 404 ``JobNotFound``; the monitor
        marks jobs it listed, which may have been deleted since)."""
        ...

    def task_log_tail(self, job_id: str, task_id: str, name: str = "stderr.txt",
                      max_bytes: int = 4096) -> str | None:
        """The last ``max_bytes`` of one of a task's log files (``stdout.txt`` or
        ``stderr.txt``), read with a range read; None where there is none."""
        ...

    # -- Spot preemption (worker/preemption.py) -------------------------------------------

    def preempted_tasks(self, pool: str) -> list[Preemption]:
        """The tasks that were running on the pool's nodes now in the ``preempted`` state
        (Azure: one ``$filter``ed, ``$select``ed listing of the pool's nodes); none on a
        backend without preemption (the local executor)."""
        ...

    def move_task(self, job_id: str, task_id: str, *, to_job: str, pool: str,
                  metadata: dict[str, str]) -> MoveResult:
        """End the task in its job and add a copy of it (same id) to ``to_job`` on
        ``pool``, created with ``metadata`` if missing. Idempotent: a task already
        copied is not copied again, whichever replica asks."""
        ...

    def close(self) -> None:
        """Release clients and, for the local executor, stop running tasks."""
        ...


# -- job metadata: what fanout keeps in the job itself (the monitor is stateless) --------

#: The handler's name; its presence marks a job as fanout's.
META_HANDLER = "fanout-handler"
#: The queue message id the job came from.
META_MESSAGE_ID = "fanout-message-id"
#: The idempotency key the job id derives from.
META_KEY = "fanout-key"
#: Where the completion event goes besides the configured destination (a reply-to).
META_REPLY_TO = "fanout-reply-to"
#: A digest of the request (handler, params, job options): the same key with another
#: request is an ``IdempotencyConflict``.
META_REQUEST = "fanout-request"
#: The outputs the handler declared, as compact JSON ``[[name, location], ...]``.
META_OUTPUTS = "fanout-outputs"
#: How many tasks the job has once sealed: the monitor reads final counts only once
#: they add up to it (Batch's task counts are eventually consistent).
META_TASKS = "fanout-tasks"
#: Where the tasks' logs are uploaded (``container/prefix``), on Azure.
META_LOGS = "fanout-logs"
#: Set once the job's completion event was published: the event id.
META_REPORTED = "fanout-reported"
#: A window job's window, an ISO 8601 interval ``<start>/<end>`` (UTC): the job
#: gathers a route's events and the monitor, not its submitters, seals it.
META_WINDOW = "fanout-window"
#: When the job monitor seals a window job (ISO 8601, UTC).
META_SEAL_AT = "fanout-seal-at"
#: A cost tag of the message (``job.tags``): ``fanout-tag-<key>`` holds its value.
META_TAG_PREFIX = "fanout-tag-"
#: Spot preemptions of the job's tasks, as compact JSON (worker/preemption.py).
META_PREEMPTION = "fanout-preemption"
#: On a companion job (tasks moved to a dedicated pool after preemptions): the id of
#: the job its tasks came from, which reports for both.
META_MOVED_FROM = "fanout-moved-from"
