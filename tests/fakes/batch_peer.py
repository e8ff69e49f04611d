"""A local HTTP **test peer** that speaks the subset of the Azure Batch REST API fanout calls.

This is a test fixture, not an emulator: one process, plain HTTP, state in memory, no
scheduling (tasks stay ``active`` until a test moves them with
:meth:`BatchPeer.set_task_state`). No Batch emulator exists, so this peer lets the
real ``azure.batch.BatchClient`` (azure-batch 15.x, api-version ``2025-06-01``) talk
to something over HTTP in every CI run, offline.

Operations (paths and JSON shapes as the SDK sends and reads them):

- ``POST /jobs`` (create job), ``GET /jobs`` (list, with ``$filter=state eq '...'``,
  ``$select``, ``maxresults`` and ``odata.nextLink`` paging), ``GET /jobs/{id}``,
  ``PATCH /jobs/{id}`` (update ``onAllTasksComplete``, ``priority``, ...);
- ``POST /jobs/{id}/addtaskcollection``, ``GET /jobs/{id}/taskcounts``;
- ``GET /pools/{id}``, ``GET /nodecounts``.

The service's rules it enforces: at most 100 tasks and ``max_body_bytes`` (1 MiB) per
add-collection request (``RequestBodyTooLarge``, HTTP 413); ids of 1-64 letters,
digits, hyphens and underscores (``InvalidPropertyValue``, 400); case-insensitive
uniqueness (``JobExists`` 409 for jobs; ``TaskExists`` per task inside a 200 answer);
task dependencies only on jobs that use them (``TaskDependenciesNotSpecifiedOnJob``
per task) and a ``taskIds`` list of at most 64,000 characters
(``TaskDependencyListTooLong`` per task); the job must exist (``JobNotFound`` 404) and
be active (``JobCompleted`` 409); the pool must exist when a job names it
(``PoolNotFound``, see ``require_pool``); an optional active-job quota
(``ActiveJobAndScheduleQuotaReached``). Errors have the service's body:
``{"code", "message": {"lang", "value"}, "values": [{"key", "value"}]}``.

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

``GET /_peer/record`` (no auth) returns everything accepted as JSON.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import hmac
import json
import random
import re
import secrets
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

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
OPERATIONS = ("create_job", "list_jobs", "get_job", "update_job", "add_task_collection",
              "get_task_counts", "get_pool", "list_node_counts")


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


@dataclass
class PeerTask:
    """One accepted task: the JSON as received, and the state the peer keeps for it."""

    body: dict[str, Any]
    state: str = "active"
    exit_code: int | None = None
    etag: str = field(default_factory=lambda: f"0x{secrets.token_hex(8).upper()}")

    @property
    def id(self) -> str:
        return str(self.body["id"])

    @property
    def slots(self) -> int:
        return int(self.body.get("requiredSlots") or 1)


@dataclass
class PeerJob:
    """One accepted job: the JSON as received, server-side fields and its tasks."""

    body: dict[str, Any]
    created: datetime
    state: str = "active"
    on_all_tasks_complete: str = "noaction"
    tasks: dict[str, PeerTask] = field(default_factory=dict)  # keyed by lower-case id
    etag: str = field(default_factory=lambda: f"0x{secrets.token_hex(8).upper()}")
    last_modified: datetime = field(default_factory=lambda: datetime.now(UTC))

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
    created: datetime = field(default_factory=lambda: datetime.now(UTC))


class BatchPeer:
    """The peer: start it, point a ``BatchClient`` at :attr:`url` with
    ``AzureNamedKeyCredential(peer.account, peer.key)``, inspect its record, stop it."""

    def __init__(self, *, account: str = "fanoutpeer", key: str | None = None,
                 host: str = "127.0.0.1", port: int = 0, api_version: str = API_VERSION,
                 max_tasks: int = MAX_TASKS_PER_REQUEST, max_body_bytes: int = MAX_BODY_BYTES,
                 require_pool: bool = True, max_active_jobs: int | None = None,
                 bearer_token: str | None = None, faults: FaultPlan | None = None,
                 task_rule: Callable[[dict[str, Any]], PeerError | None] | None = None) -> None:
        """``task_rule`` is an extra rule of the service for tests: a task it returns
        an error for is answered with that error (per task, ``clientError``)."""
        self.account = account
        self.key = key or base64.b64encode(secrets.token_bytes(64)).decode("ascii")
        self.api_version = api_version
        self.max_tasks = max_tasks
        self.max_body_bytes = max_body_bytes
        self.require_pool = require_pool
        self.max_active_jobs = max_active_jobs
        self.bearer_token = bearer_token
        self.task_rule = task_rule
        self._host, self._port = host, port
        self._lock = threading.RLock()
        self._jobs: dict[str, PeerJob] = {}
        self._pools: dict[str, PeerPool] = {}
        self._faults = faults or FaultPlan()
        self._rng = random.Random(self._faults.seed)
        self._order_rng = random.Random(self._faults.seed)  # apart, so faults stay seeded
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
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> BatchPeer:
        """Listen on the host and port given (0: a free port) in a background thread."""
        handler = type("Handler", (_Handler,), {"peer": self})
        self._server = ThreadingHTTPServer((self._host, self._port), handler)
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

    def add_pool(self, pool_id: str, *, dedicated: Mapping[str, int] | None = None,
                 low_priority: Mapping[str, int] | None = None,
                 target_dedicated: int | None = None, target_low_priority: int | None = None,
                 allocation_state: str = "steady") -> PeerPool:
        """Create (or replace) a pool with node counts by state; ``total`` and the
        current sizes follow from the counts, targets default to the current sizes."""
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
                        allocation_state=allocation_state)
        with self._lock:
            self._pools[pool_id.lower()] = pool
        return pool

    def job(self, job_id: str) -> PeerJob | None:
        """The job with this id (any case), or None."""
        with self._lock:
            job = self._jobs.get(job_id.lower())
            if job is not None:
                self._settle(job)
            return job

    def jobs(self) -> list[PeerJob]:
        """Every job, in creation order."""
        with self._lock:
            return list(self._jobs.values())

    def tasks(self, job_id: str) -> list[dict[str, Any]]:
        """The tasks of a job as received, in the order they were accepted."""
        with self._lock:
            job = self._jobs.get(job_id.lower())
            return [] if job is None else [t.body for t in job.tasks.values()]

    def set_task_state(self, job_id: str, task_id: str, state: str, *,
                       exit_code: int = 0) -> None:
        """Move a task to ``active``, ``preparing``, ``running`` or ``completed``."""
        if state not in ("active", "preparing", "running", "completed"):
            raise ValueError(f"unknown task state {state!r}")
        with self._lock:
            job = self._jobs[job_id.lower()]
            task = job.tasks[task_id.lower()]
            task.state = state
            task.exit_code = exit_code if state == "completed" else None
            self._settle(job)

    def record(self) -> dict[str, Any]:
        """Everything accepted, as JSON-ready data (jobs with their tasks, outcomes)."""
        with self._lock:
            return {
                "jobs": [{**self._job_json(j), "tasks": [t.body for t in j.tasks.values()]}
                         for j in self._jobs.values()],
                "outcomes": dict(self.outcomes),
                "task_outcomes": dict(self.task_outcomes),
            }

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

    def _route(self, method: str, path: str) -> tuple[str, str | None]:
        parts = [unquote(p) for p in path.strip("/").split("/")]
        match parts:
            case ["jobs"] if method == "POST":
                return "create_job", None
            case ["jobs"] if method == "GET":
                return "list_jobs", None
            case ["jobs", job_id] if method == "GET":
                return "get_job", job_id
            case ["jobs", job_id] if method == "PATCH":
                return "update_job", job_id
            case ["jobs", job_id, "addtaskcollection"] if method == "POST":
                return "add_task_collection", job_id
            case ["jobs", job_id, "taskcounts"] if method == "GET":
                return "get_task_counts", job_id
            case ["pools", pool_id] if method == "GET":
                return "get_pool", pool_id
            case ["nodecounts"] if method == "GET":
                return "list_node_counts", None
        raise PeerError(400, "InvalidUri", f"The requested URI {method} {path} does not "
                        "represent any resource on the server.")

    def _dispatch(self, operation: str, arg: str | None, params: Mapping[str, str],
                  body: bytes) -> tuple[int, Any, dict[str, str]]:
        if params.get("api-version") != self.api_version:
            raise PeerError(400, "InvalidQueryParameterValue",
                            "Value for one of the query parameters specified in the request "
                            "URI is invalid.",
                            {"QueryParameterName": "api-version",
                             "QueryParameterValue": params.get("api-version", ""),
                             "Reason": f"only {self.api_version} is supported"})
        handler = getattr(self, f"_op_{operation}")
        with self._lock:
            if arg is None:
                return handler(params, body)  # type: ignore[no-any-return]
            return handler(arg, params, body)  # type: ignore[no-any-return]

    def _op_create_job(self, params: Mapping[str, str],
                       body: bytes) -> tuple[int, Any, dict[str, str]]:
        data = _json_body(body)
        job_id = _valid_id(data.get("id"), "id")
        pool_id = (data.get("poolInfo") or {}).get("poolId")
        if not pool_id and not (data.get("poolInfo") or {}).get("autoPoolSpecification"):
            raise _missing("poolInfo")
        mode = str(data.get("onAllTasksComplete") or "noaction").lower()
        if mode not in ("noaction", "terminatejob"):
            raise _invalid("onAllTasksComplete", mode, "must be noaction or terminatejob")
        priority = data.get("priority", 0)
        if not isinstance(priority, int) or not -1000 <= priority <= 1000:
            raise _invalid("priority", str(priority), "must be an integer in -1000..1000")
        _check_constraints(data.get("constraints"), "constraints")
        if job_id.lower() in self._jobs:
            raise PeerError(409, "JobExists", "The specified job already exists.")
        if pool_id and self.require_pool and pool_id.lower() not in self._pools:
            raise PeerError(404, "PoolNotFound", "The specified pool does not exist.")
        active = sum(1 for j in self._jobs.values() if j.state == "active")
        if self.max_active_jobs is not None and active >= self.max_active_jobs:
            raise PeerError(409, "ActiveJobAndScheduleQuotaReached",
                            "The specified account has reached the maximum number of "
                            "active jobs and job schedules.")
        job = PeerJob(body=data, created=datetime.now(UTC), on_all_tasks_complete=mode)
        self._jobs[job_id.lower()] = job
        self._settle(job)
        return 201, None, {**self._entity_headers(job.etag, job.last_modified),
                           "DataServiceId": f"{self._base()}/jobs/{job_id}",
                           "Location": f"{self._base()}/jobs/{job_id}"}

    def _op_get_job(self, job_id: str, params: Mapping[str, str],
                    body: bytes) -> tuple[int, Any, dict[str, str]]:
        job = self._need_job(job_id)
        self._settle(job)
        return 200, _select(self._job_json(job), params), self._entity_headers(
            job.etag, job.last_modified)

    def _op_update_job(self, job_id: str, params: Mapping[str, str],
                       body: bytes) -> tuple[int, Any, dict[str, str]]:
        job = self._need_job(job_id)
        data = _json_body(body)
        if "onAllTasksComplete" in data:
            mode = str(data["onAllTasksComplete"]).lower()
            if mode not in ("noaction", "terminatejob"):
                raise _invalid("onAllTasksComplete", mode, "must be noaction or terminatejob")
            if job.state != "active" and mode != job.on_all_tasks_complete:
                raise PeerError(409, "JobCompleted", "The specified job is already in a "
                                "completed state.")
            job.on_all_tasks_complete = mode
            job.body["onAllTasksComplete"] = mode
        for key in ("priority", "constraints", "metadata", "maxParallelTasks"):
            if key in data:
                job.body[key] = data[key]
        job.etag = f"0x{secrets.token_hex(8).upper()}"
        job.last_modified = datetime.now(UTC)
        self._settle(job)
        return 200, None, {**self._entity_headers(job.etag, job.last_modified),
                           "DataServiceId": f"{self._base()}/jobs/{job.id}"}

    def _op_list_jobs(self, params: Mapping[str, str],
                      body: bytes) -> tuple[int, Any, dict[str, str]]:
        state = _state_filter(params.get("$filter"))
        jobs = list(self._jobs.values())
        for job in jobs:
            self._settle(job)
        if state is not None:
            jobs = [j for j in jobs if j.state == state]
        return 200, self._page([self._job_json(j) for j in jobs], params, "/jobs", 1000), {}

    def _op_get_task_counts(self, job_id: str, params: Mapping[str, str],
                            body: bytes) -> tuple[int, Any, dict[str, str]]:
        job = self._need_job(job_id)
        counts = Counter[str]()
        slots = Counter[str]()
        for task in job.tasks.values():
            state = "running" if task.state == "preparing" else task.state
            keys = [state]
            if state == "completed":
                keys.append("succeeded" if task.exit_code == 0 else "failed")
            for key in keys:
                counts[key] += 1
                slots[key] += task.slots
        names = ("active", "running", "completed", "succeeded", "failed")
        return 200, {"taskCounts": {n: counts[n] for n in names},
                     "taskSlotCounts": {n: slots[n] for n in names}}, {}

    def _op_add_task_collection(self, job_id: str, params: Mapping[str, str],
                                body: bytes) -> tuple[int, Any, dict[str, str]]:
        if len(body) > self.max_body_bytes:
            raise PeerError(413, "RequestBodyTooLarge",
                            "The request body is too large and exceeds the maximum "
                            "permissible limit.",
                            {"MaxLimit": str(self.max_body_bytes)})
        job = self._need_job(job_id)
        data = _json_body(body)
        tasks = data.get("value")
        if not isinstance(tasks, list) or not tasks:
            raise _missing("value")
        if len(tasks) > self.max_tasks:
            raise _invalid("value", str(len(tasks)),
                           f"a collection holds at most {self.max_tasks} tasks")
        for index, task in enumerate(tasks):
            _check_task(task, f"value[{index}]")
        self._settle(job)
        if job.state != "active":
            raise PeerError(409, "JobCompleted",
                            "The specified job is already in a completed state.")
        self.add_requests.append([str(t["id"]) for t in tasks])
        results = [self._add_one(job, task) for task in tasks]
        self._order_rng.shuffle(results)  # the service does not promise the request's order
        return 200, {"value": results}, {}

    def _add_one(self, job: PeerJob, task: dict[str, Any]) -> dict[str, Any]:
        task_id = str(task["id"])
        depends = task.get("dependsOn") or {}
        error: PeerError | None = None
        if task_id.lower() in job.tasks:
            error = PeerError(409, "TaskExists", "The specified task already exists.")
        elif self.task_rule is not None and (ruled := self.task_rule(task)) is not None:
            error = ruled
        elif depends and not job.uses_task_dependencies:
            error = PeerError(409, "TaskDependenciesNotSpecifiedOnJob",
                              "The specified job does not have task dependencies enabled.")
        elif sum(len(t) for t in depends.get("taskIds") or []) > MAX_DEPENDENCY_CHARS:
            error = PeerError(400, "TaskDependencyListTooLong",
                              "The task depends on too many other tasks: use task id "
                              "ranges instead.")
        if error is not None:
            self.task_outcomes[error.code] += 1
            return {"status": "clientError", "taskId": task_id, "error": error.body()}
        added = PeerTask(body=task)
        job.tasks[task_id.lower()] = added
        self.task_outcomes["added"] += 1
        return {"status": "success", "taskId": task_id, "eTag": added.etag,
                "lastModified": _rfc3339(datetime.now(UTC)),
                "location": f"{self._base()}/jobs/{job.id}/tasks/{task_id}"}

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
            "allocationStateTransitionTime": _rfc3339(pool.created),
            "vmSize": pool.vm_size,
            "currentDedicatedNodes": pool.dedicated.get("total", 0),
            "currentLowPriorityNodes": pool.low_priority.get("total", 0),
            "targetDedicatedNodes": pool.target_dedicated,
            "targetLowPriorityNodes": pool.target_low_priority,
            "taskSlotsPerNode": 1,
        }
        return 200, _select(data, params), {}

    def _op_list_node_counts(self, params: Mapping[str, str],
                             body: bytes) -> tuple[int, Any, dict[str, str]]:
        wanted = _pool_filter(params.get("$filter"))
        items = [{"poolId": p.id,
                  "dedicated": {s: p.dedicated.get(s, 0) for s in NODE_STATES},
                  "lowPriority": {s: p.low_priority.get(s, 0) for s in NODE_STATES}}
                 for p in self._pools.values() if wanted is None or p.id.lower() == wanted]
        return 200, self._page(items, params, "/nodecounts", 10), {}

    # -- helpers -------------------------------------------------------------------------

    def _need_job(self, job_id: str) -> PeerJob:
        job = self._jobs.get(job_id.lower())
        if job is None:
            raise PeerError(404, "JobNotFound", "The specified job does not exist.")
        return job

    def _settle(self, job: PeerJob) -> None:
        """A job set to terminate completes once every task has completed."""
        if (job.state == "active" and job.on_all_tasks_complete == "terminatejob"
                and all(t.state == "completed" for t in job.tasks.values())):
            job.state = "completed"

    def _job_json(self, job: PeerJob) -> dict[str, Any]:
        data = {k: v for k, v in job.body.items() if k != "id"}
        return {
            "id": job.id, "url": f"{self._base()}/jobs/{job.id}", "eTag": job.etag,
            "lastModified": _rfc3339(job.last_modified),
            "creationTime": _rfc3339(job.created), "state": job.state,
            "stateTransitionTime": _rfc3339(job.last_modified),
            "priority": 0, "maxParallelTasks": -1, "allowTaskPreemption": False,
            "usesTaskDependencies": False, "onTaskFailure": "noaction",
            "constraints": {"maxWallClockTime": "P10675199DT2H48M5.4775807S",
                            "maxTaskRetryCount": 0},
            **data,
            "onAllTasksComplete": job.on_all_tasks_complete,
            "executionInfo": {"startTime": _rfc3339(job.created), "poolId": job.pool},
        }

    def _page(self, items: list[dict[str, Any]], params: Mapping[str, str], path: str,
              default_size: int) -> dict[str, Any]:
        size = int(params.get("maxresults") or default_size)
        start = int(params.get("$skiptoken") or 0)
        page = [_select(item, params) for item in items[start:start + size]]
        out: dict[str, Any] = {"odata.metadata": f"{self._base()}/$metadata", "value": page}
        if start + size < len(items):
            query = {k: v for k, v in params.items() if k != "$skiptoken"}
            query["$skiptoken"] = str(start + size)
            out["odata.nextLink"] = f"{self._base()}{path}?{urlencode(query)}"
        return out

    def _entity_headers(self, etag: str, modified: datetime) -> dict[str, str]:
        return {"ETag": etag, "Last-Modified": format_datetime(modified, usegmt=True)}

    def _base(self) -> str:
        return self.url


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

    def _handle(self) -> None:
        peer = self.peer
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        split = urlsplit(self.path)
        if split.path == "/_peer/record":
            self._answer(200, peer.record(), {})
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
            peer._check_auth(self.command, split.path, split.query, self.headers)
            status, payload, headers = peer._dispatch(operation, arg, params, body)
        except PeerError as err:
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
        if not (res.get("httpUrl") or res.get("storageContainerUrl")
                or res.get("autoStorageContainerName")):
            raise _missing(f"{name}.resourceFiles[{i}].httpUrl")
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


def _select(item: dict[str, Any], params: Mapping[str, str]) -> dict[str, Any]:
    select = params.get("$select")
    if not select:
        return item
    keys = {k.strip() for k in select.split(",")}
    return {k: v for k, v in item.items() if k in keys}


def _state_filter(text: str | None) -> str | None:
    if not text:
        return None
    match = re.fullmatch(r"\s*state\s+eq\s+'(\w+)'\s*", text)
    if match is None:
        raise PeerError(400, "InvalidQueryParameterValue", "The peer supports only "
                        "$filter=state eq '<state>' on jobs.",
                        {"QueryParameterName": "$filter", "QueryParameterValue": text})
    return match.group(1)


def _pool_filter(text: str | None) -> str | None:
    if not text:
        return None
    match = re.fullmatch(r"\s*poolId\s+eq\s+'([^']+)'\s*", text)
    if match is None:
        raise PeerError(400, "InvalidQueryParameterValue", "The peer supports only "
                        "$filter=poolId eq '<pool>' on node counts.",
                        {"QueryParameterName": "$filter", "QueryParameterValue": text})
    return match.group(1).lower()


def _rfc3339(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _iter_pool_args(values: list[str]) -> Iterator[str]:
    for value in values:
        yield from (v for v in value.split(",") if v)


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
