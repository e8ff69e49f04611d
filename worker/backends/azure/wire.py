"""The Azure Batch REST shapes fanout sends and reads, as plain dicts and JSON.

The SDK's model layer costs about 85 µs of client CPU per task, most of it
deserializing the add-collection answer into models (docs/performance.md);
building the bodies as dicts and reading the answers with ``json.loads`` costs a few
µs. Field names and enum values are those of api-version ``2025-06-01`` (azure-batch
15.x).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from handlers.base import (
    ContainerRegistry,
    ContainerSettings,
    ExitConditions,
    ExitOptions,
    JobSpec,
    OutputFile,
    ResourceFile,
    TaskEnd,
    TaskSpec,
    image_host,
    server_host,
)
from worker.backends.base import (
    META_HANDLER,
    AddResult,
    FailedTask,
    FailureCategory,
    JobRecord,
    TaskCounts,
    TaskError,
)

#: The REST api-version; passed to ``BatchClient`` too so both agree.
API_VERSION = "2025-06-01"
#: The content type the SDK sends with JSON bodies (it is part of the shared-key signature).
JSON_CONTENT_TYPE = "application/json; odata=minimalmetadata"
#: The service's limits on one add-task-collection request.
MAX_TASKS_PER_REQUEST = 100
MAX_BODY_BYTES = 1024 * 1024
#: Job metadata that marks a job as fanout's (the worker sets it to the handler's name).
FANOUT_METADATA_KEY = META_HANDLER

_UPLOAD_CONDITION = {"success": "tasksuccess", "failure": "taskfailure",
                     "completion": "taskcompletion"}
#: Per-task error codes worth retrying (status ``serverError`` always is).
TRANSIENT_CODES = frozenset({"ServerBusy", "InternalError", "OperationTimedOut",
                             "TooManyRequests"})


def iso_duration(value: timedelta) -> str:
    """``timedelta(days=1, hours=2, seconds=3.5)`` -> ``"P1DT2H0M3.5S"`` (ISO 8601)."""
    micros = round(value.total_seconds() * 1_000_000)
    if micros < 0:
        raise ValueError(f"a Batch duration cannot be negative: {value}")
    days, micros = divmod(micros, 86_400_000_000)
    hours, micros = divmod(micros, 3_600_000_000)
    minutes, micros = divmod(micros, 60_000_000)
    seconds = f"{micros / 1_000_000:.6f}".rstrip("0").rstrip(".")
    head = f"P{days}D" if days else "P"
    return f"{head}T{hours}H{minutes}M{seconds}S"


def job_body(job: JobSpec, pool: str) -> dict[str, Any]:
    """The create-job body: on-all-tasks-complete = no action (sealed later)."""
    body: dict[str, Any] = {"id": job.id, "poolInfo": {"poolId": pool},
                            "onAllTasksComplete": "noaction", "priority": job.priority}
    if job.display_name:
        body["displayName"] = job.display_name
    constraints = _constraints(job.max_task_retries, job.max_wall_clock, None)
    if constraints:
        body["constraints"] = constraints
    if job.metadata:
        body["metadata"] = [{"name": k, "value": v} for k, v in job.metadata.items()]
    if job.uses_task_dependencies:
        body["usesTaskDependencies"] = True
    if job.on_task_failure != "noaction":
        body["onTaskFailure"] = job.on_task_failure
    return body


def task_body(task: TaskSpec) -> dict[str, Any]:
    """One task of an add-collection body; optional fields only when set."""
    body: dict[str, Any] = {"id": task.id, "commandLine": task.command_line}
    if task.display_name:
        body["displayName"] = task.display_name
    if task.environment:
        body["environmentSettings"] = [{"name": k, "value": v}
                                       for k, v in task.environment.items()]
    body.update(_tail(task))
    if task.container is not None:
        body["containerSettings"] = container_settings_body(task.container)
    if task.exit_conditions is not None:
        body["exitConditions"] = exit_conditions_body(task.exit_conditions)
    return body


def collection_body(tasks: Sequence[TaskSpec]) -> bytes:
    """The add-task-collection request body, compact JSON: the bytes
    ``json.dumps({"value": [task_body(t) ...]}, separators=(",", ":"))`` gives.

    Written out directly rather than through dicts and ``json.dumps``: the fields
    every task has (id, command line, environment) are joined from pre-encoded
    fragments, with strings escaped by ``json``'s own C escaper; the settings a job's
    tasks share (container, exit conditions) are encoded once per body. About half
    the CPU of the dicts and ``json.dumps`` (docs/performance.md)."""
    shared: dict[int, str] = {}
    parts = [_task_json(t, shared) for t in tasks]
    return ('{"value":[' + ",".join(parts) + "]}").encode("utf-8")


def _task_json(task: TaskSpec, shared: dict[int, str]) -> str:
    """One task's JSON, the fields in ``task_body``'s order."""
    try:
        head = _head_json(task)
    except TypeError:  # a value that is not a string: the general encoder says how
        return _compact(task_body(task))
    tail = _tail(task)
    parts = [head]
    if tail:
        parts.append("," + _compact(tail)[1:-1])
    if task.container is not None:
        parts.append(',"containerSettings":' + _shared_json(
            task.container, container_settings_body, shared))
    if task.exit_conditions is not None:
        parts.append(',"exitConditions":' + _shared_json(
            task.exit_conditions, exit_conditions_body, shared))
    parts.append("}")
    return "".join(parts)


def _head_json(task: TaskSpec) -> str:
    """``{"id":..,"commandLine":..[,"displayName":..][,"environmentSettings":[..]]``,
    without the closing brace."""
    head = '{"id":' + _enc(task.id) + ',"commandLine":' + _enc(task.command_line)
    if task.display_name:
        head += ',"displayName":' + _enc(task.display_name)
    if task.environment:
        head += ',"environmentSettings":[' + ",".join(
            _env_name(k) + _enc(v) + "}" for k, v in task.environment.items()) + "]"
    return head


def _tail(task: TaskSpec) -> dict[str, Any]:
    """The optional fields after the environment and before the container settings."""
    body: dict[str, Any] = {}
    if task.resource_files:
        body["resourceFiles"] = [_resource_file(r) for r in task.resource_files]
    if task.output_files:
        body["outputFiles"] = [_output_file(o) for o in task.output_files]
    if task.depends_on or task.depends_on_ranges:
        depends: dict[str, Any] = {}
        if task.depends_on:
            depends["taskIds"] = list(task.depends_on)
        if task.depends_on_ranges:
            depends["taskIdRanges"] = [{"start": s, "end": e} for s, e in task.depends_on_ranges]
        body["dependsOn"] = depends
    constraints = _constraints(task.max_task_retries, task.max_wall_clock, task.retention)
    if constraints:
        body["constraints"] = constraints
    if task.required_slots != 1:
        body["requiredSlots"] = task.required_slots
    return body


def _shared_json(value: Any, to_body: Any, shared: dict[int, str]) -> str:
    """``value``'s JSON, encoded once per body: ``shared`` lives only while the tasks
    holding ``value`` do, so its ``id()`` keys cannot be reused by another object."""
    hit = shared.get(id(value))
    if hit is None:
        hit = shared[id(value)] = _compact(to_body(value))
    return hit


def _env_name(name: str) -> str:
    """``{"name":"<name>","value":`` for an environment variable, kept per name."""
    hit = _ENV_NAMES.get(name)
    if hit is None:
        hit = '{"name":' + _enc(name) + ',"value":'
        if len(_ENV_NAMES) >= _ENV_NAMES_MAX:
            _ENV_NAMES.clear()
        _ENV_NAMES[name] = hit
    return hit


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


#: json.dumps's own string escaper (ensure_ascii, as json.dumps by default): the C one
#: when the interpreter has it. It raises TypeError for anything but a str.
_enc: Callable[[str], str] = json.encoder.encode_basestring_ascii
#: Environment variable names seen, with their encoded ``{"name":..,"value":`` prefix.
_ENV_NAMES: dict[str, str] = {}
_ENV_NAMES_MAX = 10_000


def parse_add_results(payload: Any, tasks: Sequence[TaskSpec]) -> AddResult:
    """Read an add-collection answer: ``success`` is added, ``TaskExists`` existed,
    anything else a :class:`TaskError` (transient for server errors).

    The service may answer in any order; a task it did not answer for at all is a
    transient error, so it is sent again.
    """
    result = AddResult()
    pending = {t.id.lower(): t.id for t in tasks}
    for item in (payload or {}).get("value") or []:
        task_id = str(item.get("taskId", ""))
        pending.pop(task_id.lower(), None)
        status = item.get("status")
        if status == "success" or str(status).lower() == "success":  # the common case first
            result.added += 1
            continue
        status = str(status or "").lower()
        code, message = error_parts(item.get("error"))
        if code == "TaskExists":
            result.existed += 1
        else:
            transient = status == "servererror" or code in TRANSIENT_CODES
            result.errors.append(TaskError(task_id=task_id, code=code, message=message,
                                           transient=transient))
    for task_id in pending.values():
        result.errors.append(TaskError(task_id=task_id, code="NoResult", transient=True,
                                       message="the service's answer did not include it"))
    return result


def error_parts(error: Any) -> tuple[str, str]:
    """``(code, message)`` from the service's error body
    ``{"code", "message": {"lang", "value"}, "values": [{"key", "value"}]}``.

    Only the ``PropertyName`` and ``Reason`` details are kept: others may echo a value
    sent (a SAS URL, say) back.
    """
    if not isinstance(error, Mapping):
        return "Unknown", ""
    code = str(error.get("code") or "Unknown")
    message = error.get("message")
    text = str(message.get("value", "")) if isinstance(message, Mapping) else str(message or "")
    text = text.split("\nRequestId:")[0].strip()
    details = [f"{v.get('key')}={v.get('value')}" for v in error.get("values") or []
               if isinstance(v, Mapping) and v.get("key") in ("PropertyName", "Reason")]
    if details:
        text += f" ({', '.join(details)})"
    return code, text


def task_counts(payload: Any) -> dict[str, int]:
    """``{"active", "running", "completed", "succeeded", "failed"}`` from task counts."""
    counts = (payload or {}).get("taskCounts") or {}
    return {k: int(counts.get(k) or 0)
            for k in ("active", "running", "completed", "succeeded", "failed")}


def metadata(items: Any) -> dict[str, str]:
    """A job's ``[{"name", "value"}]`` metadata as a dict."""
    return {str(i.get("name")): str(i.get("value", "")) for i in items or []
            if isinstance(i, Mapping)}


def _resource_file(rf: ResourceFile) -> dict[str, Any]:
    out: dict[str, Any]
    if rf.storage_container_url:  # every blob under the prefix, into filePath/<blob name>
        out = {"storageContainerUrl": rf.storage_container_url}
        if rf.blob_prefix:
            out["blobPrefix"] = rf.blob_prefix
        if rf.file_path:
            out["filePath"] = rf.file_path
    else:
        out = {"httpUrl": rf.http_url, "filePath": rf.file_path}
    if rf.file_mode:
        out["fileMode"] = rf.file_mode
    return out


def _output_file(out: OutputFile) -> dict[str, Any]:
    return {"filePattern": out.file_pattern,
            "destination": {"container": {"containerUrl": out.container_url,
                                          "path": out.path}},
            "uploadOptions": {"uploadCondition": _UPLOAD_CONDITION[out.upload_condition]}}


def _constraints(retries: int | None, wall_clock: timedelta | None,
                 retention: timedelta | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if retries is not None:
        out["maxTaskRetryCount"] = retries
    if wall_clock is not None:
        out["maxWallClockTime"] = iso_duration(wall_clock)
    if retention is not None:
        out["retentionTime"] = iso_duration(retention)
    return out


# -- container settings ------------------------------------------------------------------

#: Serialized ``containerSettings`` by ``id()`` of the (frozen) settings, as for exit
#: conditions below: a job's tasks share one ``ContainerSettings`` object.
_CONTAINER_CACHE: dict[int, tuple[ContainerSettings, dict[str, Any]]] = {}


def container_settings_body(settings: ContainerSettings) -> dict[str, Any]:
    """Batch's task ``containerSettings`` (``BatchTaskContainerSettings`` in
    BatchService.json, api-version 2025-06-01; azure-batch 15.x
    ``models.BatchTaskContainerSettings``): ``imageName`` (required),
    ``containerRunOptions`` and ``registry`` when set, and ``workingDirectory`` only
    when it is not the service's default ("The default is 'taskWorkingDirectory'").

    Cached per object and shared by every task body that carries it: callers must not
    mutate it.
    """
    hit = _CONTAINER_CACHE.get(id(settings))
    if hit is not None and hit[0] is settings:
        return hit[1]
    body: dict[str, Any] = {"imageName": settings.image}
    if settings.run_options:
        body["containerRunOptions"] = settings.run_options
    if settings.registry is not None:
        body["registry"] = registry_body(settings.registry)
    if settings.working_directory != "taskWorkingDirectory":
        body["workingDirectory"] = settings.working_directory
    if len(_CONTAINER_CACHE) >= _EXIT_CACHE_MAX:
        _CONTAINER_CACHE.clear()
    _CONTAINER_CACHE[id(settings)] = (settings, body)
    return body


def registry_body(registry: ContainerRegistry) -> dict[str, Any]:
    """Batch's ``ContainerRegistryReference``: ``registryServer``, then either
    ``identityReference`` ``{"resourceId"}`` (``BatchNodeIdentityReference``: "The ARM
    resource id of the user assigned identity") or ``username`` and ``password``
    (property names as the spec spells them: ``username``, lower-case n)."""
    body: dict[str, Any] = {"registryServer": registry.server}
    if registry.identity_reference is not None:
        body["identityReference"] = {"resourceId": registry.identity_reference}
    else:
        body["username"] = registry.username
        body["password"] = registry.password
    return body


@dataclass(frozen=True, slots=True)
class PoolContainers:
    """A pool's ``virtualMachineConfiguration.containerConfiguration``
    (``BatchContainerConfiguration``): the images it prefetches
    (``containerImageNames``), the servers of its ``containerRegistries``, and the
    resource ids of its user-assigned identities (``identity.userAssignedIdentities``;
    None when the answer did not say)."""

    type: str
    images: tuple[str, ...] = ()
    registries: tuple[str, ...] = ()
    identities: tuple[str, ...] | None = None


def pool_containers(pool: Mapping[str, Any]) -> PoolContainers | None:
    """Read a get-pool answer's container configuration; None for a pool without one."""
    config = (pool.get("virtualMachineConfiguration") or {}).get("containerConfiguration")
    if not isinstance(config, Mapping):
        return None
    servers = tuple(server_host(str(r.get("registryServer") or "docker.io"))
                    for r in config.get("containerRegistries") or [] if isinstance(r, Mapping))
    identity = pool.get("identity")
    identities: tuple[str, ...] | None = None
    if isinstance(identity, Mapping):
        identities = tuple(str(u.get("resourceId", "")).lower()
                           for u in identity.get("userAssignedIdentities") or []
                           if isinstance(u, Mapping))
    return PoolContainers(type=str(config.get("type") or ""),
                          images=tuple(str(i) for i in config.get("containerImageNames") or []),
                          registries=servers, identities=identities)


def container_problem(pool: str, containers: PoolContainers | None,
                      settings: ContainerSettings | None) -> tuple[str, str] | None:
    """``(code, description)`` when tasks with ``settings`` cannot run on ``pool``.

    From the REST spec (BatchService.json, 2025-06-01): task ``containerSettings``: "If
    the Pool that will run this Task has containerConfiguration set, this must be set
    as well. If the Pool that will run this Task doesn't have containerConfiguration
    set, this must not be set." ``BatchNodeIdentityReference``: "The reference to a
    user assigned identity associated with the Batch pool which a compute node will
    use": a registry's ``identityReference`` must be one of the pool's identities (when
    the pool's answer lists them).
    """
    if containers is None and settings is not None:
        return ("PoolNotContainerEnabled",
                f"pool {pool} has no container configuration, but the task runs in "
                f"container image {settings.image}: use a container pool or a program "
                "without an image")
    if containers is not None and settings is None:
        listed = ", ".join(containers.images) or "none listed"
        return ("ContainerImageRequired",
                f"pool {pool} has a container configuration (images: {listed}), but the "
                "task names no container image: give its program an image or use a pool "
                "without containers")
    registry = settings.registry if settings is not None else None
    if (containers is not None and registry is not None
            and registry.identity_reference is not None and containers.identities is not None
            and registry.identity_reference.lower() not in containers.identities):
        return ("ContainerRegistryIdentityNotOnPool",
                f"registry {registry.name or registry.server} pulls image "
                f"{settings.image if settings else ''} with the managed identity "
                f"{registry.identity_reference}, which pool {pool} does not have: assign "
                "it to the pool (and give it AcrPull on the registry)")
    return None


def container_warning(containers: PoolContainers, settings: ContainerSettings) -> str | None:
    """Why an image may fail to pull at task start, or None; a warning, not an error.

    ``containerImageNames`` are images prefetched when a node joins; any other image is
    pulled when a task needs it. A pull from a private registry needs credentials, the
    task's ``registry`` or the pool's ``containerRegistries`` ("If any Images must be
    downloaded from a private registry which requires credentials, then those
    credentials must be provided here"); fanout cannot tell a public registry from a
    private one, so an image with neither is only worth a warning.
    """
    if settings.registry is not None or settings.image in containers.images:
        return None
    host = image_host(settings.image)
    if host in containers.registries:
        return None
    return (f"image {settings.image} is not prefetched by the pool and neither the task "
            f"nor the pool names a registry for {host}: it is pulled at task start, which "
            "works only if the image is public")


# -- exit conditions ---------------------------------------------------------------------

#: Serialized ``exitConditions`` by ``id()`` of the (frozen) ``ExitConditions`` object,
#: with the object itself so an id reused after garbage collection never matches: a
#: sweep shares one object across its 100,000 tasks, so each task costs one dict lookup
#: and an identity check, not a walk of the conditions (nor hashing them).
_EXIT_CACHE: dict[int, tuple[ExitConditions, dict[str, Any]]] = {}
_EXIT_CACHE_MAX = 256


def exit_conditions_body(conditions: ExitConditions) -> dict[str, Any]:
    """Batch's task ``exitConditions`` (``ExitConditions`` in BatchService.json,
    api-version 2025-06-01): ``exitCodes`` ``[{code, exitOptions}]``, ``exitCodeRanges``
    ``[{start, end, exitOptions}]``, ``preProcessingError``, ``fileUploadError`` and
    ``default``, each only when set; ``exitOptions`` holds ``jobAction`` and
    ``dependencyAction`` only when set.

    The dict is cached per object and shared by every task body that carries it:
    callers must not mutate it (``json.dumps`` does not).
    """
    hit = _EXIT_CACHE.get(id(conditions))
    if hit is not None and hit[0] is conditions:
        return hit[1]
    body: dict[str, Any] = {}
    if conditions.exit_codes:
        body["exitCodes"] = [{"code": code, "exitOptions": _exit_options(options)}
                             for code, options in conditions.exit_codes]
    if conditions.exit_code_ranges:
        body["exitCodeRanges"] = [{"start": lo, "end": hi, "exitOptions": _exit_options(options)}
                                  for lo, hi, options in conditions.exit_code_ranges]
    for key, options in (("preProcessingError", conditions.pre_processing_error),
                         ("fileUploadError", conditions.file_upload_error),
                         ("default", conditions.default)):
        if options is not None:
            body[key] = _exit_options(options)
    if len(_EXIT_CACHE) >= _EXIT_CACHE_MAX:
        _EXIT_CACHE.clear()
    _EXIT_CACHE[id(conditions)] = (conditions, body)
    return body


def _exit_options(options: ExitOptions) -> dict[str, str]:
    out: dict[str, str] = {}
    if options.job_action is not None:
        out["jobAction"] = options.job_action
    if options.dependency_action is not None:
        out["dependencyAction"] = options.dependency_action
    return out


_JOB_ACTIONS = {"none": "none", "disable": "disable", "terminate": "terminate"}
_DEPENDENCY_ACTIONS = {"satisfy": "satisfy", "block": "block"}


def exit_conditions(payload: Any) -> ExitConditions | None:
    """Parse a task's ``exitConditions`` as the service returns it (None when absent).

    The service fills in ``default`` on tasks that had none (Azure/Batch#51 shows a
    listed task with ``default: {dependencyAction: block}``); that is Batch's default
    anyway, so parsing it changes nothing :meth:`ExitConditions.options_for` decides.
    """
    if not isinstance(payload, Mapping):
        return None
    codes = tuple((int(item["code"]), _parse_options(item.get("exitOptions")))
                  for item in payload.get("exitCodes") or []
                  if isinstance(item, Mapping) and item.get("code") is not None)
    ranges = tuple((int(item["start"]), int(item["end"]), _parse_options(item.get("exitOptions")))
                   for item in payload.get("exitCodeRanges") or []
                   if isinstance(item, Mapping) and item.get("start") is not None
                   and item.get("end") is not None)

    def one(key: str) -> ExitOptions | None:
        value = payload.get(key)
        return _parse_options(value) if isinstance(value, Mapping) else None

    return ExitConditions(exit_codes=codes, exit_code_ranges=ranges,
                          pre_processing_error=one("preProcessingError"),
                          file_upload_error=one("fileUploadError"), default=one("default"))


def _parse_options(payload: Any) -> ExitOptions:
    if not isinstance(payload, Mapping):
        return ExitOptions()
    job = str(payload.get("jobAction") or "").lower()
    dep = str(payload.get("dependencyAction") or "").lower()
    return ExitOptions(job_action=_JOB_ACTIONS.get(job),  # type: ignore[arg-type]
                       dependency_action=_DEPENDENCY_ACTIONS.get(dep))  # type: ignore[arg-type]


# -- listing jobs --------------------------------------------------------------------------

#: Every job state of api-version 2025-06-01 (``BatchJobState``) but ``completed``.
#: The list-jobs filter allows only ``eq`` on ``state`` ("OData filters in Batch",
#: section "List jobs": ``state | eq``), so "not completed" is spelled out with them.
NOT_COMPLETED_JOB_STATES = ("active", "disabling", "disabled", "enabling", "terminating",
                            "deleting")
#: The job fields the monitor reads (``$select``).
JOB_RECORD_SELECT = ("id,state,metadata,poolInfo,creationTime,stateTransitionTime,"
                     "executionInfo,onAllTasksComplete")


def odata_string(value: str) -> str:
    """An OData string literal: single quotes, a quote inside doubled."""
    return "'" + value.replace("'", "''") + "'"


def odata_datetime(when: datetime) -> str:
    """An OData (v2, as Batch's filters take it) DateTime literal in UTC, e.g.
    ``datetime'2026-11-24T10:00:00.000000Z'``; a naive time is taken as UTC."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return "datetime'" + when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ") + "'"


def fanout_jobs_filter(completed_since: datetime | None,
                       prefixes: Sequence[str] = ()) -> str | None:
    """The list-jobs ``$filter`` of :meth:`AzureBatchBackend.list_fanout_jobs`.

    Properties and operators are those "OData filters in Batch" documents for List
    jobs: ``state`` (eq), ``stateTransitionTime`` (eq, ne, ge, gt, le, lt) and ``id``
    (startswith, eq, ...). Metadata cannot be filtered on, so the caller keeps only
    jobs with ``fanout-handler`` metadata itself. None: no filter (every job).
    """
    clauses: list[str] = []
    if completed_since is not None:
        states = " or ".join(f"state eq '{s}'" for s in NOT_COMPLETED_JOB_STATES)
        clauses.append(f"({states} or (state eq 'completed' and stateTransitionTime ge "
                       f"{odata_datetime(completed_since)}))")
    if prefixes:
        clauses.append("(" + " or ".join(f"startswith(id, {odata_string(p)})"
                                          for p in prefixes) + ")")
    return " and ".join(clauses) or None


_FRACTION = re.compile(r"\.(\d+)")


def parse_time(value: Any) -> datetime | None:
    """A Batch timestamp (``2026-11-24T10:00:00.1234567Z``: up to 7 fractional digits)
    as an aware UTC datetime; None when absent or unreadable."""
    if not isinstance(value, str) or not value:
        return None
    text = _FRACTION.sub(lambda m: "." + m.group(1)[:6].ljust(6, "0"), value, count=1)
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def job_record(job: Mapping[str, Any]) -> JobRecord:
    """A listed (or read) job as the monitor's :class:`JobRecord`."""
    info = job.get("executionInfo") or {}
    pool = (job.get("poolInfo") or {}).get("poolId") or info.get("poolId")
    return JobRecord(
        id=str(job.get("id")), state=str(job.get("state") or "unknown"),
        metadata=metadata(job.get("metadata")), pool=str(pool) if pool else None,
        created=parse_time(job.get("creationTime")), start_time=parse_time(info.get("startTime")),
        end_time=parse_time(info.get("endTime")),
        terminate_reason=str(info["terminateReason"]) if info.get("terminateReason") else None,
        state_changed=parse_time(job.get("stateTransitionTime")),
        sealed=str(job.get("onAllTasksComplete") or "").lower() == "terminatejob")


def task_counts_record(payload: Any) -> TaskCounts:
    """The task counts API's answer as :class:`TaskCounts`."""
    return TaskCounts(**task_counts(payload))


# -- failed tasks ------------------------------------------------------------------------

#: Batch's task ``failureInfo.code`` values -> (fanout's category, the exit condition
#: Batch applies to that end). Codes from the Batch SDKs' ``TaskFailureInformationCodes``
#: (Azure/azure-sdk-for-net ``sdk/batch/Microsoft.Azure.Batch/src/Common/
#: BatchErrorCodeStrings.cs``; Azure/azure-sdk-for-java ``TaskFailureInformationCodes``),
#: ``FailureExitCode`` as the task complete event documents it (azure-docs
#: ``articles/batch/batch-task-complete-event.md``), ``FileUploadMiscError`` as
#: Azure/Batch#68 and #171 show it. Resource files, application packages and the
#: container or command that would not launch are *pre-processing errors* ("the task
#: could not be started", ``exitConditions.preProcessingError``); output uploads are
#: ``fileUploadError``. ``TaskEnded`` ("the task ended") is what a terminated task
#: carries, by a job terminate or by its max wall clock: see :func:`failure_category`.
FAILURE_CODES: Mapping[str, tuple[FailureCategory, TaskEnd]] = {
    "FailureExitCode": ("exit_code", "exit"),
    "TaskEnded": ("cancelled", "exit"),
    # resource files and packages: the task never started
    "BlobAccessDenied": ("resource_file_failure", "pre_processing_error"),
    "BlobDownloadMiscError": ("resource_file_failure", "pre_processing_error"),
    "BlobDownloadTimedOut": ("resource_file_failure", "pre_processing_error"),
    "BlobNotFound": ("resource_file_failure", "pre_processing_error"),
    "DiskFull": ("resource_file_failure", "pre_processing_error"),
    "ResourceDirectoryCreateFailed": ("resource_file_failure", "pre_processing_error"),
    "ResourceFileCreateFailed": ("resource_file_failure", "pre_processing_error"),
    "ResourceFileWriteFailed": ("resource_file_failure", "pre_processing_error"),
    "ResourceContainerAccessDenied": ("resource_file_failure", "pre_processing_error"),
    "ResourceContainerNotFound": ("resource_file_failure", "pre_processing_error"),
    "ResourceContainerListTimedOut": ("resource_file_failure", "pre_processing_error"),
    "ResourceContainerListMiscError": ("resource_file_failure", "pre_processing_error"),
    "ApplicationPackageError": ("resource_file_failure", "pre_processing_error"),
    # the process could not be started on the node
    "CommandLaunchFailed": ("start_task_failed", "pre_processing_error"),
    "CommandProgramNotFound": ("start_task_failed", "pre_processing_error"),
    "ContainerInvalidImage": ("start_task_failed", "pre_processing_error"),
    "ContainerInvalidRegistry": ("start_task_failed", "pre_processing_error"),
    "ContainerInvalidSettings": ("start_task_failed", "pre_processing_error"),
    "ContainerMiscError": ("start_task_failed", "pre_processing_error"),
    "MountConfigurationError": ("start_task_failed", "pre_processing_error"),
    # output files
    "FileUploadAccessDenied": ("output_upload_failure", "file_upload_error"),
    "FileUploadContainerNotFound": ("output_upload_failure", "file_upload_error"),
    "FileUploadConflict": ("output_upload_failure", "file_upload_error"),
    "FileUploadTimedOut": ("output_upload_failure", "file_upload_error"),
    "FileUploadMiscError": ("output_upload_failure", "file_upload_error"),
}
_CODES_LOWER = {k.lower(): v for k, v in FAILURE_CODES.items()}
#: What a failure message says when the task's max wall clock ended it.
_WALL_CLOCK = re.compile(r"wall\s*clock|maxwallclock", re.IGNORECASE)
#: The task fields ``failed_tasks`` reads.
FAILED_TASK_SELECT = "id,displayName,executionInfo,constraints"


def failure_category(info: Mapping[str, Any], constraints: Any = None
                     ) -> tuple[FailureCategory, TaskEnd]:
    """Why a failed task failed, and which exit condition Batch applied, from its
    ``executionInfo`` (``failureInfo.code``/``category``, ``exitCode``).

    ``TaskEnded`` is ``wall_clock_timeout`` when its message names the wall clock or
    the task ran at least its ``constraints.maxWallClockTime``, else ``cancelled`` (a
    job terminate ended it). An unknown code is ``node_unusable`` when Batch files it
    under ``servererror``, else ``exit_code``. (Batch requeues, rather than fails, the
    tasks of a preempted or unusable node, so ``preempted`` never comes from here.)
    """
    failure = info.get("failureInfo") or {}
    code = str(failure.get("code") or "")
    known = _CODES_LOWER.get(code.lower())
    if known is not None:
        if known[0] == "cancelled" and _timed_out(info, failure, constraints):
            return "wall_clock_timeout", "exit"
        return known
    if str(failure.get("category") or "").lower() == "servererror":
        return "node_unusable", "exit"
    return "exit_code", "exit"


def _timed_out(info: Mapping[str, Any], failure: Mapping[str, Any], constraints: Any) -> bool:
    if _WALL_CLOCK.search(str(failure.get("message") or "")):
        return True
    limit = parse_duration((constraints or {}).get("maxWallClockTime")
                           if isinstance(constraints, Mapping) else None)
    start, end = parse_time(info.get("startTime")), parse_time(info.get("endTime"))
    return limit is not None and start is not None and end is not None and end - start >= limit


_DURATION = re.compile(r"^P(?:(\d+(?:\.\d+)?)D)?(?:T(?:(\d+(?:\.\d+)?)H)?(?:(\d+(?:\.\d+)?)M)?"
                       r"(?:(\d+(?:\.\d+)?)S)?)?$")


def parse_duration(value: Any) -> timedelta | None:
    """An ISO 8601 duration as Batch writes it (``PT2H0M0S``, ``P10675199DT2H48M5.4775807S``)."""
    if not isinstance(value, str):
        return None
    match = _DURATION.match(value)
    if match is None:
        return None
    days, hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    try:
        return timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
    except OverflowError:
        return timedelta.max


def failed_task(task: Mapping[str, Any], logs: str | None = None) -> FailedTask:
    """A listed failed task as :class:`FailedTask`."""
    info = task.get("executionInfo") or {}
    failure = info.get("failureInfo") or {}
    category, _end = failure_category(info, task.get("constraints"))
    exit_code = info.get("exitCode")
    return FailedTask(
        id=str(task.get("id")), category=category,
        exit_code=int(exit_code) if isinstance(exit_code, int) else None,
        failure_code=str(failure["code"]) if failure.get("code") else None,
        failure_message=str(failure["message"]) if failure.get("message") else None,
        start_time=parse_time(info.get("startTime")), end_time=parse_time(info.get("endTime")),
        retry_count=int(info.get("retryCount") or 0), logs=logs,
        display_name=str(task["displayName"]) if task.get("displayName") else None)
