"""The job monitor's operations of the Azure Batch backend, against the Batch peer:
listing fanout's jobs with ``$filter``, task counts, failed and blocked tasks from
filtered, ``$select``ed task listings, terminate, delete and metadata updates, as the
REST spec (api-version 2025-06-01) describes them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from azure.core.credentials import AzureNamedKeyCredential

from handlers.base import (
    SATISFY_DEPENDENTS,
    BlobRef,
    ExitConditions,
    ExitOptions,
    JobSpec,
    TaskSpec,
)
from tests.fakes.batch_peer import BatchPeer
from worker.backends.azure import AzureBatchBackend
from worker.backends.azure.rest import ServiceError
from worker.backends.base import META_HANDLER, REASON_CANCELLED, TaskCounts
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


def test_list_fanout_jobs_keeps_only_fanout_jobs(peer: BatchPeer,
                                                 make_backend: MakeBackend) -> None:
    """A job without fanout-handler metadata is left out; records carry aware times."""
    backend = make_backend()
    backend.create_job(job("ours", metadata={**FANOUT, "fanout-key": "k1"}))
    backend.create_job(job("theirs", metadata={"owner": "someone"}))
    backend.create_job(job("bare"))
    before = requests_of(peer, "list_jobs")
    records = backend.list_fanout_jobs()
    assert [r.id for r in records] == ["ours"]
    assert requests_of(peer, "list_jobs") == before + 1
    record = records[0]
    assert record.metadata == {META_HANDLER: "sweep", "fanout-key": "k1"}
    assert (record.state, record.pool) == ("active", "fanout")
    assert record.created is not None and record.created.tzinfo is not None
    assert abs(record.created - datetime.now(UTC)) < timedelta(minutes=1)


def test_get_job_and_task_counts(peer: BatchPeer, make_backend: MakeBackend) -> None:
    """get_job reads one job; task_counts one request; both None for a missing job."""
    backend = make_backend()
    backend.create_job(job("j1", metadata=FANOUT))
    backend.add_tasks("j1", [TaskSpec(id=f"t{i}", command_line="x") for i in range(5)])
    peer.set_task_state("j1", "t0", "running")
    peer.set_task_state("j1", "t1", "completed", exit_code=0)
    peer.set_task_state("j1", "t2", "completed", exit_code=4)
    record = backend.get_job("j1")
    assert record is not None and record.id == "j1" and record.metadata == FANOUT
    before = requests_of(peer, "get_task_counts")
    assert backend.task_counts("j1") == TaskCounts(active=2, running=1, completed=2,
                                                   succeeded=1, failed=1)
    assert requests_of(peer, "get_task_counts") == before + 1
    assert backend.get_job("nope") is None
    assert backend.task_counts("nope") is None


def test_add_tasks_to_a_completed_job_is_rejected_as_job_completed(
        peer: BatchPeer, make_backend: MakeBackend) -> None:
    """409 JobCompleted on add to a job completed without a seal (terminated, so not
    every task was added) surfaces as BatchRejected with reason JobCompleted. (On a
    sealed job the tasks were all added before: see test_azure.py, they count as
    existed.)"""
    backend = make_backend()
    backend.create_job(job("done", metadata=FANOUT))
    backend.add_tasks("done", [TaskSpec(id="t0", command_line="x")])
    backend.terminate_job("done", "cancelled")
    with pytest.raises(BatchRejected) as rejected:
        backend.add_tasks("done", [TaskSpec(id="t1", command_line="x")])
    assert rejected.value.reason == "JobCompleted"


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
                        account_key=peer.key)  # type: ignore[arg-type]
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


def test_list_fanout_jobs_completed_since(peer: BatchPeer, make_backend: MakeBackend) -> None:
    """completed_since keeps every job not completed and the completed ones whose state
    changed at or after it, filtered by the service."""
    backend = make_backend()
    for name in ("old-done", "running", "new-done"):
        backend.create_job(job(name, metadata=FANOUT))
    backend.terminate_job("old-done", REASON_CANCELLED)
    old = backend.get_job("old-done")
    assert old is not None and old.state_changed is not None
    since = old.state_changed + timedelta(milliseconds=1)
    while datetime.now(UTC) <= since:
        pass
    backend.terminate_job("new-done", REASON_CANCELLED)
    assert sorted(r.id for r in backend.list_fanout_jobs(completed_since=since)) == [
        "new-done", "running"]
    assert sorted(r.id for r in backend.list_fanout_jobs()) == [
        "new-done", "old-done", "running"]
    done = {r.id: r for r in backend.list_fanout_jobs()}["new-done"]
    assert (done.state, done.terminate_reason) == ("completed", REASON_CANCELLED)
    assert done.end_time is not None and done.end_time.tzinfo is not None


def test_terminate_and_delete_are_idempotent(peer: BatchPeer,
                                             make_backend: MakeBackend) -> None:
    """Terminate sends the reason; again on a completed job, or on a missing one, is no
    error; delete removes the job, and again is no error."""
    backend = make_backend()
    backend.create_job(job("j", metadata=FANOUT))
    backend.terminate_job("j", REASON_CANCELLED)
    record = backend.get_job("j")
    assert record is not None
    assert (record.state, record.terminate_reason) == ("completed", REASON_CANCELLED)
    backend.terminate_job("j", REASON_CANCELLED)  # 409 JobCompleted: fine
    backend.terminate_job("absent", REASON_CANCELLED)  # 404: fine
    backend.delete_job("j")
    gone = backend.get_job("j")
    assert gone is None or gone.state == "deleting"
    backend.delete_job("j")
    backend.delete_job("absent")


def test_update_job_metadata_replaces_it_even_when_completed(
        peer: BatchPeer, make_backend: MakeBackend) -> None:
    """PATCH replaces the whole metadata list, on a completed job too."""
    backend = make_backend()
    backend.create_job(job("j", metadata={**FANOUT, "fanout-key": "k"}))
    backend.terminate_job("j", REASON_CANCELLED)
    backend.update_job_metadata("j", {**FANOUT, "fanout-reported": "ev-1"})
    record = backend.get_job("j")
    assert record is not None
    assert record.metadata == {META_HANDLER: "sweep", "fanout-reported": "ev-1"}


def test_seal_after_the_job_completed_is_done(peer: BatchPeer,
                                              make_backend: MakeBackend) -> None:
    """The peer answers a seal of a terminated job 409 JobCompleted: counted as done."""
    backend = make_backend()
    backend.create_job(job("j", metadata=FANOUT))
    backend.terminate_job("j", REASON_CANCELLED)
    backend.seal_job("j")
    record = backend.get_job("j")
    assert record is not None and record.state == "completed"


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


def test_blocked_tasks_run_versus_skip(peer: BatchPeer, make_backend: MakeBackend) -> None:
    """A fan-in task whose failed dependency satisfies (run) is not blocked; one whose
    failed dependency carries Batch's default (skip: block) is, and so is a task that
    waits on it; more active tasks than the limit give None."""
    backend = make_backend()
    tasks = [TaskSpec(id="1", command_line="x", exit_conditions=SATISFY_DEPENDENTS),
             TaskSpec(id="2", command_line="x"),
             TaskSpec(id="merge-run", command_line="x", depends_on=("1",)),
             TaskSpec(id="merge-skip", command_line="x", depends_on_ranges=((2, 2),)),
             TaskSpec(id="after", command_line="x", depends_on=("merge-skip",)),
             TaskSpec(id="free", command_line="x",
                      exit_conditions=ExitConditions(default=ExitOptions(
                          dependency_action="block")))]
    backend.create_job(job("j", tasks, metadata=FANOUT, uses_task_dependencies=True))
    backend.add_tasks("j", tasks)
    _fail(peer, "j", "1", 2, "FailureExitCode")
    _fail(peer, "j", "2", 2, "FailureExitCode")
    assert backend.blocked_tasks("j", limit=10) == ["merge-skip", "after"]
    assert backend.blocked_tasks("j", limit=3) is None  # four active tasks
