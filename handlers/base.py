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
#: Batch's ``exitOptions.jobAction``: what a task's end does to its job (it takes
#: effect only on a job whose ``on_task_failure`` is ``"performexitoptionsjobaction"``).
JobAction = Literal["none", "disable", "terminate"]
#: Batch's ``exitOptions.dependencyAction``: whether the tasks that depend on this
#: one may run (``satisfy``) or keep waiting for ever (``block``).
DependencyAction = Literal["satisfy", "block"]
#: What a fan-in task (aggregate, manifest, merge) does when one of its
#: dependencies fails: ``run`` anyway (it sees which inputs are missing) or ``skip``.
DependencyFailure = Literal["run", "skip"]
#: How a task attempt ended, for choosing its exit options.
TaskEnd = Literal["exit", "pre_processing_error", "file_upload_error"]

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


@dataclass(frozen=True, slots=True)
class ExitOptions:
    """Batch's ``exitOptions``: what happens when a task ends a given way; None
    leaves Batch's default (see :meth:`ExitConditions.options_for`)."""

    job_action: JobAction | None = None
    dependency_action: DependencyAction | None = None


@dataclass(frozen=True, slots=True)
class ExitConditions:
    """Batch's task ``exitConditions``, set on the task whose end they judge.

    ``exit_codes`` and ``exit_code_ranges`` (inclusive) match the process's exit code
    first; ``pre_processing_error`` applies when the task could not start (a resource
    file failed, the command could not be found); ``file_upload_error`` when its output
    files failed to upload (an exit code match takes precedence over it); ``default``
    to every other end, including exit code 0.
    """

    exit_codes: tuple[tuple[int, ExitOptions], ...] = ()
    exit_code_ranges: tuple[tuple[int, int, ExitOptions], ...] = ()
    pre_processing_error: ExitOptions | None = None
    file_upload_error: ExitOptions | None = None
    default: ExitOptions | None = None

    def options_for(self, end: TaskEnd, exit_code: int | None,
                    on_task_failure_acts: bool = False) -> tuple[JobAction, DependencyAction]:
        """The ``(job action, dependency action)`` Batch applies, defaults filled in.

        Batch's defaults: dependency action ``satisfy`` for exit code 0 and ``block``
        otherwise; job action ``none`` for exit code 0 and ``terminate`` otherwise, the
        latter only when the job's ``onTaskFailure`` is ``performexitoptionsjobaction``
        (``on_task_failure_acts``); with ``noaction`` no job action is taken.
        """
        chosen: ExitOptions | None = None
        if end == "exit" or (end == "file_upload_error" and exit_code is not None):
            for code, options in self.exit_codes:
                if code == exit_code:
                    chosen = options
                    break
            else:
                for lo, hi, options in self.exit_code_ranges:
                    if exit_code is not None and lo <= exit_code <= hi:
                        chosen = options
                        break
        if chosen is None:
            chosen = {"pre_processing_error": self.pre_processing_error,
                      "file_upload_error": self.file_upload_error}.get(end) or self.default
        ok = end == "exit" and exit_code == 0
        job: JobAction = (chosen.job_action if chosen and chosen.job_action
                          else ("none" if ok else "terminate"))
        dep: DependencyAction = (chosen.dependency_action if chosen and chosen.dependency_action
                                 else ("satisfy" if ok else "block"))
        return (job if on_task_failure_acts else "none"), dep


_SATISFY = ExitOptions(dependency_action="satisfy")
#: Exit conditions for the dependencies of a fan-in task that runs whatever they do.
SATISFY_DEPENDENTS = ExitConditions(pre_processing_error=_SATISFY, file_upload_error=_SATISFY,
                                    default=_SATISFY)


def fan_in_exit_conditions(policy: DependencyFailure) -> ExitConditions | None:
    """The exit conditions a fan-in task's *dependencies* carry under ``policy``.

    ``run``: every end of a dependency satisfies its dependents, so the fan-in task
    runs once all have ended and sees which inputs are missing. ``skip``: None, Batch's
    default, so a failed dependency blocks the fan-in task; fanout's job monitor then
    finds the job's remaining tasks blocked for good and terminates the job as failed.
    """
    return SATISFY_DEPENDENTS if policy == "run" else None


@dataclass(frozen=True, slots=True)
class JobOutput:
    """An output location a handler declares for its job (reported in the job's
    completion event): a name such as ``"manifest"`` and a blob reference
    ``container/path`` (a prefix when it ends with ``/``). Never a URL with a SAS."""

    name: str
    location: str


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
    #: How this task's end affects its dependents and its job (Batch ``exitConditions``).
    exit_conditions: ExitConditions | None = None


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
    #: Batch's ``onTaskFailure``: ``"performexitoptionsjobaction"`` makes the tasks'
    #: exit options' job actions take effect; ``"noaction"`` (the default) ignores them.
    on_task_failure: Literal["noaction", "performexitoptionsjobaction"] = "noaction"
    #: Where the job's results land, for its completion event and ``fanout status``.
    outputs: list[JobOutput] = field(default_factory=list)


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
