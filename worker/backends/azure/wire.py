"""The Azure Batch REST shapes fanout sends and reads, as plain dicts and JSON.

The SDK's model layer costs about 85 µs of client CPU per task, most of it
deserializing the add-collection answer into models (shared/notes/batch-submission.md);
building the bodies as dicts and reading the answers with ``json.loads`` costs a few
µs. Field names and enum values are those of api-version ``2025-06-01`` (azure-batch
15.x).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

from handlers.base import JobSpec, OutputFile, ResourceFile, TaskSpec
from worker.backends.base import AddResult, TaskError

#: The REST api-version; passed to ``BatchClient`` too so both agree.
API_VERSION = "2025-06-01"
#: The content type the SDK sends with JSON bodies (it is part of the shared-key signature).
JSON_CONTENT_TYPE = "application/json; odata=minimalmetadata"
#: The service's limits on one add-task-collection request.
MAX_TASKS_PER_REQUEST = 100
MAX_BODY_BYTES = 1024 * 1024
#: Job metadata that marks a job as fanout's (the worker sets it to the handler's name).
FANOUT_METADATA_KEY = "fanout-handler"

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
    return body


def task_body(task: TaskSpec) -> dict[str, Any]:
    """One task of an add-collection body; optional fields only when set."""
    body: dict[str, Any] = {"id": task.id, "commandLine": task.command_line}
    if task.display_name:
        body["displayName"] = task.display_name
    if task.environment:
        body["environmentSettings"] = [{"name": k, "value": v}
                                       for k, v in task.environment.items()]
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
    if task.container_image:
        body["containerSettings"] = {"imageName": task.container_image}
    return body


def collection_body(tasks: Sequence[TaskSpec]) -> bytes:
    """The add-task-collection request body, compact JSON."""
    return json.dumps({"value": [task_body(t) for t in tasks]},
                      separators=(",", ":")).encode("utf-8")


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
        status = str(item.get("status", "")).lower()
        if status == "success":
            result.added += 1
            continue
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
