"""The Backend protocol: a batch engine that takes jobs and tasks.

Implementations: ``local/`` (processes on this machine, the embedded default) and
``azure.py`` (Azure Batch). The submitter knows only this protocol. Methods are
synchronous: the submitter calls them from worker threads, several at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from handlers.base import JobSpec, TaskSpec

JobState = Literal["created", "exists", "sealed"]

#: Task states, as Azure Batch names them.
TASK_STATES = ("active", "preparing", "running", "completed")


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
class BackendStats:
    """What the metrics poller reads from a backend each interval.

    - ``pool_nodes``: nodes (local executor: slots) keyed by (pool, state), where
      state is Batch's node state, prefixed ``lowpriority_`` for spot nodes;
    - ``pool_size``: keyed by (pool, which) with which in ``current_dedicated``,
      ``target_dedicated``, ``current_low_priority``, ``target_low_priority``;
    - ``active_jobs``: jobs not yet completed (accounts have a quota of them);
    - ``job_tasks``: task counts by state summed over active jobs.
    """

    pool_nodes: dict[tuple[str, str], int] = field(default_factory=dict)
    pool_size: dict[tuple[str, str], int] = field(default_factory=dict)
    active_jobs: int = 0
    job_tasks: dict[str, int] = field(default_factory=dict)


class Backend(Protocol):
    """A batch engine. Methods raise ``SystemFault`` for transient failures,
    ``ConfigFault`` for configuration ones and ``BatchRejected`` for invalid input."""

    @property
    def max_tasks_per_request(self) -> int:
        """The largest chunk ``add_tasks`` takes (100 on Azure Batch)."""
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
        """Add one chunk; a task that already exists counts in ``existed``."""
        ...

    def seal_job(self, job_id: str) -> None:
        """Declare that every task is added: the job terminates when they complete."""
        ...

    def job_status(self, job_id: str) -> JobStatus | None:
        """One job's state and task counts, None if there is no such job."""
        ...

    def list_jobs(self, limit: int = 50) -> list[JobStatus]:
        """Recent jobs with their task counts, newest first."""
        ...

    def stats(self) -> BackendStats:
        """Pool nodes, pool sizes, active jobs and task counts, for metrics."""
        ...

    def close(self) -> None:
        """Release clients and, for the local executor, stop running tasks."""
        ...
