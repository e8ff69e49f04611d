"""A minimal BuildContext for handler tests (no worker needed)."""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from handlers.base import (
    BlobRef,
    ContainerRegistry,
    ContainerSettings,
    ContainerWorkingDirectory,
    JobSpec,
    Program,
    TaskSpec,
)
from handlers.errors import InvalidParams, UnknownProgram
from worker.app import make_storage
from worker.config import LimitsConfig, Settings
from worker.context import check_retries, check_wall_clock
from worker.plan import Plan, Planner
from worker.routing import HandlerRegistry, Router
from worker.storage.base import Storage


@dataclass
class StubContext:
    """Implements handlers.base.BuildContext over plain dicts."""

    programs: dict[str, Program] = field(default_factory=dict)
    max_tasks: int = 100_000
    allow_message_commands: bool = False
    job_id: str = "job-1"
    handler_options: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    registries: dict[str, ContainerRegistry] = field(default_factory=dict)

    def program(self, name: str) -> Program:
        if name not in self.programs:
            raise UnknownProgram(f"no program {name!r}")
        return self.programs[name]

    def options(self, handler: str) -> Mapping[str, Any]:
        return self.handler_options.get(handler, {})

    def blob_ref(self, value: object) -> BlobRef:
        if isinstance(value, dict):
            return BlobRef(value["container"], value["blob"])
        raise InvalidParams("stub takes dicts only")

    def input_url(self, ref: BlobRef) -> str:
        return f"file:///blobs/{ref.container}/{ref.blob}"

    def output_container_url(self, container: str, prefix: str) -> str:
        return f"file:///blobs/{container}"

    def input_container_url(self, container: str, prefix: str) -> str:
        return f"file:///blobs/{container}"

    def registry(self, name: str) -> ContainerRegistry:
        if name not in self.registries:
            raise InvalidParams(f"no container registry named {name!r}")
        return self.registries[name]

    def container(self, image: str, *, registry: str | None = None,
                  run_options: str | None = None,
                  working_directory: ContainerWorkingDirectory = "taskWorkingDirectory"
                  ) -> ContainerSettings:
        found = self.registry(registry) if registry is not None else None
        return ContainerSettings(image=image, registry=found, run_options=run_options,
                                 working_directory=working_directory)

    def check_task_limits(self, *, max_task_retries: int | None = None,
                          max_wall_clock: timedelta | None = None) -> None:
        check_retries(max_task_retries, self.limits)
        check_wall_clock(max_wall_clock, self.limits)


@pytest.fixture
def stub_ctx() -> StubContext:
    """A context with one program, `simulate`, taking alpha and beta."""
    return StubContext(programs={
        "simulate": Program(name="simulate",
                            command="python3 sim.py --alpha {alpha} --beta {beta}"),
        "reduce": Program(name="reduce", command="python3 reduce.py --n {task_count}"),
    })


@dataclass
class PlanHarness:
    """The worker's real planner (entry-point handlers, router, storage) over Settings."""

    settings: Settings
    planner: Planner

    @property
    def storage(self) -> Storage:
        return self.planner.storage

    def plan(self, body: Any, message_id: str = "msg-1") -> Plan:
        """Plan a message body (a dict or list is sent as JSON)."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.planner.plan(data, {}, message_id=message_id)

    def job(self, body: Any) -> tuple[JobSpec, list[TaskSpec]]:
        """The one job a message plans, with its tasks drawn from the iterator."""
        planned = self.plan(body)
        assert len(planned.jobs) == 1, planned
        job = planned.jobs[0].job
        return job, list(job.tasks)


@pytest.fixture
def make_planner(make_settings: Callable[..., Settings]) -> Callable[..., PlanHarness]:
    """Build a PlanHarness from Settings overrides (local storage unless blob is set)."""

    def make(**overrides: Any) -> PlanHarness:
        settings = make_settings(**overrides)
        storage = make_storage(settings)
        router = Router(registry=HandlerRegistry.from_entry_points(), routes=settings.routes,
                        storage=storage, drop_unrouted=settings.events.unrouted == "drop")
        return PlanHarness(settings=settings,
                           planner=Planner(router=router, settings=settings, storage=storage))

    return make


def inner_argv(command_line: str) -> list[str]:
    """The words of the shell command a task runs: ``/bin/sh -c '<this>'`` split."""
    outer = shlex.split(command_line)
    assert outer[:2] == ["/bin/sh", "-c"] and len(outer) == 3, outer
    return shlex.split(outer[2])


SAMPLES = Path(__file__).parent / "samples"


def sample(name: str) -> dict[str, Any]:
    """A copy of one of the sample events (tests/handlers/samples)."""
    data: dict[str, Any] = json.loads((SAMPLES / name).read_text())
    return data
