"""An in-memory Backend test double with fault injection, for submitter and consumer
tests that are about fanout's logic rather than an engine."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime

from handlers.base import JobSpec, TaskSpec
from worker.backends.base import (
    AddResult,
    BackendStats,
    FailedTask,
    JobRecord,
    JobState,
    JobStatus,
    JobUsage,
    MoveResult,
    Preemption,
    TaskCounts,
    TaskError,
)
from worker.errors import BatchRejected, ConfigFault, SystemFault


class MemoryBackend:
    """Records jobs and tasks; can fail a fraction of calls transiently."""

    max_tasks_per_request = 100

    def __init__(self, *, fail_rate: float = 0.0, seed: int = 0,
                 task_error_rate: float = 0.0, create_delay: float = 0.0,
                 add_delay: float = 0.0) -> None:
        """``create_delay`` and ``add_delay`` make each create_job / add_tasks call take
        that many seconds longer (a slow service), before it does anything."""
        self.jobs: dict[str, JobSpec] = {}
        self.sealed: set[str] = set()
        self.tasks: dict[str, dict[str, TaskSpec]] = {}
        self.add_calls = 0
        self.max_concurrent = 0
        self.fail_rate = fail_rate
        self.task_error_rate = task_error_rate
        self.config_fault: ConfigFault | None = None
        self.create_delay = create_delay
        self.add_delay = add_delay
        self.reject_ids: set[str] = set()
        #: Jobs terminated, with the reason given, in call order.
        self.terminated: list[tuple[str, str]] = []
        self.metadata: dict[str, dict[str, str]] = {}
        self._concurrent = 0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def _maybe_fail(self) -> None:
        if self.config_fault is not None:
            raise self.config_fault
        with self._lock:
            fail = self._rng.random() < self.fail_rate
        if fail:
            raise SystemFault("injected 503", retry_after=None)

    def start(self) -> None:
        pass

    def probe(self) -> None:
        if self.config_fault is not None:
            raise self.config_fault

    def create_job(self, job: JobSpec) -> JobState:
        time.sleep(self.create_delay)
        self._maybe_fail()
        with self._lock:
            if job.id in self.sealed:
                return "sealed"
            if job.id in self.jobs:
                return "exists"
            self.jobs[job.id] = job
            self.tasks[job.id] = {}
            self.metadata[job.id] = dict(job.metadata)
            return "created"

    def add_tasks(self, job_id: str, tasks: Sequence[TaskSpec]) -> AddResult:
        time.sleep(self.add_delay)
        with self._lock:
            self._concurrent += 1
            self.max_concurrent = max(self.max_concurrent, self._concurrent)
            self.add_calls += 1
        try:
            self._maybe_fail()
            result = AddResult()
            with self._lock:
                store = self.tasks[job_id]
                for task in tasks:
                    if task.id in self.reject_ids:
                        raise BatchRejected(f"InvalidPropertyValue: task {task.id}")
                    if self._rng.random() < self.task_error_rate:
                        result.errors.append(TaskError(task.id, "ServerBusy", "busy",
                                                       transient=True))
                        continue
                    if task.id.lower() in store:
                        result.existed += 1
                    else:
                        store[task.id.lower()] = task
                        result.added += 1
            return result
        finally:
            with self._lock:
                self._concurrent -= 1

    def seal_job(self, job_id: str) -> None:
        self._maybe_fail()
        with self._lock:
            self.sealed.add(job_id)

    def job_status(self, job_id: str) -> JobStatus | None:
        if job_id not in self.jobs:
            return None
        return JobStatus(id=job_id, state="active", pool=self.jobs[job_id].pool,
                         counts={"active": len(self.tasks[job_id])})

    def list_jobs(self, limit: int = 50) -> list[JobStatus]:
        return [s for j in list(self.jobs)[:limit] if (s := self.job_status(j))]

    def get_job(self, job_id: str) -> JobRecord | None:
        if job_id not in self.jobs:
            return None
        done = any(j == job_id for j, _ in self.terminated)
        return JobRecord(id=job_id, state="completed" if done else "active",
                         metadata=dict(self.metadata[job_id]), pool=self.jobs[job_id].pool,
                         created=datetime.now(UTC), sealed=job_id in self.sealed,
                         terminate_reason=next((r for j, r in self.terminated if j == job_id),
                                               None))

    def list_fanout_jobs(self, *, completed_since: datetime | None = None) -> list[JobRecord]:
        return [r for j in list(self.jobs) if (r := self.get_job(j)) is not None]

    def task_counts(self, job_id: str) -> TaskCounts | None:
        return TaskCounts(active=len(self.tasks[job_id])) if job_id in self.jobs else None

    def failed_tasks(self, job_id: str, limit: int) -> list[FailedTask]:
        return []

    def blocked_tasks(self, job_id: str, limit: int) -> list[str] | None:
        return []

    def job_usage(self, job_id: str, pool: str | None = None) -> JobUsage | None:
        return None

    def existing_tasks(self, job_id: str, task_ids: Sequence[str]) -> set[str]:
        store = self.tasks.get(job_id, {})
        return {t for t in task_ids if t.lower() in store}

    def preempted_tasks(self, pool: str) -> list[Preemption]:
        return []

    def move_task(self, job_id: str, task_id: str, *, to_job: str, pool: str,
                  metadata: dict[str, str]) -> MoveResult:
        return "unmovable"

    def terminate_job(self, job_id: str, reason: str) -> None:
        with self._lock:
            self.terminated.append((job_id, reason))

    def delete_job(self, job_id: str) -> None:
        with self._lock:
            self.jobs.pop(job_id, None)

    def update_job_metadata(self, job_id: str, metadata: dict[str, str]) -> None:
        self.metadata[job_id] = dict(metadata)

    def task_log_tail(self, job_id: str, task_id: str, name: str = "stderr.txt",
                      max_bytes: int = 4096) -> str | None:
        return None

    def stats(self) -> BackendStats:
        return BackendStats(pool_nodes={("mem", "idle"): 1}, active_jobs=len(self.jobs))

    def close(self) -> None:
        pass
