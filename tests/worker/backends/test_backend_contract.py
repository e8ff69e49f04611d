"""The ``Backend`` protocol's behaviour (worker/backends/base.py), one suite run against
every implementation: the local executor on a temporary home, and the Azure Batch
backend against the Batch peer (tests/fakes/batch_peer.py) over HTTP.

Each case takes the ``engine`` fixture: an :class:`Engine` holding the ``backend`` under
test and the few moves a test needs from "the service" itself, because on Azure
Batch tasks run on nodes that the backend does not drive. ``engine.task(id, exit=N)``
makes a task that ends with exit code N; ``engine.finish(job, {task: N})`` waits until
those tasks have completed (locally they run as processes and end by themselves; on the
peer they are completed with that exit code, as the service would report them);
``engine.hold(job, task)`` has a ``long_task`` running. Tests read the backend only
through the protocol.

A new implementation (say Kubernetes Jobs) gets this specification by adding one
``Engine`` subclass (its ``finish`` and ``hold``: how its tasks end, by themselves or
moved by its test peer) and one entry in ``ENGINES``: the ``engine`` fixture is
parametrized over that dict, so every case below runs against it too. Every case passes
on every implementation: the departures this suite found were fixed, none is marked as
expected to fail.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import pytest
from azure.core.credentials import AzureNamedKeyCredential

from handlers.base import SATISFY_DEPENDENTS, ExitConditions, ExitOptions, JobSpec, TaskSpec
from tests.fakes.batch_peer import BatchPeer
from worker.backends.azure import AzureBatchBackend
from worker.backends.base import (
    META_HANDLER,
    META_WINDOW,
    REASON_ALL_COMPLETE,
    REASON_BLOCKED,
    REASON_CANCELLED,
    REASON_USER,
    Backend,
    JobRecord,
    TaskCounts,
)
from worker.backends.local import LocalBackend
from worker.errors import BatchRejected, SystemFault

T = TypeVar("T")
FANOUT = {META_HANDLER: "sweep"}
MakePeer = Callable[..., BatchPeer]  # the make_peer fixture (conftest.py)


def wait_for(probe: Callable[[], T], what: str, timeout: float = 30.0) -> T:
    """Poll ``probe`` until it returns something truthy; fail after ``timeout`` (a hang)."""
    deadline = time.monotonic() + timeout
    while not (value := probe()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
    return value


def completed(backend: Backend, job_id: str) -> JobRecord:
    """Wait for the job to be completed; its record."""
    def probe() -> JobRecord | None:
        record = backend.get_job(job_id)
        return record if record is not None and record.state == "completed" else None
    found = wait_for(probe, f"job {job_id} to complete")
    assert found is not None
    return found


def spec(job_id: str, **kwargs: object) -> JobSpec:
    return JobSpec(tasks=iter(()), task_count=0, id=job_id, **kwargs)  # type: ignore[arg-type]


# -- the engines --------------------------------------------------------------------------


class Engine:
    """A backend under test and what the service does on its own."""

    kind: str = ""
    backend: Backend

    def task(self, task_id: str, exit: int = 0, **kwargs: object) -> TaskSpec:
        """A task that ends with exit code ``exit`` once it runs."""
        return TaskSpec(id=task_id, command_line="/bin/sh -c " + shlex.quote(f"exit {exit}"),
                        **kwargs)  # type: ignore[arg-type]

    def long_task(self, task_id: str, **kwargs: object) -> TaskSpec:
        """A task that runs until its job ends."""
        return TaskSpec(id=task_id, command_line="/bin/sh -c 'sleep 60'",
                        **kwargs)  # type: ignore[arg-type]

    def finish(self, job_id: str, exits: Mapping[str, int]) -> None:
        """Return once these tasks (made by :meth:`task` with these codes) completed."""
        raise NotImplementedError

    def hold(self, job_id: str, task_id: str) -> None:
        """Return once this :meth:`long_task` runs."""
        raise NotImplementedError

    def close(self) -> None:
        """Close the backend (and stop what the engine started)."""
        raise NotImplementedError


class LocalEngine(Engine):
    """The local executor, one slot (so a second task waits while a first runs)."""

    kind = "local"

    def __init__(self, home: Path) -> None:
        self.local = LocalBackend(home=home, slots=1, poll_interval=0.02, kill_grace=0.5)
        self.local.start()
        self.backend = self.local

    def finish(self, job_id: str, exits: Mapping[str, int]) -> None:
        def done() -> bool:
            infos = [self.local.task(job_id, t) for t in exits]
            return all(i is not None and i.state == "completed" for i in infos)
        wait_for(done, f"tasks {sorted(exits)} of {job_id} to complete")
        for task_id, code in exits.items():
            info = self.local.task(job_id, task_id)
            assert info is not None and info.exit_code == code, (task_id, info)

    def hold(self, job_id: str, task_id: str) -> None:
        wait_for(lambda: (i := self.local.task(job_id, task_id)) is not None
                 and i.state == "running", f"task {task_id} to run")

    def close(self) -> None:
        self.local.close()


class AzureEngine(Engine):
    """The Azure Batch backend on the peer; the test moves tasks as nodes would."""

    kind = "azure"

    def __init__(self, peer: BatchPeer) -> None:
        self.peer = peer
        self.azure = AzureBatchBackend(
            endpoint=peer.url, credential=AzureNamedKeyCredential(peer.account, peer.key),
            default_pool="fanout")
        self.backend = self.azure

    def finish(self, job_id: str, exits: Mapping[str, int]) -> None:
        for task_id, code in exits.items():
            self.peer.set_task_state(job_id, task_id, "completed", exit_code=code)

    def hold(self, job_id: str, task_id: str) -> None:
        self.peer.set_task_state(job_id, task_id, "running")

    def close(self) -> None:
        self.azure.close()


#: How to make each implementation's engine (from a temporary directory and the Batch
#: peer factory): a new implementation adds its entry here, and every case runs on it.
ENGINES: dict[str, Callable[[Path, MakePeer], Engine]] = {
    "local": lambda tmp, make_peer: LocalEngine(tmp / "home"),
    "azure": lambda tmp, make_peer: AzureEngine(make_peer()),
}


@pytest.fixture(params=sorted(ENGINES))
def engine(request: pytest.FixtureRequest, tmp_path: Path,
           make_peer: MakePeer) -> Iterator[Engine]:
    """Each implementation in turn."""
    made = ENGINES[request.param](tmp_path, make_peer)
    try:
        yield made
    finally:
        made.close()


# -- limits and probe -----------------------------------------------------------------------


def test_max_tasks_per_request_is_batchs_100_and_probe_passes(engine: Engine) -> None:
    """Both take chunks of 100 tasks (Azure Batch's add-collection limit); a healthy
    backend's probe raises nothing."""
    assert engine.backend.max_tasks_per_request == 100
    engine.backend.probe()


def test_a_chunk_of_max_tasks_per_request_is_added_whole(engine: Engine) -> None:
    b = engine.backend
    b.create_job(spec("j"))
    n = b.max_tasks_per_request
    result = b.add_tasks("j", [engine.task(f"t{i}") for i in range(n)])
    assert (result.added, result.existed, result.errors) == (n, 0, [])
    again = b.add_tasks("j", [engine.task(f"t{i}") for i in range(n)])
    assert (again.added, again.existed) == (0, n)


# -- create_job -------------------------------------------------------------------------------


def test_create_job_is_idempotent_and_knows_a_sealed_job(engine: Engine) -> None:
    """``created``, then ``exists`` (any case of the id), then ``sealed`` once sealed;
    still one job."""
    b = engine.backend
    assert b.create_job(spec("Job-1", metadata=FANOUT)) == "created"
    assert b.create_job(spec("job-1", metadata=FANOUT)) == "exists"
    assert b.create_job(spec("JOB-1", metadata=FANOUT)) == "exists"
    b.seal_job("job-1")
    assert b.create_job(spec("job-1", metadata=FANOUT)) == "sealed"
    assert [r.id.lower() for r in b.list_fanout_jobs()] == ["job-1"]


@pytest.mark.parametrize("job_id", ["", "x" * 65, "bad id", "a.b", "ü"])
def test_a_job_id_outside_batchs_rules_is_batch_rejected(engine: Engine, job_id: str) -> None:
    """Ids are 1-64 letters, digits, hyphens and underscores; 64 is allowed."""
    with pytest.raises(BatchRejected):
        engine.backend.create_job(spec(job_id))
    assert engine.backend.create_job(spec("x" * 64)) == "created"


# -- add_tasks --------------------------------------------------------------------------------


def test_add_tasks_counts_existing_tasks_whatever_their_case(engine: Engine) -> None:
    """A task id already in the job (any case, the same or an earlier chunk, a job id in
    another case) counts in ``existed`` and is never added twice."""
    b = engine.backend
    b.create_job(spec("dup"))
    first = b.add_tasks("dup", [engine.task("a"), engine.task("A"), engine.task("b")])
    assert (first.added, first.existed, first.errors) == (2, 1, [])
    second = b.add_tasks("DUP", [engine.task("B"), engine.task("c")])
    assert (second.added, second.existed, second.errors) == (1, 1, [])
    counts = b.task_counts("dup")  # locally the tasks may be running already
    assert counts is not None and counts.total == 3
    assert b.existing_tasks("dup", ["A", "b", "C", "nope"]) == {"A", "b", "C"}
    assert b.existing_tasks("missing", ["a"]) == set()


def test_a_redelivery_adds_only_the_missing_tasks(engine: Engine) -> None:
    """After a crash mid-submit, ``exists`` and the chunks sent again: the tasks added
    before count as existing, the rest are added, nothing is duplicated."""
    b = engine.backend
    assert b.create_job(spec("j")) == "created"
    for start in (0, 100):
        b.add_tasks("j", [engine.task(str(i)) for i in range(start, start + 100)])
    assert b.create_job(spec("j")) == "exists"
    totals = [b.add_tasks("j", [engine.task(str(i)) for i in range(s, s + 100)])
              for s in range(0, 300, 100)]
    assert sum(r.added for r in totals) == 100
    assert sum(r.existed for r in totals) == 200
    counts = b.task_counts("j")
    assert counts is not None and counts.total == 300


def test_dependencies_on_a_job_without_them_are_a_permanent_task_error(engine: Engine) -> None:
    """The task is not added (``TaskDependenciesNotSpecifiedOnJob``, not transient); the
    others of its chunk are."""
    b = engine.backend
    b.create_job(spec("j"))
    result = b.add_tasks("j", [engine.task("a"), engine.task("b", depends_on=("a",))])
    assert result.added == 1
    assert [(e.task_id, e.code, e.transient) for e in result.errors] == [
        ("b", "TaskDependenciesNotSpecifiedOnJob", False)]
    assert b.existing_tasks("j", ["a", "b"]) == {"a"}


@pytest.mark.parametrize("task_id", ["x" * 65, "no spaces", "a.b"])
def test_a_task_id_outside_batchs_rules_is_batch_rejected(engine: Engine,
                                                          task_id: str) -> None:
    """An invalid task id fails the whole request, as Batch's body validation does
    (400 InvalidPropertyValue): ``BatchRejected``, and no task of the chunk is added."""
    b = engine.backend
    b.create_job(spec("j"))
    with pytest.raises(BatchRejected):
        b.add_tasks("j", [engine.task("ok"), engine.task(task_id)])
    assert b.task_counts("j") == TaskCounts()


def test_a_64_character_task_id_is_allowed(engine: Engine) -> None:
    b = engine.backend
    b.create_job(spec("j"))
    assert b.add_tasks("j", [engine.task("t" * 64), engine.task("a_b-C9")]).added == 2


def test_adding_to_a_missing_job_is_a_system_fault(engine: Engine) -> None:
    """A job deleted after it was created: the add and the seal are transient faults,
    so the message's redelivery creates the job again (Azure: 404 JobNotFound)."""
    with pytest.raises(SystemFault):
        engine.backend.add_tasks("nope", [engine.task("a")])
    with pytest.raises(SystemFault):
        engine.backend.seal_job("nope")


def test_adding_to_a_job_terminated_before_its_seal_is_rejected(engine: Engine) -> None:
    """A job ended before every task was added (cancelled) takes no more tasks:
    ``BatchRejected`` with reason ``JobCompleted``."""
    b = engine.backend
    b.create_job(spec("j", metadata=FANOUT))
    b.add_tasks("j", [engine.task("t0")])
    b.terminate_job("j", REASON_CANCELLED)
    with pytest.raises(BatchRejected) as rejected:
        b.add_tasks("j", [engine.task("t1")])
    assert rejected.value.reason == "JobCompleted"


def test_adding_again_to_a_sealed_completed_job_counts_as_existed(engine: Engine) -> None:
    """An add sent again after its job was sealed and has completed: every task was
    added before the seal, so they count as existing; a seal sent again is done too."""
    b = engine.backend
    b.create_job(spec("j"))
    tasks = [engine.task(f"t{i}") for i in range(3)]
    assert b.add_tasks("j", tasks).added == 3
    b.seal_job("j")
    engine.finish("j", {t.id: 0 for t in tasks})
    completed(b, "j")
    b.seal_job("j")
    again = b.add_tasks("j", tasks)
    assert (again.added, again.existed, again.errors) == (0, 3, [])


def test_a_sealed_completed_window_job_takes_no_more_tasks(engine: Engine) -> None:
    """A window job (``fanout-window``) is sealed by the monitor whatever events are
    still to come: completed, it answers an add with ``BatchRejected`` ``JobCompleted``
    even though it was sealed, so the submitter runs a late event in a job of its own
    (worker/submit.py); ``existing_tasks`` tells an event whose tasks are in it."""
    b = engine.backend
    window = {**FANOUT, META_WINDOW: "2026-01-01T00:00:00Z/2026-01-01T01:00:00Z"}
    b.create_job(spec("w", metadata=window))
    assert b.add_tasks("w", [engine.task("e1-t0")]).added == 1
    b.seal_job("w")
    engine.finish("w", {"e1-t0": 0})
    completed(b, "w")
    for again in (["e1-t0"], ["e2-t0"]):
        with pytest.raises(BatchRejected) as rejected:
            b.add_tasks("w", [engine.task(t) for t in again])
        assert rejected.value.reason == "JobCompleted"
    assert b.existing_tasks("w", ["e1-t0", "e2-t0"]) == {"e1-t0"}


# -- seal, status and counts ---------------------------------------------------------------


def test_a_job_completes_only_after_its_seal(engine: Engine) -> None:
    """Every task completed leaves the job active until it is sealed; sealed while a
    task is still to end, it completes when that task does, with AllTasksComplete and
    its counts (one success, one failure)."""
    b = engine.backend
    b.create_job(spec("j", metadata=FANOUT))
    b.add_tasks("j", [engine.task("ok"), engine.task("bad", exit=3)])
    engine.finish("j", {"ok": 0})
    record = b.get_job("j")
    assert record is not None and (record.state, record.sealed) == ("active", False)
    b.seal_job("j")
    record = b.get_job("j")
    assert record is not None and record.sealed is True
    engine.finish("j", {"bad": 3})
    record = completed(b, "j")
    assert record.terminate_reason == REASON_ALL_COMPLETE
    assert record.end_time is not None and record.end_time.tzinfo is not None
    assert b.task_counts("j") == TaskCounts(completed=2, succeeded=1, failed=1)
    status = b.job_status("J")
    assert status is not None and (status.state, status.succeeded, status.failed) == (
        "completed", 1, 1)


def test_an_empty_job_completes_when_sealed(engine: Engine) -> None:
    b = engine.backend
    b.create_job(spec("empty", metadata=FANOUT))
    assert b.stats().active_jobs == 1
    b.seal_job("empty")
    status = b.job_status("empty")
    assert status is not None and status.state == "completed"
    assert b.stats().active_jobs == 0


def test_job_status_reads_the_job_and_its_counts(engine: Engine) -> None:
    """State, pool, display name, metadata and counts by state; None for no such job
    (ids compared case-insensitively)."""
    b = engine.backend
    pool = "local" if engine.kind == "local" else "fanout"
    b.create_job(spec("j", display_name="shown", metadata={**FANOUT, "k": "v"}))
    b.add_tasks("j", [engine.task("ok"), engine.task("bad", exit=2), engine.long_task("run"),
                      engine.task("wait")])
    engine.finish("j", {"ok": 0, "bad": 2})
    engine.hold("j", "run")
    status = b.job_status("J")
    assert status is not None
    assert (status.id.lower(), status.state, status.pool, status.display_name) == (
        "j", "active", pool, "shown")
    assert status.metadata == {**FANOUT, "k": "v"}
    assert {k: status.counts.get(k) for k in ("active", "running", "completed")} == {
        "active": 1, "running": 1, "completed": 2}
    assert (status.succeeded, status.failed) == (1, 1)
    assert b.task_counts("J") == TaskCounts(active=1, running=1, completed=2, succeeded=1,
                                            failed=1)
    assert b.job_status("absent") is None and b.task_counts("absent") is None
    assert b.stats().active_jobs == 1


def test_get_job_reads_one_job(engine: Engine) -> None:
    b = engine.backend
    b.create_job(spec("j1", metadata={**FANOUT, "fanout-key": "k1"}))
    record = b.get_job("J1")
    assert record is not None
    assert (record.id.lower(), record.state, record.metadata, record.sealed) == (
        "j1", "active", {**FANOUT, "fanout-key": "k1"}, False)
    assert record.pool is not None
    assert record.created is not None and record.created.tzinfo is not None
    assert abs(record.created - datetime.now(UTC)) < timedelta(minutes=5)
    assert record.terminate_reason is None and record.end_time is None
    assert b.get_job("nope") is None


def test_list_jobs_newest_first_up_to_the_limit(engine: Engine) -> None:
    b = engine.backend
    for name in ("a", "b", "c"):
        b.create_job(spec(name, metadata=FANOUT))
        time.sleep(0.002)  # distinct creation times (Batch's are in milliseconds)
    assert [j.id for j in b.list_jobs()] == ["c", "b", "a"]
    assert [j.id for j in b.list_jobs(limit=2)] == ["c", "b"]


def test_list_jobs_counts_are_optional_and_job_status_reads_them(engine: Engine) -> None:
    """The protocol: ``list_jobs`` may leave a job's counts empty (Azure reads none:
    one request per page, none per job); counts it gives are the job's, and
    ``job_status`` reads them on every backend."""
    b = engine.backend
    b.create_job(spec("j", metadata=FANOUT))
    b.add_tasks("j", [engine.long_task("t0"), engine.long_task("t1")])
    [listed] = b.list_jobs()
    assert (listed.id, listed.state, listed.metadata) == ("j", "active", FANOUT)
    if listed.counts:  # by state: locally one may have started
        assert sum(listed.counts.values()) == 2
    status = b.job_status("j")
    assert status is not None and sum(status.counts.values()) == 2


def test_stats_count_active_jobs_and_their_tasks(engine: Engine) -> None:
    """``active_jobs`` is the jobs not completed; ``job_tasks`` sums the task counts of
    fanout's active jobs by state."""
    b = engine.backend
    b.create_job(spec("a", metadata=FANOUT))
    b.create_job(spec("b", metadata=FANOUT))
    b.create_job(spec("done", metadata=FANOUT))
    b.seal_job("done")
    b.add_tasks("a", [engine.long_task("runs"), engine.task("waits")])
    b.add_tasks("b", [engine.task("waits")])
    engine.hold("a", "runs")
    stats = b.stats()
    assert stats.active_jobs == 2
    assert {k: stats.job_tasks.get(k) for k in ("active", "running", "completed")} == {
        "active": 2, "running": 1, "completed": 0}


def test_log_tails_of_no_task_are_none_and_names_are_checked(engine: Engine) -> None:
    b = engine.backend
    b.create_job(spec("j"))
    assert b.task_log_tail("j", "nobody") is None
    assert b.task_log_tail("missing", "t", "stdout.txt") is None
    with pytest.raises(ValueError):
        b.task_log_tail("j", "nobody", "../secrets")


# -- what the monitor reads -------------------------------------------------------------------


def test_list_fanout_jobs_keeps_fanouts_and_filters_completed_ones(engine: Engine) -> None:
    """Jobs without ``fanout-handler`` metadata are left out; ``completed_since`` keeps
    every job not completed and the completed ones whose state changed at or after it."""
    b = engine.backend
    for name in ("running", "early", "late"):
        b.create_job(spec(name, metadata=FANOUT))
    b.create_job(spec("foreign", metadata={"owner": "someone"}))
    b.create_job(spec("bare"))
    b.seal_job("early")
    early = b.get_job("early")
    assert early is not None and early.state_changed is not None
    since = early.state_changed + timedelta(milliseconds=1)
    wait_for(lambda: datetime.now(UTC) > since, "the clock to move on")
    b.terminate_job("late", REASON_CANCELLED)
    listed = {r.id: r for r in b.list_fanout_jobs()}
    assert sorted(listed) == ["early", "late", "running"]
    assert sorted(r.id for r in b.list_fanout_jobs(completed_since=since)) == [
        "late", "running"]
    late = listed["late"]
    assert (late.state, late.terminate_reason, late.metadata) == (
        "completed", REASON_CANCELLED, FANOUT)
    assert late.state_changed is not None and late.state_changed >= since
    assert late.end_time is not None and late.end_time.tzinfo is not None
    assert listed["early"].terminate_reason == REASON_ALL_COMPLETE
    running = listed["running"]
    assert (running.state, running.end_time, running.terminate_reason) == (
        "active", None, None)
    assert running.created is not None and running.created.tzinfo is not None


def test_failed_tasks_name_the_failures(engine: Engine) -> None:
    """Up to ``limit`` failed tasks with category, exit code, Batch's failure code and
    times; successes and tasks not run are not among them; none for a missing job."""
    b = engine.backend
    b.create_job(spec("j", metadata=FANOUT))
    b.add_tasks("j", [engine.task("ok"), engine.task("three", exit=3),
                      engine.task("four", exit=4), engine.task("five", exit=5)])
    engine.finish("j", {"ok": 0, "three": 3, "four": 4, "five": 5})
    failed = {t.id: t for t in b.failed_tasks("j", 10)}
    assert sorted(failed) == ["five", "four", "three"]
    three = failed["three"]
    assert (three.category, three.exit_code, three.failure_code, three.retry_count) == (
        "exit_code", 3, "FailureExitCode", 0)
    assert three.failure_message
    assert three.start_time is not None and three.end_time is not None
    assert three.start_time.tzinfo is not None and three.start_time <= three.end_time
    assert len(b.failed_tasks("j", 2)) == 2
    assert b.failed_tasks("j", 0) == []
    assert b.failed_tasks("missing", 10) == []


def test_blocked_tasks_follow_the_dependency_actions(engine: Engine) -> None:
    """A task whose failed dependency satisfies its dependents (policy run) is not
    blocked; one whose failed dependency blocks (Batch's default for a failure) is, and
    so is a task waiting on it; more active tasks than ``limit`` give None."""
    b = engine.backend
    b.create_job(spec("j", metadata=FANOUT, uses_task_dependencies=True))
    b.add_tasks("j", [
        engine.task("1", exit=2, exit_conditions=SATISFY_DEPENDENTS),
        engine.task("2", exit=2),
        engine.long_task("merge-run", depends_on=("1",)),
        engine.task("merge-skip", depends_on_ranges=((2, 2),)),
        engine.task("after", depends_on=("merge-skip",)),
        engine.long_task("free", exit_conditions=ExitConditions(
            default=ExitOptions(dependency_action="block"))),
    ])
    engine.finish("j", {"1": 2, "2": 2})
    assert b.blocked_tasks("j", limit=10) == ["merge-skip", "after"]
    assert b.blocked_tasks("j", limit=1) is None
    assert b.blocked_tasks("missing", limit=10) == []


def test_terminate_ends_running_tasks_and_keeps_the_reason(engine: Engine) -> None:
    """The job completes with the reason given; its running task ends as a failed,
    ``cancelled`` task (``TaskEnded``); a task not started stays active; terminating a
    completed or missing job changes nothing."""
    b = engine.backend
    b.create_job(spec("j", metadata=FANOUT))
    b.add_tasks("j", [engine.long_task("runs"), engine.task("queued")])
    engine.hold("j", "runs")
    b.terminate_job("J", REASON_USER)
    record = completed(b, "j")
    assert record.terminate_reason == REASON_USER
    [ended] = wait_for(lambda: b.failed_tasks("j", 10), "the running task to end")
    assert (ended.id, ended.category, ended.failure_code) == ("runs", "cancelled",
                                                             "TaskEnded")
    assert b.task_counts("j") == TaskCounts(active=1, completed=1, failed=1)
    b.terminate_job("j", REASON_BLOCKED)  # completed already: left as it is
    b.terminate_job("absent", REASON_USER)  # no such job: no error
    again = b.get_job("j")
    assert again is not None and again.terminate_reason == REASON_USER
    assert again.end_time == record.end_time


def test_delete_job_removes_it_and_frees_its_id(engine: Engine) -> None:
    b = engine.backend
    b.create_job(spec("Gone", metadata=FANOUT))
    b.add_tasks("gone", [engine.task("done"), engine.long_task("runs")])
    b.delete_job("GONE")
    assert b.get_job("gone") is None and b.job_status("gone") is None
    assert b.task_counts("gone") is None
    assert b.list_fanout_jobs() == []
    b.delete_job("gone")  # gone already: no error
    b.delete_job("absent")
    assert b.create_job(spec("gone")) == "created"


def test_update_job_metadata_replaces_it_even_when_completed(engine: Engine) -> None:
    b = engine.backend
    b.create_job(spec("j", metadata={**FANOUT, "fanout-key": "k"}))
    b.terminate_job("j", REASON_CANCELLED)
    b.update_job_metadata("J", {**FANOUT, "fanout-reported": "ev-1"})
    record = b.get_job("j")
    assert record is not None and record.state == "completed"
    assert record.metadata == {**FANOUT, "fanout-reported": "ev-1"}
    status = b.job_status("j")
    assert status is not None and status.metadata == record.metadata


def test_update_job_metadata_of_a_missing_job_is_no_error(engine: Engine) -> None:
    """Like terminate and delete, a job that is gone is left as it is (the monitor
    marks jobs it listed, which may be deleted since)."""
    engine.backend.update_job_metadata("missing", FANOUT)
    assert engine.backend.get_job("missing") is None


def test_a_seal_after_the_job_completed_is_done(engine: Engine) -> None:
    """A seal of a job that was terminated is done, and the job stays completed."""
    b = engine.backend
    b.create_job(spec("j", metadata=FANOUT))
    b.terminate_job("j", REASON_CANCELLED)
    b.seal_job("j")
    record = b.get_job("j")
    assert record is not None
    assert (record.state, record.terminate_reason) == ("completed", REASON_CANCELLED)
