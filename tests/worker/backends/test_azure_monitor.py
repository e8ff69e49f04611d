"""The job monitor's operations of the Azure Batch backend, against the Batch peer:
listing fanout's jobs with ``$filter``, task counts, failed and blocked tasks from
filtered, ``$select``ed task listings, terminate, delete and metadata updates, as the
REST spec (api-version 2025-06-01) describes them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from azure.core.credentials import AzureNamedKeyCredential
from pydantic import SecretStr

from handlers.base import (
    BlobRef,
    JobSpec,
    TaskSpec,
)
from tests.fakes.batch_peer import BatchPeer
from worker.backends.azure import AzureBatchBackend
from worker.backends.azure.rest import ServiceError
from worker.backends.base import META_HANDLER, TaskCounts
from worker.config import BatchConfig, JobsConfig
from worker.errors import BatchRejected
from worker.storage.local import LocalStorage

MakeBackend = Callable[..., AzureBatchBackend]
FANOUT = {META_HANDLER: "sweep"}


@pytest.fixture
def make_backend(peer: BatchPeer) -> Iterator[MakeBackend]:
    backends: list[AzureBatchBackend] = []

    def make(**kwargs: Any) -> AzureBatchBackend:
        kwargs.setdefault("credential", AzureNamedKeyCredential(peer.account, peer.key))
        kwargs.setdefault("default_pool", "fanout")
        backend = AzureBatchBackend(endpoint=peer.url, **kwargs)
        backends.append(backend)
        return backend

    yield make
    for backend in backends:
        backend.close()


def job(job_id: str, tasks: list[TaskSpec] | None = None, **kwargs: Any) -> JobSpec:
    items = tasks or []
    return JobSpec(tasks=iter(items), task_count=len(items), id=job_id, **kwargs)


def requests_of(peer: BatchPeer, operation: str) -> int:
    return sum(n for (op, _), n in peer.requests.items() if op == operation)


# -- listing and reading jobs (the peer's existing operations) -------------------------


def test_monitor_reads_are_one_request_each(peer: BatchPeer,
                                            make_backend: MakeBackend) -> None:
    """Listing fanout's jobs is one list request (jobs without fanout-handler dropped
    here, not per job); one job's task counts one request. (What they return is in
    test_backend_contract.py.)"""
    backend = make_backend()
    backend.create_job(job("ours", metadata={**FANOUT, "fanout-key": "k1"}))
    backend.create_job(job("theirs", metadata={"owner": "someone"}))
    backend.create_job(job("bare"))
    before = requests_of(peer, "list_jobs")
    assert [r.id for r in backend.list_fanout_jobs()] == ["ours"]
    assert requests_of(peer, "list_jobs") == before + 1
    assert requests_of(peer, "get_job") == 0
    before = requests_of(peer, "get_task_counts")
    assert backend.task_counts("ours") == TaskCounts()
    assert requests_of(peer, "get_task_counts") == before + 1


def test_seal_answered_job_completed_counts_as_done(make_backend: MakeBackend,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A seal answered 409 JobCompleted (an earlier attempt took effect and the job
    completed since) returns normally; any other 409 is still an error."""
    backend = make_backend()
    codes = iter(["JobCompleted", "JobBeingDeleted"])

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise ServiceError(409, next(codes), "no")

    monkeypatch.setattr(backend._rest, "call", refuse)
    backend.seal_job("j")  # JobCompleted: done
    with pytest.raises(BatchRejected):
        backend.seal_job("j")  # JobBeingDeleted: not a seal that took effect


def test_from_config_takes_storage_and_jobs(peer: BatchPeer, tmp_path: Path) -> None:
    """The old call still works; with [jobs] and storage, logs are named and read;
    log_upload = never means no logs."""
    batch = BatchConfig(account_url=peer.url, account_name=peer.account,
                        account_key=SecretStr(peer.key))
    plain = AzureBatchBackend.from_config(batch)
    storage = LocalStorage(root=tmp_path)
    with_logs = AzureBatchBackend.from_config(batch, storage=storage,
                                              jobs=JobsConfig(logs_container="mylogs"))
    never = AzureBatchBackend.from_config(
        batch, storage=storage, jobs=JobsConfig(logs_container="mylogs", log_upload="never"))
    storage.upload(BlobRef("mylogs", "j/t/stderr.txt"), b"boom")
    try:
        assert plain.task_log_tail("j", "t") is None
        assert with_logs.task_log_tail("j", "t") == "boom"
        assert never.task_log_tail("j", "t") is None
        assert with_logs._logs_prefix("j", "t") == "mylogs/j/t/"
        assert never._logs_prefix("j", "t") is None
    finally:
        for backend in (plain, with_logs, never):
            backend.close()


def test_task_log_tail_reads_the_end(make_backend: MakeBackend, tmp_path: Path) -> None:
    """task_log_tail reads <logs_container>/<job>/<task>/<name>, at most max_bytes from
    its end, undecodable bytes replaced; None when the task uploaded nothing."""
    storage = LocalStorage(root=tmp_path)
    backend = make_backend(storage=storage, logs_container="fanout-logs")
    storage.upload(BlobRef("fanout-logs", "job-1/t3/stderr.txt"), b"x" * 10_000 + b"Traceback!")
    storage.upload(BlobRef("fanout-logs", "job-1/t3/stdout.txt"), "…done".encode())
    assert backend.task_log_tail("job-1", "t3", max_bytes=10) == "Traceback!"
    assert backend.task_log_tail("job-1", "t3", "stdout.txt", max_bytes=6) == "\ufffd\ufffddone"
    assert backend.task_log_tail("job-1", "t4") is None
    with pytest.raises(ValueError, match="unknown log file"):
        backend.task_log_tail("job-1", "t3", "../secrets")


# -- what needs the peer's new operations ------------------------------------------------


def _fail(peer: BatchPeer, job_id: str, task_id: str, exit_code: int | None,
          code: str) -> None:
    peer.set_task_state(job_id, task_id, "completed", exit_code=exit_code, failure_code=code)


def test_failed_tasks_categories_and_one_page(peer: BatchPeer, make_backend: MakeBackend,
                                              tmp_path: Path) -> None:
    """failed_tasks reads one filtered page: categories from failureInfo, exit codes,
    logs where they are uploaded; limit caps the page."""
    backend = make_backend(storage=LocalStorage(root=tmp_path), logs_container="fanout-logs")
    tasks = [TaskSpec(id=f"t{i}", command_line="x") for i in range(6)]
    backend.create_job(job("j", tasks, metadata=FANOUT))
    backend.add_tasks("j", tasks)
    peer.set_task_state("j", "t0", "completed", exit_code=0)
    _fail(peer, "j", "t1", 3, "FailureExitCode")
    _fail(peer, "j", "t2", None, "BlobNotFound")
    _fail(peer, "j", "t3", 0, "FileUploadMiscError")
    _fail(peer, "j", "t4", 137, "TaskEnded")
    before = requests_of(peer, "list_tasks")
    failed = {t.id: t for t in backend.failed_tasks("j", limit=10)}
    assert requests_of(peer, "list_tasks") == before + 1
    assert {k: (t.category, t.exit_code, t.failure_code) for k, t in failed.items()} == {
        "t1": ("exit_code", 3, "FailureExitCode"),
        "t2": ("resource_file_failure", None, "BlobNotFound"),
        "t3": ("output_upload_failure", 0, "FileUploadMiscError"),
        "t4": ("cancelled", 137, "TaskEnded")}
    assert failed["t1"].logs == "fanout-logs/j/t1/"
    assert len(backend.failed_tasks("j", limit=2)) == 2
    assert requests_of(peer, "list_tasks") == before + 2
    assert backend.failed_tasks("absent", limit=5) == []
