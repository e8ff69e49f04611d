"""``AzureBatchBackend``: the Backend protocol on Azure Batch.

Job lifecycle (docs/azure-batch.md): create the job with on-all-tasks-complete = no
action, add every task, then seal it (terminate the job when its tasks complete).
Each call is one REST request through the ``BatchClient``'s pipeline with a body built
as plain JSON (see ``wire.py`` for why); the submitter calls ``add_tasks`` from several
threads at once, bounds the requests in flight and retries ``SystemFault`` with
backoff.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import structlog
from azure.core.credentials import AzureNamedKeyCredential, TokenCredential

from handlers.base import BlobRef, ContainerSettings, ExitConditions, JobSpec, TaskSpec
from worker.backends.azure import wire
from worker.backends.azure.rest import Rest, ServiceError, account_name, classify, make_client, path
from worker.backends.base import (
    META_HANDLER,
    META_WINDOW,
    AddResult,
    BackendStats,
    FailedTask,
    JobRecord,
    JobState,
    JobStatus,
    JobUsage,
    MoveResult,
    PoolCapacity,
    Preemption,
    ResizeError,
    TaskCounts,
)
from worker.config import BatchConfig, JobsConfig, SubmitConfig
from worker.errors import BatchRejected, ConfigFault, SettingsError, SystemFault
from worker.logs import redact
from worker.storage.base import Storage

log = structlog.get_logger(__name__)

#: How long a pool found to exist is trusted before ``create_job`` looks again.
POOL_CHECK_TTL = 60.0
#: The job fields ``job_status`` and ``list_jobs`` read.
_JOB_SELECT = "id,state,poolInfo,displayName,creationTime,metadata"
#: The pool fields ``stats`` reads (sizes, and what admission needs).
_POOL_STATS_SELECT = ("id,currentDedicatedNodes,targetDedicatedNodes,currentLowPriorityNodes,"
                      "targetLowPriorityNodes,allocationState,allocationStateTransitionTime,"
                      "resizeErrors,enableAutoScale,taskSlotsPerNode")
#: The most items one list request returns (jobs and tasks: "Common Parameters and
#: Headers", maxresults).
MAX_RESULTS = 1000
#: Log files a task uploads, the ones ``task_log_tail`` reads.
LOG_NAMES = frozenset({"stdout.txt", "stderr.txt"})
#: Codes that mean the job is already past what a terminate or delete asks for.
_JOB_GONE = frozenset({"JobNotFound"})
_JOB_DONE = frozenset({"JobCompleted", "JobBeingDeleted"})
_INT_ID = re.compile(r"^[0-9]+$")
#: How many jobs' pools ``add_tasks`` remembers (the oldest is dropped first).
_JOB_POOLS_MAX = 10_000
#: How long a pool's VM size and task slots per node are trusted (``job_usage``).
POOL_SHAPE_TTL = 3600.0
#: The task fields ``job_usage`` reads (list tasks' ``$select`` takes top-level
#: properties: ``executionInfo`` holds ``startTime`` and ``endTime``).
USAGE_SELECT = "id,requiredSlots,executionInfo"


def pool_connections(submit: SubmitConfig | None, jobs: JobsConfig | None) -> int:
    """Keep-alive connections for one backend: the submitter's requests in flight
    (``submit.concurrency``), the monitor's (``jobs.monitor_concurrency``: both go
    through the same client) and two for the stats poll and the odd probe. With fewer,
    urllib3 opens a connection for each request past the pool and drops it after
    ("Connection pool is full, discarding connection"), a TCP (and TLS) handshake a
    request."""
    concurrency = submit.concurrency if submit is not None else SubmitConfig().concurrency
    monitor = (jobs if jobs is not None else JobsConfig()).for_backend("azure")
    return concurrency + monitor.monitor_concurrency + 2


class AzureBatchBackend:
    """Submits jobs and tasks to one Azure Batch account; safe across threads."""

    def __init__(self, *, endpoint: str, credential: AzureNamedKeyCredential | TokenCredential,
                 default_pool: str | None = None, pools: Sequence[str] = (),
                 connections: int = 10, read_timeout: float = 60.0,
                 max_jobs_per_poll: int = 50, max_body_bytes: int = wire.MAX_BODY_BYTES,
                 insecure_bearer: bool = False, storage: Storage | None = None,
                 logs_container: str | None = None, job_prefixes: Sequence[str] = ()) -> None:
        """``default_pool`` takes jobs whose spec names none and is what ``probe`` reads;
        ``pools`` (plus the pools of jobs created) are what ``stats`` reports, every
        pool of the account when both are empty; ``connections`` sizes the HTTP
        connection pool (the submit concurrency plus the poller's).
        ``insecure_bearer`` lets Entra ID tokens go to an ``http://`` endpoint (tests
        only); otherwise that is a ``SettingsError``.

        ``storage`` and ``logs_container`` are where tasks upload their logs
        (``<logs_container>/<job>/<task>/stdout.txt``, ``stderr.txt``): failed tasks
        point there and ``task_log_tail`` reads there; None when logs are not
        uploaded. ``job_prefixes``, when given, narrows ``list_fanout_jobs`` and
        ``list_jobs`` on the service to job ids starting with one of them (the
        list-jobs filter supports ``startswith`` on ``id``); fanout's own jobs are
        still told apart by their metadata."""
        bearer = not isinstance(credential, AzureNamedKeyCredential)
        if bearer and not insecure_bearer and not endpoint.lower().startswith("https://"):
            raise SettingsError(f"batch.account_url {endpoint!r} must be https:// to send "
                                "Entra ID tokens to it")
        client = make_client(endpoint=endpoint, credential=credential,
                             connections=connections, read_timeout=read_timeout)
        self._rest = Rest(client, options={"enforce_https": False} if insecure_bearer else None)
        self._default_pool = default_pool
        self._credential = credential
        # an insertion-ordered set of the pools stats() reports
        self._pools: dict[str, None] = dict.fromkeys([*filter(None, [default_pool]), *pools])
        self._max_jobs_per_poll = max_jobs_per_poll
        self._max_body_bytes = max_body_bytes
        self._lock = threading.Lock()
        self._pool_checked: dict[str, float] = {}
        #: Per pool checked: its container configuration (prefetched images, registries,
        #: identities), or None for a pool without one
        #: (``virtualMachineConfiguration.containerConfiguration``).
        self._pool_containers: dict[str, wire.PoolContainers | None] = {}
        #: (pool, image) pairs already warned about (an image that may not pull).
        self._container_warned: set[tuple[str, str]] = set()
        #: The pool of each job created or found (lower-case id), for ``add_tasks``.
        self._job_pools: dict[str, str] = {}
        self._storage = storage
        self._logs_container = logs_container
        self._job_prefixes = tuple(job_prefixes)
        #: Per pool (lower-case id): (when read, vmSize, taskSlotsPerNode), for costs.
        self._pool_shapes: dict[str, tuple[float, str | None, int | None]] = {}
        #: Per pool (lower-case id): the ``GET`` of its shape in flight, which other
        #: callers wait for (:meth:`_pool_shape`).
        self._shape_reads: dict[str, Future[tuple[str | None, int | None]]] = {}

    @classmethod
    def from_config(cls, batch: BatchConfig, submit: SubmitConfig | None = None, *,
                    storage: Storage | None = None,
                    jobs: JobsConfig | None = None) -> AzureBatchBackend:
        """Build from ``[batch]``: shared key when ``account_key`` is set, else Entra ID
        through azure-identity's DefaultAzureCredential (see :func:`make_credential`);
        the connection pool holds :func:`pool_connections`. With ``storage`` and
        ``[jobs]`` (``logs_container``; ``log_upload`` other than ``never``), failed
        tasks name their logs and ``task_log_tail`` reads them."""
        if not batch.account_url:
            raise SettingsError("batch.account_url is not set")
        logs = (jobs.logs_container if jobs is not None and jobs.log_upload != "never"
                else None)
        return cls(endpoint=batch.account_url, credential=make_credential(batch),
                   default_pool=batch.pool, connections=pool_connections(submit, jobs),
                   storage=storage, logs_container=logs)

    # -- Backend protocol ---------------------------------------------------------------

    @property
    def max_tasks_per_request(self) -> int:
        return wire.MAX_TASKS_PER_REQUEST

    def start(self) -> None:
        """Nothing to start: the Batch service runs the tasks."""

    def probe(self) -> None:
        """Read the default pool (or the pool node counts when none is configured):
        ``ConfigFault`` while auth is refused or the pool does not exist."""
        if self._default_pool:
            self._check_pool(self._default_pool, force=True)
            return
        try:
            self._rest.call("GET", "/nodecounts", params={"maxresults": 1})
        except ServiceError as err:
            raise classify(err, what="probe") from None

    def create_job(self, job: JobSpec) -> JobState:
        """Create the job; if it exists, ``"sealed"`` when an earlier delivery already
        set it to terminate, else ``"exists"``."""
        pool = job.pool or self._default_pool
        if not pool:
            raise ConfigFault(f"job {job.id} names no pool and batch.pool is not set",
                              code="NoPool")
        self._check_pool(pool)
        body = wire.job_body(job, pool)
        try:
            self._rest.call("POST", "/jobs", body=_dumps(body))
        except ServiceError as err:
            if err.code != "JobExists":
                raise classify(err, what=f"create job {job.id}") from None
            self._remember_pool(job.id, pool)
            return self._existing_job_state(job.id)
        self._remember_pool(job.id, pool)
        with self._lock:
            self._pools.setdefault(pool, None)
        log.info("batch.job_created", job_id=job.id, pool=pool,
                 dependencies=job.uses_task_dependencies)
        return "created"

    def add_tasks(self, job_id: str, tasks: Sequence[TaskSpec]) -> AddResult:
        """Add up to 100 tasks in one request (more are sent 100 at a time). A body of
        1 MB or more is split in halves before sending, and again on
        ``RequestBodyTooLarge``; one task too large alone is ``BatchRejected``.

        Before anything is sent, the tasks' container settings are held against the
        job's pool (see ``_check_containers``): a task that cannot run there is a
        ``ConfigFault`` naming the pool and the image (the service would accept the task
        and fail it when scheduled)."""
        self._check_containers(job_id, tasks)
        total = AddResult()
        size = wire.MAX_TASKS_PER_REQUEST
        for start in range(0, len(tasks), size):
            _merge(total, self._add_chunk(job_id, tasks[start:start + size]))
        return total

    def seal_job(self, job_id: str) -> None:
        """Set on-all-tasks-complete = terminate job. A 409 ``JobCompleted`` means an
        earlier attempt (whose answer was lost) took effect and the job has completed
        since: done."""
        body = _dumps({"onAllTasksComplete": "terminatejob"})
        try:
            self._rest.call("PATCH", path("jobs", job_id), body=body)
        except ServiceError as err:
            if err.code == "JobCompleted":
                log.info("batch.job_sealed", job_id=job_id, already="completed")
                return
            raise self._job_fault(err, f"seal job {job_id}") from None
        log.info("batch.job_sealed", job_id=job_id)

    def job_status(self, job_id: str) -> JobStatus | None:
        """The job and its task counts (task counts API; tasks are never listed)."""
        try:
            reply = self._rest.call("GET", path("jobs", job_id),
                                    params={"$select": _JOB_SELECT})
        except ServiceError as err:
            if err.code == "JobNotFound" or err.status == 404:
                return None
            raise classify(err, what=f"get job {job_id}") from None
        return self._with_counts(reply.body)

    def list_jobs(self, limit: int = 50) -> list[JobStatus]:
        """fanout's newest ``limit`` jobs (those with ``fanout-handler`` metadata): one
        request per page of the job listing and none per job, so ``counts`` stays empty
        here (``job_status`` reads one job's counts)."""
        ours = self._fanout_jobs(_JOB_SELECT, None, what="list jobs")
        ours.sort(key=lambda j: wire.parse_time(j.get("creationTime")) or _EPOCH, reverse=True)
        return [_status(item) for item in ours[:limit]]

    def stats(self) -> BackendStats:
        """Pool node counts and sizes, active jobs, and task counts of fanout's active
        jobs (at most ``max_jobs_per_poll`` of them per call)."""
        stats = BackendStats()
        try:
            pools = self._node_counts(stats)
            for pool in pools:
                self._pool_size(pool, stats)
            self._job_stats(stats)
        except ServiceError as err:
            raise classify(err, what="read pool and job stats") from None
        return stats

    # -- what the job monitor needs ---------------------------------------------------

    def list_fanout_jobs(self, *, completed_since: datetime | None = None
                         ) -> list[JobRecord]:
        """fanout's jobs: every one not completed, and the completed ones whose state
        changed at or after ``completed_since`` (all when None).

        One ``GET /jobs`` per page with ``$filter`` (see :func:`wire.fanout_jobs_filter`:
        the documented list-jobs properties; metadata is not one of them, so jobs
        without ``fanout-handler`` metadata are dropped here) and ``$select``.
        """
        return [wire.job_record(j) for j in self._fanout_jobs(
            wire.JOB_RECORD_SELECT, completed_since, what="list fanout jobs")]

    def _fanout_jobs(self, select: str, completed_since: datetime | None, *,
                     what: str) -> list[dict[str, Any]]:
        """Every page of the job listing narrowed by :func:`wire.fanout_jobs_filter`,
        keeping the jobs with ``fanout-handler`` metadata (metadata cannot be filtered
        on by the service)."""
        params: dict[str, str | int] = {"$select": select, "maxresults": MAX_RESULTS}
        text = wire.fanout_jobs_filter(completed_since, self._job_prefixes)
        if text:
            params["$filter"] = text
        try:
            items = self._rest.get_pages("/jobs", params)
        except ServiceError as err:
            raise classify(err, what=what) from None
        return [j for j in items if META_HANDLER in wire.metadata(j.get("metadata"))]

    def get_job(self, job_id: str) -> JobRecord | None:
        """One job (``GET /jobs/{id}`` with ``$select``), None when there is none."""
        try:
            reply = self._rest.call("GET", path("jobs", job_id),
                                    params={"$select": wire.JOB_RECORD_SELECT})
        except ServiceError as err:
            if err.status == 404:
                return None
            raise classify(err, what=f"get job {job_id}") from None
        return wire.job_record(reply.body or {})

    def task_counts(self, job_id: str) -> TaskCounts | None:
        """``GET /jobs/{id}/taskcounts``; None when there is no such job."""
        try:
            reply = self._rest.call("GET", path("jobs", job_id, "taskcounts"))
        except ServiceError as err:
            if err.status == 404:
                return None
            raise classify(err, what=f"task counts of job {job_id}") from None
        return wire.task_counts_record(reply.body)

    def failed_tasks(self, job_id: str, limit: int) -> list[FailedTask]:
        """Up to ``limit`` failed tasks from ONE page of ``GET /jobs/{id}/tasks`` with
        ``$filter=executionInfo/result eq 'failure'`` (the list-tasks filter allows
        ``eq`` on ``executionInfo/result``), ``$select`` and ``maxresults`` (at most
        1000); a category each from :data:`wire.FAILURE_CODES`. None of a job that is
        gone: an empty list."""
        if limit <= 0:
            return []
        params: dict[str, str | int] = {
            "$filter": "executionInfo/result eq 'failure'",
            "$select": wire.FAILED_TASK_SELECT, "maxresults": min(limit, MAX_RESULTS)}
        try:
            reply = self._rest.call("GET", path("jobs", job_id, "tasks"), params=params)
        except ServiceError as err:
            if err.status == 404:
                return []
            raise classify(err, what=f"list failed tasks of job {job_id}") from None
        items = (reply.body or {}).get("value") or []
        return [wire.failed_task(t, self._logs_prefix(job_id, str(t.get("id"))))
                for t in items[:limit]]

    def job_usage(self, job_id: str, pool: str | None = None) -> JobUsage | None:
        """The job's slot-seconds: ``GET /jobs/{id}/tasks`` with ``$filter=state eq
        'completed'``, ``$select=id,requiredSlots,executionInfo`` and ``maxresults=1000``,
        every page (``ceil(completed / 1000)`` requests, once per job, by the monitor at
        its report), summing ``(executionInfo.endTime - startTime) * requiredSlots``.
        ``startTime`` is the most recent attempt's ("If the Task has been restarted or
        retried, this is the most recent time at which the Task started running",
        BatchTaskExecutionInfo), so earlier attempts of a retried task are not in it.

        The pool's ``vmSize`` and ``taskSlotsPerNode`` come from ``GET /pools/{id}``
        (``$select``), read once an hour per pool. None when the job is gone."""
        params: dict[str, str | int] = {"$filter": "state eq 'completed'",
                                        "$select": USAGE_SELECT, "maxresults": MAX_RESULTS}
        seconds, tasks = 0.0, 0
        where, query = path("jobs", job_id, "tasks"), params
        try:
            while True:
                reply = self._rest.call("GET", where, params=query)
                body = reply.body or {}
                for item in body.get("value") or []:
                    wall = _wall_seconds(item)
                    if wall is not None:
                        seconds += wall * _slots(item)
                        tasks += 1
                link = body.get("odata.nextLink")
                if not link:
                    break
                split = urlsplit(link)
                where, query = split.path, dict(parse_qsl(split.query))
        except ServiceError as err:
            if err.status == 404:
                return None
            raise classify(err, what=f"list the completed tasks of job {job_id}") from None
        vm_size, slots = self._pool_shape(pool) if pool else (None, None)
        return JobUsage(slot_seconds=seconds, tasks=tasks, vm_size=vm_size,
                        slots_per_node=slots)

    def _pool_shape(self, pool: str) -> tuple[str | None, int | None]:
        """The pool's ``vmSize`` (lower case) and ``taskSlotsPerNode`` (default 1),
        cached for ``POOL_SHAPE_TTL``; (None, None) when the pool is gone.

        Single-flight: while one caller reads a pool, others asking for the same pool
        wait for its answer (or its error) instead of each sending a ``GET`` of their
        own; the monitor prices up to ``jobs.monitor_concurrency`` reports at once."""
        key = pool.lower()
        now = time.monotonic()
        with self._lock:
            known = self._pool_shapes.get(key)
            if known is not None and now - known[0] < POOL_SHAPE_TTL:
                return known[1], known[2]
            flight = self._shape_reads.get(key)
            leader = flight is None
            if flight is None:
                flight = self._shape_reads[key] = Future()
        if not leader:
            return flight.result()
        try:
            shape = self._read_pool_shape(pool)
        except BaseException as err:
            flight.set_exception(err)
            raise
        else:
            flight.set_result(shape)
        finally:
            with self._lock:
                del self._shape_reads[key]
        if shape != (None, None):
            with self._lock:
                self._pool_shapes[key] = (now, *shape)
        return shape

    def _read_pool_shape(self, pool: str) -> tuple[str | None, int | None]:
        """``GET /pools/{id}`` with ``$select``: (vmSize, taskSlotsPerNode), or (None,
        None) for a pool that is gone (404)."""
        try:
            reply = self._rest.call("GET", path("pools", pool),
                                    params={"$select": "id,vmSize,taskSlotsPerNode"})
        except ServiceError as err:
            if err.status == 404:
                log.warning("batch.pool_missing", pool=pool, why="pricing a job")
                return None, None
            raise classify(err, what=f"get pool {pool}") from None
        body = reply.body or {}
        size = body.get("vmSize")
        vm_size = str(size).lower() if isinstance(size, str) and size else None
        raw = body.get("taskSlotsPerNode")
        slots = raw if isinstance(raw, int) and not isinstance(raw, bool) and raw > 0 else 1
        return vm_size, slots

    def existing_tasks(self, job_id: str, task_ids: Sequence[str]) -> set[str]:
        """Which of ``task_ids`` the job has: ``GET /jobs/{id}/tasks/{task}`` with
        ``$select=id`` each (404 ``TaskNotFound``: not there). Only a late event of a
        window job asks, for its own few tasks."""
        found: set[str] = set()
        for task_id in task_ids:
            try:
                self._rest.call("GET", path("jobs", job_id, "tasks", task_id),
                                params={"$select": "id"})
            except ServiceError as err:
                if err.status == 404:
                    continue
                raise classify(err, what=f"get task {task_id} of job {job_id}") from None
            found.add(task_id)
        return found

    def blocked_tasks(self, job_id: str, limit: int) -> list[str] | None:
        """The active tasks that wait on a dependency that can never be satisfied.

        Lists the active tasks (``$filter=state eq 'active'``, ``$select=id,dependsOn``,
        up to ``limit + 1``: None when there are more than ``limit``); when any has
        dependencies, lists the failed tasks (``$select=id,exitConditions,
        executionInfo``). A failed task blocks its dependents when its exit options
        for how it ended (:meth:`ExitConditions.options_for`: a pre-processing error
        when it could not start, a file upload error, else its exit code) give
        dependency action ``block``; an active task is blocked when one of its
        dependencies (``taskIds``, or ``taskIdRanges`` over integer ids) is such a
        task, or is itself a blocked active task.
        """
        wanted = min(limit + 1, MAX_RESULTS)
        try:
            active = self._rest.get_pages(
                path("jobs", job_id, "tasks"),
                {"$filter": "state eq 'active'", "$select": "id,dependsOn",
                 "maxresults": wanted}, max_items=limit + 1)
        except ServiceError as err:
            if err.status == 404:
                return []
            raise classify(err, what=f"list active tasks of job {job_id}") from None
        if len(active) > limit:
            return None
        waiting = [t for t in active if t.get("dependsOn")]
        if not waiting:
            return []
        try:
            failed = self._rest.get_pages(
                path("jobs", job_id, "tasks"),
                {"$filter": "executionInfo/result eq 'failure'",
                 "$select": "id,exitConditions,executionInfo", "maxresults": MAX_RESULTS})
        except ServiceError as err:
            if err.status == 404:
                return []
            raise classify(err, what=f"list failed tasks of job {job_id}") from None
        blocking = {str(t.get("id")).lower() for t in failed if _blocks(t)}
        return _blocked(waiting, blocking)

    def terminate_job(self, job_id: str, reason: str) -> None:
        """``POST /jobs/{id}/terminate`` with ``terminateReason``; a job already
        completed (409 ``JobCompleted``), being deleted or gone (404) is left alone."""
        body = _dumps({"terminateReason": reason})
        try:
            self._rest.call("POST", path("jobs", job_id, "terminate"), body=body)
        except ServiceError as err:
            if err.code in _JOB_DONE or err.code in _JOB_GONE or err.status == 404:
                log.info("batch.job_terminate_skipped", job_id=job_id, code=err.code)
                return
            raise classify(err, what=f"terminate job {job_id}") from None
        log.info("batch.job_terminated", job_id=job_id, reason=reason)

    def delete_job(self, job_id: str) -> None:
        """``DELETE /jobs/{id}``; a job gone (404) or already being deleted is done."""
        try:
            self._rest.call("DELETE", path("jobs", job_id))
        except ServiceError as err:
            if err.status == 404 or err.code == "JobBeingDeleted":
                log.info("batch.job_delete_skipped", job_id=job_id, code=err.code)
                return
            raise classify(err, what=f"delete job {job_id}") from None
        log.info("batch.job_deleted", job_id=job_id)

    def update_job_metadata(self, job_id: str, metadata: dict[str, str]) -> None:
        """``PATCH /jobs/{id}`` with the whole ``metadata`` list (Job - Update replaces
        it; allowed on a completed job). A job gone (404) is logged and left."""
        body = _dumps({"metadata": [{"name": k, "value": v} for k, v in metadata.items()]})
        try:
            self._rest.call("PATCH", path("jobs", job_id), body=body)
        except ServiceError as err:
            if err.status == 404:
                log.info("batch.job_metadata_skipped", job_id=job_id, code=err.code)
                return
            raise classify(err, what=f"update metadata of job {job_id}") from None

    def task_log_tail(self, job_id: str, task_id: str, name: str = "stderr.txt",
                      max_bytes: int = 4096) -> str | None:
        """The last ``max_bytes`` of ``<logs_container>/<job>/<task>/<name>`` through
        ``Storage.read_tail`` (a range read); None without storage or logs, or when the
        task uploaded none. Bytes cut mid-character are replaced, not an error."""
        if name not in LOG_NAMES:
            raise ValueError(f"unknown log file {name!r}: one of {sorted(LOG_NAMES)}")
        if self._storage is None or not self._logs_container:
            return None
        ref = BlobRef(container=self._logs_container, blob=f"{job_id}/{task_id}/{name}")
        data = self._storage.read_tail(ref, max_bytes)
        return None if data is None else data.decode("utf-8", errors="replace")

    # -- Spot preemption (worker/preemption.py) -------------------------------------

    def preempted_tasks(self, pool: str) -> list[Preemption]:
        """One ``GET /pools/{pool}/nodes`` with ``$filter=state eq 'preempted'`` (the
        list-nodes filter allows ``eq`` on ``state``) and ``$select`` (one page per
        1,000 preempted nodes): the tasks each preempted node's ``recentTasks`` names
        that had not ended before the node entered the state (see
        :func:`_preempted`). A pool that is gone has none."""
        try:
            nodes = self._rest.get_pages(
                path("pools", pool, "nodes"),
                {"$filter": "state eq 'preempted'",
                 "$select": "id,state,stateTransitionTime,recentTasks",
                 "maxresults": MAX_RESULTS})
        except ServiceError as err:
            if err.status == 404:
                return []
            raise classify(err, what=f"list preempted nodes of pool {pool}") from None
        return [event for node in nodes for event in _preempted(pool, node)]

    def move_task(self, job_id: str, task_id: str, *, to_job: str, pool: str,
                  metadata: dict[str, str]) -> MoveResult:
        """End the task in its job (``POST .../tasks/{id}/terminate``) and add a copy of
        it (``GET`` the task, keep its create properties) to ``to_job``, created on
        ``pool`` with the job's priority and constraints when missing (``JobExists``
        and ``TaskExists`` mean another attempt or replica did it). ``unmovable`` for a
        job that uses task dependencies or whose ``onTaskFailure`` is not ``noaction``;
        ``finished`` when the task ended by itself before it was ended here;
        ``pending`` while the terminate has not completed it yet."""
        try:
            job = self._rest.call("GET", path("jobs", job_id), params={
                "$select": "id,state,usesTaskDependencies,onTaskFailure,priority,constraints,"
                           "creationTime"}
                ).body or {}
        except ServiceError as err:
            if err.status == 404:
                return "unmovable"
            raise classify(err, what=f"get job {job_id}") from None
        if job.get("usesTaskDependencies") or str(
                job.get("onTaskFailure") or "noaction").lower() != "noaction":
            return "unmovable"
        task = self._get_task(job_id, task_id)
        if task is None:
            return "unmovable"
        if task.get("state") != "completed":
            try:
                self._rest.call("POST", path("jobs", job_id, "tasks", task_id, "terminate"))
            except ServiceError as err:
                if err.status == 404:
                    return "unmovable"
                if err.code != "TaskCompleted" and err.status != 409:
                    raise classify(err, what=f"terminate task {task_id} of job {job_id}"
                                   ) from None
            task = self._get_task(job_id, task_id)
            if task is None:
                return "unmovable"
            if task.get("state") != "completed":
                return "pending"
        info = task.get("executionInfo") or {}
        if str(info.get("result") or "").lower() == "success" or wire.failure_category(
                info, task.get("constraints"))[0] != "cancelled":
            return "finished"
        self._companion(to_job, pool, job, metadata)
        copy = {k: v for k, v in task.items() if k in _TASK_COPY}
        try:
            reply = self._rest.call("POST", path("jobs", to_job, "addtaskcollection"),
                                    body=_dumps({"value": [copy]}))
        except ServiceError as err:
            raise self._job_fault(err, f"add task {task_id} to job {to_job}") from None
        items = (reply.body or {}).get("value") or []
        for item in items:
            status = str(item.get("status", "")).lower()
            code, message = wire.error_parts(item.get("error"))
            if status == "success":
                continue
            if code == "TaskExists":
                return "exists"
            transient = status == "servererror" or code in wire.TRANSIENT_CODES
            fault = SystemFault if transient else BatchRejected
            raise fault(f"add task {task_id} to job {to_job}: {code}: {message}")
        if not items:
            raise SystemFault(f"add task {task_id} to job {to_job}: no answer for it")
        log.info("batch.task_moved", job_id=job_id, task_id=task_id, to_job=to_job, pool=pool)
        return "moved"

    def _get_task(self, job_id: str, task_id: str) -> dict[str, Any] | None:
        try:
            reply = self._rest.call("GET", path("jobs", job_id, "tasks", task_id))
        except ServiceError as err:
            if err.status == 404:
                return None
            raise classify(err, what=f"get task {task_id} of job {job_id}") from None
        return dict(reply.body or {})

    def _companion(self, job_id: str, pool: str, original: dict[str, Any],
                   metadata: dict[str, str]) -> None:
        """Create the companion job (no action when its tasks complete: the monitor
        seals it once its original is terminal); ``JobExists`` is fine."""
        body: dict[str, Any] = {
            "id": job_id, "poolInfo": {"poolId": pool}, "onAllTasksComplete": "noaction",
            "priority": int(original.get("priority") or 0),
            "metadata": [{"name": k, "value": v} for k, v in metadata.items()]}
        given = original.get("constraints") or {}
        limits: dict[str, Any] = {}
        if "maxTaskRetryCount" in given:
            limits["maxTaskRetryCount"] = given["maxTaskRetryCount"]
        # what is left of the original's wall clock: its tasks' deadline (and the
        # lifetime of the SAS URLs in their files) holds wherever they run
        wall = wire.parse_duration(given.get("maxWallClockTime"))
        created = wire.parse_time(original.get("creationTime"))
        if wall is not None and created is not None and wall < timedelta(days=365 * 100):
            left = created + wall - datetime.now(UTC)
            limits["maxWallClockTime"] = wire.iso_duration(max(left, timedelta(minutes=1)))
        if limits:
            body["constraints"] = limits
        try:
            self._rest.call("POST", "/jobs", body=_dumps(body))
        except ServiceError as err:
            if err.code != "JobExists":
                raise classify(err, what=f"create job {job_id}") from None
            return
        self._remember_pool(job_id, pool)
        with self._lock:
            self._pools.setdefault(pool, None)
        log.info("batch.job_created", job_id=job_id, pool=pool, companion_of=original.get("id"))

    def close(self) -> None:
        self._rest.close()
        close = getattr(self._credential, "close", None)
        if callable(close):  # azure-identity credentials hold HTTP sessions
            close()

    # -- internals ------------------------------------------------------------------------

    def _add_chunk(self, job_id: str, tasks: Sequence[TaskSpec]) -> AddResult:
        body = wire.collection_body(tasks)
        # "The total serialized size of this collection must be less than 1MB"
        # (BatchTaskGroup in the REST spec): 1 MiB itself is too large
        if len(body) >= self._max_body_bytes and len(tasks) > 1:
            return self._split(job_id, tasks, len(body), "client")
        try:
            reply = self._rest.call("POST", path("jobs", job_id, "addtaskcollection"),
                                    body=body)
        except ServiceError as err:
            if err.code == "JobCompleted" and self._sealed(job_id):
                # sealed by an earlier delivery (fanout seals only after every task was
                # added), then completed: these tasks exist already
                log.info("batch.tasks_exist", job_id=job_id, tasks=len(tasks),
                         why="job sealed and completed")
                return AddResult(existed=len(tasks))
            if err.code != "RequestBodyTooLarge" and err.status != 413:
                raise self._job_fault(err, f"add tasks to job {job_id}") from None
            if len(tasks) == 1:
                raise BatchRejected(f"RequestBodyTooLarge: task {tasks[0].id} alone is "
                                    f"{len(body)} bytes, over the service's limit") from None
            return self._split(job_id, tasks, len(body), "service")
        return wire.parse_add_results(reply.body, tasks)

    def _split(self, job_id: str, tasks: Sequence[TaskSpec], size: int,
               by: str) -> AddResult:
        half = len(tasks) // 2
        log.info("batch.request_split", job_id=job_id, tasks=len(tasks), bytes=size, by=by)
        result = self._add_chunk(job_id, tasks[:half])
        return _merge(result, self._add_chunk(job_id, tasks[half:]))

    def _job_fault(self, err: ServiceError, what: str) -> Exception:
        if err.code == "JobNotFound":
            # deleted since it was created: a redelivery creates it again
            return SystemFault(f"{what}: JobNotFound: {err.message}")
        if err.code == "JobCompleted":
            # terminated (cancelled, or sealed and done): no task can be added any more
            return BatchRejected(f"{what}: the job is completed: {err.message}",
                                 reason="JobCompleted")
        return classify(err, what=what)

    def _logs_prefix(self, job_id: str, task_id: str) -> str | None:
        if not self._logs_container:
            return None
        return f"{self._logs_container}/{job_id}/{task_id}/"

    def _sealed(self, job_id: str) -> bool:
        """True when the job is set to terminate when its tasks complete (an earlier
        delivery sealed it); False when it is not, or cannot be read, and for a window
        job (``fanout-window``): the monitor seals those, so a task refused by one that
        completed was never added (the submitter runs its event on its own)."""
        try:
            reply = self._rest.call("GET", path("jobs", job_id),
                                    params={"$select": "id,onAllTasksComplete,metadata"})
        except ServiceError:
            return False
        body = reply.body or {}
        if any(isinstance(m, dict) and m.get("name") == META_WINDOW
               for m in body.get("metadata") or []):
            return False
        mode = str(body.get("onAllTasksComplete", "")).lower()
        return mode == "terminatejob"

    def _remember_pool(self, job_id: str, pool: str) -> None:
        with self._lock:
            if len(self._job_pools) >= _JOB_POOLS_MAX:
                self._job_pools.pop(next(iter(self._job_pools)))
            self._job_pools[job_id.lower()] = pool

    def _job_pool(self, job_id: str) -> str | None:
        """The job's pool: as created or found here, else read from the job."""
        with self._lock:
            pool = self._job_pools.get(job_id.lower())
        if pool is not None:
            return pool
        try:
            reply = self._rest.call("GET", path("jobs", job_id),
                                    params={"$select": "id,poolInfo"})
        except ServiceError as err:
            raise self._job_fault(err, f"get job {job_id}") from None
        found = ((reply.body or {}).get("poolInfo") or {}).get("poolId")
        if not found:
            return None  # an auto pool: nothing to hold the tasks against
        self._remember_pool(job_id, str(found))
        return str(found)

    def _check_containers(self, job_id: str, tasks: Sequence[TaskSpec]) -> None:
        """``ConfigFault`` when a task's container settings do not fit the job's pool
        (:func:`wire.container_problem`: a container task on a pool without a container
        configuration, a plain task on a container pool, a registry identity the pool
        does not have); a warning, once per pool and image, for an image the pool does
        not prefetch and no registry covers (:func:`wire.container_warning`). Either
        error means the programs and the pool disagree: the configuration is wrong, not
        the message. The tasks of a job share a few settings objects, so each distinct
        one is checked once per call."""
        if not tasks:
            return
        pool = self._job_pool(job_id)
        if pool is None:
            return
        with self._lock:
            known = pool in self._pool_containers
        if not known:
            self._check_pool(pool, force=True)
        with self._lock:
            containers = self._pool_containers.get(pool)
        seen: set[int] = set()
        for task in tasks:
            settings = task.container
            if id(settings) in seen:
                continue
            seen.add(id(settings))
            problem = wire.container_problem(pool, containers, settings)
            if problem is not None:
                code, text = problem
                raise ConfigFault(f"task {task.id} of job {job_id}: {text}", code=code)
            if containers is not None and settings is not None:
                self._warn_image(pool, containers, settings)

    def _warn_image(self, pool: str, containers: wire.PoolContainers,
                    settings: ContainerSettings) -> None:
        warning = wire.container_warning(containers, settings)
        if warning is None:
            return
        with self._lock:
            if (pool, settings.image) in self._container_warned:
                return
            self._container_warned.add((pool, settings.image))
        log.warning("batch.container_image_unregistered", pool=pool, image=settings.image,
                    detail=warning)

    def _existing_job_state(self, job_id: str) -> JobState:
        try:
            reply = self._rest.call("GET", path("jobs", job_id),
                                    params={"$select": "id,state,onAllTasksComplete"})
        except ServiceError as err:
            raise classify(err, what=f"get job {job_id}") from None
        mode = str((reply.body or {}).get("onAllTasksComplete", "")).lower()
        state: JobState = "sealed" if mode == "terminatejob" else "exists"
        log.info("batch.job_exists", job_id=job_id, state=state)
        return state

    def _check_pool(self, pool: str, *, force: bool = False) -> None:
        """``ConfigFault`` unless the pool exists. The service accepts a job whose pool
        does not exist (its tasks then wait forever), so fanout looks first; an answer
        is trusted for ``POOL_CHECK_TTL`` seconds."""
        now = time.monotonic()
        with self._lock:
            checked = self._pool_checked.get(pool)
        if not force and checked is not None and now - checked < POOL_CHECK_TTL:
            return
        try:
            reply = self._rest.call("GET", path("pools", pool), params={
                "$select": "id,state,virtualMachineConfiguration,identity"})
        except ServiceError as err:
            if err.status == 404 and err.code in ("PoolNotFound", "HTTP404"):
                raise ConfigFault(f"pool {pool} does not exist in the Batch account",
                                  code="PoolNotFound") from None
            raise classify(err, what=f"get pool {pool}") from None
        body = reply.body or {}
        if str(body.get("state", "active")).lower() == "deleting":
            raise ConfigFault(f"pool {pool} is being deleted", code="PoolBeingDeleted")
        containers = wire.pool_containers(body)
        with self._lock:
            self._pool_checked[pool] = now
            self._pool_containers[pool] = containers

    def _with_counts(self, job: dict[str, Any]) -> JobStatus:
        job_id = str(job.get("id"))
        counts: dict[str, int] = {}
        try:
            reply = self._rest.call("GET", path("jobs", job_id, "taskcounts"))
            counts = wire.task_counts(reply.body)
        except ServiceError as err:
            if err.status != 404:
                raise classify(err, what=f"task counts of job {job_id}") from None
        return JobStatus(
            id=job_id, state=str(job.get("state", "unknown")),
            pool=(job.get("poolInfo") or {}).get("poolId"),
            display_name=job.get("displayName"), created=job.get("creationTime"),
            counts={k: counts[k] for k in ("active", "running", "completed") if k in counts},
            succeeded=counts.get("succeeded", 0), failed=counts.get("failed", 0),
            metadata=wire.metadata(job.get("metadata")))

    def _node_counts(self, stats: BackendStats) -> list[str]:
        """Fill ``pool_nodes`` from the node counts API; return the pools reported."""
        with self._lock:
            wanted = {p.lower(): p for p in self._pools}
        items = self._rest.get_pages("/nodecounts", {"maxresults": 10})
        seen: list[str] = []
        for item in items:
            pool = str(item.get("poolId"))
            if wanted and pool.lower() not in wanted:
                continue
            seen.append(pool)
            nodes = stats.pools.setdefault(pool, PoolCapacity(pool=pool)).nodes
            for prefix, key in (("", "dedicated"), ("lowpriority_", "lowPriority")):
                for state, count in (item.get(key) or {}).items():
                    if isinstance(count, int):
                        stats.pool_nodes[pool, prefix + state] = count
                        if state != "total":  # admission: dedicated and spot summed
                            nodes[state] = nodes.get(state, 0) + count
        return list(wanted.values()) if wanted else seen

    def _pool_size(self, pool: str, stats: BackendStats) -> None:
        """One get pool (``$select``ed): sizes for ``pool_size``, and for admission the
        allocation state and its transition time, resize errors, autoscale and task
        slots per node (BatchPool in the REST spec)."""
        capacity = stats.pools.setdefault(pool, PoolCapacity(pool=pool))
        try:
            reply = self._rest.call("GET", path("pools", pool),
                                    params={"$select": _POOL_STATS_SELECT})
        except ServiceError as err:
            if err.status == 404:
                log.warning("batch.pool_missing", pool=pool)
                capacity.exists = False
                return
            raise
        body = reply.body or {}
        for which, key in (("current_dedicated", "currentDedicatedNodes"),
                           ("target_dedicated", "targetDedicatedNodes"),
                           ("current_low_priority", "currentLowPriorityNodes"),
                           ("target_low_priority", "targetLowPriorityNodes")):
            stats.pool_size[pool, which] = int(body.get(key) or 0)
        _fill_capacity(body, capacity)

    def _job_stats(self, stats: BackendStats) -> None:
        jobs = self._rest.get_pages("/jobs", {"$filter": "state eq 'active'",
                                              "$select": "id,metadata,poolInfo"})
        stats.active_jobs = len(jobs)
        ours = [j for j in jobs
                if wire.FANOUT_METADATA_KEY in wire.metadata(j.get("metadata"))]
        if len(ours) > self._max_jobs_per_poll:
            log.info("batch.job_stats_capped", active_fanout_jobs=len(ours),
                     read=self._max_jobs_per_poll)
        totals = dict.fromkeys(("active", "running", "completed", "succeeded", "failed"), 0)
        by_pool = {p.lower(): c for p, c in stats.pools.items()}  # ids: case-insensitive
        for job in ours[:self._max_jobs_per_poll]:
            try:
                reply = self._rest.call("GET", path("jobs", str(job["id"]), "taskcounts"))
            except ServiceError as err:
                if err.status == 404:
                    continue  # deleted since it was listed
                raise
            counts = wire.task_counts(reply.body)
            for key, value in counts.items():
                totals[key] += value
            # admission: fanout's pending tasks per pool, from the same counts
            capacity = by_pool.get(str((job.get("poolInfo") or {}).get("poolId")).lower())
            if capacity is not None:
                capacity.pending += counts["active"]
                capacity.running += counts["running"]
        stats.job_tasks = totals


#: The task properties a moved task's copy keeps (those Tasks_CreateTaskCollection
#: takes; its dependencies are none: only jobs without dependencies lose tasks).
_TASK_COPY = frozenset({"id", "displayName", "commandLine", "containerSettings",
                        "resourceFiles", "outputFiles", "environmentSettings", "constraints",
                        "requiredSlots", "exitConditions", "userIdentity",
                        "applicationPackageReferences"})


def _preempted(pool: str, node: dict[str, Any]) -> list[Preemption]:
    """The tasks a preempted node was running: its ``recentTasks`` not completed, or
    completed after the node entered ``preempted`` (requeued, then run elsewhere)."""
    if str(node.get("state") or "").lower() != "preempted":
        return []
    at = wire.parse_time(node.get("stateTransitionTime"))
    found: list[Preemption] = []
    for item in node.get("recentTasks") or []:
        if not isinstance(item, dict) or not item.get("jobId") or not item.get("taskId"):
            continue
        if item.get("subtaskId") not in (None, 0):
            continue  # a multi-instance subtask: its task is counted once
        if str(item.get("taskState") or "").lower() == "completed":
            ended = wire.parse_time((item.get("executionInfo") or {}).get("endTime"))
            if at is None or ended is None or ended < at:
                continue
        found.append(Preemption(pool=pool, node_id=str(node.get("id")), at=at,
                                job_id=str(item["jobId"]), task_id=str(item["taskId"])))
    return found


def make_credential(batch: BatchConfig) -> AzureNamedKeyCredential | TokenCredential:
    """Shared key when ``batch.account_key`` is set, else an Entra ID credential."""
    if batch.account_key is not None:
        name = batch.account_name or account_name(batch.account_url or "")
        if not name or name.replace(".", "").isdigit():
            raise SettingsError("batch.account_name is required with batch.account_key "
                                "when the account URL does not start with it")
        return AzureNamedKeyCredential(name, batch.account_key.get_secret_value())
    from azure.identity import DefaultAzureCredential

    client_id = batch.managed_identity_client_id
    if client_id:
        # the same user-assigned identity on a VM (IMDS) or AKS (workload identity)
        return DefaultAzureCredential(managed_identity_client_id=client_id,
                                      workload_identity_client_id=client_id)
    return DefaultAzureCredential()


_EPOCH = datetime.fromtimestamp(0).astimezone()


def _fill_capacity(body: dict[str, Any], capacity: PoolCapacity) -> None:
    """A get pool answer's fields admission reads (BatchPool in the REST spec):
    ``allocationState`` and ``allocationStateTransitionTime``, ``resizeErrors``
    (ResizeError: ``code``, ``message``; "set only if one or more errors occurred during
    the last Pool resize, and only when the Pool allocationState is Steady"),
    ``enableAutoScale``, ``taskSlotsPerNode`` ("The default value is 1") and the sizes."""
    sizes = {key: int(body.get(key) or 0) for key in (
        "currentDedicatedNodes", "targetDedicatedNodes", "currentLowPriorityNodes",
        "targetLowPriorityNodes")}
    capacity.current_dedicated = sizes["currentDedicatedNodes"]
    capacity.target_dedicated = sizes["targetDedicatedNodes"]
    capacity.current_low_priority = sizes["currentLowPriorityNodes"]
    capacity.target_low_priority = sizes["targetLowPriorityNodes"]
    capacity.current = capacity.current_dedicated + capacity.current_low_priority
    capacity.target = capacity.target_dedicated + capacity.target_low_priority
    capacity.allocation_state = str(body.get("allocationState") or "steady").lower()
    capacity.allocation_changed = wire.parse_time(body.get("allocationStateTransitionTime"))
    capacity.autoscale = bool(body.get("enableAutoScale"))
    slots = body.get("taskSlotsPerNode")
    capacity.slots_per_node = slots if isinstance(slots, int) and slots > 0 else 1
    capacity.resize_errors = [
        ResizeError(code=str(e.get("code") or "Unknown"), message=redact(str(e.get("message")
                                                                          or ""))[:300])
        for e in body.get("resizeErrors") or [] if isinstance(e, dict)]


def _status(job: dict[str, Any]) -> JobStatus:
    """A listed job as a :class:`JobStatus` without counts."""
    return JobStatus(id=str(job.get("id")), state=str(job.get("state", "unknown")),
                     pool=(job.get("poolInfo") or {}).get("poolId"),
                     display_name=job.get("displayName"), created=job.get("creationTime"),
                     metadata=wire.metadata(job.get("metadata")))


def _blocks(task: dict[str, Any]) -> bool:
    """True when a failed task's exit options block its dependents."""
    info = task.get("executionInfo") or {}
    _category, end = wire.failure_category(info)
    exit_code = info.get("exitCode")
    conditions = wire.exit_conditions(task.get("exitConditions")) or ExitConditions()
    _job, dependency = conditions.options_for(
        end, exit_code if isinstance(exit_code, int) else None)
    return dependency == "block"


def _blocked(waiting: list[dict[str, Any]], blocking: set[str]) -> list[str]:
    """The waiting tasks that depend, directly or through other waiting tasks, on a
    blocking task (ids compared case-insensitively, as Batch does)."""
    bad = set(blocking)
    bad_ints = {int(i) for i in bad if _INT_ID.match(i)}
    deps = {str(t.get("id")): t.get("dependsOn") or {} for t in waiting}
    blocked: list[str] = []
    pending = dict(deps)
    changed = True
    while changed and pending:
        changed = False
        for task_id, depends in list(pending.items()):
            ids = (str(d).lower() for d in depends.get("taskIds") or [])
            hit = any(d in bad for d in ids) or any(
                int(r.get("start", 0)) <= n <= int(r.get("end", -1))
                for r in depends.get("taskIdRanges") or [] for n in bad_ints)
            if hit:
                blocked.append(task_id)
                del pending[task_id]
                bad.add(task_id.lower())
                if _INT_ID.match(task_id):
                    bad_ints.add(int(task_id))
                changed = True
    order = {task_id: i for i, task_id in enumerate(deps)}
    return sorted(blocked, key=order.__getitem__)


def _wall_seconds(task: dict[str, Any]) -> float | None:
    """A listed task's last attempt in seconds (``executionInfo.endTime - startTime``);
    None for a task that never started or has not ended."""
    info = task.get("executionInfo")
    if not isinstance(info, dict):
        return None
    start = wire.parse_time(info.get("startTime"))
    end = wire.parse_time(info.get("endTime"))
    if start is None or end is None:
        return None
    return max(0.0, (end - start).total_seconds())


def _slots(task: dict[str, Any]) -> int:
    """A listed task's ``requiredSlots`` (default 1)."""
    raw = task.get("requiredSlots")
    return raw if isinstance(raw, int) and not isinstance(raw, bool) and raw > 0 else 1


def _merge(total: AddResult, more: AddResult) -> AddResult:
    total.added += more.added
    total.existed += more.existed
    total.errors.extend(more.errors)
    return total


def _dumps(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode("utf-8")
