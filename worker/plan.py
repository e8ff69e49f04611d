"""Message -> jobs, without submitting: the part ``fanout plan`` and the consumer share.

Parsing, routing, building and applying job options all happen here, so a dry run
sees exactly the jobs (and the faults) a real run would.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any

import structlog

from handlers.base import BuildRequest, JobSpec, OutputFile, TaskSpec
from worker import cost, window
from worker.backends.base import (
    META_KEY,
    META_LOGS,
    META_MESSAGE_ID,
    META_OUTPUTS,
    META_REPLY_TO,
    META_REQUEST,
    META_TASKS,
)
from worker.config import (
    BlobConfig,
    CostConfig,
    JobsConfig,
    LimitsConfig,
    ProgramCatalog,
    QueueConfig,
)
from worker.context import WorkerContext, apply_job_options, job_id_for, sas_lifetime
from worker.envelope import parse_body
from worker.routing import Router, Work
from worker.storage.base import Storage
from worker.tracing import Tracing

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class PlannedJob:
    """One job a message asks for, with its lazy tasks."""

    handler: str
    key: str
    job: JobSpec

    @property
    def request_hash(self) -> str:
        return self.job.metadata.get(META_REQUEST, "")


@dataclass(slots=True)
class Plan:
    """Every job one message asks for, the events it leaves alone, and the jobs a
    cancel message asks to terminate."""

    jobs: list[PlannedJob] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    cancels: list[str] = field(default_factory=list)


#: Longest metadata value fanout writes (keys, reply-to and outputs are cut to it).
MAX_METADATA_VALUE = 1024


def request_hash(handler: str, params: Mapping[str, Any], options: Any) -> str:
    """A digest of what a message asks for: the same idempotency key with a different
    request is an ``IdempotencyConflict``."""
    dumped = options.model_dump(mode="json", exclude_none=True) if options is not None else {}
    text = json.dumps({"handler": handler, "params": params, "job": dumped},
                      sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


class Planner:
    """Turns one message into its jobs; raises a ``MessageFault`` for a bad one.

    Given the sections it reads (``worker.app.make_planner`` picks them):
    ``programs`` (``Settings.program_specs()``), ``[limits]``, ``[jobs]``, ``[blob]``
    (the SAS wait allowance), ``[queue]`` (the largest message), ``[cost]`` (the
    allowed tags), the ``[handlers.<name>]`` tables, the default pool, whether messages
    may carry commands, and whether tasks upload their logs (on Azure); the router's
    routes are checked against ``jobs.max_wall_clock`` (worker/window.py)."""

    def __init__(self, *, router: Router, storage: Storage, programs: ProgramCatalog,
                 limits: LimitsConfig, jobs: JobsConfig, blob: BlobConfig,
                 queue: QueueConfig, cost: CostConfig,
                 handler_options: Mapping[str, Mapping[str, Any]], default_pool: str,
                 allow_message_commands: bool = False, log_uploads: bool = False,
                 tracing: Tracing | None = None) -> None:
        self.router = router
        self.storage = storage
        self.programs = programs
        self.limits = limits
        self.jobs = jobs
        self.blob = blob
        self.queue = queue
        self.cost = cost
        self.handler_options = handler_options
        self.default_pool = default_pool
        self.allow_message_commands = allow_message_commands
        self.log_uploads = log_uploads
        self.tracing = tracing or Tracing.off()
        window.check_routes(router.routes, jobs.max_wall_clock)

    def plan(self, body: bytes, properties: Mapping[str, str] | None = None, *,
             message_id: str | None = None, reply_to: str | None = None) -> Plan:
        """Parse, route and build; each job's tasks are still a lazy iterator.

        ``reply_to`` is the queue's ReplyTo; an envelope's ``reply_to`` wins over it.
        Traced as ``fanout.plan`` (worker/tracing.py)."""
        with self.tracing.span("fanout.plan", attributes={
                "messaging.message.id": message_id}) as span:
            plan = self._plan(body, properties, message_id=message_id, reply_to=reply_to)
            if self.tracing.enabled:
                span.set_attributes({
                    "fanout.jobs": [p.job.id for p in plan.jobs],
                    "fanout.handlers": sorted({p.handler for p in plan.jobs}),
                    "fanout.tasks": sum(p.job.task_count for p in plan.jobs),
                    "fanout.cancels": len(plan.cancels), "fanout.ignored": plan.ignored})
            return plan

    def _plan(self, body: bytes, properties: Mapping[str, str] | None, *,
              message_id: str | None, reply_to: str | None) -> Plan:
        parsed = parse_body(body, properties,
                            max_bytes=self.queue.max_message_bytes)
        routed = self.router.route(parsed, message_id=message_id)
        plan = Plan(ignored=list(routed.ignored), cancels=list(routed.cancels))
        for work in routed.works:
            origin = _origin(work, message_id, work.reply_to or reply_to)
            job = self.build(work, properties or {}, origin)
            plan.jobs.append(PlannedJob(work.handler_name, work.key, job))
        return plan

    def build(self, work: Work, properties: Mapping[str, str],
              origin: Mapping[str, str] | None = None) -> JobSpec:
        """One work item's job: the handler's spec with the message's job options, the
        operator's default wall clock, fanout's metadata (``origin``: who asked) and, on
        Azure, log uploads. An event of a windowed route becomes its share of the
        window's job (worker/window.py)."""
        structlog.contextvars.bind_contextvars(
            handler=work.handler_name, job_id=job_id_for(work.handler_name, work.key))
        job = self.spec(work, properties)
        if job.max_wall_clock is None:
            job.max_wall_clock = self.jobs.max_wall_clock
        if work.window is not None:
            own = work.without_window()
            job = window.gather(job, work.window, handler=work.handler_name,
                                fallback=lambda: self.build(own, properties, origin))
            self._upload_logs(job)
            log.debug("job.built", tasks=job.task_count, pool=job.pool, window=job.id)
            return job
        job.metadata.update(origin or {})
        job.metadata[META_REQUEST] = request_hash(work.handler_name, work.params, work.job)
        job.metadata[META_TASKS] = str(job.task_count)
        if job.outputs:
            outputs = json.dumps([[o.name, o.location] for o in job.outputs],
                                 separators=(",", ":"))
            job.metadata[META_OUTPUTS] = _fit_outputs(outputs, job)
        self._upload_logs(job)
        log.debug("job.built", tasks=job.task_count, pool=job.pool)
        return job

    def spec(self, work: Work, properties: Mapping[str, str],
             storage: Storage | None = None) -> JobSpec:
        """The handler's build with the message's job options applied and the operator's
        limits enforced; ``storage`` replaces the worker's store (the start-up route
        check passes one that signs nothing)."""
        job_id = job_id_for(work.handler_name, work.key)
        limits = self.limits
        # The URLs the handler asks for live the job's own wall clock plus the wait
        # allowance: the message's option, else the operator's default.
        wall = work.job.max_wall_clock or self.jobs.max_wall_clock
        ctx = WorkerContext(
            job_id=job_id, max_tasks=limits.max_tasks_per_message,
            allow_message_commands=self.allow_message_commands,
            programs=self.programs, handler_options=self.handler_options,
            storage=storage or self.storage, limits=limits,
            sas_lifetime=self.sas_lifetime(wall), registries=self.programs.registries)
        request = BuildRequest(handler=work.handler_name, params=work.params,
                               idempotency_key=work.key, properties=properties)
        job = apply_job_options(work.handler.build(request, ctx), work.job, job_id=job_id,
                                default_pool=self.default_pool, limits=limits,
                                handler=work.handler_name)
        if job.max_wall_clock is not None and job.max_wall_clock > wall:
            # The handler chose a longer wall clock of its own (within the limit): build
            # again, so its URLs live as long as the job may.
            ctx = replace(ctx, sas_lifetime=self.sas_lifetime(job.max_wall_clock))
            job = apply_job_options(work.handler.build(request, ctx), work.job,
                                    job_id=job_id, default_pool=self.default_pool,
                                    limits=limits, handler=work.handler_name)
        # Cost tags (the operator's keys only) into the metadata; the handler's estimate
        # against the task-hours budget, before anything is submitted (worker/cost.py).
        job.metadata.update(cost.tag_metadata(work.job.tags, self.cost.allowed_tags))
        cost.check_budget(job, limits)
        return job

    def sas_lifetime(self, wall_clock: timedelta | None) -> timedelta:
        """How long the URLs of a job with this max wall clock must stay valid."""
        return sas_lifetime(wall_clock or self.jobs.max_wall_clock, self.limits,
                            self.blob.sas_wait_allowance)

    def _upload_logs(self, job: JobSpec) -> None:
        """On Azure, every task uploads its stdout.txt and stderr.txt to
        ``<jobs.logs_container>/<job>/<task>/`` (on failure by default), so the logs
        outlive nodes that scale to zero; locally they stay in the task directory."""
        jobs = self.jobs
        if not self.log_uploads or jobs.log_upload == "never":
            return
        url = self.storage.output_container_url(jobs.logs_container, job.id,
                                                lifetime=self.sas_lifetime(job.max_wall_clock))
        condition: Any = "failure" if jobs.log_upload == "failure" else "completion"
        job.metadata[META_LOGS] = f"{jobs.logs_container}/{job.id}/"
        job.tasks = _with_logs(job.tasks, url, job.id, condition)


def _origin(work: Work, message_id: str | None, reply_to: str | None) -> dict[str, str]:
    """Who asked for the job, kept in its metadata for the monitor's event."""
    meta = {META_KEY: work.key[:MAX_METADATA_VALUE]}
    if message_id:
        meta[META_MESSAGE_ID] = message_id[:MAX_METADATA_VALUE]
    if reply_to:
        meta[META_REPLY_TO] = reply_to[:MAX_METADATA_VALUE]
    return meta


def _fit_outputs(text: str, job: JobSpec) -> str:
    """The outputs JSON, trimmed by whole entries to fit a metadata value."""
    outputs = list(job.outputs)
    while len(text) > MAX_METADATA_VALUE and outputs:
        outputs.pop()
        text = json.dumps([[o.name, o.location] for o in outputs], separators=(",", ":"))
    return text


def _with_logs(tasks: Iterable[TaskSpec], container_url: str, job_id: str,
               condition: Any) -> Iterator[TaskSpec]:
    """Add the log upload to each task as it streams past (one shared pattern)."""
    for task in tasks:
        task.output_files = [*task.output_files, OutputFile(
            file_pattern="../std*.txt", container_url=container_url,
            path=f"{job_id}/{task.id}", upload_condition=condition)]
        yield task



