"""Tests for the Azure Batch backend: the real ``BatchClient`` against the local Batch
peer over HTTP, with shared-key signatures the peer verifies."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import pytest
from azure.core.credentials import AccessToken, AzureNamedKeyCredential
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from handlers.base import (
    ContainerSettings,
    JobSpec,
    OutputFile,
    ResourceFile,
    TaskSpec,
)
from tests.fakes.batch_peer import BatchPeer, FaultPlan
from worker.backends.azure import AzureBatchBackend
from worker.config import BatchConfig, JobsConfig, SubmitConfig
from worker.errors import BatchRejected, ConfigFault, SettingsError, SystemFault
from worker.metrics import Metrics
from worker.submit import Submitter

MakePeer = Callable[..., BatchPeer]  # the make_peer fixture (conftest.py)

MakeBackend = Callable[..., AzureBatchBackend]

FFMPEG = ContainerSettings("ghcr.io/x/ffmpeg:7")


@pytest.fixture
def make_backend(peer: BatchPeer) -> Iterator[MakeBackend]:
    """Backends on the peer (shared key unless a credential is given), closed afterwards."""
    backends: list[AzureBatchBackend] = []

    def make(target: BatchPeer | None = None, **kwargs: Any) -> AzureBatchBackend:
        target = target or peer
        kwargs.setdefault("credential", AzureNamedKeyCredential(target.account, target.key))
        kwargs.setdefault("default_pool", "fanout")
        backend = AzureBatchBackend(endpoint=target.url, **kwargs)
        backends.append(backend)
        return backend

    yield make
    for backend in backends:
        backend.close()


def job_spec(job_id: str = "job-1", n: int = 0, **kwargs: Any) -> JobSpec:
    tasks = [TaskSpec(id=f"t{i}", command_line=f"echo {i}") for i in range(n)]
    return JobSpec(tasks=iter(tasks), task_count=n, id=job_id, **kwargs)


def tasks(n: int, *, start: int = 0, env_bytes: int = 0) -> list[TaskSpec]:
    pad = "x" * env_bytes
    return [TaskSpec(id=f"t{i}", command_line=f"echo {i}",
                     environment={"PAD": pad} if env_bytes else {})
            for i in range(start, start + n)]


# -- job lifecycle --------------------------------------------------------------------


def test_create_job_sends_no_action_and_the_job_options(peer: BatchPeer,
                                                         make_backend: MakeBackend) -> None:
    """The job is created with on-all-tasks-complete = no action, its pool and options."""
    backend = make_backend()
    spec = job_spec(priority=50, max_task_retries=3, max_wall_clock=timedelta(hours=2),
                    display_name="sweep pi", metadata={"fanout-handler": "sweep"})
    assert backend.create_job(spec) == "created"
    job = peer.job("job-1")
    assert job is not None
    assert job.body == {
        "id": "job-1", "poolInfo": {"poolId": "fanout"}, "onAllTasksComplete": "noaction",
        "priority": 50, "displayName": "sweep pi",
        "constraints": {"maxTaskRetryCount": 3, "maxWallClockTime": "PT2H0M0S"},
        "metadata": [{"name": "fanout-handler", "value": "sweep"}],
    }


def test_dependencies_enabled_only_when_the_job_has_them(peer: BatchPeer,
                                                         make_backend: MakeBackend) -> None:
    """``usesTaskDependencies`` is sent for a job that uses them and omitted otherwise."""
    backend = make_backend()
    backend.create_job(job_spec("plain"))
    backend.create_job(job_spec("deps", uses_task_dependencies=True))
    plain, deps = peer.job("plain"), peer.job("deps")
    assert plain is not None and "usesTaskDependencies" not in plain.body
    assert deps is not None and deps.body["usesTaskDependencies"] is True


def test_sealed_job_completes_when_its_tasks_do(peer: BatchPeer,
                                                make_backend: MakeBackend) -> None:
    """Sealing sets terminate-job: the job completes when every task has completed."""
    backend = make_backend()
    backend.create_job(job_spec())
    backend.add_tasks("job-1", tasks(2))
    backend.seal_job("job-1")
    peer.set_task_state("job-1", "t0", "completed")
    assert (status := backend.job_status("job-1")) is not None and status.state == "active"
    peer.set_task_state("job-1", "t1", "completed", exit_code=1)
    status = backend.job_status("job-1")
    assert status is not None and status.state == "completed"
    assert (status.succeeded, status.failed) == (1, 1)


# -- task bodies ----------------------------------------------------------------------


def test_task_fields_reach_the_service_as_batch_json(peer: BatchPeer,
                                                     make_backend: MakeBackend) -> None:
    """Every TaskSpec field arrives as the Batch task JSON the SDK would send."""
    peer.add_pool("docker", container_images=["ghcr.io/x/ffmpeg:7"])  # the task has an image
    backend = make_backend(default_pool="docker")
    backend.create_job(job_spec(uses_task_dependencies=True))
    full = TaskSpec(
        id="full", command_line="ffmpeg -i in.mp4 out.mp4", environment={"A": "1", "B": "two"},
        resource_files=[ResourceFile(http_url="https://a.blob.core.windows.net/c/in.mp4?sig=s",
                                     file_path="in.mp4", file_mode="0644")],
        output_files=[OutputFile(file_pattern="out*.mp4", path="run/1",
                                 container_url="https://a.blob.core.windows.net/o?sig=w",
                                 upload_condition="completion")],
        depends_on=("t1", "t2"), depends_on_ranges=((10, 20),), max_task_retries=2,
        max_wall_clock=timedelta(days=1, minutes=30), retention=timedelta(seconds=90.5),
        required_slots=2, container=FFMPEG, display_name="transcode 1")
    result = backend.add_tasks("job-1", [full, TaskSpec(id="min", command_line="true",
                                                        container=FFMPEG)])
    assert (result.added, result.existed, result.errors) == (2, 0, [])
    plain = make_backend()  # a task without an image goes to a pool without containers
    plain.create_job(job_spec("job-2"))
    assert plain.add_tasks("job-2", [TaskSpec(id="min", command_line="true")]).added == 1
    received = {t["id"]: t for t in peer.tasks("job-1")}
    assert peer.tasks("job-2") == [{"id": "min", "commandLine": "true"}]
    assert received["min"] == {"id": "min", "commandLine": "true",
                               "containerSettings": {"imageName": "ghcr.io/x/ffmpeg:7"}}
    assert received["full"] == {
        "id": "full", "commandLine": "ffmpeg -i in.mp4 out.mp4", "displayName": "transcode 1",
        "environmentSettings": [{"name": "A", "value": "1"}, {"name": "B", "value": "two"}],
        "resourceFiles": [{"httpUrl": "https://a.blob.core.windows.net/c/in.mp4?sig=s",
                           "filePath": "in.mp4", "fileMode": "0644"}],
        "outputFiles": [{"filePattern": "out*.mp4",
                         "destination": {"container": {
                             "containerUrl": "https://a.blob.core.windows.net/o?sig=w",
                             "path": "run/1"}},
                         "uploadOptions": {"uploadCondition": "taskcompletion"}}],
        "dependsOn": {"taskIds": ["t1", "t2"], "taskIdRanges": [{"start": 10, "end": 20}]},
        "constraints": {"maxTaskRetryCount": 2, "maxWallClockTime": "P1DT0H30M0S",
                        "retentionTime": "PT0H1M30.5S"},
        "requiredSlots": 2, "containerSettings": {"imageName": "ghcr.io/x/ffmpeg:7"},
    }


# -- bulk submission --------------------------------------------------------------------


def test_sweep_of_5000_tasks_is_submitted_exactly_once_under_faults(
        make_peer: MakePeer, make_backend: MakeBackend) -> None:
    """With 20% of requests throttled, failing or dropped (some after taking effect),
    the submitter adds each of 5,000 tasks exactly once and seals the job."""
    peer = make_peer(faults=FaultPlan(throttle=0.05, unavailable=0.05, drop=0.05,
                                      drop_after=0.05, seed=7))
    backend = make_backend(peer, connections=10)
    config = SubmitConfig(concurrency=8, max_retries=12, backoff_base=0.001, backoff_max=0.01)
    submitter = Submitter(backend=backend, config=config,
                          metrics=Metrics(registry=CollectorRegistry()))
    try:
        result = submitter.submit(job_spec("sweep-1", 5000), handler="sweep")
    finally:
        submitter.close()
    received = [t["id"] for t in peer.tasks("sweep-1")]
    assert sorted(received) == sorted(f"t{i}" for i in range(5000))
    assert result.added + result.existed == 5000
    # a chunk whose answer was lost after it took effect is all "already exists" next time
    assert result.existed == 100 * peer.requests["add_task_collection", "dropped_after"]
    for outcome in ("throttled", "unavailable", "dropped", "dropped_after"):
        assert peer.outcomes[outcome] > 0, outcome
    job = peer.job("sweep-1")
    assert job is not None and job.on_all_tasks_complete == "terminatejob"


def test_add_tasks_from_many_threads_keeps_connections_pooled(
        peer: BatchPeer, make_backend: MakeBackend, caplog: pytest.LogCaptureFixture) -> None:
    """16 threads adding at once over a pool of 18 connections add every task, and
    urllib3 never discards a connection for a full pool."""
    backend = make_backend(connections=18)
    backend.create_job(job_spec())
    caplog.set_level(logging.WARNING, logger="urllib3")
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda s: backend.add_tasks("job-1", tasks(100, start=s)),
                                range(0, 3200, 100)))
    assert sum(r.added for r in results) == 3200
    assert len(peer.tasks("job-1")) == 3200
    assert not [r for r in caplog.records if "pool is full" in r.getMessage()]


def test_pool_from_config_holds_the_submitter_and_the_monitor_in_flight(
        make_peer: MakePeer, caplog: pytest.LogCaptureFixture) -> None:
    """``from_config`` sizes the connection pool for the submit concurrency and the
    monitor's (the same client serves both): 16 adds and 16 status reads in flight at
    once (50 ms each on the peer), twice, and urllib3 discards no connection, and the
    second round opens none (each request reuses a kept connection)."""
    peer = make_peer(faults=FaultPlan(latency=0.05))
    config = BatchConfig(account_url=peer.url, account_name=peer.account,
                         account_key=SecretStr(peer.key), pool="fanout")
    backend = AzureBatchBackend.from_config(config, SubmitConfig(concurrency=16),
                                            jobs=JobsConfig())
    start = threading.Barrier(32)

    def add(first: int) -> int:
        start.wait()
        return backend.add_tasks("job-1", tasks(10, start=first)).added

    def status(_: int) -> int:
        start.wait()
        found = backend.job_status("job-1")
        return 0 if found is None else 1

    try:
        backend.create_job(job_spec())
        caplog.set_level(logging.WARNING, logger="urllib3")
        opened: list[int] = []
        with ThreadPoolExecutor(32) as pool:
            for round_ in range(2):
                adds = [pool.submit(add, round_ * 1000 + i * 10) for i in range(16)]
                reads = [pool.submit(status, i) for i in range(16)]
                assert sum(f.result() for f in adds) == 160
                assert sum(f.result() for f in reads) == 16
                opened.append(peer.connections_opened)
    finally:
        backend.close()
    assert len(peer.tasks("job-1")) == 320
    assert not [r for r in caplog.records if "pool is full" in r.getMessage()]
    assert opened[1] == opened[0] <= 34


def test_pool_shape_is_read_once_for_many_callers_at_once(
        make_peer: MakePeer, make_backend: MakeBackend) -> None:
    """16 usage reads of jobs on one pool at once (50 ms a request on the peer) send
    one ``GET /pools/fanout`` between them, and all get its VM size and slots; later
    reads use the kept shape. For a pool that is gone, callers at once share one 404."""
    peer = make_peer(faults=FaultPlan(latency=0.05))
    backend = make_backend(peer, connections=20)
    backend.create_job(job_spec())
    start = threading.Barrier(16)

    def usage(pool_id: str) -> tuple[str | None, int | None]:
        start.wait()
        found = backend.job_usage("job-1", pool_id)
        assert found is not None
        return found.vm_size, found.slots_per_node

    def pool_reads() -> int:
        return sum(n for (op, _), n in peer.requests.items() if op == "get_pool")

    before = pool_reads()
    with ThreadPoolExecutor(16) as pool:
        shapes = set(pool.map(usage, ["fanout"] * 16))
        assert pool_reads() - before == 1
        assert len(shapes) == 1 and next(iter(shapes))[1] == 1
        assert backend.job_usage("job-1", "fanout") is not None
        assert pool_reads() - before == 1
        shapes = set(pool.map(usage, ["gone"] * 16))
    assert shapes == {(None, None)}
    assert pool_reads() - before == 2


def test_request_too_large_for_the_service_is_split(make_peer: MakePeer,
                                                    make_backend: MakeBackend) -> None:
    """A chunk the service answers ``RequestBodyTooLarge`` is split in halves until
    each part fits, and every task is added once."""
    peer = make_peer(max_body_bytes=200_000)
    backend = make_backend(peer)
    backend.create_job(job_spec())
    result = backend.add_tasks("job-1", tasks(100, env_bytes=4000))  # about 410 kB
    assert (result.added, result.errors) == (100, [])
    assert peer.outcomes["too_large"] >= 2  # 100 and both halves of 50
    assert sorted(len(ids) for ids in peer.add_requests) == [25, 25, 25, 25]
    assert len(peer.tasks("job-1")) == 100


def test_chunk_over_one_megabyte_is_split_before_sending(peer: BatchPeer,
                                                         make_backend: MakeBackend) -> None:
    """A chunk whose body is over 1 MB is split by the client: no request is refused."""
    backend = make_backend()
    backend.create_job(job_spec())
    result = backend.add_tasks("job-1", tasks(100, env_bytes=12_000))  # about 1.2 MB
    assert result.added == 100
    assert peer.outcomes["too_large"] == 0
    assert [len(ids) for ids in peer.add_requests] == [50, 50]


def test_one_task_too_large_alone_is_rejected(make_peer: MakePeer,
                                              make_backend: MakeBackend) -> None:
    """A single task over the service's limit is ``BatchRejected`` (retrying cannot help)."""
    peer = make_peer(max_body_bytes=50_000)
    backend = make_backend(peer)
    backend.create_job(job_spec())
    with pytest.raises(BatchRejected, match="RequestBodyTooLarge"):
        backend.add_tasks("job-1", tasks(2, env_bytes=60_000))


def test_redelivery_after_a_crash_counts_existing_tasks(peer: BatchPeer,
                                                        make_backend: MakeBackend) -> None:
    """A message delivered again after a crash mid-submit adds only the missing tasks:
    the ones added before count as existing and nothing is duplicated."""
    first = make_backend()
    assert first.create_job(job_spec()) == "created"
    for start in (0, 100, 200):  # the worker dies after 3 of 5 chunks
        first.add_tasks("job-1", tasks(100, start=start))
    first.close()
    second = make_backend()
    assert second.create_job(job_spec()) == "exists"
    totals = [second.add_tasks("job-1", tasks(100, start=s)) for s in range(0, 500, 100)]
    assert sum(r.added for r in totals) == 200
    assert sum(r.existed for r in totals) == 300
    assert len(peer.tasks("job-1")) == 500
    assert peer.task_outcomes["TaskExists"] == 300


def test_transient_fault_is_one_request_not_an_sdk_retry_loop(peer: BatchPeer,
                                                              make_backend: MakeBackend) -> None:
    """A 503 reaches the caller as ``SystemFault`` with Retry-After after one request:
    azure-core's own retries are off, the submitter owns retrying."""
    backend = make_backend()
    backend.create_job(job_spec())
    peer.set_faults(FaultPlan(unavailable=1.0, retry_after=3))
    with pytest.raises(SystemFault) as caught:
        backend.add_tasks("job-1", tasks(10))
    assert caught.value.retry_after == 3.0
    assert peer.requests["add_task_collection", "unavailable"] == 1
    peer.set_faults(FaultPlan(drop=1.0))
    with pytest.raises(SystemFault, match="connection failed"):
        backend.add_tasks("job-1", tasks(10))
    assert peer.requests["add_task_collection", "dropped"] == 1


# -- rejected input -----------------------------------------------------------------------


def test_task_the_service_rejects_is_batch_rejected(peer: BatchPeer,
                                                    make_backend: MakeBackend) -> None:
    """An invalid task id fails the request: ``BatchRejected`` with the service's code."""
    backend = make_backend()
    backend.create_job(job_spec())
    with pytest.raises(BatchRejected, match=r"InvalidPropertyValue: .*PropertyName=value\[1\]"):
        backend.add_tasks("job-1", [TaskSpec(id="ok", command_line="true"),
                                    TaskSpec(id="no spaces", command_line="true")])
    assert peer.tasks("job-1") == []


def test_per_task_errors_are_surfaced_not_swallowed(peer: BatchPeer,
                                                    make_backend: MakeBackend) -> None:
    """Dependencies on a job without them and an over-long dependency list come back
    as permanent task errors with the service's codes; the other tasks are added."""
    backend = make_backend()
    backend.create_job(job_spec())
    backend.create_job(job_spec("deps", uses_task_dependencies=True))
    result = backend.add_tasks("job-1", [TaskSpec(id="a", command_line="true"),
                                         TaskSpec(id="b", command_line="true", depends_on=("a",))])
    assert result.added == 1
    assert [(e.task_id, e.code, e.transient) for e in result.errors] == [
        ("b", "TaskDependenciesNotSpecifiedOnJob", False)]
    many = tuple(f"task-{i:010d}" for i in range(5000))  # 75,000 characters
    result = backend.add_tasks("deps", [TaskSpec(id="c", command_line="true", depends_on=many)])
    assert [(e.code, e.transient) for e in result.errors] == [("TaskDependencyListTooLong", False)]


def test_submitter_dead_letters_a_rejected_task(peer: BatchPeer,
                                                make_backend: MakeBackend) -> None:
    """Through the submitter a permanent task error is ``BatchRejected`` naming the task."""
    backend = make_backend()
    job = JobSpec(tasks=iter([TaskSpec(id="x", command_line="true", depends_on=("y",))]),
                  task_count=1, id="job-1")
    submitter = Submitter(backend=backend, config=SubmitConfig(),
                          metrics=Metrics(registry=CollectorRegistry()))
    try:
        with pytest.raises(BatchRejected, match="task x: TaskDependenciesNotSpecifiedOnJob"):
            submitter.submit(job, handler="sweep")
    finally:
        submitter.close()


# -- configuration faults ----------------------------------------------------------------


def test_wrong_key_is_a_config_fault_and_changes_nothing(peer: BatchPeer,
                                                         make_backend: MakeBackend) -> None:
    """A wrong shared key is refused by the peer: ``ConfigFault``, no job, no secret."""
    wrong = "V3JvbmdLZXlXcm9uZ0tleVdyb25nS2V5"
    backend = make_backend(credential=AzureNamedKeyCredential(peer.account, wrong))
    for call in (backend.probe, lambda: backend.create_job(job_spec()),
                 lambda: backend.add_tasks("job-1", tasks(1))):
        with pytest.raises(ConfigFault) as caught:
            call()
        assert caught.value.code == "AuthenticationFailed"
        assert wrong not in str(caught.value) and peer.key not in str(caught.value)
    assert peer.jobs() == []
    assert peer.outcomes["auth_failed"] == 3


def test_missing_pool_is_a_config_fault(make_peer: MakePeer, make_backend: MakeBackend) -> None:
    """A pool that does not exist is ``PoolNotFound`` from the probe and before any job
    is created, even where the service would accept the job."""
    peer = make_peer()  # like the service, the peer accepts a job for any pool
    backend = make_backend(peer, default_pool="missing")
    with pytest.raises(ConfigFault) as caught:
        backend.probe()
    assert caught.value.code == "PoolNotFound"
    with pytest.raises(ConfigFault, match="missing"):
        backend.create_job(job_spec())
    assert peer.jobs() == []


def test_pool_rule_of_the_peer_is_a_config_fault(make_peer: MakePeer,
                                                 make_backend: MakeBackend) -> None:
    """A ``PoolNotFound`` answer to creating the job is a ``ConfigFault`` as well."""
    # require_pool: the service never answers a job create with PoolNotFound (it accepts
    # the job), but fanout's mapping of that code, should it come, is still tested here
    peer = make_peer(require_pool=True)
    backend = make_backend(peer)
    backend.create_job(job_spec("warm"))  # the pool check is now cached
    peer.add_pool("other")
    with peer._lock:
        del peer._pools["fanout"]
    with pytest.raises(ConfigFault) as caught:
        backend.create_job(job_spec("cold"))
    assert caught.value.code == "PoolNotFound"


def test_active_job_quota_is_a_config_fault(make_peer: MakePeer,
                                            make_backend: MakeBackend) -> None:
    """Reaching the account's active job quota is a ``ConfigFault`` with its code."""
    peer = make_peer(max_active_jobs=1)
    backend = make_backend(peer)
    backend.create_job(job_spec("one"))
    with pytest.raises(ConfigFault) as caught:
        backend.create_job(job_spec("two"))
    assert caught.value.code == "ActiveJobAndScheduleQuotaReached"


def test_entra_token_is_sent_and_a_refused_one_is_a_config_fault(
        make_peer: MakePeer, make_backend: MakeBackend) -> None:
    """With a token credential the pipeline sends a bearer token for Batch's scope."""

    class Token:
        def __init__(self, token: str) -> None:
            self.token = token
            self.scopes: list[tuple[str, ...]] = []

        def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
            self.scopes.append(scopes)
            return AccessToken(self.token, int(time.time()) + 3600)

    peer = make_peer(bearer_token="good-token")
    good = Token("good-token")
    make_backend(peer, credential=good, insecure_bearer=True).probe()
    assert good.scopes == [("https://batch.core.windows.net//.default",)]
    with pytest.raises(ConfigFault):
        make_backend(peer, credential=Token("bad-token"), insecure_bearer=True).probe()


def test_entra_token_to_plain_http_is_refused_at_start(peer: BatchPeer) -> None:
    """Sending tokens to an ``http://`` endpoint is a start-up ``SettingsError``."""
    class Token:
        def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
            return AccessToken("t", int(time.time()) + 3600)

    with pytest.raises(SettingsError, match="https"):
        AzureBatchBackend(endpoint=peer.url, credential=Token())


def test_from_config_uses_the_shared_key(peer: BatchPeer) -> None:
    """``[batch]`` with ``account_key`` builds a shared-key backend that works."""
    config = BatchConfig(account_url=peer.url, account_name=peer.account,
                         account_key=SecretStr(peer.key), pool="fanout")
    backend = AzureBatchBackend.from_config(config, SubmitConfig(concurrency=4))
    try:
        backend.probe()
        assert backend.create_job(job_spec()) == "created"
    finally:
        backend.close()
    with pytest.raises(SettingsError, match="account_name"):
        AzureBatchBackend.from_config(BatchConfig(account_url=peer.url,
                                                  account_key=SecretStr(peer.key)))


# -- status and metrics ---------------------------------------------------------------------


def test_job_status_and_list_jobs_use_task_counts(peer: BatchPeer,
                                                  make_backend: MakeBackend) -> None:
    """Status comes from the task counts API; list_jobs is fanout's jobs, newest first,
    one request per page and no task counts per job."""
    backend = make_backend()
    backend.create_job(job_spec("older", metadata={"fanout-handler": "sweep"}))
    time.sleep(0.002)  # distinct creation times (millisecond resolution)
    backend.create_job(job_spec("newer", display_name="n", metadata={"fanout-handler": "x"}))
    time.sleep(0.002)
    backend.create_job(job_spec("foreign"))  # not fanout's: no fanout-handler metadata
    backend.add_tasks("older", tasks(4))
    peer.set_task_state("older", "t0", "running")
    peer.set_task_state("older", "t1", "completed", exit_code=2)
    status = backend.job_status("older")
    assert status is not None
    assert status.counts == {"active": 2, "running": 1, "completed": 1}
    assert (status.succeeded, status.failed, status.pool) == (0, 1, "fanout")
    assert status.metadata == {"fanout-handler": "sweep"}
    assert backend.job_status("absent") is None
    counts_before = sum(n for (op, _), n in peer.requests.items() if op == "get_task_counts")
    listed = backend.list_jobs()
    assert [j.id for j in listed] == ["newer", "older"]
    assert [(j.counts, j.display_name, j.metadata) for j in listed] == [
        ({}, "n", {"fanout-handler": "x"}), ({}, None, {"fanout-handler": "sweep"})]
    assert [j.id for j in backend.list_jobs(limit=1)] == ["newer"]
    counts_after = sum(n for (op, _), n in peer.requests.items() if op == "get_task_counts")
    assert counts_after == counts_before  # listing read no task counts
    # only jobs and task counts were read: no task was ever listed
    assert {op for op, _ in peer.requests} == {"get_pool", "create_job", "add_task_collection",
                                              "get_job", "list_jobs", "get_task_counts"}


def test_stats_read_pools_jobs_and_task_counts(peer: BatchPeer,
                                               make_backend: MakeBackend) -> None:
    """Node counts by state (low priority prefixed), pool sizes, active jobs and the
    task counts of fanout's active jobs come from the peer."""
    peer.add_pool("fanout", dedicated={"idle": 3, "running": 5, "startTaskFailed": 1},
                  low_priority={"preempted": 2, "running": 4}, target_dedicated=12,
                  target_low_priority=6)
    peer.add_pool("elsewhere", dedicated={"idle": 9})
    backend = make_backend()
    backend.create_job(job_spec("a", metadata={"fanout-handler": "sweep"}))
    backend.create_job(job_spec("b", metadata={"fanout-handler": "render"}))
    backend.create_job(job_spec("not-ours"))
    backend.add_tasks("a", tasks(3))
    backend.add_tasks("b", tasks(2))
    backend.add_tasks("not-ours", tasks(7))
    peer.set_task_state("a", "t0", "running")
    peer.set_task_state("b", "t0", "completed")
    stats = backend.stats()
    assert stats.pool_nodes["fanout", "idle"] == 3
    assert stats.pool_nodes["fanout", "running"] == 5
    assert stats.pool_nodes["fanout", "startTaskFailed"] == 1
    assert stats.pool_nodes["fanout", "total"] == 9
    assert stats.pool_nodes["fanout", "lowpriority_preempted"] == 2
    assert stats.pool_nodes["fanout", "lowpriority_total"] == 6
    assert not any(pool == "elsewhere" for pool, _ in stats.pool_nodes)
    assert stats.pool_size == {("fanout", "current_dedicated"): 9,
                               ("fanout", "target_dedicated"): 12,
                               ("fanout", "current_low_priority"): 6,
                               ("fanout", "target_low_priority"): 6}
    assert stats.active_jobs == 3
    assert stats.job_tasks == {"active": 3, "running": 1, "completed": 1, "succeeded": 1,
                               "failed": 0}


def test_stats_cap_the_jobs_read_per_poll(peer: BatchPeer, make_backend: MakeBackend) -> None:
    """At most ``max_jobs_per_poll`` task counts are read per call."""
    backend = make_backend(max_jobs_per_poll=2)
    for i in range(5):
        backend.create_job(job_spec(f"j{i}", metadata={"fanout-handler": "sweep"}))
    stats = backend.stats()
    assert stats.active_jobs == 5
    assert peer.requests["get_task_counts", "ok"] == 2


def test_stats_without_configured_pools_cover_the_account(peer: BatchPeer,
                                                          make_backend: MakeBackend) -> None:
    """With no pool configured, every pool of the account is reported."""
    peer.add_pool("second", low_priority={"idle": 1})
    stats = make_backend(default_pool=None).stats()
    assert {pool for pool, _ in stats.pool_nodes} == {"fanout", "second"}
    assert stats.pool_size["second", "current_low_priority"] == 1


def test_stats_faults_are_classified(peer: BatchPeer, make_backend: MakeBackend) -> None:
    """A throttled poll is a ``SystemFault``; the next one works."""
    backend = make_backend()
    peer.set_faults(FaultPlan(throttle=1.0, operations=frozenset({"list_node_counts"})))
    with pytest.raises(SystemFault):
        backend.stats()
    peer.set_faults(FaultPlan())
    assert backend.stats().pool_nodes["fanout", "idle"] == 2


def test_probe_is_cheap_and_passes_when_healthy(peer: BatchPeer,
                                                make_backend: MakeBackend) -> None:
    """The probe is one get-pool request."""
    make_backend().probe()
    assert peer.requests == {("get_pool", "ok"): 1}


def test_threads_share_one_backend_for_jobs_and_stats(peer: BatchPeer,
                                                      make_backend: MakeBackend) -> None:
    """Creating jobs, adding tasks and polling stats at once from threads all work."""
    backend = make_backend()
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            backend.create_job(job_spec(f"job-{i}", metadata={"fanout-handler": "sweep"}))
            backend.add_tasks(f"job-{i}", tasks(50))
            backend.stats()
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sum(len(peer.tasks(f"job-{i}")) for i in range(6)) == 300


# -- retries on completed jobs, containers, limits -------------------------------------


def test_add_retried_on_a_sealed_and_completed_job_counts_as_existed(
        peer: BatchPeer, make_backend: MakeBackend) -> None:
    """An add sent again after an earlier delivery added every task and sealed the job,
    which has completed since, answers 409 JobCompleted: the job says terminatejob, so
    the tasks exist; a seal sent again is done too."""
    backend = make_backend()
    backend.create_job(job_spec())
    assert backend.add_tasks("job-1", tasks(3)).added == 3
    backend.seal_job("job-1")
    for i in range(3):
        peer.set_task_state("job-1", f"t{i}", "completed")
    ended = peer.job("job-1")
    assert ended is not None and ended.state == "completed"
    again = backend.add_tasks("job-1", tasks(3))
    assert (again.added, again.existed, again.errors) == (0, 3, [])
    backend.seal_job("job-1")  # 409 JobCompleted: done
    assert peer.requests["update_job", "JobCompleted"] == 1
    assert peer.requests["add_task_collection", "JobCompleted"] == 1


def image_tasks(n: int, image: str | None) -> list[TaskSpec]:
    container = ContainerSettings(image) if image else None
    return [TaskSpec(id=f"t{i}", command_line="run", container=container) for i in range(n)]


def test_container_image_on_a_plain_pool_is_a_config_fault(
        peer: BatchPeer, make_backend: MakeBackend) -> None:
    """A task with an image on a pool without a container configuration is a
    ``ConfigFault`` naming the pool and the image, before any task is sent."""
    backend = make_backend()
    backend.create_job(job_spec())
    with pytest.raises(ConfigFault) as caught:
        backend.add_tasks("job-1", image_tasks(2, "repo/sim:2"))
    assert caught.value.code == "PoolNotContainerEnabled"
    assert "pool fanout" in str(caught.value) and "repo/sim:2" in str(caught.value)
    assert peer.add_requests == []


def test_no_image_on_a_container_pool_is_a_config_fault(
        peer: BatchPeer, make_backend: MakeBackend) -> None:
    """A task without an image on a container pool is a ``ConfigFault`` naming the pool
    and its images; with an image the tasks are added and the pool was read once."""
    peer.add_pool("docker", container_images=["repo/sim:2"])
    backend = make_backend(default_pool="docker")
    backend.create_job(job_spec("job-1"))
    with pytest.raises(ConfigFault) as caught:
        backend.add_tasks("job-1", image_tasks(2, None))
    assert caught.value.code == "ContainerImageRequired"
    assert "pool docker" in str(caught.value) and "repo/sim:2" in str(caught.value)
    assert peer.add_requests == []
    assert backend.add_tasks("job-1", image_tasks(2, "repo/sim:2")).added == 2
    assert peer.tasks("job-1")[0]["containerSettings"] == {"imageName": "repo/sim:2"}
    assert peer.requests["get_pool", "ok"] == 1


def test_containers_of_a_job_created_elsewhere_are_read_from_the_job(
        peer: BatchPeer, make_backend: MakeBackend) -> None:
    """A backend that did not create the job reads its pool from the job."""
    peer.add_pool("docker", container_images=[])
    make_backend(default_pool="docker").create_job(job_spec("job-1"))
    other = make_backend(default_pool="fanout")
    with pytest.raises(ConfigFault, match="pool docker"):
        other.add_tasks("job-1", image_tasks(1, None))
    assert peer.requests["get_job", "ok"] == 1


def test_a_body_of_exactly_the_limit_is_split_before_sending(
        make_peer: MakePeer, make_backend: MakeBackend) -> None:
    """"Less than 1MB": a body of exactly the limit is too large, so it is split by
    fanout and the service never answers RequestBodyTooLarge. (A small limit on both
    sides keeps the bodies small; the rule is the same at 1 MiB.)"""
    from worker.backends.azure import wire

    chunk = tasks(2, env_bytes=100)
    size = len(wire.collection_body(chunk))
    target = make_peer(max_body_bytes=size)
    backend = make_backend(target, max_body_bytes=size)
    backend.create_job(job_spec())
    assert backend.add_tasks("job-1", chunk).added == 2
    assert target.add_requests == [["t0"], ["t1"]]
    assert target.outcomes["too_large"] == 0


def test_backend_sees_only_documented_properties(peer: BatchPeer,
                                                 make_backend: MakeBackend) -> None:
    """Every answer the backend got in a whole job lifecycle, stats and monitor reads
    held only the spec's property names."""
    backend = make_backend()
    backend.probe()
    backend.create_job(job_spec())
    backend.add_tasks("job-1", tasks(3))
    backend.seal_job("job-1")
    peer.set_task_state("job-1", "t0", "completed", exit_code=2)
    backend.stats()
    backend.job_status("job-1")
    backend.list_jobs()
    backend.list_fanout_jobs()
    backend.failed_tasks("job-1", 10)
    backend.blocked_tasks("job-1", 10)
    backend.terminate_job("job-1", "done")
    assert len(peer.log) > 10 and peer.undocumented == []
