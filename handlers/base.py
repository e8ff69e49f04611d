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
import shlex
from collections.abc import Iterable, Mapping, Sequence
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
#: Batch's ``ContainerWorkingDirectory``: ``taskWorkingDirectory`` (the default: the
#: task's own working directory, holding its resource files, is the container's) or
#: ``containerImageDefault`` (the image's WORKDIR, "Beware that this directory will not
#: contain the Resource Files downloaded by Batch", BatchService.json).
ContainerWorkingDirectory = Literal["taskWorkingDirectory", "containerImageDefault"]
CONTAINER_WORKING_DIRECTORIES: tuple[ContainerWorkingDirectory, ...] = (
    "taskWorkingDirectory", "containerImageDefault")
#: An image reference as ``docker pull`` takes it (``[host[:port]/]path[:tag][@digest]``):
#: lower-case path components, never starting with ``-`` (it goes into a command line).
_IMAGE = re.compile(
    r"^(?:(?P<host>(?:localhost|(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+"
    r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)(?::[0-9]{1,5})?"
    r"|[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?:[0-9]{1,5})/)?"
    r"(?P<path>[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?"
    r"(?:@(?P<digest>[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}))?$")
#: A registry server: a host name with an optional port (and, as Batch's examples
#: allow, an ``https://`` scheme and a path).
_SERVER = re.compile(r"^(?:https?://)?[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?(?::[0-9]{1,5})?"
                     r"(?:/[A-Za-z0-9._~-]+)*/?$")
#: The ARM resource id of a user-assigned managed identity (Batch's
#: ``BatchNodeIdentityReference.resourceId``).
_IDENTITY = re.compile(
    r"^/subscriptions/[^/\s]+/resourceGroups/[^/\s]+/providers/"
    r"Microsoft\.ManagedIdentity/userAssignedIdentities/[^/\s]+$", re.IGNORECASE)
#: ``docker create`` options the task runner controls ("in addition to those
#: controlled by the Batch Service", BatchTaskContainerSettings.containerRunOptions):
#: the container's name and how it is attached; refused in ``run_options``.
_ENGINE_CONTROLLED = frozenset({"--name", "--detach", "--interactive", "--tty",
                                "--attach"})
#: Names Docker Hub goes by: an image without a host comes from there.
DOCKER_HUB = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io",
                        "registry.hub.docker.com", "hub.docker.com"})


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


def check_image(image: str) -> str:
    """Return ``image`` if it is an image reference ``docker pull`` takes (a host part
    only when it has a dot, a port or is ``localhost``), else raise ``ValueError``."""
    if not isinstance(image, str) or len(image) > 512 or _IMAGE.match(image) is None:
        raise ValueError(f"{str(image)[:80]!r} is not a container image reference "
                         "([registry/]name[:tag][@digest], lower-case name)")
    return image


def image_host(image: str) -> str:
    """The registry an image is pulled from: its first component when that has a dot
    or a port or is ``localhost`` (as Docker reads a reference), else Docker Hub."""
    first, sep, _rest = image.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return first.lower()
    return "docker.io"


def server_host(server: str) -> str:
    """A registry server as a bare lower-case host (scheme and path dropped); Docker
    Hub's aliases are ``docker.io``."""
    host = server.split("://", 1)[-1].split("/", 1)[0].lower()
    return "docker.io" if host in DOCKER_HUB else host


@dataclass(frozen=True, slots=True)
class ContainerRegistry:
    """A private container registry, as Batch's ``ContainerRegistryReference``
    (BatchService.json, api-version 2025-06-01; azure-batch 15.x
    ``models.ContainerRegistryReference``): ``registryServer`` ("If omitted, the
    default is docker.io"), and either ``identityReference`` ("The reference to the
    user assigned identity to use to access an Azure Container Registry instead of
    username and password": the ARM resource id of a user-assigned managed identity of
    the *pool*) or ``username`` and ``password``.

    The password never appears in ``repr`` (nor in logs, ``fanout plan`` or errors);
    only the Azure wire body carries it.
    """

    server: str
    identity_reference: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    #: The configuration's name for it (``[registries.<name>]``), for messages.
    name: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.server, str) or not _SERVER.match(self.server):
            raise ValueError(f"registry server {str(self.server)[:80]!r} is not a host name "
                             "(myacr.azurecr.io, registry.example.com:5000)")
        if self.identity_reference is not None:
            if self.username is not None or self.password is not None:
                raise ValueError("a registry takes an identity or a username and password, "
                                 "not both")
            if not _IDENTITY.match(self.identity_reference):
                raise ValueError(
                    f"identity {self.identity_reference[:200]!r} is not the resource id of "
                    "a user-assigned managed identity (/subscriptions/<id>/resourceGroups/"
                    "<group>/providers/Microsoft.ManagedIdentity/userAssignedIdentities/"
                    "<name>)")
        elif self.username is None or self.password is None:
            raise ValueError("a registry needs an identity, or a username and a password")

    @property
    def host(self) -> str:
        return server_host(self.server)


@dataclass(frozen=True, slots=True)
class ContainerSettings:
    """The container a task runs in, as Batch's task ``containerSettings``
    (``BatchTaskContainerSettings`` in BatchService.json, api-version 2025-06-01;
    azure-batch 15.x ``models.BatchTaskContainerSettings``): ``imageName`` ("the full
    Image reference, as would be specified to docker pull"), ``registry`` ("The private
    registry which contains the container Image. This setting can be omitted if was
    already provided at Pool creation"), ``containerRunOptions`` ("supplied as arguments
    to the docker create command, in addition to those controlled by the Batch
    Service") and ``workingDirectory`` (default ``taskWorkingDirectory``).

    ``run_options`` come from the operator's configuration only, never from a message.
    Build one per job (``BuildContext.container``) and share it across its tasks.
    """

    image: str
    registry: ContainerRegistry | None = None
    run_options: str | None = None
    working_directory: ContainerWorkingDirectory = "taskWorkingDirectory"

    def __post_init__(self) -> None:
        check_image(self.image)
        if self.working_directory not in CONTAINER_WORKING_DIRECTORIES:
            raise ValueError(f"container working directory {self.working_directory!r} is "
                             "not taskWorkingDirectory or containerImageDefault")
        if self.run_options is not None:
            try:
                words = shlex.split(self.run_options)
            except ValueError as exc:
                raise ValueError(f"container run options do not parse: {exc}") from None
            for word in words:
                flag = word.split("=", 1)[0]
                if flag in _ENGINE_CONTROLLED or (
                        len(flag) > 1 and flag[0] == "-" and flag[1] != "-"
                        and set(flag[1:]) & {"d", "i", "t"}):
                    raise ValueError(
                        f"container run option {word[:40]!r} is the engine's to set: the "
                        "task runner names, attaches and removes the container itself")
        if self.registry is not None and self.registry.host != image_host(self.image):
            raise ValueError(f"image {self.image} is not on registry "
                             f"{self.registry.name or self.registry.server} "
                             f"({self.registry.host}): name the image with its registry "
                             f"({self.registry.host}/...)")


@dataclass(frozen=True, slots=True)
class JobOutput:
    """An output location a handler declares for its job (reported in the job's
    completion event): a name such as ``"manifest"`` and a blob reference
    ``container/path`` (a prefix when it ends with ``/``). Never a URL with a SAS."""

    name: str
    location: str


@dataclass(slots=True)
class TaskSpec:
    """One Azure Batch task. ``command_line`` runs without a shell, as on Batch.

    ``resource_files`` and ``output_files`` default to one shared empty tuple, not a
    new list per task (a million-task sweep builds a million of these): to add files,
    assign a new sequence (``task.output_files = [*task.output_files, more]``), as the
    worker does; never change one in place."""

    id: str
    command_line: str
    environment: dict[str, str] = field(default_factory=dict)
    resource_files: Sequence[ResourceFile] = ()
    output_files: Sequence[OutputFile] = ()
    depends_on: tuple[str, ...] = ()
    depends_on_ranges: tuple[tuple[int, int], ...] = ()
    max_task_retries: int | None = None
    max_wall_clock: timedelta | None = None
    retention: timedelta | None = None
    required_slots: int = 1
    #: Run in a container (Batch ``containerSettings``); None: on the node itself.
    container: ContainerSettings | None = None
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
    #: The handler's estimate of the job's task-hours (each task's expected duration
    #: times its required slots, summed), held against ``limits.max_task_hours``
    #: before anything is submitted; None: no estimate, no check.
    estimated_task_hours: float | None = None
    #: How the estimate was made, for the error over budget (``"20 tasks x PT10M x 1
    #: slot (programs.pi.expected_duration)"``).
    estimate_basis: str | None = None


@dataclass(frozen=True, slots=True)
class Program:
    """An operator-configured command template, e.g. ``python3 sim.py --a {alpha}``."""

    name: str
    command: str
    environment: Mapping[str, str] = field(default_factory=dict)
    #: The container its tasks run in (``container_image`` and friends in the program's
    #: configuration); None: on the node itself.
    container: ContainerSettings | None = None
    required_slots: int = 1
    #: Per-task inputs, ``"<container>/<blob name>"`` templated by the task's fields
    #: (``"data/{sample}.csv"``); a name ending in ``/`` stages every blob under it.
    inputs: tuple[str, ...] = ()
    #: ``"<container>"`` or ``"<container>/<name prefix>"``: what a message's own
    #: inputs may name (none when empty).
    allowed_inputs: tuple[str, ...] = ()
    #: File patterns (relative to the working directory) uploaded after each task.
    outputs: tuple[str, ...] = ()
    #: When the outputs are uploaded: on the task's ``success``, ``failure`` or ``completion``.
    upload_condition: UploadCondition = "success"
    #: How long one of its tasks is expected to run (``expected_duration``), for the
    #: job's estimate (``JobSpec.estimated_task_hours``); None: no estimate.
    expected_duration: timedelta | None = None


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

    def check_task_limits(self, *, max_task_retries: int | None = None,
                          max_wall_clock: timedelta | None = None) -> None:
        """Raise ``BudgetExceeded`` when per-task settings are over the operator's limits
        (``limits.max_task_retries``, where -1 means unlimited and is allowed only when
        the limit is -1 too; ``limits.max_wall_clock``), with the message a job option
        over them gets. A handler with per-task options calls this at build time; the
        worker checks every task it yields again as it streams, so a handler that does
        not is still refused, just later."""
        ...

    def registry(self, name: str) -> ContainerRegistry:
        """The configured ``[registries.<name>]``; ``InvalidParams`` naming the
        configured ones otherwise."""
        ...

    def container(self, image: str, *, registry: str | None = None,
                  run_options: str | None = None,
                  working_directory: ContainerWorkingDirectory = "taskWorkingDirectory"
                  ) -> ContainerSettings:
        """Container settings for ``image`` pulled from the configured registry
        ``registry`` (None: a public image, or one the pool's own registries cover).
        ``run_options`` must come from the operator's configuration, never a message.
        A bad image, working directory or registry name is ``InvalidParams``."""
        ...


class Handler(Protocol):
    """A plug-in that turns one message's params into a job with its tasks.

    Register one through the ``fanout.handlers`` entry-point group; the entry
    point's name is the handler's name in messages. It is instantiated once with no
    arguments at start-up and must be safe to call from several threads.

    A handler with operator options may also satisfy :class:`ChecksOptions`.
    """

    def build(self, request: BuildRequest, ctx: BuildContext) -> JobSpec:
        """Validate ``request.params`` and return the job; raise a ``MessageFault``."""
        ...


@runtime_checkable
class ChecksOptions(Protocol):
    """A handler that checks its operator options before any message: the worker
    calls ``check_options`` once at start-up with the ``[handlers.<name>]`` table
    (``{}`` when there is none), and a ``ValueError`` it raises stops the worker with
    that message, instead of every message failing later."""

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` naming what is wrong with ``options``."""
        ...


def check_task_id(task_id: str) -> str:
    """Return ``task_id`` if it is a valid Batch id, else raise ``InvalidParams``."""
    if not ID_PATTERN.match(task_id):
        raise InvalidParams(
            f"task id {task_id!r} is not 1-64 letters, digits, hyphens or underscores"
        )
    return task_id
