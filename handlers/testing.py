"""A test kit for handler authors: a ``BuildContext`` over plain values.

:class:`StubContext` (or :func:`make_context`) stands in for the worker while a
handler's ``build()`` runs in a unit test: configured programs, ``[handlers.<name>]``
options, registries, the per-task limits, and storage URLs under a made-up root. It
imports nothing from ``worker``, so a plug-in's tests need only this and
``handlers.base``; to run ``build()`` through the worker's own validation and limits
as a message would, use ``worker.testing`` ::

    from handlers.testing import make_context, request, tasks_of

    ctx = make_context(programs={"sim": "python3 sim.py --alpha {alpha}"})
    job = MyHandler().build(request("mine", {"alpha": [1, 2]}), ctx)
    assert [t.id for t in tasks_of(job)] == ["0", "1"]

The stub is lenient where the worker is strict: ``blob_ref`` takes
``{"container", "blob"}`` objects and URLs under its own root without checking
Azure's naming rules, and it signs nothing. ``check_task_limits`` refuses what the
worker refuses, with the same messages.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from urllib.parse import quote, unquote

from handlers.base import (
    BlobRef,
    BuildRequest,
    ContainerRegistry,
    ContainerSettings,
    ContainerWorkingDirectory,
    JobSpec,
    Program,
    TaskSpec,
)
from handlers.containers import find_registry, make_container
from handlers.errors import ForeignStorage, InvalidParams, UnknownProgram
from handlers.limits import check_retries, check_wall_clock

__all__ = ["StubContext", "TaskLimits", "make_context", "request", "tasks_of"]

#: Where the stub's storage URLs point unless told otherwise.
DEFAULT_BLOB_ROOT = "file:///blobs"


@dataclass(frozen=True, slots=True)
class TaskLimits:
    """The operator's per-task limits that ``check_task_limits`` holds a handler to;
    the defaults are the worker's (``[limits]``). ``max_task_retries = -1`` allows
    unlimited retries."""

    max_task_retries: int = 10
    max_wall_clock: timedelta = timedelta(days=6)


@dataclass
class StubContext:
    """Implements ``handlers.base.BuildContext`` over plain values; every field may
    be changed between builds (``ctx.max_tasks = 10``)."""

    programs: dict[str, Program] = field(default_factory=dict)
    max_tasks: int = 100_000
    allow_message_commands: bool = False
    job_id: str = "job-1"
    #: ``[handlers.<name>]`` tables by handler name.
    handler_options: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    limits: TaskLimits = field(default_factory=TaskLimits)
    registries: dict[str, ContainerRegistry] = field(default_factory=dict)
    #: The URL every blob and container URL starts with: ``<root>/<container>[/<blob>]``.
    blob_root: str = DEFAULT_BLOB_ROOT

    def program(self, name: str) -> Program:
        if name not in self.programs:
            known = ", ".join(sorted(self.programs)) or "none"
            raise UnknownProgram(f"no program named {str(name)[:64]!r} is configured "
                                 f"(configured: {known})")
        return self.programs[name]

    def options(self, handler: str) -> Mapping[str, Any]:
        return self.handler_options.get(handler, {})

    def blob_ref(self, value: object) -> BlobRef:
        """``{"container", "blob"}`` or a URL under ``blob_root``; another URL is
        ``ForeignStorage``, anything else ``InvalidParams``."""
        if isinstance(value, Mapping):
            container, blob = value.get("container"), value.get("blob")
            if isinstance(container, str) and container and isinstance(blob, str) and blob:
                return BlobRef(container, blob)
            raise InvalidParams('a blob reference is {"container": "...", "blob": "..."}')
        if isinstance(value, str):
            root = self.blob_root.rstrip("/") + "/"
            if not value.startswith(root):
                raise ForeignStorage(f"blob URL {value[:80]!r} is not under {root}")
            container, _, blob = unquote(value[len(root):]).partition("/")
            if container and blob:
                return BlobRef(container, blob)
        raise InvalidParams(f"{str(value)[:80]!r} is not a blob reference")

    def input_url(self, ref: BlobRef) -> str:
        return f"{self.blob_root.rstrip('/')}/{quote(ref.container)}/{quote(ref.blob)}"

    def output_container_url(self, container: str, prefix: str) -> str:
        return f"{self.blob_root.rstrip('/')}/{quote(container)}"

    def input_container_url(self, container: str, prefix: str) -> str:
        return f"{self.blob_root.rstrip('/')}/{quote(container)}"

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
        check_retries(max_task_retries, self.limits.max_task_retries)
        check_wall_clock(max_wall_clock, self.limits.max_wall_clock)


def make_context(programs: Mapping[str, Program | str] | None = None, *,
                 options: Mapping[str, Mapping[str, Any]] | None = None,
                 registries: Mapping[str, ContainerRegistry] | None = None,
                 limits: TaskLimits | None = None, blob_root: str = DEFAULT_BLOB_ROOT,
                 job_id: str = "job-1", max_tasks: int = 100_000,
                 allow_message_commands: bool = False) -> StubContext:
    """A :class:`StubContext`; a program given as a string is its command template
    (``{"sim": "python3 sim.py --alpha {alpha}"}``)."""
    specs = {name: value if isinstance(value, Program) else Program(name=name, command=value)
             for name, value in (programs or {}).items()}
    return StubContext(programs=specs, max_tasks=max_tasks,
                       allow_message_commands=allow_message_commands, job_id=job_id,
                       handler_options=dict(options or {}), limits=limits or TaskLimits(),
                       registries=dict(registries or {}), blob_root=blob_root)


def request(handler: str, params: Mapping[str, Any], key: str = "test-key",
            properties: Mapping[str, str] | None = None) -> BuildRequest:
    """The ``BuildRequest`` a message with these params would give ``handler``."""
    return BuildRequest(handler=handler, params=params, idempotency_key=key,
                        properties=dict(properties or {}))


def tasks_of(job: JobSpec) -> list[TaskSpec]:
    """Draw a job's tasks (once: they are an iterator) and hold the handler to its
    ``task_count``, as the worker's submitter does; ``job.tasks`` becomes the list."""
    tasks = list(_draw(job.tasks))
    if len(tasks) != job.task_count:
        raise RuntimeError(f"the handler declared {job.task_count} tasks but yielded "
                             f"{len(tasks)}")
    job.tasks = tasks
    return tasks


def _draw(tasks: Iterable[TaskSpec]) -> Iterable[TaskSpec]:
    for task in tasks:
        if not isinstance(task, TaskSpec):
            raise TypeError(f"the handler yielded a {type(task).__name__}, not a TaskSpec")
        yield task
