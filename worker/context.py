"""The worker's side of the handler contract: ``BuildContext``, job ids and limits.

``job_id_for`` derives the job id from the idempotency key, so the same message
delivered twice (or re-run after a crash) builds the same job, and the backend's
"already exists" makes the second submission harmless.

The operator's limits hold for every handler the same way: job options are checked
by :func:`apply_job_options`, a handler's own per-task settings by
``BuildContext.check_task_limits`` at build time, and every task as it streams to the
submitter by :func:`limit_tasks` (so a plug-in cannot bypass them). Storage URLs a
handler asks for live the job's own :func:`sas_lifetime`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from handlers.base import (
    BlobRef,
    ContainerRegistry,
    ContainerSettings,
    ContainerWorkingDirectory,
    JobSpec,
    Program,
    TaskSpec,
)
from handlers.containers import find_registry, make_container
from handlers.errors import BudgetExceeded, UnknownProgram
from handlers.limits import check_retries as limited_retries
from handlers.limits import check_wall_clock as limited_wall_clock
from worker.config import LimitsConfig
from worker.envelope import JobOptions, TaskDefaults
from worker.storage.base import Storage
from worker.storage.refs import parse_ref

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def job_id_for(handler: str, key: str) -> str:
    """A Batch job id (64 characters at most) unique to ``handler`` and ``key``.

    Readable where the key is, and always carrying a digest of the exact key, since
    Batch ids are case-insensitive and limited to letters, digits, ``-`` and ``_``.
    """
    digest = hashlib.sha256(f"{handler}\0{key}".encode()).hexdigest()[:16]
    slug = _UNSAFE.sub("-", key).strip("-")[:24].rstrip("-")
    head = _UNSAFE.sub("-", handler)[:6].strip("-") or "job"
    return f"{head}-{slug}-{digest}" if slug else f"{head}-{digest}"


@dataclass(frozen=True, slots=True)
class WorkerContext:
    """Implements ``handlers.base.BuildContext`` for one message."""

    job_id: str
    max_tasks: int
    allow_message_commands: bool
    programs: Mapping[str, Program]
    handler_options: Mapping[str, Mapping[str, Any]]
    storage: Storage
    #: The operator's limits (``check_task_limits``).
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    #: How long the URLs this job's tasks get must stay valid (``sas_lifetime``);
    #: None: the storage's longest.
    sas_lifetime: timedelta | None = None
    #: The configured ``[registries]`` (``Settings.program_specs().registries``).
    registries: Mapping[str, ContainerRegistry] = field(default_factory=dict)

    def program(self, name: str) -> Program:
        try:
            return self.programs[name]
        except KeyError:
            known = ", ".join(sorted(self.programs)) or "none"
            raise UnknownProgram(f"no program named {name[:64]!r} is configured "
                                 f"(configured: {known})") from None

    def options(self, handler: str) -> Mapping[str, Any]:
        return self.handler_options.get(handler, {})

    def blob_ref(self, value: object) -> BlobRef:
        return parse_ref(value, parse_url=self.storage.parse_url)

    def input_url(self, ref: BlobRef) -> str:
        return self.storage.input_url(ref, lifetime=self.sas_lifetime)

    def output_container_url(self, container: str, prefix: str) -> str:
        return self.storage.output_container_url(container, prefix,
                                                 lifetime=self.sas_lifetime)

    def input_container_url(self, container: str, prefix: str) -> str:
        return self.storage.input_container_url(container, prefix,
                                                lifetime=self.sas_lifetime)

    def registry(self, name: str) -> ContainerRegistry:
        return find_registry(self.registries, name)

    def container(self, image: str, *, registry: str | None = None,
                  run_options: str | None = None,
                  working_directory: ContainerWorkingDirectory = "taskWorkingDirectory"
                  ) -> ContainerSettings:
        return make_container(self.registries, image, registry=registry,
                              run_options=run_options, working_directory=working_directory)

    def check_task_limits(self, *, max_task_retries: int | None = None,
                          max_wall_clock: timedelta | None = None) -> None:
        check_retries(max_task_retries, self.limits)
        check_wall_clock(max_wall_clock, self.limits)


def sas_lifetime(wall_clock: timedelta, limits: LimitsConfig,
                 allowance: timedelta) -> timedelta:
    """How long a job's SAS must live: its max wall clock, capped by the operator's
    limit, plus ``allowance`` (``blob.sas_wait_allowance``).

    Batch counts a job's max wall clock from the job's creation, so the time its tasks
    wait in the pool is inside it; the allowance covers the rest (the build and the
    submission before the job exists) with room to spare. A wall clock over the limit
    is refused after the build (``BudgetExceeded``), so capping it here only keeps the
    SAS within what the storage may sign.
    """
    return min(max(wall_clock, timedelta(0)), limits.max_wall_clock) + allowance


def check_retries(retries: int | None, limits: LimitsConfig) -> None:
    """``BudgetExceeded`` for a ``max_task_retries`` over ``limits.max_task_retries``."""
    limited_retries(retries, limits.max_task_retries)


def check_wall_clock(wall: timedelta | None, limits: LimitsConfig) -> None:
    """``BudgetExceeded`` for a ``max_wall_clock`` over ``limits.max_wall_clock``."""
    limited_wall_clock(wall, limits.max_wall_clock)


def limit_tasks(tasks: Iterable[TaskSpec], defaults: TaskDefaults | None,
                limits: LimitsConfig) -> Iterator[TaskSpec]:
    """Each task as it streams to the submitter: the message's ``job.task`` defaults
    filled in where the handler set nothing, then its retries and wall clock checked
    against the limits (two comparisons a task). A task over a limit raises
    ``BudgetExceeded`` naming it: the submitter terminates the partly submitted job,
    and the message is dead-lettered."""
    retries = defaults.max_task_retries if defaults is not None else None
    wall = defaults.max_wall_clock if defaults is not None else None
    any_retries = limits.max_task_retries == -1
    most_retries, longest = limits.max_task_retries, limits.max_wall_clock
    for task in tasks:
        if task.max_task_retries is None:
            task.max_task_retries = retries
        if task.max_wall_clock is None:
            task.max_wall_clock = wall
        r, w = task.max_task_retries, task.max_wall_clock
        if ((r is not None and not any_retries and (r == -1 or r > most_retries))
                or (w is not None and (w > longest or w <= timedelta(0)))):
            try:
                check_retries(r, limits)
                check_wall_clock(w, limits)
            except BudgetExceeded as exc:
                raise BudgetExceeded(f"task {task.id[:64]!r}: {exc.description}") from None
        yield task


def apply_job_options(job: JobSpec, options: JobOptions, *, job_id: str,
                      default_pool: str, limits: LimitsConfig, handler: str) -> JobSpec:
    """Fill the job's id, pool, priority and constraints; enforce the operator's limits."""
    if job.task_count > limits.max_tasks_per_message:
        raise BudgetExceeded(f"the job has {job.task_count} tasks; this worker allows at "
                             f"most {limits.max_tasks_per_message} per message "
                             "(limits.max_tasks_per_message)")
    pool = options.pool or job.pool or default_pool
    if limits.allowed_pools and pool not in limits.allowed_pools:
        raise BudgetExceeded(f"pool {pool!r} is not one this worker may use "
                             f"(limits.allowed_pools: {', '.join(limits.allowed_pools)})")
    priority = options.priority if options.priority is not None else job.priority
    if not limits.min_priority <= priority <= limits.max_priority:
        raise BudgetExceeded(f"priority {priority} is outside this worker's limits "
                             f"{limits.min_priority}..{limits.max_priority}")
    retries = (options.max_task_retries if options.max_task_retries is not None
               else job.max_task_retries)
    check_retries(retries, limits)
    wall = options.max_wall_clock or job.max_wall_clock
    check_wall_clock(wall, limits)
    if options.task is not None:  # refused before the first task streams, if over
        check_retries(options.task.max_task_retries, limits)
        check_wall_clock(options.task.max_wall_clock, limits)
    job.id = job_id
    job.pool = pool
    job.priority = priority
    job.max_task_retries = retries
    job.max_wall_clock = wall
    job.display_name = options.display_name or job.display_name
    job.metadata = {**job.metadata, "fanout-handler": handler}
    job.tasks = limit_tasks(job.tasks, options.task, limits)
    return job
