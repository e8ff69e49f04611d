"""Message -> jobs, without submitting: the part ``fanout plan`` and the consumer share.

Parsing, routing, building and applying job options all happen here, so a dry run
sees exactly the jobs (and the faults) a real run would.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import structlog

from handlers.base import BuildRequest, JobSpec
from worker.config import Settings
from worker.context import WorkerContext, apply_job_options, job_id_for
from worker.envelope import parse_body
from worker.routing import Router, Work
from worker.storage.base import Storage

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class PlannedJob:
    """One job a message asks for, with its lazy tasks."""

    handler: str
    key: str
    job: JobSpec


@dataclass(slots=True)
class Plan:
    """Every job one message asks for, and the events it leaves alone."""

    jobs: list[PlannedJob] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


class Planner:
    """Turns one message into its jobs; raises a ``MessageFault`` for a bad one."""

    def __init__(self, *, router: Router, settings: Settings, storage: Storage) -> None:
        self.router = router
        self.settings = settings
        self.storage = storage
        self._programs = settings.program_specs()

    def plan(self, body: bytes, properties: Mapping[str, str] | None = None, *,
             message_id: str | None = None) -> Plan:
        """Parse, route and build; each job's tasks are still a lazy iterator."""
        parsed = parse_body(body, properties,
                            max_bytes=self.settings.queue.max_message_bytes)
        routed = self.router.route(parsed, message_id=message_id)
        plan = Plan(ignored=list(routed.ignored))
        for work in routed.works:
            plan.jobs.append(PlannedJob(work.handler_name, work.key,
                                        self.build(work, properties or {})))
        return plan

    def build(self, work: Work, properties: Mapping[str, str]) -> JobSpec:
        """One work item's job: the handler's spec with the message's job options."""
        job_id = job_id_for(work.handler_name, work.key)
        structlog.contextvars.bind_contextvars(handler=work.handler_name, job_id=job_id)
        limits = self.settings.limits
        ctx = WorkerContext(
            job_id=job_id, max_tasks=limits.max_tasks_per_message,
            allow_message_commands=self.settings.allow_message_commands,
            programs=self._programs, handler_options=self.settings.handlers,
            storage=self.storage)
        request = BuildRequest(handler=work.handler_name, params=work.params,
                               idempotency_key=work.key, properties=properties)
        job = work.handler.build(request, ctx)
        apply_job_options(job, work.job, job_id=job_id, default_pool=self.settings.default_pool,
                          limits=limits, handler=work.handler_name)
        log.info("job.built", tasks=job.task_count, pool=job.pool)
        return job
