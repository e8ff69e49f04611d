"""The plug-in surface: the Handler protocol and the job and task spec models.

A handler turns one validated message into a :class:`JobSpec` whose ``tasks`` is a
lazy iterator of :class:`TaskSpec`. Handlers never import ``worker``: everything they
need from the running worker (configured programs, storage URLs, limits) comes
through the :class:`BuildContext` protocol, which the worker implements.

The spec models mirror the Azure Batch task and job models closely enough that the
Azure backend maps them field for field, and the local executor honours the same
fields. ``TaskSpec`` is a slotted dataclass rather than a validated model on purpose:
a sweep may build a million of them, so validation happens once at the message
boundary and the per-task path stays light.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal, Protocol, runtime_checkable

from handlers.errors import InvalidParams

UploadCondition = Literal["success", "failure", "completion"]

#: Azure Batch ids: letters, digits, hyphens and underscores, at most 64 characters.
ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True, slots=True)
class BlobRef:
    """A blob in a container of the configured storage (never a foreign account)."""

    container: str
    blob: str

    def __str__(self) -> str:
        return f"{self.container}/{self.blob}"


@dataclass(frozen=True, slots=True)
class ResourceFile:
    """A file the task needs, downloaded into its working directory before it runs.

    ``http_url`` is a task-readable URL produced by ``BuildContext.input_url`` (a
    short-lived read-only SAS URL on Azure, a ``file://`` URL locally).

    Or, as Batch's ``storageContainerUrl`` + ``blobPrefix``: ``http_url`` is ``""``,
    ``storage_container_url`` comes from ``BuildContext.input_container_url``, and
    every blob whose name starts with ``blob_prefix`` is downloaded to
    ``<file_path>/<full blob name>`` (``file_path`` is then a directory, may be ``""``).
    """

    http_url: str
    file_path: str
    file_mode: str | None = None
    storage_container_url: str | None = None
    blob_prefix: str | None = None


@dataclass(frozen=True, slots=True)
class OutputFile:
    """Files matching ``file_pattern`` uploaded after the task ends, as Batch does.

    ``container_url`` is a task-writable destination from
    ``BuildContext.output_container_url``; ``path`` is the blob name (or, for a
    pattern with wildcards, the blob prefix) under it.
    """

    file_pattern: str
    container_url: str
    path: str
    upload_condition: UploadCondition = "success"


@dataclass(slots=True)
class TaskSpec:
    """One Azure Batch task. ``command_line`` runs without a shell, as on Batch."""

    id: str
    command_line: str
    environment: dict[str, str] = field(default_factory=dict)
    resource_files: list[ResourceFile] = field(default_factory=list)
    output_files: list[OutputFile] = field(default_factory=list)
    depends_on: tuple[str, ...] = ()
    depends_on_ranges: tuple[tuple[int, int], ...] = ()
    max_task_retries: int | None = None
    max_wall_clock: timedelta | None = None
    retention: timedelta | None = None
    required_slots: int = 1
    container_image: str | None = None
    display_name: str | None = None


@dataclass(slots=True)
class JobSpec:
    """One Azure Batch job and its tasks.

    ``tasks`` is consumed once, lazily, by the submitter; ``task_count`` is the exact
    number it will yield, known up front so budgets are checked before anything is
    submitted. The worker fills ``id`` and applies the message's job options; a
    handler may set ``pool`` as its own default.
    """

    tasks: Iterable[TaskSpec]
    task_count: int
    id: str = ""
    pool: str | None = None
    priority: int = 0
    max_task_retries: int | None = None
    max_wall_clock: timedelta | None = None
    display_name: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    uses_task_dependencies: bool = False


@dataclass(frozen=True, slots=True)
class Program:
    """An operator-configured command template, e.g. ``python3 sim.py --a {alpha}``."""

    name: str
    command: str
    environment: Mapping[str, str] = field(default_factory=dict)
    container_image: str | None = None
    required_slots: int = 1


@dataclass(frozen=True, slots=True)
class BuildRequest:
    """What a handler gets from one message: its params and where it came from."""

    handler: str
    params: Mapping[str, Any]
    idempotency_key: str
    properties: Mapping[str, str] = field(default_factory=dict)


@runtime_checkable
class BuildContext(Protocol):
    """What the worker offers a handler while it builds one job."""

    @property
    def job_id(self) -> str:
        """The job id the worker derived from the message's idempotency key."""
        ...

    @property
    def max_tasks(self) -> int:
        """The operator's limit on tasks per message (``limits.max_tasks_per_message``)."""
        ...

    @property
    def allow_message_commands(self) -> bool:
        """True only when the operator opted in to command lines carried by messages."""
        ...

    def program(self, name: str) -> Program:
        """Return the configured program ``name``; raise ``UnknownProgram`` otherwise."""
        ...

    def options(self, handler: str) -> Mapping[str, Any]:
        """Return the operator's ``[handlers.<name>]`` table (presets, profiles...)."""
        ...

    def blob_ref(self, value: object) -> BlobRef:
        """Parse ``{"container", "blob"}`` or a blob URL; raise ``ForeignStorage`` for
        a URL of an unconfigured account and ``InvalidParams`` for a bad name."""
        ...

    def input_url(self, ref: BlobRef) -> str:
        """A task-readable URL for one input blob (read-only, short-lived)."""
        ...

    def output_container_url(self, container: str, prefix: str) -> str:
        """A task-writable destination for outputs under ``prefix`` in ``container``."""
        ...

    def input_container_url(self, container: str, prefix: str) -> str:
        """A task-readable, listable URL of ``container`` for staging every blob under
        ``prefix`` (``ResourceFile.storage_container_url``; read+list, short-lived)."""
        ...


class Handler(Protocol):
    """A plug-in that turns one message's params into a job with its tasks.

    Register one through the ``fanout.handlers`` entry-point group; the entry
    point's name is the handler's name in messages. It is instantiated once with no
    arguments at start-up and must be safe to call from several threads.

    A handler with operator options may also define ``check_options(options)``:
    the worker calls it once at start-up with the ``[handlers.<name>]`` table, and
    a ``ValueError`` it raises stops the worker with that message, instead of every
    message failing later.
    """

    def build(self, request: BuildRequest, ctx: BuildContext) -> JobSpec:
        """Validate ``request.params`` and return the job; raise a ``MessageFault``."""
        ...


def check_task_id(task_id: str) -> str:
    """Return ``task_id`` if it is a valid Batch id, else raise ``InvalidParams``."""
    if not ID_PATTERN.match(task_id):
        raise InvalidParams(
            f"task id {task_id!r} is not 1-64 letters, digits, hyphens or underscores"
        )
    return task_id
