"""The local executor's job outcomes, as Azure Batch decides them: exit conditions and
dependency actions, job actions, the job's max wall clock, terminate and delete, and
what the job monitor reads (records, counts, failed and blocked tasks, log tails)."""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from handlers.base import (
    SATISFY_DEPENDENTS,
    ExitConditions,
    ExitOptions,
    OutputFile,
    ResourceFile,
    TaskSpec,
)
from tests.worker.backends.test_local import MakeBackend, alive, job, sh, task_of, wait_for
from worker.backends.base import (
    META_HANDLER,
    REASON_ALL_COMPLETE,
    REASON_BLOCKED,
    REASON_TASK_FAILED,
    REASON_USER,
    REASON_WALL_CLOCK,
    TaskCounts,
)
from worker.backends.local import LocalBackend
from worker.backends.local.store import Store
from worker.errors import BatchRejected

SATISFY = ExitOptions(dependency_action="satisfy")
BLOCK = ExitOptions(dependency_action="block")
FANOUT = {META_HANDLER: "sweep"}


@pytest.fixture
def make_backend(tmp_path: Path) -> Iterator[MakeBackend]:
    """LocalBackends under tmp_path (started unless told not to), closed at the end."""
    made: list[LocalBackend] = []

    def make(*, start: bool = True, slots: int = 2, **kwargs: Any) -> LocalBackend:
        kwargs.setdefault("poll_interval", 0.02)
        kwargs.setdefault("kill_grace", 0.5)
        backend = LocalBackend(home=tmp_path / "home", slots=slots, **kwargs)
        made.append(backend)
        if start:
            backend.start()
        return backend

    yield make
    for backend in reversed(made):
        backend.close()


def state(backend: LocalBackend, job_id: str, task_id: str) -> str | None:
    info = backend.task(job_id, task_id)
    return None if info is None else info.state


def completed(backend: LocalBackend, job_id: str) -> bool:
    record = backend.get_job(job_id)
    return record is not None and record.state == "completed"


def running(backend: LocalBackend, job_id: str, task_id: str) -> int | None:
    """The task's pid if it runs."""
    info = backend.task(job_id, task_id)
    return info.pid if info is not None and info.state == "running" else None


def started(backend: LocalBackend, job_id: str, task_id: str) -> int:
    """Wait for the task to run; its pid."""
    pid = wait_for(lambda: running(backend, job_id, task_id), f"task {task_id} to run")
    assert pid is not None
    return pid


def fan_in(conditions: ExitConditions | None) -> list[TaskSpec]:
    """Three tasks (task 1 exits 1) and an aggregate depending on the range 0..2."""
    return [TaskSpec(id=str(i), command_line=sh(f"exit {int(i == 1)}"),
                     exit_conditions=conditions) for i in range(3)] + [
        TaskSpec(id="agg", command_line=sh("touch $AZ_BATCH_NODE_SHARED_DIR/agg-ran"),
                 depends_on_ranges=((0, 2),))]


# -- dependency actions ---------------------------------------------------------------------


def test_fan_in_runs_when_failed_dependencies_satisfy(make_backend: MakeBackend) -> None:
    """policy "run": upstream tasks that satisfy their dependents whatever their end let
    the aggregate run after a failure; the sealed job then completes normally."""
    backend = make_backend()
    backend.create_job(job("j", uses_task_dependencies=True, metadata=FANOUT))
    backend.add_tasks("j", fan_in(SATISFY_DEPENDENTS))
    backend.seal_job("j")
    wait_for(lambda: completed(backend, "j"), "the job to complete")
    assert (backend.home / "shared" / "agg-ran").exists()
    assert task_of(backend, "j", "agg").result == "success"
    assert task_of(backend, "j", "1").result == "failure"
    record = backend.get_job("j")
    assert record is not None and record.terminate_reason == REASON_ALL_COMPLETE
    assert backend.task_counts("j") == TaskCounts(completed=4, succeeded=3, failed=1)
    assert backend.blocked_tasks("j", 10) == []


def test_fan_in_skips_when_a_failure_blocks(make_backend: MakeBackend) -> None:
    """policy "skip" (Batch's defaults): the aggregate and whatever depends on it wait for
    ever; blocked_tasks names them; terminating the job leaves them active."""
    backend = make_backend()
    backend.create_job(job("j", uses_task_dependencies=True, metadata=FANOUT))
    backend.add_tasks("j", [*fan_in(None),
                            TaskSpec(id="after-agg", command_line="true", depends_on=("agg",)),
                            TaskSpec(id="free", command_line=sh("sleep 60"))])
    backend.seal_job("j")
    wait_for(lambda: backend.task_counts("j") == TaskCounts(
        active=2, running=1, completed=3, succeeded=2, failed=1), "the upstream tasks")
    assert backend.store.evaluate_waiting() == 0
    assert not backend.store.has_ready()
    assert state(backend, "j", "agg") == "active"
    assert backend.blocked_tasks("j", 10) == ["agg", "after-agg"]
    assert backend.blocked_tasks("j", 1) is None  # two active tasks: too many to decide
    assert not completed(backend, "j")
    backend.terminate_job("j", REASON_BLOCKED)
    record = backend.get_job("j")
    assert record is not None
    assert (record.state, record.terminate_reason) == ("completed", REASON_BLOCKED)
    assert record.end_time is not None and record.end_time.tzinfo is not None
    assert backend.task_counts("j") == TaskCounts(active=2, completed=4, succeeded=2, failed=2)
    assert not (backend.home / "shared" / "agg-ran").exists()


def test_exit_codes_and_ranges_choose_the_dependency_action(make_backend: MakeBackend) -> None:
    """Exit codes match first, then ranges (inclusive), then the default; even a
    success can block its dependents when its options say so."""
    conditions = ExitConditions(exit_codes=((3, SATISFY), (0, BLOCK)),
                                exit_code_ranges=((10, 20, SATISFY),))
    backend = make_backend()
    backend.create_job(job("j", uses_task_dependencies=True))
    codes = {"c3": 3, "c10": 10, "c15": 15, "c20": 20, "c21": 21, "c0": 0}
    backend.add_tasks("j", [TaskSpec(id=name, command_line=sh(f"exit {code}"),
                                     exit_conditions=conditions)
                            for name, code in codes.items()])
    backend.add_tasks("j", [TaskSpec(id=f"after-{name}", command_line="true",
                                     depends_on=(name,)) for name in codes])
    backend.seal_job("j")
    should_run = {"c3", "c10", "c15", "c20"}
    wait_for(lambda: all(state(backend, "j", f"after-{n}") == "completed"
                         for n in should_run), "the satisfied dependents")
    backend.store.evaluate_waiting()
    assert state(backend, "j", "after-c21") == "active"
    assert state(backend, "j", "after-c0") == "active"
    assert task_of(backend, "j", "c0").result == "success"
    assert sorted(backend.blocked_tasks("j", 10) or []) == ["after-c0", "after-c21"]


def test_pre_processing_errors_use_their_own_options(make_backend: MakeBackend,
                                                     tmp_path: Path) -> None:
    """A missing program and a missing resource file are pre-processing errors: their
    options apply (not the exit code's, though a missing program reports 127)."""
    conditions = ExitConditions(pre_processing_error=SATISFY,
                                exit_code_ranges=((1, 255, BLOCK),))
    missing = ResourceFile(http_url=(tmp_path / "absent").as_uri(), file_path="in.txt")
    backend = make_backend()
    backend.create_job(job("j", uses_task_dependencies=True))
    backend.add_tasks("j", [
        TaskSpec(id="no-program", command_line="/nonexistent/program",
                 exit_conditions=conditions),
        TaskSpec(id="no-file", command_line="true", resource_files=[missing],
                 exit_conditions=conditions),
        TaskSpec(id="no-program-default", command_line="/nonexistent/program"),
        TaskSpec(id="after", command_line="true", depends_on=("no-program", "no-file")),
        TaskSpec(id="after-default", command_line="true", depends_on=("no-program-default",)),
    ])
    backend.seal_job("j")
    wait_for(lambda: state(backend, "j", "after") == "completed", "the satisfied dependent")
    info = backend.task("j", "no-program")
    assert info is not None and (info.exit_code, info.failure_code) == (
        127, "CommandProgramNotFound")
    backend.store.evaluate_waiting()
    assert state(backend, "j", "after-default") == "active"
    categories = {t.id: t.category for t in backend.failed_tasks("j", 10)}
    assert categories == {"no-program": "exit_code", "no-file": "resource_file_failure",
                          "no-program-default": "exit_code"}


# -- job actions and the job's wall clock ----------------------------------------------------


def test_job_action_terminate_ends_the_job(make_backend: MakeBackend) -> None:
    """With performexitoptionsjobaction a failure's default job action terminates the job:
    running tasks end as TaskEnded, queued ones stay active and never run."""
    backend = make_backend(slots=2)
    backend.create_job(job("j", on_task_failure="performexitoptionsjobaction"))
    backend.add_tasks("j", [TaskSpec(id="sleeper", command_line=sh("sleep 60"))])
    pid = started(backend, "j", "sleeper")
    backend.add_tasks("j", [TaskSpec(id="fails", command_line=sh("exit 4")),
                            TaskSpec(id="queued", command_line="true")])
    wait_for(lambda: completed(backend, "j"), "the job to be terminated")
    record = backend.get_job("j")
    assert record is not None and record.terminate_reason == REASON_TASK_FAILED
    wait_for(lambda: not alive(pid), "the sleeper's process to die")
    sleeper = backend.task("j", "sleeper")
    assert sleeper is not None and (sleeper.state, sleeper.failure_code) == (
        "completed", "TaskEnded")
    assert state(backend, "j", "queued") == "active"
    with pytest.raises(BatchRejected):
        backend.add_tasks("j", [TaskSpec(id="late", command_line="true")])


def test_job_actions_need_performexitoptionsjobaction(make_backend: MakeBackend) -> None:
    """On a noaction job failures terminate nothing; on an acting job an exit option's
    job action "none" keeps it going."""
    keep = ExitConditions(exit_codes=((4, ExitOptions(job_action="none")),))
    backend = make_backend()
    backend.create_job(job("quiet"))
    backend.create_job(job("acting", on_task_failure="performexitoptionsjobaction"))
    backend.add_tasks("quiet", [TaskSpec(id="fails", command_line=sh("exit 4"))])
    backend.add_tasks("acting", [TaskSpec(id="fails", command_line=sh("exit 4"),
                                          exit_conditions=keep)])
    wait_for(lambda: all(state(backend, j, "fails") == "completed"
                         for j in ("quiet", "acting")), "both failures")
    for job_id in ("quiet", "acting"):
        record = backend.get_job(job_id)
        assert record is not None and (record.state, record.terminate_reason) == (
            "active", None), job_id


def test_disable_job_action_is_refused(make_backend: MakeBackend) -> None:
    """The local executor cannot enable a job again, so it takes no "disable" action."""
    backend = make_backend(start=False)
    backend.create_job(job("j"))
    result = backend.add_tasks("j", [TaskSpec(
        id="t", command_line="true",
        exit_conditions=ExitConditions(default=ExitOptions(job_action="disable")))])
    assert result.added == 0
    assert [(e.task_id, e.code) for e in result.errors] == [("t", "InvalidPropertyValue")]


def test_job_max_wall_clock_counts_from_creation(make_backend: MakeBackend) -> None:
    """Past the job's max wall clock (from its creation) the job is terminated and its
    running tasks end; the job's limit is no task's wall clock."""
    backend = make_backend()
    backend.create_job(job("j", max_wall_clock=timedelta(seconds=0.6)))
    backend.add_tasks("j", [TaskSpec(id="sleeper", command_line=sh("sleep 60"))])
    pid = started(backend, "j", "sleeper")
    wait_for(lambda: completed(backend, "j"), "the job's wall clock to run out")
    record = backend.get_job("j")
    assert record is not None and record.created is not None and record.end_time is not None
    assert record.terminate_reason == REASON_WALL_CLOCK
    assert record.end_time - record.created >= timedelta(seconds=0.6)
    wait_for(lambda: not alive(pid), "the sleeper's process to die")
    [ended] = backend.failed_tasks("j", 10)
    assert (ended.id, ended.category, ended.failure_code) == ("sleeper", "cancelled",
                                                             "TaskEnded")


def test_a_jobs_wall_clock_is_not_its_tasks_default(tmp_path: Path) -> None:
    store = Store(path=tmp_path / "executor.db", pool="local")
    store.create_job(job("j", max_wall_clock=timedelta(hours=1)))
    store.add_tasks("j", [TaskSpec(id="plain", command_line="true"),
                          TaskSpec(id="own", command_line="true",
                                   max_wall_clock=timedelta(seconds=5))])
    walls = {run.task_id: run.max_wall_clock for run in store.claim(2, 2)}
    assert walls == {"plain": None, "own": 5.0}
    store.close()


# -- terminate and delete -----------------------------------------------------------------------


def test_terminate_stops_a_running_task(make_backend: MakeBackend) -> None:
    """terminate_job kills the running task's process group (SIGKILL after the grace
    for one ignoring SIGTERM); queued tasks never run; a second call changes nothing."""
    backend = make_backend(slots=1)
    backend.create_job(job("j", metadata=FANOUT))
    backend.add_tasks("j", [
        TaskSpec(id="stubborn", command_line=sh("trap '' TERM; sleep 60")),
        TaskSpec(id="queued", command_line=sh("touch $AZ_BATCH_NODE_SHARED_DIR/queued-ran")),
    ])
    pid = started(backend, "j", "stubborn")
    backend.terminate_job("j", REASON_USER)
    wait_for(lambda: not alive(pid), "the task's process to be killed")
    [ended] = backend.failed_tasks("j", 10)
    assert (ended.id, ended.category, ended.failure_code, ended.exit_code) == (
        "stubborn", "cancelled", "TaskEnded", None)
    first = backend.get_job("j")
    backend.terminate_job("j", REASON_BLOCKED)  # already completed: no-op
    backend.terminate_job("missing", REASON_USER)  # no such job: no error
    assert backend.get_job("j") == first
    assert first is not None and first.terminate_reason == REASON_USER
    assert backend.task_counts("j") == TaskCounts(active=1, completed=1, failed=1)
    backend.create_job(job("next"))
    backend.add_tasks("next", [TaskSpec(id="t", command_line="true")])
    wait_for(lambda: state(backend, "next", "t") == "completed", "the executor to go on")
    assert not (backend.home / "shared" / "queued-ran").exists()


def test_terminate_from_another_process_stops_the_task(make_backend: MakeBackend,
                                                        tmp_path: Path) -> None:
    """A termination recorded by another process (``fanout cancel``) is seen by the
    scheduler, which owns the task's process and stops it."""
    backend = make_backend()
    backend.create_job(job("j"))
    backend.add_tasks("j", [TaskSpec(id="sleeper", command_line=sh("sleep 60"))])
    pid = started(backend, "j", "sleeper")
    other = LocalBackend(home=backend.home, slots=1)  # not started: a reader/writer
    try:
        other.terminate_job("j", REASON_USER)
    finally:
        other.close()
    wait_for(lambda: not alive(pid), "the scheduler to stop the task")
    assert task_of(backend, "j", "sleeper").failure_code == "TaskEnded"


def test_delete_removes_records_and_directories(make_backend: MakeBackend) -> None:
    backend = make_backend()
    backend.create_job(job("Gone", metadata=FANOUT))
    backend.add_tasks("gone", [TaskSpec(id="done", command_line="true"),
                               TaskSpec(id="sleeper", command_line=sh("sleep 60"))])
    pid = started(backend, "gone", "sleeper")
    wait_for(lambda: state(backend, "gone", "done") == "completed", "the quick task")
    job_dir = backend.home / "tasks" / "Gone"
    assert (job_dir / "done" / "stdout.txt").exists()
    backend.delete_job("gone")
    assert not job_dir.exists()
    assert not alive(pid)
    assert backend.get_job("gone") is None and backend.job_status("gone") is None
    assert backend.task_counts("gone") is None and backend.task("gone", "done") is None
    assert backend.list_fanout_jobs() == []
    left = sqlite3.connect(backend.home / "executor.db").execute(
        "SELECT (SELECT count(*) FROM tasks), (SELECT count(*) FROM transitions)").fetchone()
    assert left == (0, 0)
    backend.delete_job("gone")  # already gone: no error
    assert backend.create_job(job("gone")) == "created"  # the id is free again


# -- what the monitor reads ----------------------------------------------------------------------


def test_failed_tasks_categories_and_limit(make_backend: MakeBackend, tmp_path: Path) -> None:
    backend = make_backend(slots=2)
    backend.create_job(job("j"))
    blocked_dest = tmp_path / "file-not-dir"
    blocked_dest.write_text("")
    backend.add_tasks("j", [
        TaskSpec(id="exits", command_line=sh("exit 3"), max_task_retries=1),
        TaskSpec(id="slow", command_line=sh("sleep 60"), max_wall_clock=timedelta(seconds=0.2)),
        TaskSpec(id="no-file", command_line="true", resource_files=[
            ResourceFile(http_url=(tmp_path / "absent").as_uri(), file_path="in.txt")]),
        TaskSpec(id="no-upload", command_line=sh("echo x > out.txt"), output_files=[
            OutputFile(file_pattern="out.txt", container_url=(blocked_dest / "c").as_uri(),
                       path="out.txt")]),
        TaskSpec(id="ok", command_line="true"),
    ])
    wait_for(lambda: backend.task_counts("j") == TaskCounts(
        completed=5, succeeded=1, failed=4), "every task")
    failed = {t.id: t for t in backend.failed_tasks("j", 10)}
    assert {i: t.category for i, t in failed.items()} == {
        "exits": "exit_code", "slow": "wall_clock_timeout", "no-file": "resource_file_failure",
        "no-upload": "output_upload_failure"}
    exits = failed["exits"]
    assert (exits.exit_code, exits.failure_code, exits.retry_count) == (3, "FailureExitCode", 1)
    assert exits.failure_message and "3" in exits.failure_message
    assert exits.start_time is not None and exits.end_time is not None
    assert exits.start_time.tzinfo is not None and exits.start_time <= exits.end_time
    assert exits.logs == str(backend.task_dir("j", "exits"))
    assert failed["slow"].failure_code == "MaxWallClockTimeExceeded"
    assert len(backend.failed_tasks("j", 2)) == 2
    assert backend.failed_tasks("missing", 10) == []


def test_task_counts_count_preparing_as_running(tmp_path: Path) -> None:
    store = Store(path=tmp_path / "executor.db", pool="local")
    store.create_job(job("j"))
    store.add_tasks("j", [TaskSpec(id=str(i), command_line="true") for i in range(4)])
    first, second = store.claim(2, 2)
    store.mark_running(first.seq, os.getpid(), None)
    assert store.task_counts("j") == TaskCounts(active=2, running=2)
    store.finish(second.seq, success=False, exit_code=1, failure_code="FailureExitCode",
                 failure_message="exit 1")
    assert store.task_counts("j") == TaskCounts(active=2, running=1, completed=1, failed=1)
    assert store.task_counts("missing") is None
    store.close()


def test_log_tail_reads_only_the_end(make_backend: MakeBackend) -> None:
    """The tail of a large stderr, found by seeking: a 64 GiB sparse file is never read
    whole; a cut inside a UTF-8 character drops the partial character."""
    backend = make_backend()
    backend.create_job(job("j"))
    backend.add_tasks("j", [TaskSpec(id="loud", command_line=sh(
        "head -c 3000000 /dev/zero | tr '\\0' x >&2; printf 'caf\\303\\251 THE END' >&2"))])
    wait_for(lambda: state(backend, "j", "loud") == "completed", "the task")
    assert backend.task_log_tail("j", "loud", max_bytes=10) == "\u00e9 THE END"
    assert backend.task_log_tail("j", "loud", max_bytes=9) == " THE END"  # cut inside é
    tail = backend.task_log_tail("j", "loud")
    assert tail is not None and len(tail.encode()) <= 4096 and tail.endswith("café THE END")
    assert set(tail[:-len("café THE END")]) == {"x"}
    huge = backend.task_dir("j", "loud") / "stdout.txt"
    with open(huge, "wb") as fh:
        fh.truncate(64 << 30)
        fh.seek(0, os.SEEK_END)
        fh.write(b"last line\n")
    assert backend.task_log_tail("j", "loud", "stdout.txt", 10) == "last line\n"
    assert backend.task_log_tail("j", "loud", "missing.txt") is None
    assert backend.task_log_tail("j", "nobody") is None
    with pytest.raises(ValueError):
        backend.task_log_tail("j", "loud", "../loud/stderr.txt")


# -- upgrading a version-1 database ---------------------------------------------------------------

#: Version 1's tables, as that schema created them (only what the upgrade touches differs).
V1_SCHEMA = """
CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL COLLATE NOCASE
    UNIQUE, pool TEXT NOT NULL, priority INTEGER NOT NULL DEFAULT 0, display_name TEXT,
    metadata TEXT, max_task_retries INTEGER, max_wall_clock REAL,
    uses_dependencies INTEGER NOT NULL DEFAULT 0, sealed INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT 'active', succeeded INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL, completed REAL);
CREATE INDEX jobs_active ON jobs(priority DESC, seq) WHERE state = 'active';
CREATE TABLE tasks (seq INTEGER PRIMARY KEY, job_seq INTEGER NOT NULL,
    id TEXT NOT NULL COLLATE NOCASE, num INTEGER, display_name TEXT,
    command_line TEXT NOT NULL, environment TEXT, resource_files TEXT, output_files TEXT,
    depends_on TEXT, depends_on_ranges TEXT, max_task_retries INTEGER, max_wall_clock REAL,
    retention REAL, required_slots INTEGER NOT NULL DEFAULT 1, container_image TEXT,
    state TEXT NOT NULL DEFAULT 'active', waiting INTEGER NOT NULL DEFAULT 0,
    recheck_at INTEGER NOT NULL DEFAULT 0, result TEXT, exit_code INTEGER,
    failure_code TEXT, failure_message TEXT, retry_count INTEGER NOT NULL DEFAULT 0,
    requeue_count INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL, start_time REAL,
    end_time REAL, pid INTEGER, proc_start INTEGER, purge_at REAL, UNIQUE (job_seq, id));
CREATE INDEX tasks_state ON tasks(job_seq, state, result);
CREATE INDEX tasks_ready ON tasks(job_seq) WHERE state = 'active' AND waiting = 0;
CREATE INDEX tasks_waiting ON tasks(job_seq, recheck_at) WHERE state = 'active' AND waiting = 1;
CREATE INDEX tasks_num ON tasks(job_seq, num, result) WHERE num IS NOT NULL;
CREATE INDEX tasks_purge ON tasks(purge_at) WHERE purge_at IS NOT NULL;
CREATE TABLE transitions (task_seq INTEGER NOT NULL, at REAL NOT NULL, state TEXT NOT NULL,
    reason TEXT);
CREATE INDEX transitions_task ON transitions(task_seq);
PRAGMA user_version = 1;
"""


def test_a_version_1_database_is_upgraded(tmp_path: Path) -> None:
    """Old jobs keep working: successes carry over as satisfied, failures block, a
    finished job reads as AllTasksComplete, and a waiting task still becomes ready."""
    path = tmp_path / "executor.db"
    now = time.time()
    old = sqlite3.connect(path)
    old.executescript(V1_SCHEMA)
    old.executemany("INSERT INTO jobs (id, pool, uses_dependencies, sealed, state, succeeded,"
                    " created, completed, metadata) VALUES (?, 'local', 1, ?, ?, ?, ?, ?, ?)",
                    [("old", 0, "active", 1, now, None, None),
                     ("done", 1, "completed", 0, now, now, '{"fanout-handler": "x"}')])
    old.executemany(
        "INSERT INTO tasks (job_seq, id, num, command_line, state, waiting, result, exit_code,"
        " failure_code, depends_on, created) VALUES (1, ?, ?, 'true', ?, ?, ?, ?, ?, ?, ?)",
        [("0", 0, "completed", 0, "success", 0, None, None, now),
         ("1", 1, "completed", 0, "failure", 2, "MaxWallClockTimeExceeded", None, now),
         ("needs-0", None, "active", 1, None, None, None, '["0"]', now),
         ("needs-1", None, "active", 1, None, None, None, '["1"]', now)])
    old.commit()
    old.close()
    store = Store(path=path, pool="local")
    assert store._conn().execute("PRAGMA user_version").fetchone()[0] == 2
    assert store.evaluate_waiting() == 1
    [run] = store.claim(2, 2)
    assert run.task_id == "needs-0"
    assert store.blocked_tasks("old", 10) == ["needs-1"]
    [failed] = store.failed_tasks("old", 10)[1]
    assert (failed.id, failed.category) == ("1", "wall_clock_timeout")
    done = store.job_record("done")
    assert done is not None and done.terminate_reason == REASON_ALL_COMPLETE
    assert [r.id for r in store.fanout_jobs(None)] == ["done"]
    store.finish(run.seq, success=True, exit_code=0, failure_code=None, failure_message=None)
    assert task_of(store, "old", "needs-0").result == "success"
    store.close()
    assert Store(path=path, pool="local").job_status("old") is not None  # opens again


def test_terminated_sleep_gets_sigterm_first(make_backend: MakeBackend) -> None:
    """A task that handles SIGTERM sees it (and may clean up) before anything harsher."""
    backend = make_backend()
    backend.create_job(job("j"))
    backend.add_tasks("j", [TaskSpec(id="polite", command_line=sh(
        f"trap 'echo got-term > term.txt; exit {128 + signal.SIGTERM}' TERM; "
        "touch trapped; sleep 60 & wait"))])
    wd = backend.task_dir("j", "polite") / "wd"
    wait_for((wd / "trapped").exists, "the task to install its trap")
    backend.terminate_job("j", REASON_USER)
    wait_for((wd / "term.txt").exists, "the task's TERM handler to run")


def test_satisfying_failures_keep_readiness_counted(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """An aggregate over 2,000 tasks, half of which fail but satisfy it, is evaluated a
    handful of times (the satisfied counter), not once per end."""
    import worker.backends.local.store as store_module

    store = Store(path=tmp_path / "executor.db", pool="local")
    store.create_job(job("j", uses_task_dependencies=True))
    store.add_tasks("j", [TaskSpec(id="agg", command_line="true",
                                   depends_on_ranges=((0, 1999),))])
    for start in range(0, 2000, 100):
        store.add_tasks("j", [TaskSpec(id=str(i), command_line="true",
                                       exit_conditions=SATISFY_DEPENDENTS)
                              for i in range(start, start + 100)])
    store.seal_job("j")
    checks: list[int] = []
    real = store_module._missing

    def counted(*args: Any) -> int:
        checks.append(1)
        return real(*args)

    monkeypatch.setattr(store_module, "_missing", counted)
    while runs := store.claim(50, 50):
        for run in runs:
            ok = run.task_id == "agg" or int(run.task_id) % 2 == 0
            store.finish(run.seq, success=ok, exit_code=0 if ok else 1,
                         failure_code=None if ok else "FailureExitCode", failure_message=None)
        store.evaluate_waiting()
    assert task_of(store, "j", "agg").result == "success"
    assert 1 <= len(checks) <= 3
    store.close()


def test_fanout_jobs_come_in_pages_that_continue_where_the_last_ended(
        make_backend: MakeBackend) -> None:
    """Pages of the monitor's listing: each at most ``limit`` jobs in creation order,
    each job once, a job without fanout metadata left out, None after the last."""
    backend = make_backend()
    for i in range(7):
        backend.create_job(job(f"j{i}", metadata=FANOUT))
    backend.create_job(job("other"))
    seen: list[str] = []
    after: int | None = 0
    pages = 0
    while after is not None:
        records, after = backend.list_fanout_jobs_page(after=after, limit=3)
        assert len(records) <= 3
        seen += [r.id for r in records]
        pages += 1
    assert seen == [f"j{i}" for i in range(7)] and pages == 3
    assert [r.id for r in backend.list_fanout_jobs()] == seen
