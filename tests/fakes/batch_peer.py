"""A local HTTP **test peer** that speaks the subset of the Azure Batch REST API fanout calls.

This is a test fixture, not an emulator: one process, plain HTTP, state in memory. By
default nothing is scheduled (tasks stay ``active`` until a test moves them with
:meth:`BatchPeer.set_task_state`); in *runner mode* (:class:`Runner`) tasks whose
dependencies are met run and complete on their own. No Batch emulator exists, so this
peer lets the real ``azure.batch.BatchClient`` (azure-batch 15.x, api-version
``2025-06-01``) talk to something over HTTP in every CI run, offline.

Sources, cited where each rule is enforced: the REST spec
``specification/batch/data-plane/Azure.Batch/stable/2025-06-01/BatchService.json`` in
github.com/Azure/azure-rest-api-specs (operation and model descriptions), "OData filters
in Batch" (https://learn.microsoft.com/rest/api/batchservice/odata-filters-in-batch),
"Create queries to list Batch resources efficiently"
(https://learn.microsoft.com/azure/batch/batch-efficient-list-queries), "Batch Status and
Error Codes" (https://learn.microsoft.com/rest/api/batchservice/batch-status-and-error-codes),
"Error handling and detection in Azure Batch"
(https://learn.microsoft.com/azure/batch/error-handling), "Create task dependencies"
(https://learn.microsoft.com/azure/batch/batch-task-dependencies) and the task failure
codes of the Batch .NET SDK (``TaskFailureInformationCodes`` in
sdk/batch/Microsoft.Azure.Batch/src/Common/BatchErrorCodeStrings.cs, Azure/azure-sdk-for-net).

Operations (paths and JSON shapes as the SDK sends and reads them; names as in
:data:`OPERATIONS`):

- ``POST /jobs`` (create_job), ``GET /jobs`` (list_jobs: ``$filter`` over the documented
  list-jobs properties, ``$select``, ``maxresults`` and ``odata.nextLink`` paging),
  ``GET /jobs/{id}`` (get_job), ``PATCH /jobs/{id}`` (update_job: omitted properties stay,
  ``metadata`` replaces the list, conditional headers), ``POST /jobs/{id}/terminate``
  (terminate_job), ``DELETE /jobs/{id}`` (delete_job);
- ``POST /jobs/{id}/addtaskcollection`` (add_task_collection), ``GET
  /jobs/{id}/taskcounts`` (get_task_counts), ``GET /jobs/{id}/tasks`` (list_tasks:
  ``$filter``, ``$select``, ``maxresults`` <= 1000, paging), ``GET
  /jobs/{id}/tasks/{id}`` (get_task);
- ``GET /pools/{id}`` (get_pool), ``GET /nodecounts`` (list_node_counts).

The service's rules it enforces: at most 100 tasks and ``max_body_bytes`` (1 MiB) per
add-collection request (``RequestBodyTooLarge``, HTTP 413); ids of 1-64 letters,
digits, hyphens and underscores (``InvalidPropertyValue``, 400); case-insensitive
uniqueness (``JobExists`` 409 for jobs; ``TaskExists`` per task inside a 200 answer);
task dependencies only on jobs that use them (``TaskDependenciesNotSpecifiedOnJob``
per task) and a ``taskIds`` list of at most 64,000 characters
(``TaskDependencyListTooLong`` per task); exit options: a ``dependencyAction`` on a job
without ``usesTaskDependencies`` and a ``jobAction`` on a job whose ``onTaskFailure`` is
``noaction`` are 400 ``InvalidPropertyValue`` per task; the job must exist
(``JobNotFound`` 404) and be active (``JobCompleted`` 409); a job naming a missing
pool is accepted and its tasks wait (``require_pool`` refuses it, for tests only); only
the spec's property names in bodies (``InvalidRequestBody``) and answers
(:attr:`BatchPeer.undocumented`); pools with and without a container configuration;
resource file sources; an optional active-job quota
(``ActiveJobAndScheduleQuotaReached``). Errors have the service's body:
``{"code", "message": {"lang", "value"}, "values": [{"key", "value"}]}``.

How jobs and tasks move (all times from the peer's clock, see ``clock``):

- a completed task has ``executionInfo`` {startTime, endTime, exitCode, result,
  retryCount, requeueCount, failureInfo {category, code, message, details}} with the
  service's failure codes (:data:`FAILURE_KINDS`): ``FailureExitCode`` for a non-zero exit,
  ``BlobDownloadMiscError`` for a resource file that failed to download (no exit code),
  ``FileUploadMiscError`` for output files that failed to upload, ``TaskEnded`` (exit code
  0xC000013A) for a task killed at its max wall clock or ended by job termination;
- its exit conditions decide its dependency action (``satisfy`` or ``block``; defaults:
  satisfy for exit code 0, block otherwise) and, on a job with ``onTaskFailure:
  performexitoptionsjobaction``, its job action (default terminate on failure: the job is
  terminated with terminateReason ``TaskFailed``);
- terminate: ``terminating`` then ``completed`` (``terminate_delay``), running tasks end
  with ``TaskEnded``, active tasks stay active for good, terminateReason as given or
  ``UserTerminate``; ``constraints.maxWallClockTime`` on a job terminates it with
  ``MaxWallClockTimeExpiry``; a job with ``onAllTasksComplete: terminatejob`` completes with
  ``AllTasksComplete``; delete: ``deleting`` (``delete_delay``) then gone;
- task counts are kept as numbers and may lag the task states (``counts_lag``):
  "the numbers returned may not always be up to date" (Jobs_GetJobTaskCounts);
- :meth:`BatchPeer.seed_job` makes big jobs cheaply for request-budget tests.

Every request must carry ``Authorization: SharedKey <account>:<signature>``; the peer
recomputes the signature as the SDK's ``BatchSharedKeyAuthPolicy`` builds it (method,
the standard headers, the ``ocp-*`` headers, ``/<account><path>`` and the sorted query
parameters, HMAC-SHA256 with the base64 key) and answers 403 ``AuthenticationFailed``
on a mismatch. Optionally a fixed bearer token is accepted as well.

Fault injection (:class:`FaultPlan`): an added latency per request, and fractions of
requests answered 429 (with ``Retry-After``), 503, or dropped (the socket closed
without an answer) either before or after the request took effect. Decisions come
from one ``random.Random(seed)`` drawn in arrival order: the same seed gives the same
sequence of decisions (which request gets which one depends on thread timing).

Run it by hand, for a manual ``fanout run`` against it::

    python -m tests.fakes.batch_peer --port 8090 --pool fanout --latency 0.05

Test administration, for a peer in another process (the benchmarks'), outside the
Batch API: paths under ``/_peer/``, which no Batch operation has and the SDK never
calls, without auth (the peer listens on 127.0.0.1), never counted in
:attr:`BatchPeer.requests`:

- ``GET /_peer/record``: everything accepted, as JSON (:meth:`BatchPeer.record`);
- ``GET /_peer/requests``: the requests answered, by operation and outcome;
- ``POST /_peer/seed`` ``{"jobs": [{"id", "tasks", "metadata", ...}]}``:
  :meth:`BatchPeer.seed_job` for each;
- ``POST /_peer/finish`` ``{"jobs": [ids]}``: :meth:`BatchPeer.finish_seeded`, every
  task of those seeded jobs succeeding at one instant.
"""

from __future__ import annotations

import argparse
import base64
import bisect
import contextlib
import functools
import gc
import hashlib
import hmac
import itertools
import json
import random
import re
import secrets
import socket
import sys
import threading
import time
import typing
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime, parsedate_to_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

from azure.batch import models as _sdk_package
from azure.batch._utils.model_base import Model as _SdkModel
from azure.batch.models import _models as _sdk_models

API_VERSION = "2025-06-01"
MAX_TASKS_PER_REQUEST = 100
MAX_BODY_BYTES = 1024 * 1024
MAX_DEPENDENCY_CHARS = 64_000
ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_DURATION = re.compile(r"^P(?!$)(\d+(\.\d+)?D)?"
                       r"(T(?=\d)(\d+(\.\d+)?H)?(\d+(\.\d+)?M)?(\d+(\.\d+)?S)?)?$")
_UPLOAD_CONDITIONS = {"tasksuccess", "taskfailure", "taskcompletion"}
#: The headers the shared-key string-to-sign holds, in order (as the SDK signs them).
SIGNED_HEADERS = ("content-encoding", "content-language", "content-length", "content-md5",
                  "content-type", "date", "if-modified-since", "if-match", "if-none-match",
                  "if-unmodified-since", "range")
#: Node states of the pool node counts API, in the service's spelling.
NODE_STATES = ("creating", "idle", "offline", "preempted", "rebooting", "reimaging", "running",
               "starting", "startTaskFailed", "leavingPool", "unknown", "unusable",
               "waitingForStartTask", "deallocated", "deallocating", "upgradingOS", "total")
#: Operation names, for :class:`FaultPlan.operations` and the request record.
OPERATIONS = ("create_job", "list_jobs", "get_job", "update_job", "terminate_job",
              "delete_job", "add_task_collection", "get_task_counts", "list_tasks",
              "get_task", "get_pool", "list_node_counts", "list_nodes", "terminate_task")

# failureInfo codes, from TaskFailureInformationCodes in the Batch .NET SDK
# (sdk/batch/Microsoft.Azure.Batch/src/Common/BatchErrorCodeStrings.cs in
# Azure/azure-sdk-for-net): "The task process exited with a nonzero exit code", "An error
# occurred when trying to download a resource file required for the task", "The compute
# node hit an unexpected error when uploading Output Files", "The task ended".
FAILURE_EXIT_CODE = "FailureExitCode"
RESOURCE_FILE_FAILURE = "BlobDownloadMiscError"
FILE_UPLOAD_FAILURE = "FileUploadMiscError"
TASK_ENDED = "TaskEnded"
#: "If the maximum duration is exceeded, the task is marked as completed, but the exit
#: code is set to 0xC000013A and the schedulingError field will be marked as
#: { category:"ServerError", code="TaskEnded"}" (learn.microsoft.com/azure/batch/
#: error-handling, "Constraint errors"); the peer uses that exit code for tasks ended by
#: job termination too ("if the Batch service terminates the Task (due to timeout, or
#: user termination via the API) you may see an operating system-defined exit code",
#: BatchTaskExecutionInfo.exitCode in the spec).
TERMINATED_EXIT_CODE = -1073741510  # 0xC000013A as a signed 32-bit integer
WALL_CLOCK_MESSAGE = "The task was ended because it exceeded its maximum wall clock time."
USER_ENDED_MESSAGE = "The task was ended by user request."
#: How a task can fail, for :class:`Runner` and :meth:`BatchPeer.set_task_state`.
FAILURE_KINDS = frozenset({"resource_file", "file_upload", "wall_clock"})
#: terminateReason values the service sets (BatchJobExecutionInfo.terminateReason and
#: BatchJobTerminateOptions in the spec: "The default is 'UserTerminate'").
REASON_WALL_CLOCK = "MaxWallClockTimeExpiry"
REASON_TASK_FAILED = "TaskFailed"
REASON_ALL_TASKS_COMPLETE = "AllTasksComplete"
REASON_USER_TERMINATE = "UserTerminate"
DEFAULT_WALL_CLOCK = "P10675199DT2H48M5.4775807S"
#: Runner mode never retries a task more often than this (maxTaskRetryCount -1 is
#: "without limit" on the service).
MAX_PEER_RETRIES = 100


# -- the spec's shapes ------------------------------------------------------------------
#
# The property names of every request and answer body, as the REST spec
# (BatchService.json, api-version 2025-06-01) defines them. They are read from the
# azure-batch 15.x models (azure/batch/models/_models.py), which are generated from that
# spec and carry each property's exact REST name (``rest_field(name=...)``), so the
# tables below are the spec's, not a hand-made list. Pages are not models in the SDK:
# the spec's list results (BatchJobListResult, BatchTaskListResult,
# BatchPoolNodeCountsListResult) are ``{"value": [...], "odata.nextLink": "..."}``
# (``x-ms-pageable: {"nextLinkName": "odata.nextLink"}`` on the list operations).

_PAGES = {"BatchJobListResult": "BatchJob", "BatchTaskListResult": "BatchTask",
          "BatchPoolNodeCountsListResult": "BatchPoolNodeCounts",
          "BatchNodeListResult": "BatchNode"}
#: The request body model of each operation that takes one (the spec's body parameters:
#: Jobs_CreateJob ``job``, Jobs_UpdateJob ``job``, Jobs_TerminateJob ``parameters``,
#: Tasks_CreateTaskCollection ``taskCollection``).
REQUEST_MODELS = {"create_job": "BatchJobCreateOptions", "update_job": "BatchJobUpdateOptions",
                  "terminate_job": "BatchJobTerminateOptions",
                  "add_task_collection": "BatchTaskGroup"}
#: The 200 answer model of each operation that answers with a body.
ANSWER_MODELS = {"list_jobs": "BatchJobListResult", "get_job": "BatchJob",
                 "add_task_collection": "BatchCreateTaskCollectionResult",
                 "get_task_counts": "BatchTaskCountsResult", "list_tasks": "BatchTaskListResult",
                 "get_task": "BatchTask", "get_pool": "BatchPool",
                 "list_node_counts": "BatchPoolNodeCountsListResult",
                 "list_nodes": "BatchNodeListResult"}
#: Every error answer: "default": {"schema": {"$ref": "#/definitions/BatchError"}}.
ERROR_MODEL = "BatchError"


def _model_class(tp: Any) -> type[_SdkModel] | None:
    """The SDK model inside an annotation (``Optional[list["_models.X"]]`` -> X)."""
    if isinstance(tp, type) and issubclass(tp, _SdkModel):
        return tp
    for arg in typing.get_args(tp):
        found = _model_class(arg)
        if found is not None:
            return found
    return None


@functools.cache
def spec_shape(model: str) -> dict[str, str | None]:
    """The REST property names of one spec model -> the model of its value (or of its
    items, for a list) when that is an object, else None."""
    if model in _PAGES:
        return {"value": _PAGES[model], "odata.nextLink": None}
    cls = getattr(_sdk_models, model)
    hints = typing.get_type_hints(cls, {**vars(_sdk_models), "_models": _sdk_package})
    shape: dict[str, str | None] = {}
    for klass in reversed(cls.__mro__):
        for attr, value in vars(klass).items():
            if attr.startswith("_") or not hasattr(value, "_rest_name_input"):
                continue
            child = _model_class(hints.get(attr))
            shape[value._rest_name_input or attr] = child.__name__ if child else None
    return shape


def undocumented(value: Any, model: str, where: str = "") -> list[str]:
    """The paths of the properties of ``value`` that the spec's ``model`` does not
    define (names compare case-sensitively, as JSON property names do).

    Every body and answer goes through here, so the common case (nothing undocumented)
    is a walk that builds no path strings (:func:`_all_documented`); the paths are
    made only when something is found."""
    if not isinstance(value, Mapping) or _all_documented(value, model):
        return []
    return _undocumented_paths(value, model, where)


@functools.cache
def _shape_sets(model: str) -> tuple[frozenset[str], dict[str, str]]:
    """The spec model's property names, and those of its properties whose value is
    an object (or a list of them) -> that object's model."""
    shape = spec_shape(model)
    return frozenset(shape), {key: child for key, child in shape.items() if child}


def _all_documented(value: Mapping[str, Any], model: str) -> bool:
    """Whether every property of ``value``, nested ones too, is in the spec's model.

    A 100-task body is about 600 objects: each is one subset test of its keys (done
    in C) and a look at only its object-valued properties; ``type(...) is dict``
    comes first because decoded JSON is plain dicts and ABC checks cost more."""
    names, nested = _shape_sets(model)
    keys = value.keys()
    if not keys <= names:
        return False
    for key in keys & nested.keys() if nested else ():
        item, child = value[key], nested[key]
        if isinstance(item, list):
            child_names, child_nested = _shape_sets(child)
            for element in item:
                if not (type(element) is dict or isinstance(element, Mapping)):
                    continue
                if child_nested:
                    if not _all_documented(element, child):
                        return False
                elif not element.keys() <= child_names:  # environment settings and such
                    return False
        elif (type(item) is dict or isinstance(item, Mapping)) \
                and not _all_documented(item, child):
            return False
    return True


def _undocumented_paths(value: Any, model: str, where: str) -> list[str]:
    """:func:`undocumented`'s answer, paths and all."""
    if not isinstance(value, Mapping):
        return []
    shape = spec_shape(model)
    found: list[str] = []
    for key, item in value.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in shape:
            found.append(path)
            continue
        child = shape[key]
        if child is None:
            continue
        if isinstance(item, list):
            for index, element in enumerate(item):
                found.extend(_undocumented_paths(element, child, f"{path}[{index}]"))
        else:
            found.extend(_undocumented_paths(item, child, path))
    return found


def _check_known(data: Mapping[str, Any], model: str) -> None:
    """400 ``InvalidRequestBody`` for a property the spec's request model does not have.

    The service reads bodies with OData, which refuses a property its type does not
    define; the error is the one for a body it cannot read: code ``InvalidRequestBody``,
    "The specified Request Body is not syntactically valid." with a ``Reason`` detail
    (as Azure/azure-powershell#12147 shows it for a body the service could not read);
    the Reason's wording here is ODataLib's for an undeclared property."""
    unknown = undocumented(data, model)
    if unknown:
        raise PeerError(400, "InvalidRequestBody", "The specified Request Body is not "
                        "syntactically valid.",
                        {"Reason": f"The property '{unknown[0]}' does not exist on type "
                         f"'{model}'. Make sure to only use property names that are "
                         "defined by the type."})


#: ETags are opaque to clients and must differ after every change: a counter from a
#: random start gives that (never one twice in a process) for less than random bytes
#: each, which the add-collection path spends per task.
_ETAGS = itertools.count(secrets.randbits(60))


def _new_etag() -> str:
    return f"0x{next(_ETAGS):016X}"


def shared_key_signature(*, account: str, key: str, method: str, path: str, query: str,
                         headers: Mapping[str, str]) -> str:
    """The Batch shared-key signature of one request, as the service computes it.

    ``path`` is the raw (still percent-encoded) request path, ``query`` the raw query
    string and ``headers`` the request headers (any case).
    """
    lowered = {name.lower(): value for name, value in headers.items() if value}
    if method not in ("GET", "HEAD"):
        lowered.setdefault("content-length", "0")
    text = method + "\n" + "\n".join(lowered.get(h, "") for h in SIGNED_HEADERS) + "\n"
    ocp = sorted((name, value) for name, value in lowered.items() if "ocp-" in name)
    text += "".join(f"{name}:{value}\n" for name, value in ocp)
    text += f"/{account}{path}"
    params = parse_qs(query)
    for name in sorted(params):
        if params[name][0]:
            text += f"\n{name}:{params[name][0]}"
    digest = hmac.new(base64.b64decode(key), text.encode("utf-8"), hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


@dataclass(frozen=True)
class FaultPlan:
    """Faults the peer injects: latency for every request, and fractions of requests
    answered 429 (``throttle``), 503 (``unavailable``) or dropped without an answer,
    before (``drop``) or after (``drop_after``) the request took effect."""

    latency: float = 0.0
    throttle: float = 0.0
    unavailable: float = 0.0
    drop: float = 0.0
    drop_after: float = 0.0
    retry_after: int = 0
    seed: int = 0
    #: Only these operations (names in ``OPERATIONS``) get faults; None means all.
    operations: frozenset[str] | None = None

    def draw(self, rng: random.Random, operation: str) -> str | None:
        """The fault for one request (None for none), drawn from ``rng``."""
        if self.operations is not None and operation not in self.operations:
            return None
        roll = rng.random()
        for kind, rate in (("throttle", self.throttle), ("unavailable", self.unavailable),
                           ("drop", self.drop), ("drop_after", self.drop_after)):
            if roll < rate:
                return kind
            roll -= rate
        return None


class PeerError(Exception):
    """An error answer: HTTP status and the service's error body."""

    def __init__(self, status: int, code: str, message: str,
                 values: Mapping[str, str] | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.values = dict(values or {})
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code,
                               "message": {"lang": "en-US", "value": self.message}}
        if self.values:
            out["values"] = [{"key": k, "value": v} for k, v in self.values.items()]
        return out


@dataclass(frozen=True)
class Runner:
    """How tasks move on their own ("runner mode", see :meth:`BatchPeer.set_runner`).

    A task whose dependencies are met goes ``running`` ``delay`` seconds after it became
    runnable, and its attempt ends ``delay`` seconds later: with the exit code
    ``exit_codes`` gives for its id (a dict or a callable; 0 when absent), or with the
    failure ``failures`` gives for it (:data:`FAILURE_KINDS`: ``"resource_file"``,
    ``"file_upload"``, ``"wall_clock"``). A task whose ``constraints.maxWallClockTime``
    is shorter than ``delay`` is killed at it, as the service does. Event times derive
    from when tasks became runnable, not from when the peer noticed, so the outcome does
    not depend on how often clients poll.
    """

    delay: float = 0.0
    exit_codes: Mapping[str, int] | Callable[[str], int] | None = None
    failures: Mapping[str, str | None] | Callable[[str], str | None] | None = None

    def exit_code(self, task_id: str) -> int:
        if callable(self.exit_codes):
            return int(self.exit_codes(task_id))
        return int((self.exit_codes or {}).get(task_id, 0))

    def failure(self, task_id: str) -> str | None:
        kind = (self.failures(task_id) if callable(self.failures)
                else (self.failures or {}).get(task_id))
        if kind is not None and kind not in FAILURE_KINDS:
            raise ValueError(f"unknown failure kind {kind!r}: one of {sorted(FAILURE_KINDS)}")
        return kind


class ManualClock:
    """A clock for :class:`BatchPeer` that moves only when a test says so."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2025, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


@dataclass
class PeerTask:
    """One accepted task: the JSON as received, and the state the peer keeps for it."""

    body: dict[str, Any]
    created: datetime = field(default_factory=lambda: datetime.now(UTC))
    state: str = "active"
    exit_code: int | None = None
    etag: str = field(default_factory=_new_etag)
    state_changed: datetime | None = None
    previous_state: str | None = None
    previous_changed: datetime | None = None
    start_time: datetime | None = None
    end_time: datetime | None = None
    result: str | None = None
    failure_info: dict[str, Any] | None = None
    retry_count: int = 0
    last_retry_time: datetime | None = None
    #: ``satisfy`` or ``block``, decided when the task completes (its exit options).
    dependency_action: str | None = None
    #: Runner mode: when the current attempt ends, and how.
    run_end: datetime | None = None
    run_kind: str | None = None
    run_exit: int | None = None
    #: When Batch last requeued it (its node was preempted: :meth:`BatchPeer.preempt_task`).
    requeued: datetime | None = None

    def __post_init__(self) -> None:
        if self.state_changed is None:
            self.state_changed = self.created

    @property
    def id(self) -> str:
        return str(self.body["id"])

    @property
    def slots(self) -> int:
        return int(self.body.get("requiredSlots") or 1)

    @property
    def int_id(self) -> int | None:
        """The id as an integer, for ``taskIdRanges`` (leading zeroes do not count)."""
        return int(self.id) if self.id.isdigit() else None


@dataclass
class PeerJob:
    """One accepted job: the JSON as received, server-side fields and its tasks."""

    body: dict[str, Any]
    created: datetime
    state: str = "active"
    on_all_tasks_complete: str = "noaction"
    tasks: dict[str, PeerTask] = field(default_factory=dict)  # keyed by lower-case id
    etag: str = field(default_factory=_new_etag)
    last_modified: datetime = field(default_factory=lambda: datetime.now(UTC))
    state_changed: datetime | None = None
    previous_state: str | None = None
    previous_changed: datetime | None = None
    end_time: datetime | None = None
    terminate_reason: str | None = None
    #: ``terminating`` ends at this time, ``deleting`` (the job is gone) at ``gone_at``.
    complete_at: datetime | None = None
    gone_at: datetime | None = None
    #: Task counts by active/running/completed/succeeded/failed, kept as tasks move.
    counts: Counter[str] = field(default_factory=Counter)
    slot_counts: Counter[str] = field(default_factory=Counter)
    #: (time, counts, slot counts) after every change, for ``counts_lag``.
    history: list[tuple[datetime, dict[str, int], dict[str, int]]] = field(default_factory=list)
    history_times: list[datetime] = field(default_factory=list)
    #: Tasks not completed yet, and tasks by integer id (``taskIdRanges``).
    pending: dict[str, PeerTask] = field(default_factory=dict)
    by_int: dict[int, list[PeerTask]] = field(default_factory=dict)
    #: A job made by :meth:`BatchPeer.seed_job`: counts of tasks held as numbers only,
    #: keyed active/running/succeeded/failed (ids ``seed0``, ``seed1``, ...).
    virtual: dict[str, int] | None = None
    max_wall_clock: timedelta | None = None

    def __post_init__(self) -> None:
        if self.state_changed is None:
            self.state_changed = self.created
        self.max_wall_clock = _parse_duration(
            (self.body.get("constraints") or {}).get("maxWallClockTime"))

    @property
    def id(self) -> str:
        return str(self.body["id"])

    @property
    def pool(self) -> str | None:
        pool = (self.body.get("poolInfo") or {}).get("poolId")
        return str(pool) if pool else None

    @property
    def uses_task_dependencies(self) -> bool:
        return bool(self.body.get("usesTaskDependencies"))

    @property
    def on_task_failure(self) -> str:
        return str(self.body.get("onTaskFailure") or "noaction").lower()

    @property
    def total(self) -> int:
        return self.counts["active"] + self.counts["running"] + self.counts["completed"]


@dataclass
class PeerNode:
    """A compute node, kept only for preemption (``GET /pools/{id}/nodes``): its state,
    when it entered it, and the (job id, task id) pairs of its ``recentTasks``."""

    id: str
    state: str
    state_changed: datetime
    is_dedicated: bool = False
    recent_tasks: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class PeerPool:
    """A pool: its sizes and node counts (dedicated and low priority) by state."""

    id: str
    dedicated: dict[str, int] = field(default_factory=dict)
    low_priority: dict[str, int] = field(default_factory=dict)
    target_dedicated: int = 0
    target_low_priority: int = 0
    allocation_state: str = "steady"
    state: str = "active"
    vm_size: str = "standard_d2s_v3"
    #: ``taskSlotsPerNode`` ("The default value is 1", BatchPool).
    task_slots_per_node: int = 1
    created: datetime = field(default_factory=lambda: datetime.now(UTC))
    #: ``virtualMachineConfiguration.containerConfiguration``: None for a pool without
    #: one, else its ``type`` and ``containerImageNames``.
    container_type: str | None = None
    container_images: tuple[str, ...] = ()
    #: Compute nodes the peer keeps (only those :meth:`BatchPeer.preempt_task` made).
    nodes: dict[str, PeerNode] = field(default_factory=dict)
    #: ``resizeErrors`` of the last resize, (code, message) each; answered only while
    #: the pool is steady ("set only if one or more errors occurred during the last Pool
    #: resize, and only when the Pool allocationState is Steady", BatchPool).
    resize_errors: tuple[tuple[str, str], ...] = ()
    #: ``enableAutoScale`` (with a placeholder ``autoScaleFormula``, required then).
    enable_auto_scale: bool = False
    #: ``allocationStateTransitionTime``: when the pool entered its allocation state
    #: (None: its creation).
    allocation_changed: datetime | None = None


class BatchPeer:
    """The peer: start it, point a ``BatchClient`` at :attr:`url` with
    ``AzureNamedKeyCredential(peer.account, peer.key)``, inspect its record, stop it."""

    def __init__(self, *, account: str = "fanoutpeer", key: str | None = None,
                 host: str = "127.0.0.1", port: int = 0, api_version: str = API_VERSION,
                 max_tasks: int = MAX_TASKS_PER_REQUEST, max_body_bytes: int = MAX_BODY_BYTES,
                 require_pool: bool = False, max_active_jobs: int | None = None,
                 bearer_token: str | None = None, faults: FaultPlan | None = None,
                 task_rule: Callable[[dict[str, Any]], PeerError | None] | None = None,
                 runner: Runner | None = None, counts_lag: float = 0.0,
                 terminate_delay: float = 0.0, delete_delay: float = 0.0,
                 clock: Callable[[], datetime] | None = None) -> None:
        """``require_pool`` refuses a job naming a missing pool with 404 ``PoolNotFound``;
        the service does not (off by default): BatchPoolInfo.poolId in the spec: "You
        must ensure that the Pool referenced by this property exists. If the Pool does not
        exist at the time the Batch service tries to schedule a Job, no Tasks for the Job
        will run until you create a Pool with that id. Note that the Batch service will not
        reject the Job request; it will simply not run Tasks until the Pool exists": the
        job is accepted and its tasks stay active (runner mode does not start them).

        ``task_rule`` is an extra rule of the service for tests: a task it returns
        an error for is answered with that error (per task, ``clientError``).

        ``runner`` makes tasks move on their own (:class:`Runner`); ``counts_lag``
        makes the task counts answer show the tasks as they were that many seconds
        ago; ``terminate_delay`` and ``delete_delay`` keep a job ``terminating`` or
        ``deleting`` that long; ``clock`` (e.g. a :class:`ManualClock`) replaces the
        wall clock for every time the peer keeps."""
        self.account = account
        self.key = key or base64.b64encode(secrets.token_bytes(64)).decode("ascii")
        self.api_version = api_version
        self.max_tasks = max_tasks
        self.max_body_bytes = max_body_bytes
        self.require_pool = require_pool
        self.max_active_jobs = max_active_jobs
        self.bearer_token = bearer_token
        self.task_rule = task_rule
        self.counts_lag = counts_lag
        self.terminate_delay = terminate_delay
        self.delete_delay = delete_delay
        self._clock = clock or (lambda: datetime.now(UTC))
        self._runner = runner
        self._runner_since = self._clock()
        self._host, self._port = host, port
        self._lock = threading.RLock()
        self._jobs: dict[str, PeerJob] = {}
        self._pools: dict[str, PeerPool] = {}
        self._faults = faults or FaultPlan()
        self._rng = random.Random(self._faults.seed)
        self._order_rng = random.Random(self._faults.seed)  # apart, so faults stay seeded
        self._headers: Mapping[str, str] = {}
        #: The request body being handled and its JSON, decoded once (:meth:`_body`).
        self._decoded: tuple[bytes, dict[str, Any]] | None = None
        #: Requests by outcome: ok, throttled, unavailable, dropped, dropped_after,
        #: too_large, auth_failed, or the error code answered.
        self.outcomes: Counter[str] = Counter()
        #: Requests by (operation, outcome).
        self.requests: Counter[tuple[str, str]] = Counter()
        #: Every request's (operation, outcome), in the order they were answered.
        self.log: list[tuple[str, str]] = []
        #: Tasks in add-collection answers by outcome: added, TaskExists, <error code>.
        self.task_outcomes: Counter[str] = Counter()
        #: Task ids per add-collection request that reached the handler, in order.
        self.add_requests: list[list[str]] = []
        #: (operation, property path) of every property the peer answered with that the
        #: spec's answer model does not define: empty unless the peer itself is wrong.
        self.undocumented: list[tuple[str, str]] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        #: Connections accepted since start: tests hold clients to keep-alive reuse.
        self.connections_opened = 0

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> BatchPeer:
        """Listen on the host and port given (0: a free port) in a background thread."""
        handler = type("Handler", (_Handler,), {"peer": self})
        self._server = _Server((self._host, self._port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        name="batch-peer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and close every open connection."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            for conn in list(self._connections):
                _close_quietly(conn)
            self._connections.clear()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None

    def __enter__(self) -> BatchPeer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "the peer is not started"
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """The account URL to give ``BatchClient`` (``http://127.0.0.1:<port>``)."""
        return f"http://{self._host}:{self.port}"

    # -- test API ----------------------------------------------------------------------

    @property
    def faults(self) -> FaultPlan:
        return self._faults

    def set_faults(self, faults: FaultPlan) -> None:
        """Replace the fault plan and reseed the decisions from ``faults.seed``."""
        with self._lock:
            self._faults = faults
            self._rng = random.Random(faults.seed)

    @property
    def runner(self) -> Runner | None:
        return self._runner

    def set_runner(self, runner: Runner | None) -> None:
        """Turn runner mode on (tasks already waiting count as runnable from now) or off
        (None: tasks stay where they are until :meth:`set_task_state` moves them)."""
        with self._lock:
            self._advance()
            self._runner = runner
            self._runner_since = self._clock()

    def set_counts_lag(self, seconds: float) -> None:
        """Task counts answer with the task states as they were ``seconds`` ago."""
        with self._lock:
            self.counts_lag = seconds

    def now(self) -> datetime:
        """The peer's clock."""
        return self._clock()

    def add_pool(self, pool_id: str, *, dedicated: Mapping[str, int] | None = None,
                 low_priority: Mapping[str, int] | None = None,
                 target_dedicated: int | None = None, target_low_priority: int | None = None,
                 allocation_state: str = "steady",
                 container_images: list[str] | tuple[str, ...] | None = None,
                 container_type: str = "dockerCompatible", vm_size: str = "standard_d2s_v3",
                 task_slots_per_node: int = 1) -> PeerPool:
        """Create (or replace) a pool with node counts by state; ``total`` and the
        current sizes follow from the counts, targets default to the current sizes.

        ``container_images`` (even empty) gives the pool a container configuration
        (``virtualMachineConfiguration.containerConfiguration`` with ``type`` and
        ``containerImageNames``); None: a pool without one."""
        if container_type not in ("dockerCompatible", "criCompatible"):  # ContainerType
            raise ValueError(f"unknown container type {container_type!r}")
        ded = {k: int(v) for k, v in (dedicated or {}).items()}
        low = {k: int(v) for k, v in (low_priority or {}).items()}
        for counts in (ded, low):
            unknown = set(counts) - set(NODE_STATES)
            if unknown:
                raise ValueError(f"unknown node states {sorted(unknown)}")
            counts.setdefault("total", sum(counts.values()))
        pool = PeerPool(id=pool_id, dedicated=ded, low_priority=low,
                        target_dedicated=ded["total"] if target_dedicated is None
                        else target_dedicated,
                        target_low_priority=low["total"] if target_low_priority is None
                        else target_low_priority,
                        allocation_state=allocation_state, created=self._clock(),
                        container_type=None if container_images is None else container_type,
                        container_images=tuple(container_images or ()),
                        vm_size=vm_size, task_slots_per_node=task_slots_per_node)
        with self._lock:
            self._pools[pool_id.lower()] = pool
        return pool

    def set_pool(self, pool_id: str, *, dedicated: Mapping[str, int] | None = None,
                 low_priority: Mapping[str, int] | None = None,
                 target_dedicated: int | None = None, target_low_priority: int | None = None,
                 allocation_state: str | None = None,
                 resize_errors: list[tuple[str, str]] | None = None,
                 enable_auto_scale: bool | None = None,
                 task_slots_per_node: int | None = None) -> PeerPool:
        """Change a pool in place (a test knob): node counts by state (``total`` follows;
        the targets are kept unless given), targets, allocation state (a change moves
        ``allocationStateTransitionTime`` to now, and a new resize clears the resize
        errors of the last one), resize errors as (code, message), autoscale, slots."""
        with self._lock:
            pool = self._pools[pool_id.lower()]
            for name, counts in (("dedicated", dedicated), ("low_priority", low_priority)):
                if counts is None:
                    continue
                new = {k: int(v) for k, v in counts.items()}
                unknown = set(new) - set(NODE_STATES)
                if unknown:
                    raise ValueError(f"unknown node states {sorted(unknown)}")
                new["total"] = sum(v for k, v in new.items() if k != "total")
                setattr(pool, name, new)
            if target_dedicated is not None:
                pool.target_dedicated = target_dedicated
            if target_low_priority is not None:
                pool.target_low_priority = target_low_priority
            if allocation_state is not None:
                if allocation_state not in ("steady", "resizing", "stopping"):  # AllocationState
                    raise ValueError(f"unknown allocation state {allocation_state!r}")
                if allocation_state != pool.allocation_state:
                    pool.allocation_state = allocation_state
                    pool.allocation_changed = self._clock()
                    if allocation_state == "resizing":
                        pool.resize_errors = ()
            if resize_errors is not None:
                pool.resize_errors = tuple((str(c), str(m)) for c, m in resize_errors)
            if enable_auto_scale is not None:
                pool.enable_auto_scale = enable_auto_scale
            if task_slots_per_node is not None:
                pool.task_slots_per_node = task_slots_per_node
            return pool

    def remove_pool(self, pool_id: str) -> None:
        """Delete a pool at once (any case); jobs naming it stay, their tasks wait."""
        with self._lock:
            self._pools.pop(pool_id.lower(), None)

    def seed_job(self, job_id: str, pool: str = "fanout", *, tasks: int = 0,
                 counts: Mapping[str, int] | None = None,
                 metadata: Mapping[str, str] | None = None, state: str = "active",
                 on_all_tasks_complete: str = "noaction", on_task_failure: str = "noaction",
                 terminate_reason: str | None = None, created: datetime | None = None,
                 end_time: datetime | None = None) -> PeerJob:
        """Create a job with many tasks in memory, without HTTP and without task bodies.

        Its tasks are numbers only (``counts``: active, running, succeeded, failed;
        default all ``tasks`` active, or all succeeded for a completed job); they do not
        move on their own, list as ``seed0``, ``seed1``, ... and running ones end when
        the job is terminated. ``state`` is ``active`` or ``completed`` (then with
        ``terminate_reason``, default ``AllTasksComplete``, and ``end_time``)."""
        if state not in ("active", "completed", "disabled"):
            raise ValueError(f"a seeded job is active, disabled or completed, not {state!r}")
        with self._lock:
            now = self._clock()
            made = created or now
            virtual = {k: 0 for k in ("active", "running", "succeeded", "failed")}
            given = dict(counts) if counts is not None else (
                {"active": tasks} if state != "completed" else {"succeeded": tasks})
            unknown = set(given) - set(virtual)
            if unknown:
                raise ValueError(f"unknown task count keys {sorted(unknown)}")
            virtual.update({k: int(v) for k, v in given.items()})
            body: dict[str, Any] = {"id": job_id, "poolInfo": {"poolId": pool},
                                    "onAllTasksComplete": on_all_tasks_complete,
                                    "onTaskFailure": on_task_failure}
            if metadata:
                body["metadata"] = [{"name": k, "value": v} for k, v in metadata.items()]
            job = PeerJob(body=body, created=made, state=state, last_modified=made,
                          on_all_tasks_complete=on_all_tasks_complete, virtual=virtual)
            job.counts.update({"active": virtual["active"], "running": virtual["running"],
                               "completed": virtual["succeeded"] + virtual["failed"],
                               "succeeded": virtual["succeeded"], "failed": virtual["failed"]})
            job.slot_counts.update(job.counts)
            if state == "completed":
                job.end_time = end_time or now
                job.terminate_reason = terminate_reason or REASON_ALL_TASKS_COMPLETE
                job.state_changed = job.end_time
            self._snapshot(job, made)
            self._jobs[job_id.lower()] = job
            return job

    def finish_seeded(self, job_ids: list[str]) -> datetime:
        """Every active and running task of these seeded jobs succeeds at one instant
        (returned); a job with ``onAllTasksComplete: terminatejob`` then completes with
        ``AllTasksComplete``, as :meth:`_settle` ends any job whose tasks have all
        completed. Unknown and unseeded jobs are refused with ``KeyError``."""
        with self._lock:
            self._advance()
            now = self._clock()
            jobs = [self._jobs[j.lower()] for j in job_ids]
            if any(job.virtual is None for job in jobs):
                raise KeyError("only seeded jobs can be finished this way")
            for job in jobs:
                self._finish_virtual(job, now)
            return now

    def _finish_virtual(self, job: PeerJob, at: datetime) -> None:
        assert job.virtual is not None
        ended = job.virtual["active"] + job.virtual["running"]
        job.virtual.update(active=0, running=0, succeeded=job.virtual["succeeded"] + ended)
        for counts in (job.counts, job.slot_counts):
            counts.update(active=-counts["active"], running=-counts["running"],
                          completed=ended, succeeded=ended)
        self._snapshot(job, at)
        self._touch(job, at)
        self._settle(job, at)

    def job(self, job_id: str) -> PeerJob | None:
        """The job with this id (any case), or None."""
        with self._lock:
            self._advance()
            return self._jobs.get(job_id.lower())

    def jobs(self) -> list[PeerJob]:
        """Every job, in creation order."""
        with self._lock:
            self._advance()
            return list(self._jobs.values())

    def tasks(self, job_id: str) -> list[dict[str, Any]]:
        """The tasks of a job as received, in the order they were accepted."""
        with self._lock:
            job = self._jobs.get(job_id.lower())
            return [] if job is None else [t.body for t in job.tasks.values()]

    def task(self, job_id: str, task_id: str) -> PeerTask:
        """One task's state (raises KeyError for an unknown job or task)."""
        with self._lock:
            self._advance()
            return self._jobs[job_id.lower()].tasks[task_id.lower()]

    def task_json(self, job_id: str, task_id: str) -> dict[str, Any]:
        """One task as the service reports it (``GET /jobs/{id}/tasks/{id}``)."""
        with self._lock:
            self._advance()
            job = self._jobs[job_id.lower()]
            return self._task_json(job, job.tasks[task_id.lower()])

    def set_task_state(self, job_id: str, task_id: str, state: str, *,
                       exit_code: int | None = 0, failure: str | None = None,
                       failure_code: str | None = None,
                       failure_message: str | None = None) -> None:
        """Move a task to ``active``, ``preparing``, ``running`` or ``completed``.

        A completed task gets the exit code (and, with ``failure``, one of
        :data:`FAILURE_KINDS`) with the service's ``executionInfo``; its exit options
        decide its dependents and, on a job with ``onTaskFailure:
        performexitoptionsjobaction``, its job. ``failure_code`` sets any failureInfo
        code instead (a ``Blob*``/``Resource*`` code is a pre-processing error, a
        ``FileUpload*`` one a file upload error, ``TaskEnded`` a servererror)."""
        if state not in ("active", "preparing", "running", "completed"):
            raise ValueError(f"unknown task state {state!r}")
        if failure is not None and failure not in FAILURE_KINDS:
            raise ValueError(f"unknown failure kind {failure!r}")
        if failure_code is not None:
            failure = "code:" + failure_code + "\n" + (failure_message or "")
        with self._lock:
            self._advance()
            job = self._jobs[job_id.lower()]
            task = job.tasks[task_id.lower()]
            now = self._clock()
            if state == "completed":
                if task.start_time is None and failure != "resource_file" and not (
                        failure or "").startswith(("code:Blob", "code:Resource")):
                    task.start_time = now
                self._complete(job, task, now, kind=failure or "exit", exit_code=exit_code)
            else:
                if state in ("preparing", "running") and task.start_time is None:
                    task.start_time = now
                if state == "active":
                    task.start_time = task.end_time = task.result = None
                    task.exit_code = task.failure_info = task.dependency_action = None
                task.run_end = None
                self._move(job, task, state, now)
            self._settle(job, now)

    def preempt_task(self, job_id: str, task_id: str, node_id: str | None = None) -> str:
        """Preempt the Spot/low-priority node a running task is on, as the service does
        ("Tasks which were running on the Compute Node when it was preempted will be
        rescheduled when another Compute Node becomes available", BatchNodeState
        ``preempted`` in the spec): the node (``node_id``, else a new one) enters the
        ``preempted`` state with the task in its ``recentTasks``, the pool's
        ``lowPriority.preempted`` count follows, and the task is requeued: ``active``
        again (in runner mode it runs again after ``delay``). Its ``retryCount`` and
        ``requeueCount`` stay as they were: the spec counts retries after a non-zero
        exit and requeues "as the result of a user request" (a pool shrunk or a job
        disabled with ``requeue``), and a preemption is neither. Returns the node id."""
        with self._lock:
            self._advance()
            job = self._jobs[job_id.lower()]
            task = job.tasks[task_id.lower()]
            if task.state not in ("running", "preparing"):
                raise ValueError(f"task {task_id} is {task.state}, not on a node")
            pool = self._pools[(job.pool or "").lower()]
            now = self._clock()
            node_id = node_id or f"tvm-spot-{len(pool.nodes) + 1}"
            node = pool.nodes.get(node_id.lower())
            if node is None:
                node = pool.nodes[node_id.lower()] = PeerNode(node_id, "preempted", now)
            node.state, node.state_changed = "preempted", now
            node.recent_tasks = [*node.recent_tasks, (job.id, task.id)][-10:]
            pool.low_priority["preempted"] = sum(
                1 for n in pool.nodes.values() if n.state == "preempted")
            pool.low_priority["total"] = max(pool.low_priority.get("total", 0),
                                             pool.low_priority["preempted"])
            task.start_time = None
            task.run_end = task.run_kind = None
            task.requeued = now
            self._move(job, task, "active", now)
            return node.id

    def restore_node(self, pool_id: str, node_id: str) -> None:
        """Capacity is back: the preempted node is ``idle`` again (its id kept,
        "reinitialized", batch-spot-vms)."""
        with self._lock:
            pool = self._pools[pool_id.lower()]
            node = pool.nodes[node_id.lower()]
            node.state, node.state_changed = "idle", self._clock()
            pool.low_priority["preempted"] = sum(
                1 for n in pool.nodes.values() if n.state == "preempted")

    def record(self) -> dict[str, Any]:
        """Everything accepted, as JSON-ready data (jobs with their tasks, outcomes)."""
        with self._lock:
            self._advance()
            return {
                "jobs": [{**self._job_json(j), "tasks": [t.body for t in j.tasks.values()]}
                         for j in self._jobs.values()],
                "outcomes": dict(self.outcomes),
                "task_outcomes": dict(self.task_outcomes),
            }

    def admin(self, method: str, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        """A ``/_peer/`` request (see the module docstring): test administration,
        not a Batch operation."""
        try:
            match method, path:
                case "GET", "/_peer/record":
                    return 200, self.record()
                case "GET", "/_peer/requests":
                    with self._lock:
                        rows = [[op, outcome, n] for (op, outcome), n in self.requests.items()]
                    return 200, {"requests": rows}
                case "POST", "/_peer/seed":
                    jobs = json.loads(body or b"{}").get("jobs") or []
                    for spec in jobs:
                        job_id, kwargs = _seed_args(spec)
                        self.seed_job(job_id, **kwargs)
                    return 200, {"seeded": len(jobs)}
                case "POST", "/_peer/finish":
                    ids = [str(j) for j in json.loads(body or b"{}").get("jobs") or []]
                    return 200, {"finished": len(ids), "at": _rfc3339(self.finish_seeded(ids))}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            return 400, {"error": f"{type(exc).__name__}: {exc}"}
        return 404, {"error": f"no test administration at {method} {path}"}

    # -- request handling (called from handler threads) ---------------------------------

    def _draw_fault(self, operation: str) -> str | None:
        with self._lock:
            return self._faults.draw(self._rng, operation)

    def _count(self, operation: str, outcome: str) -> None:
        with self._lock:
            self.outcomes[outcome] += 1
            self.requests[operation, outcome] += 1
            self.log.append((operation, outcome))

    def _check_auth(self, method: str, path: str, query: str,
                    headers: Mapping[str, str]) -> None:
        auth = headers.get("Authorization") or ""
        if self.bearer_token is not None and auth == f"Bearer {self.bearer_token}":
            return
        if not auth:
            raise PeerError(401, "AuthenticationRequired",
                            "Server failed to authenticate the request: no Authorization "
                            "header.")
        scheme, _, rest = auth.partition(" ")
        account, _, signature = rest.partition(":")
        expected = shared_key_signature(account=self.account, key=self.key, method=method,
                                        path=path, query=query, headers=headers)
        if scheme != "SharedKey" or account != self.account or not hmac.compare_digest(
                signature, expected):
            raise PeerError(403, "AuthenticationFailed",
                            "Server failed to authenticate the request. Make sure the value "
                            "of Authorization header is correctly formed including the "
                            "signature.",
                            {"AuthenticationErrorDetail": "The MAC signature found in the "
                             "HTTP request is not the same as any computed signature."})

    def _route(self, method: str, path: str) -> tuple[str, tuple[str, ...]]:
        parts = [unquote(p) for p in path.strip("/").split("/")]
        match parts:
            case ["jobs"] if method == "POST":
                return "create_job", ()
            case ["jobs"] if method == "GET":
                return "list_jobs", ()
            case ["jobs", job_id] if method == "GET":
                return "get_job", (job_id,)
            case ["jobs", job_id] if method == "PATCH":
                return "update_job", (job_id,)
            case ["jobs", job_id] if method == "DELETE":
                return "delete_job", (job_id,)
            case ["jobs", job_id, "terminate"] if method == "POST":
                return "terminate_job", (job_id,)
            case ["jobs", job_id, "addtaskcollection"] if method == "POST":
                return "add_task_collection", (job_id,)
            case ["jobs", job_id, "taskcounts"] if method == "GET":
                return "get_task_counts", (job_id,)
            case ["jobs", job_id, "tasks"] if method == "GET":
                return "list_tasks", (job_id,)
            case ["jobs", job_id, "tasks", task_id] if method == "GET":
                return "get_task", (job_id, task_id)
            case ["pools", pool_id] if method == "GET":
                return "get_pool", (pool_id,)
            case ["pools", pool_id, "nodes"] if method == "GET":
                return "list_nodes", (pool_id,)
            case ["jobs", job_id, "tasks", task_id, "terminate"] if method == "POST":
                return "terminate_task", (job_id, task_id)
            case ["nodecounts"] if method == "GET":
                return "list_node_counts", ()
        raise PeerError(400, "InvalidUri", f"The requested URI {method} {path} does not "
                        "represent any resource on the server.")

    def _dispatch(self, operation: str, args: tuple[str, ...] | str | None,
                  params: Mapping[str, str], body: bytes,
                  headers: Mapping[str, str] | None = None) -> tuple[int, Any, dict[str, str]]:
        if params.get("api-version") != self.api_version:
            raise PeerError(400, "InvalidQueryParameterValue",
                            "Value for one of the query parameters specified in the request "
                            "URI is invalid.",
                            {"QueryParameterName": "api-version",
                             "QueryParameterValue": params.get("api-version", ""),
                             "Reason": f"only {self.api_version} is supported"})
        if args is None:
            args = ()
        elif isinstance(args, str):
            args = (args,)
        if len(body) >= self.max_body_bytes:
            # Tasks_CreateTaskCollection: "The total serialized size of this collection
            # must be less than 1MB. If it is greater than 1MB (for example if each Task
            # has 100's of resource files or environment variables), the request will
            # fail with code 'RequestBodyTooLarge'" (BatchTaskGroup in the spec); 413 as
            # "Batch Status and Error Codes" lists it. The peer holds every body to it.
            raise PeerError(413, "RequestBodyTooLarge",
                            "The request body is too large and exceeds the maximum "
                            "permissible limit.",
                            {"MaxLimit": str(self.max_body_bytes)})
        model = REQUEST_MODELS.get(operation)
        decoded: tuple[bytes, dict[str, Any]] | None = None
        if model is not None and body:
            decoded = body, _json_body(body)
            _check_known(decoded[1], model)
        handler = getattr(self, f"_op_{operation}")
        with self._lock:
            self._headers = headers or {}
            self._decoded = decoded
            self._advance()
            status, payload, out_headers = handler(*args, params, body)
            self._check_answer(operation, payload)
            return status, payload, out_headers

    def _body(self, body: bytes) -> dict[str, Any]:
        """The request body's JSON: the copy :meth:`_dispatch` decoded for its property
        check when it is this body (a 100-task body is decoded once, not twice)."""
        decoded = self._decoded
        if decoded is not None and decoded[0] is body:
            return decoded[1]
        return _json_body(body)

    def _check_answer(self, operation: str, payload: Any, model: str | None = None) -> None:
        """Record every property of an answer that the spec's answer model lacks
        (:attr:`undocumented`), so tests can assert fanout reads only documented ones."""
        model = model or ANSWER_MODELS.get(operation)
        if model is None or payload is None:
            return
        for path in undocumented(payload, model):
            with self._lock:
                self.undocumented.append((operation, path))

    # -- jobs ----------------------------------------------------------------------------

    def _op_create_job(self, params: Mapping[str, str],
                       body: bytes) -> tuple[int, Any, dict[str, str]]:
        data = self._body(body)
        job_id = _valid_id(data.get("id"), "id")
        pool_id = (data.get("poolInfo") or {}).get("poolId")
        if not pool_id and not (data.get("poolInfo") or {}).get("autoPoolSpecification"):
            raise _missing("poolInfo")
        mode = str(data.get("onAllTasksComplete") or "noaction").lower()
        if mode not in ("noaction", "terminatejob"):
            raise _invalid("onAllTasksComplete", mode, "must be noaction or terminatejob")
        failure_mode = str(data.get("onTaskFailure") or "noaction").lower()
        if failure_mode not in ("noaction", "performexitoptionsjobaction"):
            raise _invalid("onTaskFailure", failure_mode,
                           "must be noaction or performexitoptionsjobaction")
        priority = data.get("priority", 0)
        if not isinstance(priority, int) or not -1000 <= priority <= 1000:
            raise _invalid("priority", str(priority), "must be an integer in -1000..1000")
        _check_constraints(data.get("constraints"), "constraints")
        _check_metadata(data.get("metadata"))
        if job_id.lower() in self._jobs:
            raise PeerError(409, "JobExists", "The specified job already exists.")
        if pool_id and self.require_pool and pool_id.lower() not in self._pools:
            # not the service's behaviour (off by default): a job may name a pool that
            # does not exist, see _run_tasks; only for tests of a PoolNotFound answer
            raise PeerError(404, "PoolNotFound", "The specified pool does not exist.")
        active = sum(1 for j in self._jobs.values() if j.state == "active")
        if self.max_active_jobs is not None and active >= self.max_active_jobs:
            raise PeerError(409, "ActiveJobAndScheduleQuotaReached",
                            "The specified account has reached the maximum number of "
                            "active jobs and job schedules.")
        now = self._clock()
        job = PeerJob(body=data, created=now, on_all_tasks_complete=mode, last_modified=now)
        self._snapshot(job, now)
        self._jobs[job_id.lower()] = job
        self._settle(job, now)
        return 201, None, {**self._entity_headers(job.etag, job.last_modified),
                           "DataServiceId": f"{self._base()}/jobs/{job_id}",
                           "Location": f"{self._base()}/jobs/{job_id}"}

    def _op_get_job(self, job_id: str, params: Mapping[str, str],
                    body: bytes) -> tuple[int, Any, dict[str, str]]:
        job = self._need_job(job_id)
        return 200, _select(self._job_json(job), params), self._entity_headers(
            job.etag, job.last_modified)

    def _op_update_job(self, job_id: str, params: Mapping[str, str],
                       body: bytes) -> tuple[int, Any, dict[str, str]]:
        """``PATCH /jobs/{id}`` ("Jobs_UpdateJob" in BatchService.json): properties the
        body leaves out stay as they are; ``metadata`` replaces the whole list.

        ``onAllTasksComplete`` may not go from terminatejob back to noaction (400
        InvalidPropertyValue, per the spec's BatchJobUpdateOptions). On a job that is
        no longer active only ``metadata`` may change: a patch holding anything else
        (even the value it has) answers 409 ``JobCompleted``
        (``JobBeingTerminated``/``JobBeingDeleted`` while terminating or deleting: "All
        update operations on a Job that is in deleting state will fail with status code
        409", Jobs_DeleteJob in the spec).
        ``If-Match``/``If-None-Match``/``If-(Un)Modified-Since`` are honoured (412
        ``ConditionNotMet``)."""
        job = self._need_job(job_id)
        self._check_conditions(job)
        data = self._body(body)
        if job.state == "deleting":
            raise _being_deleted()
        changes: dict[str, Any] = {}
        if "onAllTasksComplete" in data:
            mode = str(data["onAllTasksComplete"]).lower()
            if mode not in ("noaction", "terminatejob"):
                raise _invalid("onAllTasksComplete", mode, "must be noaction or terminatejob")
            # BatchJobUpdateOptions.onAllTasksComplete: "You may not change the value from
            # terminatejob to noaction ... the request fails with an 'invalid property
            # value' error response; ... the HTTP status code is 400 (Bad Request)."
            if job.on_all_tasks_complete == "terminatejob" and mode == "noaction":
                raise _invalid("onAllTasksComplete", mode, "once terminatejob is set it "
                               "cannot go back to noaction")
            if mode != job.on_all_tasks_complete:
                changes["onAllTasksComplete"] = mode
        if "priority" in data:
            priority = data["priority"]
            if not isinstance(priority, int) or not -1000 <= priority <= 1000:
                raise _invalid("priority", str(priority), "must be an integer in -1000..1000")
        if "maxParallelTasks" in data:
            value = data["maxParallelTasks"]
            if not isinstance(value, int) or not (value == -1 or value > 0):
                raise _invalid("maxParallelTasks", str(value), "must be -1 or more than 0")
        if "constraints" in data:
            _check_constraints(data["constraints"], "constraints")
        if "metadata" in data:
            _check_metadata(data["metadata"])
        # the body is checked first (an invalid value is 400 whatever the job's state);
        # then a completed job takes no more changes but its metadata, even a change to
        # what it already has (a seal sent again): 409 JobCompleted
        if job.state in ("terminating", "completed") and any(k != "metadata" for k in data):
            # a completed job takes no more changes but its metadata, even a change to
            # what it already has (a seal sent again): 409 JobCompleted
            if job.state == "terminating":
                raise _being_terminated()
            raise PeerError(409, "JobCompleted", "The specified job is already in a "
                            "completed state.")
        if "poolInfo" in data and job.state != "disabled":
            raise PeerError(409, "JobNotDisabled" if job.state == "active" else "JobCompleted",
                            "The pool of a job may change only while the job is disabled.")
        for key in ("priority", "constraints", "maxParallelTasks", "allowTaskPreemption",
                    "poolInfo", "networkConfiguration"):
            if key in data and data[key] != job.body.get(key):
                changes[key] = data[key]
        if "metadata" in data:
            changes["metadata"] = data["metadata"]
        for key, value in changes.items():
            job.body[key] = value
        if "onAllTasksComplete" in changes:
            job.on_all_tasks_complete = changes["onAllTasksComplete"]
        if "constraints" in changes:
            job.max_wall_clock = _parse_duration(
                (job.body.get("constraints") or {}).get("maxWallClockTime"))
        now = self._clock()
        self._touch(job, now)
        self._settle(job, now)
        self._advance()
        return 200, None, {**self._entity_headers(job.etag, job.last_modified),
                           "DataServiceId": f"{self._base()}/jobs/{job.id}"}

    def _op_terminate_job(self, job_id: str, params: Mapping[str, str],
                          body: bytes) -> tuple[int, Any, dict[str, str]]:
        """``POST /jobs/{id}/terminate`` ("Jobs_TerminateJob"): 202, the job goes
        ``terminating`` then ``completed``; running tasks are ended (failureInfo
        ``TaskEnded``); "If there are any Tasks in the Job in the active state, they
        will remain in the active state" (the spec's description): they stay active and
        are never scheduled. ``terminateReason`` defaults to ``UserTerminate``
        (BatchJobTerminateOptions). The ``force`` query parameter (bool) is accepted; the
        peer has no nodes to wait for. A completed job answers 409 ``JobCompleted``."""
        job = self._need_job(job_id)
        self._check_conditions(job)
        force = params.get("force")
        if force is not None and force.lower() not in ("true", "false"):
            raise PeerError(400, "InvalidQueryParameterValue", "Value for one of the query "
                            "parameters specified in the request URI is invalid.",
                            {"QueryParameterName": "force", "QueryParameterValue": force})
        data = self._body(body) if body else {}
        reason = data.get("terminateReason")
        if reason is not None and not isinstance(reason, str):
            raise _invalid("terminateReason", str(reason), "must be a string")
        if job.state == "completed":
            raise PeerError(409, "JobCompleted", "The specified job is already in a "
                            "completed state.")
        if job.state == "terminating":
            raise _being_terminated()
        if job.state == "deleting":
            raise _being_deleted()
        now = self._clock()
        self._terminate(job, reason or REASON_USER_TERMINATE, now)
        return 202, None, {**self._entity_headers(job.etag, job.last_modified),
                           "DataServiceId": f"{self._base()}/jobs/{job.id}"}

    def _op_delete_job(self, job_id: str, params: Mapping[str, str],
                       body: bytes) -> tuple[int, Any, dict[str, str]]:
        """``DELETE /jobs/{id}`` ("Jobs_DeleteJob"): 202; the job is ``deleting`` for
        ``delete_delay`` seconds (0: gone at once), then gone (404 ``JobNotFound``)."""
        job = self._need_job(job_id)
        self._check_conditions(job)
        if job.state == "deleting":
            raise _being_deleted()
        now = self._clock()
        self._job_state(job, "deleting", now)
        job.gone_at = now + timedelta(seconds=self.delete_delay)
        if self.delete_delay <= 0:
            del self._jobs[job.id.lower()]
        return 202, None, {}

    def _op_list_jobs(self, params: Mapping[str, str],
                      body: bytes) -> tuple[int, Any, dict[str, str]]:
        """``GET /jobs``: ``$filter`` over the properties the "List jobs" table of
        "OData filters in Batch" lists (:data:`JOB_FILTERS`), ``$select``, paging."""
        text = params.get("$filter")
        keep = _compile_filter(text, JOB_FILTERS) if text else None
        items = [self._job_json(j) for j in self._jobs.values()]
        if keep is not None:
            items = [item for item in items if keep(item)]
        return 200, self._page(items, params, "/jobs", 1000, limit=1000), {}

    def _op_get_task_counts(self, job_id: str, params: Mapping[str, str],
                            body: bytes) -> tuple[int, Any, dict[str, str]]:
        """Task counts ("Jobs_GetJobTaskCounts"): "Tasks in the preparing state are
        counted as running. Note that the numbers returned may not always be up to
        date." With ``counts_lag`` the answer is the counts as they were that long ago."""
        job = self._need_job(job_id)
        counts: Mapping[str, int] = job.counts
        slots: Mapping[str, int] = job.slot_counts
        if self.counts_lag > 0 and job.history:
            when = self._clock() - timedelta(seconds=self.counts_lag)
            index = bisect.bisect_right(job.history_times, when) - 1
            _, counts, slots = job.history[max(index, 0)] if index >= 0 else (
                when, {}, {})
        names = ("active", "running", "completed", "succeeded", "failed")
        return 200, {"taskCounts": {n: int(counts.get(n, 0)) for n in names},
                     "taskSlotCounts": {n: int(slots.get(n, 0)) for n in names}}, {}

    # -- tasks ---------------------------------------------------------------------------

    def _op_add_task_collection(self, job_id: str, params: Mapping[str, str],
                                body: bytes) -> tuple[int, Any, dict[str, str]]:
        job = self._need_job(job_id)
        data = self._body(body)
        tasks = data.get("value")
        if not isinstance(tasks, list) or not tasks:
            raise _missing("value")
        if len(tasks) > self.max_tasks:
            raise _invalid("value", str(len(tasks)),
                           f"a collection holds at most {self.max_tasks} tasks")
        for index, task in enumerate(tasks):
            _check_task(task, f"value[{index}]")
        if job.state == "deleting":
            raise _being_deleted()
        if job.state != "active":
            raise PeerError(409, "JobCompleted",
                            "The specified job is already in a completed state.")
        self.add_requests.append([str(t["id"]) for t in tasks])
        # One time for the whole request: its tasks are created together (the spec
        # promises nothing finer, and a service node stamps them at its clock's
        # granularity), formatted once, and the counts' history needs one entry for it:
        # entries at the same time are never read apart (get_task_counts takes the last).
        now = self._clock()
        stamp = _rfc3339(now)
        location = f"{self._base()}/jobs/{job.id}/tasks/"
        added = self.task_outcomes["added"]
        results = [self._add_one(job, task, now, stamp, location) for task in tasks]
        if self.task_outcomes["added"] != added:
            self._snapshot(job, now)
        self._order_rng.shuffle(results)  # the service does not promise the request's order
        return 200, {"value": results}, {}

    def _add_one(self, job: PeerJob, task: dict[str, Any], now: datetime, stamp: str,
                 location: str) -> dict[str, Any]:
        """One task of an add-collection request: its result, added or refused.
        ``now``, its text ``stamp`` and the tasks' ``location`` prefix are the request's."""
        task_id = str(task["id"])
        key = task_id.lower()
        depends = task.get("dependsOn") or {}
        actions = _exit_actions(task.get("exitConditions"))
        error: PeerError | None = None
        if key in job.tasks or _is_seeded_id(job, task_id):
            error = PeerError(409, "TaskExists", "The specified task already exists.")
        elif self.task_rule is not None and (ruled := self.task_rule(task)) is not None:
            error = ruled
        elif depends and not job.uses_task_dependencies:
            error = PeerError(409, "TaskDependenciesNotSpecifiedOnJob",
                              "The specified job does not have task dependencies enabled.")
        elif depends and sum(len(t) for t in depends.get("taskIds") or []) \
                > MAX_DEPENDENCY_CHARS:
            error = PeerError(400, "TaskDependencyListTooLong",
                              "The task depends on too many other tasks: use task id "
                              "ranges instead.")
        elif "dependencyAction" in actions and not job.uses_task_dependencies:
            # ExitOptions.dependencyAction: "If the Job's usesTaskDependencies property is
            # set to false, then specifying the dependencyAction property returns an error
            # and the add Task request fails with an invalid property value error ... 400"
            error = _invalid("exitConditions.dependencyAction", actions["dependencyAction"],
                             "the job does not use task dependencies")
        elif "jobAction" in actions and job.on_task_failure == "noaction":
            # ExitOptions.jobAction (BatchService.json): "If the Job's onTaskFailed
            # property is noaction, then specifying this property returns an error and
            # the add Task request fails with an invalid property value error ... 400"
            error = _invalid("exitConditions.jobAction", actions["jobAction"],
                             "the job's onTaskFailure is noaction")
        if error is not None:
            self.task_outcomes[error.code] += 1
            return {"status": "clientError", "taskId": task_id, "error": error.body()}
        added = PeerTask(body=task, created=now)
        job.tasks[key] = added
        if task_id.isdigit():
            job.by_int.setdefault(int(task_id), []).append(added)
        self._count_in(job, added, +1)
        job.pending[key] = added
        self.task_outcomes["added"] += 1
        return {"status": "success", "taskId": task_id, "eTag": added.etag,
                "lastModified": stamp, "location": location + task_id}

    def _op_list_tasks(self, job_id: str, params: Mapping[str, str],
                       body: bytes) -> tuple[int, Any, dict[str, str]]:
        """``GET /jobs/{id}/tasks`` ("Tasks_ListTasks"): ``$filter`` over the "List
        tasks" properties of "OData filters in Batch" (:data:`TASK_FILTERS`),
        ``$select`` of top-level properties, ``maxresults`` 1..1000 (default 1000) and
        ``odata.nextLink`` paging."""
        job = self._need_job(job_id)
        text = params.get("$filter")
        keep = _compile_filter(text, TASK_FILTERS) if text else None
        items: Iterator[dict[str, Any]] = itertools.chain(
            (self._task_json(job, t) for t in job.tasks.values()), self._virtual_tasks(job))
        chosen = [item for item in items if keep is None or keep(item)]
        return 200, self._page(chosen, params, f"/jobs/{job.id}/tasks", 1000, limit=1000), {}

    def _op_get_task(self, job_id: str, task_id: str, params: Mapping[str, str],
                     body: bytes) -> tuple[int, Any, dict[str, str]]:
        job = self._need_job(job_id)
        task = job.tasks.get(task_id.lower())
        if task is None:
            raise PeerError(404, "TaskNotFound", "The specified task does not exist.")
        return 200, _select(self._task_json(job, task), params), self._entity_headers(
            task.etag, task.state_changed or task.created)

    # -- pools ---------------------------------------------------------------------------

    def _op_get_pool(self, pool_id: str, params: Mapping[str, str],
                     body: bytes) -> tuple[int, Any, dict[str, str]]:
        pool = self._pools.get(pool_id.lower())
        if pool is None:
            raise PeerError(404, "PoolNotFound", "The specified pool does not exist.")
        data = {
            "id": pool.id, "url": f"{self._base()}/pools/{pool.id}",
            "eTag": "0x8DD00000000000", "lastModified": _rfc3339(pool.created),
            "creationTime": _rfc3339(pool.created), "state": pool.state,
            "stateTransitionTime": _rfc3339(pool.created),
            "allocationState": pool.allocation_state,
            "allocationStateTransitionTime": _rfc3339(pool.allocation_changed or pool.created),
            "vmSize": pool.vm_size,
            "currentDedicatedNodes": pool.dedicated.get("total", 0),
            "currentLowPriorityNodes": pool.low_priority.get("total", 0),
            "targetDedicatedNodes": pool.target_dedicated,
            "targetLowPriorityNodes": pool.target_low_priority,
            "taskSlotsPerNode": pool.task_slots_per_node,
            "virtualMachineConfiguration": _vm_configuration(pool),
            "enableAutoScale": pool.enable_auto_scale,
        }
        if pool.enable_auto_scale:
            data["autoScaleFormula"] = "$TargetDedicatedNodes = 0;"
        if pool.resize_errors and pool.allocation_state == "steady":
            data["resizeErrors"] = [{"code": code, "message": message}
                                    for code, message in pool.resize_errors]
        return 200, _select(data, params), {}

    def _op_list_nodes(self, pool_id: str, params: Mapping[str, str],
                       body: bytes) -> tuple[int, Any, dict[str, str]]:
        """``GET /pools/{id}/nodes`` ("Nodes_ListNodes"): ``$filter`` over the "List
        nodes in a pool" properties of "OData filters in Batch" (:data:`NODE_FILTERS`),
        ``$select``, ``maxresults`` 1..1000. Only nodes :meth:`preempt_task` made exist;
        ``recentTasks`` entries carry each task's current state and execution info."""
        pool = self._pools.get(pool_id.lower())
        if pool is None:
            raise PeerError(404, "PoolNotFound", "The specified pool does not exist.")
        text = params.get("$filter")
        keep = _compile_filter(text, NODE_FILTERS) if text else None
        items: list[dict[str, Any]] = []
        for index, node in enumerate(pool.nodes.values()):
            recent: list[dict[str, Any]] = []
            for job_id, task_id in node.recent_tasks:
                job = self._jobs.get(job_id.lower())
                task = job.tasks.get(task_id.lower()) if job is not None else None
                if job is None or task is None:
                    continue
                info: dict[str, Any] = {
                    "taskUrl": f"{self._base()}/jobs/{job.id}/tasks/{task.id}",
                    "jobId": job.id, "taskId": task.id, "taskState": task.state}
                execution = self._task_json(job, task).get("executionInfo")
                if execution is not None:
                    info["executionInfo"] = execution
                recent.append(info)
            item: dict[str, Any] = {
                "id": node.id, "url": f"{self._base()}/pools/{pool.id}/nodes/{node.id}",
                "state": node.state, "schedulingState": "enabled",
                "stateTransitionTime": _rfc3339(node.state_changed),
                "lastBootTime": _rfc3339(pool.created),
                "allocationTime": _rfc3339(pool.created),
                "ipAddress": f"10.0.0.{4 + index}", "vmSize": pool.vm_size,
                "totalTasksRun": len(recent), "runningTasksCount": 0,
                "runningTaskSlotsCount": 0, "totalTasksSucceeded": 0,
                "isDedicated": node.is_dedicated}
            if recent:
                item["recentTasks"] = recent
            if keep is None or keep(item):
                items.append(item)
        return 200, self._page(items, params, f"/pools/{pool.id}/nodes", 1000,
                               limit=1000), {}

    def _op_terminate_task(self, job_id: str, task_id: str, params: Mapping[str, str],
                           body: bytes) -> tuple[int, Any, dict[str, str]]:
        """``POST /jobs/{id}/tasks/{id}/terminate`` ("Tasks_TerminateTask": "When the Task
        has been terminated, it moves to the completed state"): 204; a completed task is
        409 ``TaskCompleted``."""
        job = self._need_job(job_id)
        task = job.tasks.get(task_id.lower())
        if task is None:
            raise PeerError(404, "TaskNotFound", "The specified task does not exist.")
        if task.state == "completed":
            raise PeerError(409, "TaskCompleted", "The specified task is already completed.")
        now = self._clock()
        self._complete(job, task, now, kind="job_terminated", exit_code=None)
        self._settle(job, now)
        return 204, None, {}

    def _op_list_node_counts(self, params: Mapping[str, str],
                             body: bytes) -> tuple[int, Any, dict[str, str]]:
        wanted = _pool_filter(params.get("$filter"))
        items = [{"poolId": p.id,
                  "dedicated": {s: p.dedicated.get(s, 0) for s in NODE_STATES},
                  "lowPriority": {s: p.low_priority.get(s, 0) for s in NODE_STATES}}
                 for p in self._pools.values() if wanted is None or p.id.lower() == wanted]
        return 200, self._page(items, params, "/nodecounts", 10), {}

    # -- state machine -------------------------------------------------------------------

    def _need_job(self, job_id: str) -> PeerJob:
        job = self._jobs.get(job_id.lower())
        if job is None:
            raise PeerError(404, "JobNotFound", "The specified job does not exist.")
        return job

    def _check_conditions(self, job: PeerJob) -> None:
        """The conditional headers of a write (the spec lists If-Match, If-None-Match,
        If-Modified-Since and If-Unmodified-Since on job updates, terminate and delete):
        412 ``ConditionNotMet`` when one does not hold ("Batch Status and Error Codes")."""
        headers = {k.lower(): v for k, v in self._headers.items()}
        failed = False
        if (match := headers.get("if-match")) is not None:
            failed |= match != "*" and match.strip('"') != job.etag.strip('"')
        if (none_match := headers.get("if-none-match")) is not None:
            failed |= none_match == "*" or none_match.strip('"') == job.etag.strip('"')
        modified = job.last_modified.replace(microsecond=0)
        if (since := headers.get("if-modified-since")) is not None:
            failed |= modified <= parsedate_to_datetime(since)
        if (unmodified := headers.get("if-unmodified-since")) is not None:
            failed |= modified > parsedate_to_datetime(unmodified)
        if failed:
            raise PeerError(412, "ConditionNotMet", "The condition specified using HTTP "
                            "conditional header(s) is not met.")

    def _touch(self, job: PeerJob, now: datetime) -> None:
        job.etag = _new_etag()
        job.last_modified = max(now, job.last_modified)

    def _job_state(self, job: PeerJob, state: str, at: datetime) -> None:
        job.previous_state, job.previous_changed = job.state, job.state_changed
        job.state, job.state_changed = state, at
        self._touch(job, at)

    def _snapshot(self, job: PeerJob, at: datetime) -> None:
        if job.history_times and at < job.history_times[-1]:
            at = job.history_times[-1]
        job.history.append((at, dict(job.counts), dict(job.slot_counts)))
        job.history_times.append(at)

    @staticmethod
    def _count_keys(task: PeerTask) -> tuple[str, ...]:
        if task.state == "completed":
            return ("completed", "succeeded" if task.result == "success" else "failed")
        return ("running",) if task.state in ("preparing", "running") else ("active",)

    def _count_in(self, job: PeerJob, task: PeerTask, sign: int) -> None:
        for key in self._count_keys(task):
            job.counts[key] += sign
            job.slot_counts[key] += sign * task.slots

    def _move(self, job: PeerJob, task: PeerTask, state: str, at: datetime) -> None:
        """Every task state change goes through here: counts, history, pending set."""
        self._count_in(job, task, -1)
        task.previous_state, task.previous_changed = task.state, task.state_changed
        task.state, task.state_changed = state, at
        task.etag = _new_etag()
        self._count_in(job, task, +1)
        if state == "completed":
            job.pending.pop(task.id.lower(), None)
        else:
            job.pending[task.id.lower()] = task
        self._snapshot(job, at)

    def _complete(self, job: PeerJob, task: PeerTask, at: datetime, *, kind: str,
                  exit_code: int | None) -> None:
        """End a task as the service reports it (``executionInfo``, ``failureInfo``),
        then apply its exit options: its dependency action, and its job action."""
        end = "exit"
        failure: dict[str, Any] | None = None
        if kind == "exit":
            if exit_code:
                failure = _failure_info(FAILURE_EXIT_CODE)
        elif kind == "resource_file":
            end, exit_code = "pre_processing_error", None
            failure = _failure_info(RESOURCE_FILE_FAILURE)
        elif kind == "file_upload":
            end = "file_upload_error"
            failure = _failure_info(FILE_UPLOAD_FAILURE)
        elif kind == "wall_clock":
            exit_code = TERMINATED_EXIT_CODE
            failure = _failure_info(TASK_ENDED, WALL_CLOCK_MESSAGE, "servererror")
        elif kind == "job_terminated":
            exit_code = TERMINATED_EXIT_CODE
            failure = _failure_info(TASK_ENDED, USER_ENDED_MESSAGE, "usererror")
        elif kind.startswith("code:"):  # set_task_state(failure_code=...)
            code, _, message = kind[5:].partition("\n")
            if code.startswith(("Blob", "Resource", "Command", "Container", "DiskFull")):
                end = "pre_processing_error"
            elif code.startswith("FileUpload"):
                end = "file_upload_error"
            failure = _failure_info(code, message or None,
                                    "servererror" if code == TASK_ENDED else "usererror")
        else:
            raise ValueError(f"unknown task end {kind!r}")
        task.exit_code, task.failure_info, task.end_time = exit_code, failure, at
        task.result = "failure" if failure else "success"
        task.run_end = task.run_kind = None
        acts = job.on_task_failure == "performexitoptionsjobaction"
        job_action, task.dependency_action = _exit_options(
            task.body.get("exitConditions"), end, exit_code, acts)
        self._move(job, task, "completed", at)
        if failure is None or kind == "job_terminated" or job.state != "active":
            return
        if job_action == "terminate":
            self._terminate(job, REASON_TASK_FAILED, at)
        elif job_action == "disable":
            self._job_state(job, "disabled", at)

    def _terminate(self, job: PeerJob, reason: str, at: datetime) -> None:
        """Terminate: running tasks end (``TaskEnded``), active ones stay active."""
        self._job_state(job, "terminating", at)
        job.terminate_reason = reason
        for task in list(job.pending.values()):
            if task.state in ("preparing", "running"):
                self._complete(job, task, at, kind="job_terminated", exit_code=None)
        if job.virtual and job.virtual["running"]:
            ended = job.virtual["running"]
            job.virtual["running"] = 0
            job.virtual["failed"] += ended
            for counts in (job.counts, job.slot_counts):
                counts["running"] -= ended
                counts["completed"] += ended
                counts["failed"] += ended
            self._snapshot(job, at)
        job.complete_at = at + timedelta(seconds=self.terminate_delay)
        if self.terminate_delay <= 0:
            self._finish_terminate(job)

    def _finish_terminate(self, job: PeerJob) -> None:
        assert job.complete_at is not None
        job.end_time = job.complete_at
        self._job_state(job, "completed", job.complete_at)

    def _settle(self, job: PeerJob, at: datetime) -> None:
        """A job set to terminate completes once every task has completed."""
        if (job.state == "active" and job.on_all_tasks_complete == "terminatejob"
                and job.counts["completed"] == job.total):
            ends = [t.end_time for t in job.tasks.values() if t.end_time is not None]
            self._terminate(job, REASON_ALL_TASKS_COMPLETE, min(max(ends), at) if ends else at)

    def _advance(self) -> None:
        """Bring every job up to the clock: runner events, job max wall clock,
        terminating and deleting jobs. Cheap for jobs with nothing to do."""
        now = self._clock()
        for job in list(self._jobs.values()):
            if job.state in ("completed",):
                continue
            if job.state == "deleting":
                if job.gone_at is not None and job.gone_at <= now:
                    del self._jobs[job.id.lower()]
                continue
            if job.state == "terminating":
                if job.complete_at is not None and job.complete_at <= now:
                    self._finish_terminate(job)
                continue
            deadline = (job.created + job.max_wall_clock
                        if job.max_wall_clock is not None else None)
            until = now if deadline is None else min(now, deadline)
            if self._runner is not None and job.pending:
                self._run_tasks(job, until)
            if deadline is not None and deadline <= now and job.state in ("active",
                                                                          "disabled"):
                # BatchJobConstraints.maxWallClockTime: "If the Job does not complete
                # within the time limit, the Batch service terminates it and any Tasks
                # that are still running ... the termination reason will be
                # MaxWallClockTimeExpiry."
                self._terminate(job, REASON_WALL_CLOCK, deadline)
                continue
            if job.state == "terminating" and job.complete_at is not None \
                    and job.complete_at <= now:
                self._finish_terminate(job)
            self._settle(job, until)

    def _run_tasks(self, job: PeerJob, until: datetime) -> None:
        """Runner mode: start runnable tasks and end attempts, in event-time order."""
        runner = self._runner
        assert runner is not None
        delay = timedelta(seconds=runner.delay)
        pool = self._pools.get(job.pool.lower()) if job.pool else None
        if job.pool and pool is None:
            return  # BatchPoolInfo.poolId: "it will simply not run Tasks until the Pool exists"
        changed = True
        while changed:
            changed = False
            events: list[tuple[datetime, int, PeerTask]] = []
            for order, task in enumerate(job.pending.values()):
                if task.state == "active" and job.state == "active":
                    ready = self._deps_ready(job, task)
                    if ready is not None:
                        start = max(ready, task.created, self._runner_since,
                                    task.requeued or task.created,
                                    pool.created if pool else ready) + delay
                        events.append((start, order, task))
                elif task.state in ("running", "preparing") and task.run_end is not None:
                    events.append((task.run_end, order, task))
            events.sort(key=lambda e: (e[0], e[1]))
            for when, _, task in events:
                if when > until or job.state != "active":
                    break
                if task.state == "active":
                    self._start(job, task, when, runner)
                    changed = True
                elif task.state in ("running", "preparing") and task.run_end == when:
                    self._end_attempt(job, task, when)
                    changed = True
                    if job.uses_task_dependencies or job.state != "active":
                        break  # its end may unblock dependents earlier than later events

    def _start(self, job: PeerJob, task: PeerTask, at: datetime, runner: Runner) -> None:
        pool = self._pools.get(job.pool.lower()) if job.pool else None
        mismatch = _container_mismatch(pool, task.body) if pool is not None else None
        if mismatch is not None:
            self._complete(job, task, at, kind=mismatch, exit_code=None)
            self._settle(job, at)
            return
        kind = runner.failure(task.id) or "exit"
        duration = timedelta(seconds=runner.delay)
        limit = _parse_duration((task.body.get("constraints") or {}).get("maxWallClockTime"))
        if kind == "wall_clock":
            duration = limit if limit is not None else duration
        elif kind in ("exit", "file_upload") and limit is not None and limit < duration:
            kind, duration = "wall_clock", limit
        task.run_kind, task.run_exit = kind, runner.exit_code(task.id)
        task.start_time, task.run_end = at, at + duration
        self._move(job, task, "running", at)

    def _end_attempt(self, job: PeerJob, task: PeerTask, at: datetime) -> None:
        kind, code = task.run_kind or "exit", task.run_exit or 0
        retries = _max_retries(task.body, job.body)
        if kind == "exit" and code != 0 and (retries == -1 or task.retry_count < retries) \
                and task.retry_count < MAX_PEER_RETRIES:
            # BatchTaskExecutionInfo.retryCount: "Task application failures (non-zero exit
            # code) are retried, pre-processing errors ... and file upload errors are not"
            task.retry_count += 1
            task.last_retry_time = task.start_time = at
            assert self._runner is not None
            task.run_end = at + timedelta(seconds=self._runner.delay)
            task.etag = _new_etag()
            return
        self._complete(job, task, at, kind=kind, exit_code=code)
        self._settle(job, at)

    def _deps_ready(self, job: PeerJob, task: PeerTask) -> datetime | None:
        """When the task's dependencies were all met (None: not yet, or never).

        ``dependsOn.taskIds``: each must exist, be completed, and have satisfied its
        dependents. ``taskIdRanges``: the tasks whose ids are integers in the range
        ("only tasks with IDs representing integer values will be selected by the range
        ... Leading zeroes are not significant ... the first one to complete will
        satisfy the dependency", learn.microsoft.com/azure/batch/batch-task-dependencies).
        """
        depends = task.body.get("dependsOn") or {}
        latest = task.created
        for dep_id in depends.get("taskIds") or []:
            dep = job.tasks.get(str(dep_id).lower())
            if dep is None or dep.state != "completed" or dep.dependency_action != "satisfy":
                return None
            assert dep.end_time is not None
            latest = max(latest, dep.end_time)
        for rng in depends.get("taskIdRanges") or []:
            start, end = int(rng["start"]), int(rng["end"])
            if end - start < len(job.by_int):
                groups = (job.by_int[v] for v in range(start, end + 1) if v in job.by_int)
            else:
                groups = (g for v, g in job.by_int.items() if start <= v <= end)
            for group in groups:
                done = [t.end_time for t in group if t.state == "completed"
                        and t.dependency_action == "satisfy" and t.end_time is not None]
                if not done:
                    return None
                latest = max(latest, min(done))
        return latest

    # -- JSON ----------------------------------------------------------------------------

    def _job_json(self, job: PeerJob) -> dict[str, Any]:
        data = {k: v for k, v in job.body.items() if k != "id"}
        execution: dict[str, Any] = {"startTime": _rfc3339(job.created), "poolId": job.pool}
        if job.state == "completed":
            if job.end_time is not None:
                execution["endTime"] = _rfc3339(job.end_time)
            if job.terminate_reason is not None:
                execution["terminateReason"] = job.terminate_reason
        out = {
            "id": job.id, "url": f"{self._base()}/jobs/{job.id}", "eTag": job.etag,
            "lastModified": _rfc3339(job.last_modified),
            "creationTime": _rfc3339(job.created), "state": job.state,
            "stateTransitionTime": _rfc3339(job.state_changed or job.created),
            "priority": 0, "maxParallelTasks": -1, "allowTaskPreemption": False,
            "usesTaskDependencies": False, "onTaskFailure": "noaction",
            **data,
            "constraints": {"maxWallClockTime": DEFAULT_WALL_CLOCK, "maxTaskRetryCount": 0,
                            **(data.get("constraints") or {})},
            "onAllTasksComplete": job.on_all_tasks_complete,
            "executionInfo": execution,
        }
        if job.previous_state is not None and job.previous_changed is not None:
            out["previousState"] = job.previous_state
            out["previousStateTransitionTime"] = _rfc3339(job.previous_changed)
        return out

    def _task_json(self, job: PeerJob, task: PeerTask) -> dict[str, Any]:
        data = {k: v for k, v in task.body.items() if k != "id"}
        changed = task.state_changed or task.created
        out: dict[str, Any] = {
            "id": task.id, "url": f"{self._base()}/jobs/{job.id}/tasks/{task.id}",
            "eTag": task.etag, "creationTime": _rfc3339(task.created),
            "lastModified": _rfc3339(changed), "state": task.state,
            "stateTransitionTime": _rfc3339(changed),
            **data,
            "constraints": {"maxWallClockTime": DEFAULT_WALL_CLOCK, "retentionTime": "P7D",
                            "maxTaskRetryCount": 0, **(data.get("constraints") or {})},
            "requiredSlots": task.slots,
        }
        if task.previous_state is not None and task.previous_changed is not None:
            out["previousState"] = task.previous_state
            out["previousStateTransitionTime"] = _rfc3339(task.previous_changed)
        if task.state == "completed" or task.start_time is not None or task.requeued:
            info: dict[str, Any] = {"retryCount": task.retry_count, "requeueCount": 0}
            if task.start_time is not None:
                info["startTime"] = _rfc3339(task.start_time)
            if task.last_retry_time is not None:
                info["lastRetryTime"] = _rfc3339(task.last_retry_time)
            if task.state == "completed":
                if task.end_time is not None:
                    info["endTime"] = _rfc3339(task.end_time)
                if task.exit_code is not None:
                    info["exitCode"] = task.exit_code
                info["result"] = task.result
                if task.failure_info is not None:
                    info["failureInfo"] = task.failure_info
            out["executionInfo"] = info
        return out

    def _virtual_tasks(self, job: PeerJob) -> Iterator[dict[str, Any]]:
        """The tasks of a seeded job, made up as they are listed."""
        if not job.virtual:
            return
        made = _rfc3339(job.created)
        index = 0
        for state in ("active", "running", "succeeded", "failed"):
            for _ in range(job.virtual[state]):
                task_id = f"seed{index}"
                index += 1
                out: dict[str, Any] = {
                    "id": task_id, "url": f"{self._base()}/jobs/{job.id}/tasks/{task_id}",
                    "eTag": "0x8DD00000000001", "creationTime": made, "lastModified": made,
                    "state": state if state in ("active", "running") else "completed",
                    "stateTransitionTime": made, "commandLine": "true", "requiredSlots": 1}
                if state != "active":
                    info: dict[str, Any] = {"startTime": made, "retryCount": 0,
                                            "requeueCount": 0}
                    if state != "running":
                        info.update(endTime=made, exitCode=0 if state == "succeeded" else 1,
                                    result="success" if state == "succeeded" else "failure")
                        if state == "failed":
                            info["failureInfo"] = _failure_info(FAILURE_EXIT_CODE)
                    out["executionInfo"] = info
                yield out

    def _page(self, items: list[dict[str, Any]], params: Mapping[str, str], path: str,
              default_size: int, limit: int | None = None) -> dict[str, Any]:
        raw = params.get("maxresults")
        try:
            size = int(raw) if raw else default_size
        except ValueError:
            size = 0
        if limit is not None and not 1 <= size <= limit:
            raise PeerError(400, "InvalidQueryParameterValue", "Value for one of the query "
                            "parameters specified in the request URI is invalid.",
                            {"QueryParameterName": "maxresults",
                             "QueryParameterValue": str(raw),
                             "Reason": f"must be between 1 and {limit}"})
        start = int(params.get("$skiptoken") or 0)
        page = [_select(item, params) for item in items[start:start + size]]
        out: dict[str, Any] = {"value": page}
        if start + size < len(items):
            query = {k: v for k, v in params.items() if k != "$skiptoken"}
            query["$skiptoken"] = str(start + size)
            out["odata.nextLink"] = f"{self._base()}{path}?{urlencode(query)}"
        return out

    def _entity_headers(self, etag: str, modified: datetime) -> dict[str, str]:
        return {"ETag": etag, "Last-Modified": format_datetime(modified, usegmt=True)}

    def _base(self) -> str:
        return self.url

class _Server(ThreadingHTTPServer):
    """The peer's HTTP server: a listen backlog for the many clients that connect at
    once (socketserver's default is 5: a 6th connection made together with the others
    waits on SYN retries or is reset, which the service never does to a client
    opening 32 connections)."""

    request_queue_size = 128


class _Handler(BaseHTTPRequestHandler):
    peer: BatchPeer
    protocol_version = "HTTP/1.1"
    server_version = "BatchPeer/1.0"
    timeout = 30

    def setup(self) -> None:
        super().setup()
        # headers and body go out in two writes: without this, Nagle's algorithm and
        # the client's delayed ACK add about 40 ms to every answer
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.peer._lock:
            self.peer._connections.add(self.connection)
            self.peer.connections_opened += 1

    def finish(self) -> None:
        with self.peer._lock:
            self.peer._connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the record and counters say what happened."""

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PATCH(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def _handle(self) -> None:
        peer = self.peer
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        split = urlsplit(self.path)
        if split.path.startswith("/_peer/"):
            self._answer(*peer.admin(self.command, split.path, body), {})
            return
        params = {k: v[0] for k, v in parse_qs(split.query).items()}
        operation = "unknown"
        try:
            operation, arg = peer._route(self.command, split.path)
            faults = peer.faults
            if faults.latency:
                time.sleep(faults.latency)
            fault = peer._draw_fault(operation)
            if fault == "drop":
                peer._count(operation, "dropped")
                self._drop()
                return
            if fault == "throttle":
                raise PeerError(429, "TooManyRequests", "The server is busy: too many "
                                "requests.", headers={"Retry-After": str(faults.retry_after)})
            if fault == "unavailable":
                raise PeerError(503, "ServerBusy", "The server is currently unable to "
                                "receive requests. Please retry your request.",
                                headers={"Retry-After": str(faults.retry_after)})
            peer._check_auth(self.command, split.path, split.query,
                             typing.cast(Mapping[str, str], self.headers))
            status, payload, headers = peer._dispatch(operation, arg, params, body,
                                                     dict(self.headers))
        except PeerError as err:
            peer._check_answer(operation, err.body(), ERROR_MODEL)
            outcome = {429: "throttled", 503: "unavailable", 413: "too_large",
                       403: "auth_failed", 401: "auth_failed"}.get(err.status, err.code)
            peer._count(operation, outcome)
            self._answer(err.status, err.body(), err.headers)
            return
        if fault == "drop_after":
            peer._count(operation, "dropped_after")
            self._drop()
            return
        peer._count(operation, "ok")
        self._answer(status, payload, headers)

    def _answer(self, status: int, payload: Any, headers: Mapping[str, str]) -> None:
        data = b"" if payload is None else json.dumps(payload).encode("utf-8")
        self.send_response(status)
        if payload is not None:
            self.send_header("Content-Type", "application/json;odata=minimalmetadata")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("request-id", str(uuid.uuid4()))
        client_id = self.headers.get("client-request-id")
        if client_id:
            self.send_header("client-request-id", client_id)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _drop(self) -> None:
        """Close the connection without an answer."""
        self.close_connection = True
        _close_quietly(self.connection)


def _close_quietly(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)


def _json_body(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body or b"{}")
    except ValueError:
        raise PeerError(400, "InvalidRequestBody", "The specified Request Body is not "
                        "syntactically valid.") from None
    if not isinstance(data, dict):
        raise PeerError(400, "InvalidRequestBody", "The request body is not an object.")
    return data


def _invalid(name: str, value: str, reason: str) -> PeerError:
    return PeerError(400, "InvalidPropertyValue", "The value provided for one of the "
                     "properties in the request body is invalid.",
                     {"PropertyName": name, "PropertyValue": value, "Reason": reason})


def _missing(name: str) -> PeerError:
    return PeerError(400, "MissingRequiredProperty", "A required property was not "
                     "specified in the request body.", {"PropertyName": name})


def _valid_id(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise _missing(name)
    if not ID_PATTERN.match(value):
        raise _invalid(name, value, "ids are 1-64 letters, digits, hyphens and underscores")
    return value


def _check_constraints(value: Any, name: str) -> None:
    if not value:
        return
    for key in ("maxWallClockTime", "retentionTime"):
        if key in value and not _DURATION.match(str(value[key])):
            raise _invalid(f"{name}.{key}", str(value[key]), "not an ISO 8601 duration")
    retries = value.get("maxTaskRetryCount")
    if retries is not None and (not isinstance(retries, int) or retries < -1):
        raise _invalid(f"{name}.maxTaskRetryCount", str(retries), "must be -1 or more")


def _check_task(task: Any, name: str) -> None:
    """Body validation of one task: a fault fails the whole request, as the service does."""
    if not isinstance(task, dict):
        raise _invalid(name, str(task), "a task is an object")
    _valid_id(task.get("id"), f"{name}.id")
    if not task.get("commandLine"):
        raise _missing(f"{name}.commandLine")
    _check_constraints(task.get("constraints"), f"{name}.constraints")
    for i, env in enumerate(task.get("environmentSettings") or []):
        if not env.get("name"):
            raise _missing(f"{name}.environmentSettings[{i}].name")
    for i, res in enumerate(task.get("resourceFiles") or []):
        _check_resource_file(res, f"{name}.resourceFiles[{i}]")
    settings = task.get("containerSettings")
    if settings is not None and not (isinstance(settings, dict) and settings.get("imageName")):
        # BatchTaskContainerSettings: imageName is required
        raise _missing(f"{name}.containerSettings.imageName")
    if settings is not None:
        _check_container_settings(settings, f"{name}.containerSettings")
    for i, out in enumerate(task.get("outputFiles") or []):
        cond = str(((out.get("uploadOptions") or {}).get("uploadCondition")) or "").lower()
        if not out.get("filePattern") or cond not in _UPLOAD_CONDITIONS:
            raise _invalid(f"{name}.outputFiles[{i}]", cond, "filePattern and uploadCondition "
                           "(taskSuccess, taskFailure or taskCompletion) are required")
        if not ((out.get("destination") or {}).get("container") or {}).get("containerUrl"):
            raise _missing(f"{name}.outputFiles[{i}].destination.container.containerUrl")
    depends = task.get("dependsOn") or {}
    for dep in depends.get("taskIds") or []:
        _valid_id(dep, f"{name}.dependsOn.taskIds")
    for rng in depends.get("taskIdRanges") or []:
        start, end = rng.get("start"), rng.get("end")
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end):
            raise _invalid(f"{name}.dependsOn.taskIdRanges", f"{start}-{end}",
                           "a range needs 0 <= start <= end")
    slots = task.get("requiredSlots", 1)
    if not isinstance(slots, int) or slots < 1:
        raise _invalid(f"{name}.requiredSlots", str(slots), "must be 1 or more")


#: ContainerWorkingDirectory in the spec (an enum: "taskWorkingDirectory",
#: "containerImageDefault"; "The default is 'taskWorkingDirectory'").
_WORKING_DIRECTORIES = ("taskWorkingDirectory", "containerImageDefault")


def _check_container_settings(settings: dict[str, Any], name: str) -> None:
    """BatchTaskContainerSettings in the spec: ``imageName`` a string (required, checked
    by the caller), ``containerRunOptions`` a string, ``workingDirectory`` one of the
    ContainerWorkingDirectory values (compared as the service compares enums, without
    regard to case), ``registry`` a ContainerRegistryReference: ``registryServer``
    (format uri), ``username``, ``password`` strings, ``identityReference`` a
    BatchNodeIdentityReference with a ``resourceId``. A wrong type or value is 400
    InvalidPropertyValue naming the property (the value itself is never echoed for the
    password)."""
    for key in ("imageName", "containerRunOptions"):
        if key in settings and not isinstance(settings[key], str):
            raise _invalid(f"{name}.{key}", str(settings[key]), "must be a string")
    wd = settings.get("workingDirectory")
    if wd is not None and str(wd).lower() not in {w.lower() for w in _WORKING_DIRECTORIES}:
        raise _invalid(f"{name}.workingDirectory", str(wd),
                       f"must be one of {', '.join(_WORKING_DIRECTORIES)}")
    registry = settings.get("registry")
    if registry is None:
        return
    if not isinstance(registry, dict):
        raise _invalid(f"{name}.registry", str(registry), "a registry is an object")
    for key in ("registryServer", "username", "password"):
        if key in registry and not isinstance(registry[key], str):
            shown = "" if key == "password" else str(registry[key])
            raise _invalid(f"{name}.registry.{key}", shown, "must be a string")
    identity = registry.get("identityReference")
    if identity is not None and not (isinstance(identity, dict)
                                     and isinstance(identity.get("resourceId"), str)
                                     and identity["resourceId"]):
        raise _missing(f"{name}.registry.identityReference.resourceId")


_SOURCES = ("httpUrl", "storageContainerUrl", "autoStorageContainerName")


def _check_resource_file(res: Any, name: str) -> None:
    """ResourceFile in the spec: "The autoStorageContainerName, storageContainerUrl and
    httpUrl properties are mutually exclusive and one of them must be specified"; "If the
    httpUrl property is specified, the filePath is required"; blobPrefix "is valid only
    when autoStorageContainerName or storageContainerUrl is used". None given is 400
    MissingRequiredProperty, two or a misplaced blobPrefix 400 InvalidPropertyValue."""
    if not isinstance(res, dict):
        raise _invalid(name, str(res), "a resource file is an object")
    given = [key for key in _SOURCES if res.get(key)]
    if not given:
        raise _missing(f"{name}.httpUrl")
    if len(given) > 1:
        raise _invalid(f"{name}.{given[1]}", "", f"{' and '.join(given)} are mutually "
                       "exclusive")
    if given == ["httpUrl"]:
        if not res.get("filePath"):
            raise _missing(f"{name}.filePath")
        if res.get("blobPrefix"):
            raise _invalid(f"{name}.blobPrefix", str(res["blobPrefix"]), "blobPrefix is "
                           "valid only with storageContainerUrl or autoStorageContainerName")


def _select(item: dict[str, Any], params: Mapping[str, str]) -> dict[str, Any]:
    select = params.get("$select")
    if not select:
        return item
    keys = {k.strip() for k in select.split(",")}
    return {k: v for k, v in item.items() if k in keys}


def _being_deleted() -> PeerError:
    return PeerError(409, "JobBeingDeleted", "The specified job has been marked for "
                     "deletion and is being deleted.")


def _being_terminated() -> PeerError:
    return PeerError(409, "JobBeingTerminated", "The specified job is in the process of "
                     "being terminated.")


def _check_metadata(value: Any) -> None:
    """``metadata`` is a list of ``{"name", "value"}``; an empty name is an error
    (``EmptyMetadataKey`` in the Batch .NET SDK's BatchErrorCodeStrings)."""
    if value is None:
        return
    if not isinstance(value, list):
        raise _invalid("metadata", str(value), "a list of name-value pairs")
    for item in value:
        if not isinstance(item, dict) or "value" not in item:
            raise _invalid("metadata", str(item), "a name-value pair")
        if not item.get("name"):
            raise PeerError(400, "EmptyMetadataKey", "An add or update request specified a "
                            "metadata item whose key is an empty string.")


def _vm_configuration(pool: PeerPool) -> dict[str, Any]:
    """A pool's ``virtualMachineConfiguration`` (VirtualMachineConfiguration in the spec:
    ``imageReference`` and ``nodeAgentSKUId`` are required, ``containerConfiguration``
    (BatchContainerConfiguration: ``type`` required, ``containerImageNames``) only on a
    container pool)."""
    out: dict[str, Any] = {
        "imageReference": {"publisher": "canonical", "offer": "ubuntu-24_04-lts",
                           "sku": "server", "version": "latest"},
        "nodeAgentSKUId": "batch.node.ubuntu 24.04"}
    if pool.container_type is not None:
        out["containerConfiguration"] = {"type": pool.container_type,
                                         "containerImageNames": list(pool.container_images)}
    return out


def _container_mismatch(pool: PeerPool, task: Mapping[str, Any]) -> str | None:
    """The failureInfo a task gets when it is scheduled on a pool it does not fit, or
    None. BatchTaskCreateOptions.containerSettings in the spec: "If the Pool that will
    run this Task has containerConfiguration set, this must be set as well. If the Pool
    that will run this Task doesn't have containerConfiguration set, this must not be
    set." The add is not refused (the pool is the job's, and may not exist yet or change
    while the job is disabled); the task fails when it is scheduled:

    - on a container pool without containerSettings: ``ContainerTaskSettingsNotFound``,
      "Container-enabled compute node requires task container settings" (as reported in
      microsoft/ga4gh-tes#525 and MicrosoftDocs/azure-docs#16473);
    - with containerSettings on a pool without a container configuration: inferred,
      not documented: ``ContainerInvalidSettings`` ("At least one value of specified
      task container settings is invalid", TaskFailureInformationCodes; the failureInfo
      text as Azure/Batch#4 shows it).
    """
    has = bool(task.get("containerSettings"))
    if pool.container_type is not None and not has:
        return ("code:ContainerTaskSettingsNotFound\n"
                "Container-enabled compute node requires task container settings")
    if pool.container_type is None and has:
        return ("code:ContainerInvalidSettings\nAt least one value of specified task "
                "container settings is invalid")
    return None


def _is_seeded_id(job: PeerJob, task_id: str) -> bool:
    if not job.virtual or not task_id.lower().startswith("seed"):
        return False
    rest = task_id[4:]
    return rest.isdigit() and int(rest) < sum(job.virtual.values())


_DURATION_PARTS = re.compile(r"^P(?:(?P<d>\d+(?:\.\d+)?)D)?(?:T(?:(?P<h>\d+(?:\.\d+)?)H)?"
                             r"(?:(?P<m>\d+(?:\.\d+)?)M)?(?:(?P<s>\d+(?:\.\d+)?)S)?)?$")


def _parse_duration(text: Any) -> timedelta | None:
    """An ISO 8601 duration; None when absent or beyond a century (the service's default
    maxWallClockTime, ``P10675199DT2H48M5.4775807S``, means no limit)."""
    if not text:
        return None
    match = _DURATION_PARTS.match(str(text))
    if match is None:
        return None
    value = timedelta(days=float(match["d"] or 0), hours=float(match["h"] or 0),
                      minutes=float(match["m"] or 0), seconds=float(match["s"] or 0))
    return None if value > timedelta(days=36_500) else value


def _max_retries(task: Mapping[str, Any], job: Mapping[str, Any]) -> int:
    for source in (task, job):
        value = (source.get("constraints") or {}).get("maxTaskRetryCount")
        if isinstance(value, int):
            return value
    return 0


def _failure_info(code: str, message: str | None = None,
                  category: str = "usererror") -> dict[str, Any]:
    messages = {FAILURE_EXIT_CODE: "The task exited with an exit code representing a "
                "failure",
                RESOURCE_FILE_FAILURE: "Miscellaneous error encountered while downloading "
                "one of the specified Azure Blob(s)",
                FILE_UPLOAD_FAILURE: "Miscellaneous error encountered while uploading one "
                "of the output files"}
    return {"category": category, "code": code,
            "message": message or messages.get(code, code), "details": []}


_EXIT_OPTION_KEYS = ("preProcessingError", "fileUploadError", "default")


def _iter_exit_options(conditions: Any) -> Iterator[Mapping[str, Any]]:
    if not isinstance(conditions, Mapping):
        return
    for mapping in list(conditions.get("exitCodes") or []) + list(
            conditions.get("exitCodeRanges") or []):
        if isinstance(mapping, Mapping) and isinstance(mapping.get("exitOptions"), Mapping):
            yield mapping["exitOptions"]
    for key in _EXIT_OPTION_KEYS:
        if isinstance(conditions.get(key), Mapping):
            yield conditions[key]


def _exit_actions(conditions: Any) -> dict[str, str]:
    """The first ``jobAction`` and ``dependencyAction`` the exit conditions set."""
    found: dict[str, str] = {}
    if not conditions:
        return found  # most tasks have none: no generator for them
    for options in _iter_exit_options(conditions):
        for key in ("jobAction", "dependencyAction"):
            if options.get(key) is not None:
                found.setdefault(key, str(options[key]))
    return found


def _exit_options(conditions: Any, end: str, exit_code: int | None,
                  job_acts: bool) -> tuple[str, str]:
    """The (jobAction, dependencyAction) for one task end, defaults filled in.

    As ExitConditions in the spec: ``exitCodes`` then ``exitCodeRanges`` (inclusive)
    match the exit code; "If the Task exited with an exit code that was specified via
    exitCodes or exitCodeRanges, and then encountered a file upload error, then the
    action specified by the exit code takes precedence"; ``preProcessingError`` and
    ``fileUploadError`` apply to those ends; ``default`` to everything else. Defaults
    (ExitOptions): jobAction none for exit code 0 and terminate otherwise, only on a
    job with onTaskFailure performexitoptionsjobaction; dependencyAction satisfy for
    exit code 0 and block otherwise. ``end`` is exit, pre_processing_error or
    file_upload_error."""
    conditions = conditions if isinstance(conditions, Mapping) else {}
    chosen: Mapping[str, Any] | None = None
    if exit_code is not None and end in ("exit", "file_upload_error"):
        for mapping in conditions.get("exitCodes") or []:
            if mapping.get("code") == exit_code:
                chosen = mapping.get("exitOptions") or {}
                break
        else:
            for mapping in conditions.get("exitCodeRanges") or []:
                if int(mapping.get("start", 0)) <= exit_code <= int(mapping.get("end", -1)):
                    chosen = mapping.get("exitOptions") or {}
                    break
    if chosen is None:
        key = {"pre_processing_error": "preProcessingError",
               "file_upload_error": "fileUploadError"}.get(end)
        chosen = (conditions.get(key) if key else None) or conditions.get("default") or {}
    ok = end == "exit" and exit_code == 0
    job_action = str(chosen.get("jobAction") or ("none" if ok else "terminate")).lower()
    dependency = str(chosen.get("dependencyAction") or ("satisfy" if ok else "block")).lower()
    return (job_action if job_acts else "none"), dependency


# -- OData $filter ------------------------------------------------------------------------

_ALL_OPS = frozenset({"startswith", "eq", "ne", "ge", "gt", "le", "lt"})
_CMP_OPS = frozenset({"eq", "ne", "ge", "gt", "le", "lt"})
_EQ_OPS = frozenset({"eq", "ne"})
#: The "List jobs" properties of "OData filters in Batch"
#: (learn.microsoft.com/rest/api/batchservice/odata-filters-in-batch): property ->
#: (operators allowed, type).
JOB_FILTERS: dict[str, tuple[frozenset[str], str]] = {
    "id": (_ALL_OPS, "string"),
    "state": (_EQ_OPS, "string"),
    "stateTransitionTime": (_CMP_OPS, "datetime"),
    "creationTime": (_CMP_OPS, "datetime"),
    "lastModified": (_CMP_OPS, "datetime"),
    "executionInfo/startTime": (_CMP_OPS, "datetime"),
    "executionInfo/endTime": (_CMP_OPS, "datetime"),
    "executionInfo/poolId": (_ALL_OPS, "string"),
}
#: The "List tasks" properties of the same page.
#: The "List nodes in a pool" properties of the same page (those the peer keeps).
NODE_FILTERS: dict[str, tuple[frozenset[str], str]] = {
    "state": (_EQ_OPS, "string"),
    "stateTransitionTime": (_CMP_OPS, "datetime"),
}
TASK_FILTERS: dict[str, tuple[frozenset[str], str]] = {
    "id": (_ALL_OPS, "string"),
    "state": (_EQ_OPS, "string"),
    "stateTransitionTime": (_CMP_OPS, "datetime"),
    "creationTime": (_CMP_OPS, "datetime"),
    "lastModified": (_CMP_OPS, "datetime"),
    "executionInfo/startTime": (_CMP_OPS, "datetime"),
    "executionInfo/endTime": (_CMP_OPS, "datetime"),
    "executionInfo/exitCode": (_CMP_OPS, "int"),
    "executionInfo/result": (_EQ_OPS, "string"),
    "executionInfo/retryCount": (_CMP_OPS, "int"),
    "executionInfo/requeueCount": (_CMP_OPS, "int"),
}
_FILTER_TOKEN = re.compile(
    r"\s*(?:(?P<lp>\()|(?P<rp>\))|(?P<comma>,)"
    r"|(?i:datetime)'(?P<dt>[^']*)'"
    r"|'(?P<str>(?:[^']|'')*)'"
    r"|(?P<num>-?\d+)(?![\w'])"
    r"|(?P<word>[A-Za-z_][A-Za-z0-9_/]*))")

Predicate = Callable[[Mapping[str, Any]], bool]


def _bad_filter(text: str, reason: str) -> PeerError:
    """"If an invalid property or operator is specified, a 400 (Bad Request) error will
    result" (batch-efficient-list-queries); the code as in "Batch Status and Error Codes"."""
    return PeerError(400, "InvalidQueryParameterValue", "Value for one of the query "
                     "parameters specified in the request URI is invalid.",
                     {"QueryParameterName": "$filter", "QueryParameterValue": text,
                      "Reason": reason})


def _parse_filter_time(text: str) -> datetime | None:
    """A ``DateTime'...'`` literal: "Date/time strings can be one of two formats, and must
    be preceded with DateTime": W3C-DTF (``DateTime'2011-05-08T08:49:37Z'``) or RFC 1123
    (``DateTime'Sun, 08 May 2011 08:49:37 GMT'``) (batch-efficient-list-queries)."""
    try:
        if re.match(r"^\d{4}-\d{2}-\d{2}T", text):
            when = datetime.fromisoformat(text.replace("Z", "+00:00"))
        else:
            when = parsedate_to_datetime(text)
    except (ValueError, TypeError):
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _value_at(item: Mapping[str, Any], path: str) -> Any:
    value: Any = item
    for part in path.split("/"):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def _compare(left: Any, op: str, right: Any) -> bool:
    if left is None:
        return op == "ne"
    if op == "startswith":
        return str(left).startswith(right)
    return bool({"eq": left == right, "ne": left != right, "gt": left > right,
                 "ge": left >= right, "lt": left < right, "le": left <= right}[op])


def _compile_filter(text: str, table: Mapping[str, tuple[frozenset[str], str]]) -> Predicate:
    """An OData ``$filter`` over ``table``'s properties: comparisons
    ``<property> <op> <literal>``, ``startswith(<property>, '<prefix>')``, ``and``,
    ``or`` and parentheses ("Filter conditions can be combined using the "AND" and "OR"
    operators", odata-filters-in-batch). String values compare case-insensitively ("All
    property names are case-sensitive, but property values are case insensitive",
    batch-efficient-list-queries). Anything else is 400 InvalidQueryParameterValue."""
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        match = _FILTER_TOKEN.match(text, pos)
        if match is None or match.end() == pos:
            raise _bad_filter(text, f"cannot read the filter at {text[pos:pos + 20]!r}")
        kind = match.lastgroup or ""
        value = match.group(kind) if kind else ""
        tokens.append((kind, value))
        pos = match.end()
    index = 0

    def peek() -> tuple[str, str]:
        return tokens[index] if index < len(tokens) else ("end", "")

    def take(kind: str | None = None) -> tuple[str, str]:
        nonlocal index
        token = peek()
        if token[0] == "end" or (kind is not None and token[0] != kind):
            raise _bad_filter(text, f"expected {kind or 'more'}, found {token[1] or 'the end'}")
        index += 1
        return token

    def literal(prop: str, kind_wanted: str) -> Any:
        kind, value = take()
        if kind_wanted == "string" and kind == "str":
            return value.replace("''", "'").lower()
        if kind_wanted == "int" and kind == "num":
            return int(value)
        if kind_wanted == "datetime" and kind == "dt":
            when = _parse_filter_time(value)
            if when is not None:
                return when
        raise _bad_filter(text, f"{prop} needs a {kind_wanted} literal, not {value!r}")

    def prop_of(name: str, op: str) -> str:
        if name not in table:
            raise _bad_filter(text, f"{name} cannot be filtered on")
        if op not in table[name][0]:
            raise _bad_filter(text, f"{op} is not allowed on {name}")
        return table[name][1]

    def getter(name: str, kind: str) -> Callable[[Mapping[str, Any]], Any]:
        def get(item: Mapping[str, Any]) -> Any:
            value = _value_at(item, name)
            if value is None:
                return None
            if kind == "string":
                return str(value).lower()
            if kind == "datetime":
                return _parse_filter_time(str(value))
            return int(value)
        return get

    def primary() -> Predicate:
        kind, value = take()
        if kind == "lp":
            inner = disjunction()
            take("rp")
            return inner
        if kind == "word" and value == "startswith" and peek()[0] == "lp":
            take("lp")
            name = take("word")[1]
            prop_kind = prop_of(name, "startswith")
            take("comma")
            prefix = literal(name, prop_kind)
            take("rp")
            get = getter(name, prop_kind)
            return lambda item: _compare(get(item), "startswith", prefix)
        if kind != "word":
            raise _bad_filter(text, f"expected a property, found {value!r}")
        op = take("word")[1]
        if op not in _CMP_OPS:
            raise _bad_filter(text, f"unknown operator {op!r}")
        prop_kind = prop_of(value, op)
        right = literal(value, prop_kind)
        get = getter(value, prop_kind)
        return lambda item: _compare(get(item), op, right)

    def conjunction() -> Predicate:
        parts = [primary()]
        while peek() == ("word", "and"):
            take()
            parts.append(primary())
        return parts[0] if len(parts) == 1 else (lambda item: all(p(item) for p in parts))

    def disjunction() -> Predicate:
        parts = [conjunction()]
        while peek() == ("word", "or"):
            take()
            parts.append(conjunction())
        return parts[0] if len(parts) == 1 else (lambda item: any(p(item) for p in parts))

    predicate = disjunction()
    if index != len(tokens):
        raise _bad_filter(text, f"unexpected {tokens[index][1]!r}")
    return predicate



def _pool_filter(text: str | None) -> str | None:
    if not text:
        return None
    match = re.fullmatch(r"\s*poolId\s+eq\s+'([^']+)'\s*", text)
    if match is None:
        raise PeerError(400, "InvalidQueryParameterValue", "The peer supports only "
                        "$filter=poolId eq '<pool>' on node counts.",
                        {"QueryParameterName": "$filter", "QueryParameterValue": text})
    return match.group(1).lower()


#: What ``POST /_peer/seed`` may say of a job besides its ``id``: arguments of
#: :meth:`BatchPeer.seed_job` that JSON can carry.
_SEED_KEYS = frozenset({"pool", "tasks", "counts", "metadata", "state",
                        "on_all_tasks_complete", "on_task_failure", "terminate_reason"})


def _seed_args(spec: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """A seeded job's id and the other arguments, refusing anything else."""
    unknown = set(spec) - _SEED_KEYS - {"id"}
    if unknown:
        raise ValueError(f"unknown seed properties {sorted(unknown)}")
    return str(spec["id"]), {k: v for k, v in spec.items() if k != "id"}


def _rfc3339(when: datetime) -> str:
    """``when`` in UTC to the millisecond (truncated), ``Z`` suffixed, as the service
    writes times. ``isoformat`` is several times cheaper than ``strftime`` and gives the
    same text; listings format a time per task."""
    text = when.astimezone(UTC).isoformat(timespec="milliseconds")
    return text[:-6] + "Z"


def _iter_pool_args(values: list[str]) -> Iterator[str]:
    for value in values:
        yield from (v for v in value.split(",") if v)


def _warm_shapes(models: list[str]) -> None:
    """Read the spec shapes of ``models`` and the models inside them now, at start-up,
    rather than on the first request that needs each (``typing.get_type_hints`` over
    the SDK's models takes tens of milliseconds)."""
    seen: set[str] = set()
    while models:
        model = models.pop()
        if model not in seen:
            seen.add(model)
            models.extend(_shape_sets(model)[1].values())


def _tune_process() -> None:
    """Tune a peer process (``main``) for its one job: answering many requests at once.

    Its state is long-lived, acyclic containers that only grow (50,000 tasks are
    about a million objects). With the default thresholds the cycle collector's full
    passes over them were about 5 µs per task added, a fifth of the peer's CPU in a
    bulk submission; at 50,000 allocations a young collection and 100 before a full
    one, under 1 µs. What start-up imported (the SDK's models) is frozen, never
    scanned. Cycles (threads, errors) are still collected.

    Each request's handler thread wakes from the added latency and needs the GIL
    while another parses a body: at the default 5 ms switch interval answers queued
    behind each other (2.75 s against 2.4 s for the 50,000-task bench); 0.5 ms."""
    _warm_shapes([*REQUEST_MODELS.values(), *ANSWER_MODELS.values(), ERROR_MODEL])
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    sys.setswitchinterval(0.0005)


def main(argv: list[str] | None = None) -> None:
    """Run the peer in the foreground until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--account", default="fanoutpeer")
    parser.add_argument("--key", default=None, help="base64 key (default: random, printed)")
    parser.add_argument("--pool", action="append", default=[],
                        help="a pool to create (repeat, or comma-separated)")
    parser.add_argument("--idle-nodes", type=int, default=2)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--fault-rate", type=float, default=0.0,
                        help="fraction of requests answered 429/503 or dropped")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    third = args.fault_rate / 3
    peer = BatchPeer(account=args.account, key=args.key, host=args.host, port=args.port,
                     faults=replace(FaultPlan(), latency=args.latency, throttle=third,
                                    unavailable=third, drop_after=third, seed=args.seed))
    for pool in _iter_pool_args(args.pool or ["fanout"]):
        peer.add_pool(pool, dedicated={"idle": args.idle_nodes})
    peer.start()
    _tune_process()
    print(f"batch peer on {peer.url} account={peer.account} key={peer.key}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        peer.stop()


if __name__ == "__main__":
    main()
