"""``AzureBatchBackend``: the Backend protocol on Azure Batch.

Job lifecycle (ARCHITECTURE.md): create the job with on-all-tasks-complete = no
action, add every task, then seal it (terminate the job when its tasks complete).
Each call is one REST request through the ``BatchClient``'s pipeline with a body built
as plain JSON (see ``wire.py`` for why); the submitter calls ``add_tasks`` from several
threads at once, bounds the requests in flight and retries ``SystemFault`` with
backoff.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from typing import Any

import structlog
from azure.core.credentials import AzureNamedKeyCredential, TokenCredential

from handlers.base import JobSpec, TaskSpec
from worker.backends.azure import wire
from worker.backends.azure.rest import Rest, ServiceError, account_name, classify, make_client, path
from worker.backends.base import AddResult, BackendStats, JobState, JobStatus
from worker.config import BatchConfig, SubmitConfig
from worker.errors import BatchRejected, ConfigFault, SettingsError, SystemFault

log = structlog.get_logger(__name__)

#: How long a pool found to exist is trusted before ``create_job`` looks again.
POOL_CHECK_TTL = 60.0
#: The job fields ``job_status`` and ``list_jobs`` read.
_JOB_SELECT = "id,state,poolInfo,displayName,creationTime,metadata"


class AzureBatchBackend:
    """Submits jobs and tasks to one Azure Batch account; safe across threads."""

    def __init__(self, *, endpoint: str, credential: AzureNamedKeyCredential | TokenCredential,
                 default_pool: str | None = None, pools: Sequence[str] = (),
                 connections: int = 10, read_timeout: float = 60.0,
                 max_jobs_per_poll: int = 50, max_body_bytes: int = wire.MAX_BODY_BYTES,
                 insecure_bearer: bool = False) -> None:
        """``default_pool`` takes jobs whose spec names none and is what ``probe`` reads;
        ``pools`` (plus the pools of jobs created) are what ``stats`` reports, every
        pool of the account when both are empty; ``connections`` sizes the HTTP
        connection pool (the submit concurrency plus the poller's).
        ``insecure_bearer`` lets Entra ID tokens go to an ``http://`` endpoint (tests
        only); otherwise that is a ``SettingsError``."""
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

    @classmethod
    def from_config(cls, batch: BatchConfig,
                    submit: SubmitConfig | None = None) -> AzureBatchBackend:
        """Build from ``[batch]``: shared key when ``account_key`` is set, else Entra ID
        through azure-identity's DefaultAzureCredential (see :func:`make_credential`);
        the connection pool holds the submit concurrency plus two."""
        if not batch.account_url:
            raise SettingsError("batch.account_url is not set")
        concurrency = submit.concurrency if submit is not None else 8
        return cls(endpoint=batch.account_url, credential=make_credential(batch),
                   default_pool=batch.pool, connections=concurrency + 2)

    # -- Backend protocol ---------------------------------------------------------------

    @property
    def max_tasks_per_request(self) -> int:
        return wire.MAX_TASKS_PER_REQUEST

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
            return self._existing_job_state(job.id)
        with self._lock:
            self._pools.setdefault(pool, None)
        log.info("batch.job_created", job_id=job.id, pool=pool,
                 dependencies=job.uses_task_dependencies)
        return "created"

    def add_tasks(self, job_id: str, tasks: Sequence[TaskSpec]) -> AddResult:
        """Add up to 100 tasks in one request (more are sent 100 at a time). A body
        over 1 MB is split in halves before sending, and again on
        ``RequestBodyTooLarge``; one task too large alone is ``BatchRejected``."""
        total = AddResult()
        size = wire.MAX_TASKS_PER_REQUEST
        for start in range(0, len(tasks), size):
            _merge(total, self._add_chunk(job_id, tasks[start:start + size]))
        return total

    def seal_job(self, job_id: str) -> None:
        """Set on-all-tasks-complete = terminate job."""
        body = _dumps({"onAllTasksComplete": "terminatejob"})
        try:
            self._rest.call("PATCH", path("jobs", job_id), body=body)
        except ServiceError as err:
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
        """The newest ``limit`` jobs with their task counts."""
        try:
            items = self._rest.get_pages("/jobs", {"$select": _JOB_SELECT})
        except ServiceError as err:
            raise classify(err, what="list jobs") from None
        items.sort(key=lambda j: str(j.get("creationTime") or ""), reverse=True)
        return [self._with_counts(item) for item in items[:limit]]

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

    def close(self) -> None:
        self._rest.close()
        close = getattr(self._credential, "close", None)
        if callable(close):  # azure-identity credentials hold HTTP sessions
            close()

    # -- internals ------------------------------------------------------------------------

    def _add_chunk(self, job_id: str, tasks: Sequence[TaskSpec]) -> AddResult:
        body = wire.collection_body(tasks)
        if len(body) > self._max_body_bytes and len(tasks) > 1:
            return self._split(job_id, tasks, len(body), "client")
        try:
            reply = self._rest.call("POST", path("jobs", job_id, "addtaskcollection"),
                                    body=body)
        except ServiceError as err:
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
        return classify(err, what=what)

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
            reply = self._rest.call("GET", path("pools", pool), params={"$select": "id,state"})
        except ServiceError as err:
            if err.status == 404 and err.code in ("PoolNotFound", "HTTP404"):
                raise ConfigFault(f"pool {pool} does not exist in the Batch account",
                                  code="PoolNotFound") from None
            raise classify(err, what=f"get pool {pool}") from None
        if str((reply.body or {}).get("state", "active")).lower() == "deleting":
            raise ConfigFault(f"pool {pool} is being deleted", code="PoolBeingDeleted")
        with self._lock:
            self._pool_checked[pool] = now

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
            for prefix, key in (("", "dedicated"), ("lowpriority_", "lowPriority")):
                for state, count in (item.get(key) or {}).items():
                    if isinstance(count, int):
                        stats.pool_nodes[pool, prefix + state] = count
        return list(wanted.values()) if wanted else seen

    def _pool_size(self, pool: str, stats: BackendStats) -> None:
        select = ("id,currentDedicatedNodes,targetDedicatedNodes,currentLowPriorityNodes,"
                  "targetLowPriorityNodes")
        try:
            reply = self._rest.call("GET", path("pools", pool), params={"$select": select})
        except ServiceError as err:
            if err.status == 404:
                log.warning("batch.pool_missing", pool=pool)
                return
            raise
        body = reply.body or {}
        for which, key in (("current_dedicated", "currentDedicatedNodes"),
                           ("target_dedicated", "targetDedicatedNodes"),
                           ("current_low_priority", "currentLowPriorityNodes"),
                           ("target_low_priority", "targetLowPriorityNodes")):
            stats.pool_size[pool, which] = int(body.get(key) or 0)

    def _job_stats(self, stats: BackendStats) -> None:
        jobs = self._rest.get_pages("/jobs", {"$filter": "state eq 'active'",
                                              "$select": "id,metadata"})
        stats.active_jobs = len(jobs)
        ours = [j for j in jobs
                if wire.FANOUT_METADATA_KEY in wire.metadata(j.get("metadata"))]
        if len(ours) > self._max_jobs_per_poll:
            log.info("batch.job_stats_capped", active_fanout_jobs=len(ours),
                     read=self._max_jobs_per_poll)
        totals = dict.fromkeys(("active", "running", "completed", "succeeded", "failed"), 0)
        for job in ours[:self._max_jobs_per_poll]:
            try:
                reply = self._rest.call("GET", path("jobs", str(job["id"]), "taskcounts"))
            except ServiceError as err:
                if err.status == 404:
                    continue  # deleted since it was listed
                raise
            for key, value in wire.task_counts(reply.body).items():
                totals[key] += value
        stats.job_tasks = totals


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


def _merge(total: AddResult, more: AddResult) -> AddResult:
    total.added += more.added
    total.existed += more.existed
    total.errors.extend(more.errors)
    return total


def _dumps(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode("utf-8")
