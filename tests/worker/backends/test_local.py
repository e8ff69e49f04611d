"""The local executor: Batch semantics for jobs and tasks run as local processes."""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import pytest

from handlers.base import JobSpec, OutputFile, ResourceFile, TaskSpec, UploadCondition
from worker.backends.base import META_WINDOW, AddResult, JobStatus
from worker.backends.local import LocalBackend, TaskInfo
from worker.backends.local.runner import (
    ProcessTable,
    make_task_dirs,
    split_command,
    spread_subdirectories,
)
from worker.backends.local.store import Store
from worker.errors import BatchRejected, ConfigFault, SystemFault

T = TypeVar("T")
CONDITIONS: tuple[UploadCondition, ...] = ("success", "failure", "completion")
MakeBackend = Callable[..., LocalBackend]


def wait_for(probe: Callable[[], T], what: str, timeout: float = 30.0) -> T:
    """Poll ``probe`` until it returns something truthy; fail after ``timeout`` (a hang)."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def task_of(source: LocalBackend | Store, job_id: str, task_id: str) -> TaskInfo:
    """The task's record, which must exist."""
    info = source.task(job_id, task_id)
    assert info is not None, f"no task {job_id}/{task_id}"
    return info


def status_of(backend: LocalBackend, job_id: str) -> JobStatus:
    """The job's status, which must exist."""
    status = backend.job_status(job_id)
    assert status is not None, f"no job {job_id}"
    return status


def py(code: str, *args: str) -> str:
    """A command line running ``code`` with this interpreter, without a shell."""
    return shlex.join([sys.executable, "-c", code, *args])


def sh(script: str) -> str:
    """A command line running ``script`` through /bin/sh, as handlers wrap commands."""
    return "/bin/sh -c " + shlex.quote(script)


def job(job_id: str, **kwargs: Any) -> JobSpec:
    return JobSpec(tasks=[], task_count=0, id=job_id, **kwargs)


def settled(backend: LocalBackend, job_id: str, count: int) -> Callable[[], bool]:
    """A probe: ``count`` tasks of the job have completed."""
    def probe() -> bool:
        status = backend.job_status(job_id)
        return status is not None and status.counts["completed"] >= count
    return probe


def alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie nobody reaped counts as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):  # gone, or being reaped (ESRCH)
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


@pytest.fixture
def make_backend(tmp_path: Path) -> Iterator[MakeBackend]:
    """Build LocalBackends under tmp_path (started unless told not to); close them all."""
    made: list[LocalBackend] = []

    def make(*, start: bool = True, slots: int = 2, home: Path | None = None,
             **kwargs: Any) -> LocalBackend:
        kwargs.setdefault("poll_interval", 0.02)
        kwargs.setdefault("kill_grace", 0.5)
        backend = LocalBackend(home=home or tmp_path / "home", slots=slots, **kwargs)
        made.append(backend)
        if start:
            backend.start()
        return backend

    yield make
    for backend in reversed(made):
        backend.close()


@pytest.fixture
def web(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A local HTTP server: GET serves ``files``, PUT records into ``puts``."""
    state: dict[str, Any] = {"files": {}, "puts": {}}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = state["files"].get(self.path.split("?")[0])
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def do_PUT(self) -> None:
            length = int(self.headers["Content-Length"])
            state["puts"][self.path] = (self.headers.get("x-ms-blob-type"),
                                        self.rfile.read(length))
            self.send_response(201)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    state["url"] = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    server.shutdown()
    server.server_close()
    thread.join()


# -- running tasks ------------------------------------------------------------------------


def test_runs_tasks_and_records_exit_codes_and_stdout(make_backend: MakeBackend) -> None:
    """Each task's exit code, result and stdout/stderr land where Batch puts them."""
    backend = make_backend()
    backend.create_job(job("j"))
    backend.add_tasks("j", [
        TaskSpec(id="ok", command_line=sh("echo out-$AZ_BATCH_TASK_ID; echo err >&2")),
        TaskSpec(id="bad", command_line=sh("exit 3")),
    ])
    wait_for(settled(backend, "j", 2), "both tasks")
    ok, bad = backend.task("j", "ok"), backend.task("j", "bad")
    assert ok is not None and bad is not None
    assert (ok.result, ok.exit_code, ok.failure_code) == ("success", 0, None)
    assert (bad.result, bad.exit_code, bad.failure_code) == ("failure", 3, "FailureExitCode")
    assert ok.start_time is not None and ok.end_time is not None
    assert ok.end_time >= ok.start_time
    task_dir = backend.task_dir("j", "ok")
    assert (task_dir / "stdout.txt").read_text() == "out-ok\n"
    assert (task_dir / "stderr.txt").read_text() == "err\n"
    assert [s for _, s, _ in backend.store.transitions("j", "ok")] == [
        "preparing", "running", "completed"]
    status = backend.job_status("j")
    assert status is not None
    assert (status.state, status.succeeded, status.failed) == ("active", 1, 1)


def test_sets_batch_environment(make_backend: MakeBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tasks see Batch's variables and their own, but not the executor's other ones."""
    monkeypatch.setenv("UNRELATED_SECRET", "s3cret")
    backend = make_backend(pool="mypool")
    backend.create_job(job("env-job"))
    backend.add_tasks("env-job", [TaskSpec(
        id="t1", environment={"MY_VAR": "mine"},
        command_line=py("import json, os; print(json.dumps(dict(os.environ)))"))])
    wait_for(settled(backend, "env-job", 1), "the task")
    task_dir = backend.task_dir("env-job", "t1").absolute()
    env = json.loads((task_dir / "stdout.txt").read_text())
    home = backend.home
    assert env["MY_VAR"] == "mine"
    assert "UNRELATED_SECRET" not in env
    assert env["PATH"] == os.environ["PATH"]
    assert env["AZ_BATCH_TASK_ID"] == "t1"
    assert env["AZ_BATCH_JOB_ID"] == "env-job"
    assert env["AZ_BATCH_POOL_ID"] == "mypool"
    assert env["AZ_BATCH_NODE_ID"] == "local"
    assert env["AZ_BATCH_ACCOUNT_NAME"] == "local"
    assert env["AZ_BATCH_TASK_DIR"] == str(task_dir)
    assert env["AZ_BATCH_TASK_WORKING_DIR"] == str(task_dir / "wd")
    assert env["AZ_BATCH_NODE_ROOT_DIR"] == str(home)
    assert env["AZ_BATCH_NODE_SHARED_DIR"] == str(home / "shared")
    assert (home / "shared").is_dir()
    assert env["AZ_BATCH_TASK_USER"]


def test_runs_in_working_dir(make_backend: MakeBackend) -> None:
    """The process's current directory is the task's ``wd``."""
    backend = make_backend()
    backend.create_job(job("j"))
    backend.add_tasks("j", [TaskSpec(id="t", command_line=py("import os; print(os.getcwd())"))])
    wait_for(settled(backend, "j", 1), "the task")
    out = (backend.task_dir("j", "t") / "stdout.txt").read_text().strip()
    assert Path(out).resolve() == (backend.task_dir("j", "t") / "wd").resolve()


def top_dir_flag(directory: Path) -> bool:
    """Whether ``directory`` has ext4's top-directory flag (``lsattr`` shows ``T``)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        flags = struct.unpack("i", fcntl.ioctl(fd, 0x80086601, bytes(4)))[0]
    finally:
        os.close(fd)
    return bool(flags & 0x00020000)


def test_task_directories_are_spread_where_the_file_system_can(
        make_backend: MakeBackend, tmp_path: Path) -> None:
    """``tasks/`` and each job's directory get ext4's top-directory flag, so new task
    directories (and their files) go to block groups the allocator picks rather than
    all into the home's; on other file systems the tasks run all the same."""
    backend = make_backend()
    backend.create_job(job("j"))
    backend.add_tasks("j", [TaskSpec(id="t", command_line="true")])
    wait_for(settled(backend, "j", 1), "the task")
    assert status_of(backend, "j").succeeded == 1
    probe = tmp_path / "probe"
    probe.mkdir()
    if not spread_subdirectories(probe):
        pytest.skip("this file system has no top-directory flag")
    assert top_dir_flag(probe)
    assert top_dir_flag(backend.home / "tasks")
    assert top_dir_flag(backend.home / "tasks" / "j")
    assert not top_dir_flag(backend.task_dir("j", "t"))


def test_make_task_dirs_creates_what_is_missing_and_keeps_what_exists(tmp_path: Path) -> None:
    """A task's first attempt creates ``tasks/<job>/<task>/wd`` (and the job's and
    ``tasks/`` directories when missing); a later attempt keeps what is there."""
    task_dir = tmp_path / "tasks" / "j" / "t"
    make_task_dirs(str(task_dir), str(task_dir / "wd"))
    assert (task_dir / "wd").is_dir()
    (task_dir / "wd" / "left").write_text("by the first attempt")
    make_task_dirs(str(task_dir), str(task_dir / "wd"))
    assert (task_dir / "wd" / "left").read_text() == "by the first attempt"
    make_task_dirs(str(tmp_path / "tasks" / "j" / "u"), str(tmp_path / "tasks" / "j" / "u" / "wd"))
    assert sorted(p.name for p in (tmp_path / "tasks" / "j").iterdir()) == ["t", "u"]


def test_split_command_splits_as_shlex_does() -> None:
    """The plain-line fast path gives exactly shlex's words, for lines that take it and
    lines that must not (quotes, escapes, whitespace only str.split knows)."""
    import random
    import shlex

    rng = random.Random(4)
    alphabet = "ab1 \t\n\r\x0b\x0c\x1c\x1f'\"\\$;*#=\xa0\u2003é-"
    lines = ["", " ", "true 1", "  python3 sim.py --alpha 0  ", "a\x0bb", "a\x1fb", "a\xa0b",
             "it's", 'say "hi there"', "back\\ slash", "# not a comment", "x#y"]
    lines += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
              for _ in range(3000)]
    for line in lines:
        try:
            expected: list[str] | str = shlex.split(line)
        except ValueError as exc:
            expected = f"ValueError: {exc}"
        try:
            got: list[str] | str = split_command(line)
        except ValueError as exc:
            got = f"ValueError: {exc}"
        assert got == expected, repr(line)


def test_command_line_runs_without_a_shell(make_backend: MakeBackend) -> None:
    """Semicolons, ``$`` and globs reach the program as literal arguments."""
    backend = make_backend()
    backend.create_job(job("j"))
    command = py("import json, sys; print(json.dumps(sys.argv[1:]))") + " 'a; echo hacked' $HOME *"
    backend.add_tasks("j", [TaskSpec(id="t", command_line=command)])
    wait_for(settled(backend, "j", 1), "the task")
    args = json.loads((backend.task_dir("j", "t") / "stdout.txt").read_text())
    assert args == ["a; echo hacked", "$HOME", "*"]


def test_program_that_cannot_start_fails_the_task(make_backend: MakeBackend) -> None:
    """A missing program is a failed task with an exit code, and the executor goes on."""
    backend = make_backend(slots=1)
    backend.create_job(job("j"))
    backend.add_tasks("j", [
        TaskSpec(id="missing", command_line="/nonexistent/program --flag", max_task_retries=3),
        TaskSpec(id="unparsable", command_line="echo 'unbalanced"),
        TaskSpec(id="after", command_line=sh("true")),
    ])
    wait_for(settled(backend, "j", 3), "all three tasks")
    missing = backend.task("j", "missing")
    assert missing is not None
    assert (missing.result, missing.exit_code, missing.failure_code) == (
        "failure", 127, "CommandProgramNotFound")
    assert missing.retry_count == 0
    assert "/nonexistent/program" in (backend.task_dir("j", "missing") / "stderr.txt").read_text()
    unparsable = backend.task("j", "unparsable")
    assert unparsable is not None and unparsable.failure_code == "CommandLineInvalid"
    after = backend.task("j", "after")
    assert after is not None and after.result == "success"


# -- adding tasks -------------------------------------------------------------------------


def test_duplicates_keep_the_first_id_and_insertion_order(make_backend: MakeBackend) -> None:
    """A task id added again in another case is not stored twice: the first spelling
    stays, in insertion order (the counts are in test_backend_contract.py)."""
    backend = make_backend(start=False)
    backend.create_job(job("dup"))
    backend.add_tasks("dup", [TaskSpec(id="a", command_line="true"),
                              TaskSpec(id="A", command_line="true"),
                              TaskSpec(id="b", command_line="true")])
    backend.add_tasks("DUP", [TaskSpec(id="B", command_line="true"),
                              TaskSpec(id="c", command_line="true")])
    assert [t.id for t in backend.tasks("dup")] == ["a", "b", "c"]


def test_add_reports_invalid_tasks(make_backend: MakeBackend) -> None:
    """As Batch answers an add-collection request: dependencies on a job without them
    are per-task errors; a malformed task (its id, a dependency's id or an id range)
    refuses the whole chunk (400 InvalidPropertyValue: ``BatchRejected``, nothing
    added); a missing job is a ``SystemFault`` (404 JobNotFound: a redelivery creates
    it again)."""
    backend = make_backend(start=False)
    backend.create_job(job("j"))
    result = backend.add_tasks("j", [
        TaskSpec(id="dep", command_line="true", depends_on=("x",)),
        TaskSpec(id="fine", command_line="true"),
    ])
    assert result.added == 1
    assert [(e.task_id, e.code, e.transient) for e in result.errors] == [
        ("dep", "TaskDependenciesNotSpecifiedOnJob", False)]
    for bad in (TaskSpec(id="bad id!", command_line="true"),
                TaskSpec(id="d1", command_line="true", depends_on=("no spaces",)),
                TaskSpec(id="d2", command_line="true", depends_on_ranges=((3, 1),))):
        with pytest.raises(BatchRejected, match="InvalidPropertyValue"):
            backend.add_tasks("j", [TaskSpec(id="other", command_line="true"), bad])
    assert [t.id for t in backend.tasks("j")] == ["fine"]
    with pytest.raises(SystemFault, match="JobNotFound"):
        backend.add_tasks("nope", [TaskSpec(id="a", command_line="true")])
    with pytest.raises(SystemFault, match="JobNotFound"):
        backend.seal_job("nope")
    with pytest.raises(BatchRejected):
        backend.create_job(job(""))


def test_adds_20000_tasks_in_chunks(make_backend: MakeBackend) -> None:
    """A large sweep added in chunks of 100 holds exactly one row per task."""
    backend = make_backend(start=False)
    backend.create_job(job("big"))
    env = {"FANOUT_PARAM_ALPHA": "1"}
    total = 0
    for start in range(0, 20_000, backend.max_tasks_per_request):
        chunk = [TaskSpec(id=str(i), command_line=sh(f"echo {i}"), environment=env)
                 for i in range(start, start + backend.max_tasks_per_request)]
        total += backend.add_tasks("big", chunk).added
    again = backend.add_tasks("big", [TaskSpec(id="19999", command_line="true")])
    assert total == 20_000 and again.existed == 1
    status = backend.job_status("big")
    assert status is not None and status.counts == {
        "active": 20_000, "preparing": 0, "running": 0, "completed": 0}


def test_add_from_threads_while_running(make_backend: MakeBackend) -> None:
    """Submitter threads add chunks while the scheduler runs; every task runs once."""
    backend = make_backend(slots=2)
    backend.create_job(job("j"))

    def add(offset: int) -> None:
        for start in range(offset, offset + 100, 25):
            backend.add_tasks("j", [TaskSpec(id=str(i), command_line="true")
                                    for i in range(start, start + 25)])

    threads = [threading.Thread(target=add, args=(n * 100,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    backend.seal_job("j")
    wait_for(lambda: status_of(backend, "j").state == "completed",
             "the job to complete", timeout=120)
    status = backend.job_status("j")
    assert status is not None and (status.succeeded, status.failed) == (400, 0)
    assert all(t.requeue_count == 0 and t.retry_count == 0 for t in backend.tasks("j"))


# -- jobs, order and stats ---------------------------------------------------------------


def test_an_add_to_a_sealed_completed_job_counts_as_existed(make_backend: MakeBackend) -> None:
    """The job completes at its seal once its tasks have; an add then is taken as an
    earlier delivery's, sent again, and counts as existing without adding anything, as
    the Azure backend does (fanout seals a job only after every task was added), unless
    it is a window job, which the monitor seals: then ``JobCompleted`` (the seal, the
    counts and ``sealed`` from create_job are in test_backend_contract.py)."""
    backend = make_backend()
    backend.create_job(job("j"))
    backend.add_tasks("j", [TaskSpec(id="t", command_line="true")])
    wait_for(settled(backend, "j", 1), "the task")
    backend.seal_job("j")
    assert status_of(backend, "j").state == "completed"
    again = backend.add_tasks("j", [TaskSpec(id="late", command_line="true")])
    assert (again.added, again.existed, again.errors) == (0, 1, [])
    assert [t.id for t in backend.tasks("j")] == ["t"]
    backend.create_job(job("w", metadata={META_WINDOW: "2026-01-01T00:00:00Z/PT1H"}))
    backend.seal_job("w")
    with pytest.raises(BatchRejected) as rejected:
        backend.add_tasks("w", [TaskSpec(id="late", command_line="true")])
    assert rejected.value.reason == "JobCompleted"


def test_a_job_deleted_mid_submission_is_created_again_by_the_redelivery(
        make_backend: MakeBackend) -> None:
    """The job is deleted after the submitter created it: its add is a ``SystemFault``
    (404 JobNotFound on Azure), so the message is abandoned rather than dead-lettered,
    and the redelivery's submission creates the job again with every task."""
    from prometheus_client import CollectorRegistry

    from worker.config import SubmitConfig
    from worker.metrics import Metrics
    from worker.submit import Submitter

    backend = make_backend(start=False)
    real_add = backend.add_tasks
    deleted: list[str] = []

    def add_after_a_delete(job_id: str, tasks: Sequence[TaskSpec]) -> AddResult:
        if not deleted:
            deleted.append(job_id)
            backend.delete_job(job_id)
        return real_add(job_id, tasks)

    backend.add_tasks = add_after_a_delete  # type: ignore[method-assign]
    submitter = Submitter(backend=backend, metrics=Metrics(registry=CollectorRegistry()),
                          config=SubmitConfig(max_retries=1, backoff_base=0.001,
                                              backoff_max=0.01))
    try:
        def spec() -> JobSpec:
            return JobSpec(tasks=iter([TaskSpec(id=f"t{i}", command_line="true")
                                       for i in range(3)]), task_count=3, id="j")
        with pytest.raises(SystemFault, match="JobNotFound"):
            submitter.submit(spec(), handler="sweep")
        assert backend.get_job("j") is None
        result = submitter.submit(spec(), handler="sweep")
    finally:
        submitter.close()
    assert (result.added, result.existed) == (3, 0)
    record = backend.get_job("j")
    assert record is not None and record.sealed


def test_metadata_of_a_missing_job_is_left_alone(make_backend: MakeBackend) -> None:
    """As on Azure (404 JobNotFound ignored), like terminate and delete."""
    backend = make_backend(start=False)
    backend.update_job_metadata("gone", {"k": "v"})
    backend.terminate_job("gone", "UserTerminate")
    backend.delete_job("gone")
    assert backend.get_job("gone") is None


def test_sealed_job_completes_when_last_task_does(make_backend: MakeBackend, tmp_path: Path
                                                  ) -> None:
    """Sealed while a task runs, the job completes when that task ends."""
    backend = make_backend()
    gate = tmp_path / "gate"
    backend.create_job(job("j"))
    backend.add_tasks("j", [TaskSpec(id="t", command_line=sh(f"while [ ! -f {gate} ]; do "
                                                             "sleep 0.02; done"))])
    backend.seal_job("j")
    assert backend.create_job(job("j")) == "sealed"
    wait_for(lambda: task_of(backend, "j", "t").state == "running",
             "the task to run")
    assert status_of(backend, "j").state == "active"
    gate.touch()
    wait_for(lambda: status_of(backend, "j").state == "completed",
             "the job to complete")


def test_order_is_priority_then_job_then_task(make_backend: MakeBackend, tmp_path: Path) -> None:
    """With one slot, tasks run by job priority, then job creation, then insertion."""
    backend = make_backend(start=False, slots=1)
    log = tmp_path / "order.txt"

    def tasks(prefix: str) -> list[TaskSpec]:
        return [TaskSpec(id=f"{prefix}{i}", command_line=sh(f"echo {prefix}{i} >> {log}"))
                for i in (2, 1)]

    backend.create_job(job("low", priority=-5))
    backend.create_job(job("first", priority=10))
    backend.create_job(job("second", priority=10))
    backend.add_tasks("low", tasks("l"))
    backend.add_tasks("second", tasks("s"))
    backend.add_tasks("first", tasks("f"))
    backend.start()
    for name in ("low", "first", "second"):
        wait_for(settled(backend, name, 2), f"job {name}")
    assert log.read_text().split() == ["f2", "f1", "s2", "s1", "l2", "l1"]


def test_stats_count_slots_and_tasks(make_backend: MakeBackend, tmp_path: Path) -> None:
    """Busy and idle slots, active jobs and task counts reflect what runs."""
    backend = make_backend(slots=3, pool="p")
    gate = tmp_path / "gate"
    backend.create_job(job("j"))
    wait_cmd = sh(f"while [ ! -f {gate} ]; do sleep 0.02; done")
    backend.add_tasks("j", [TaskSpec(id="big", command_line=wait_cmd, required_slots=2),
                            TaskSpec(id="next", command_line=wait_cmd, required_slots=2)])
    wait_for(lambda: task_of(backend, "j", "big").state == "running",
             "the big task to run")
    stats = backend.stats()
    assert stats.pool_nodes == {("p", "running"): 2, ("p", "idle"): 1}
    assert stats.active_jobs == 1
    assert stats.job_tasks == {"active": 1, "preparing": 0, "running": 1, "completed": 0}
    gate.touch()
    wait_for(settled(backend, "j", 2), "both tasks")
    assert backend.stats().pool_nodes == {("p", "running"): 0, ("p", "idle"): 3}


def test_task_wider_than_the_executor_still_runs(make_backend: MakeBackend) -> None:
    """A task needing more slots than exist takes them all instead of waiting for ever."""
    backend = make_backend(slots=1)
    backend.create_job(job("j"))
    backend.add_tasks("j", [TaskSpec(id="wide", command_line="true", required_slots=8)])
    wait_for(settled(backend, "j", 1), "the wide task")
    assert task_of(backend, "j", "wide").result == "success"


def test_another_instance_reads_but_cannot_schedule(make_backend: MakeBackend) -> None:
    """A second backend on the same home sees the jobs; only one may run the scheduler."""
    runner = make_backend()
    reader = make_backend(start=False)
    runner.create_job(job("j"))
    runner.add_tasks("j", [TaskSpec(id="t", command_line="true")])
    wait_for(settled(reader, "j", 1), "the reader to see the task complete")
    with pytest.raises(ConfigFault):
        reader.start()
    reader.probe()


# -- dependencies ------------------------------------------------------------------------


def test_dependency_by_id(make_backend: MakeBackend) -> None:
    """A dependent task starts only after its dependency succeeded."""
    backend = make_backend(slots=2)
    backend.create_job(job("j", uses_task_dependencies=True))
    marker = "$AZ_BATCH_NODE_SHARED_DIR/first-done"
    backend.add_tasks("j", [
        TaskSpec(id="second", command_line=sh(f"test -f {marker}"), depends_on=("FIRST",)),
        TaskSpec(id="first", command_line=sh(f"sleep 0.2; touch {marker}")),
    ])
    wait_for(settled(backend, "j", 2), "both tasks")
    second = backend.task("j", "second")
    first = backend.task("j", "first")
    assert second is not None and first is not None
    assert second.result == "success"
    assert second.start_time is not None and first.end_time is not None
    assert second.start_time >= first.end_time


def test_dependency_on_a_range(make_backend: MakeBackend) -> None:
    """An aggregate depending on ids 0..19 runs once, after all twenty succeeded."""
    backend = make_backend(slots=2)
    backend.create_job(job("j", uses_task_dependencies=True))
    shared = "$AZ_BATCH_NODE_SHARED_DIR"
    backend.add_tasks("j", [TaskSpec(id="agg", depends_on_ranges=((0, 19),),
                                     command_line=sh(f"ls {shared}/done | wc -l > {shared}/n"))])
    backend.add_tasks("j", [TaskSpec(id=str(i), command_line=sh(
        f"mkdir -p {shared}/done && touch {shared}/done/{i}")) for i in range(20)])
    backend.seal_job("j")
    wait_for(lambda: status_of(backend, "j").state == "completed",
             "the job to complete")
    assert (backend.home / "shared" / "n").read_text().strip() == "20"
    assert task_of(backend, "j", "agg").result == "success"


def test_range_waits_for_missing_ids_until_sealed(make_backend: MakeBackend) -> None:
    """Range members not yet added hold the dependent back until the job is sealed."""
    backend = make_backend(slots=1)
    backend.create_job(job("j", uses_task_dependencies=True))
    backend.add_tasks("j", [TaskSpec(id="0", command_line="true"),
                            TaskSpec(id="agg", command_line="true", depends_on_ranges=((0, 5),)),
                            TaskSpec(id="later", command_line="true")])
    wait_for(settled(backend, "j", 2), "tasks 0 and later")
    assert task_of(backend, "j", "agg").state == "active"
    backend.seal_job("j")
    wait_for(lambda: status_of(backend, "j").state == "completed",
             "the job to complete")


def test_failed_dependency_blocks_dependents(make_backend: MakeBackend) -> None:
    """A dependent of a failed task stays active, and so does its sealed job."""
    backend = make_backend(slots=1)
    backend.create_job(job("j", uses_task_dependencies=True))
    backend.add_tasks("j", [
        TaskSpec(id="fails", command_line=sh("exit 1")),
        TaskSpec(id="works", command_line="true"),
        TaskSpec(id="blocked", command_line="true", depends_on=("fails", "works")),
        TaskSpec(id="in-range", command_line="true", depends_on_ranges=((0, 0),)),
        TaskSpec(id="0", command_line=sh("exit 2")),
        TaskSpec(id="last", command_line="true"),
    ])
    backend.seal_job("j")
    wait_for(settled(backend, "j", 4), "the independent tasks")
    status = backend.job_status("j")
    assert status is not None
    assert (status.state, status.counts["active"], status.failed) == ("active", 2, 2)
    assert task_of(backend, "j", "blocked").state == "active"
    assert task_of(backend, "j", "in-range").state == "active"


def test_range_readiness_uses_counts_not_rescans(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """An aggregate over 10,000 tasks is re-evaluated a handful of times, not per success."""
    import worker.backends.local.store as store_module

    store = Store(path=tmp_path / "executor.db", pool="local")
    store.create_job(job("j", uses_task_dependencies=True))
    store.add_tasks("j", [TaskSpec(id="agg", command_line="true",
                                   depends_on_ranges=((0, 9999),))])
    for start in range(0, 10_000, 100):
        store.add_tasks("j", [TaskSpec(id=str(i), command_line="true")
                              for i in range(start, start + 100)])
    store.seal_job("j")
    checks: list[int] = []
    real = store_module._missing

    def counted(*args: Any) -> int:
        checks.append(1)
        return real(*args)

    monkeypatch.setattr(store_module, "_missing", counted)
    done = 0
    while True:
        runs = store.claim(50, 50)
        for run in runs:
            store.finish(run.seq, success=True, exit_code=0, failure_code=None,
                         failure_message=None)
        store.evaluate_waiting()
        done += len(runs)
        if not runs:
            break
    assert done == 10_001
    assert task_of(store, "j", "agg").result == "success"
    assert 1 <= len(checks) <= 3
    store.close()


# -- retries and wall clock ---------------------------------------------------------------


def counter_script(succeed_on: int) -> str:
    """A task that counts its attempts in the shared dir and succeeds on attempt N."""
    count = "$AZ_BATCH_NODE_SHARED_DIR/$AZ_BATCH_TASK_ID.count"
    return sh(f"echo x >> {count}; test $(wc -l < {count}) -ge {succeed_on}")


def attempts(backend: LocalBackend, task_id: str) -> int:
    return len((backend.home / "shared" / f"{task_id}.count").read_text().split())


def test_retries_until_success_or_limit(make_backend: MakeBackend) -> None:
    """Non-zero exits are retried up to max_task_retries (task, else job default)."""
    backend = make_backend()
    backend.create_job(job("j", max_task_retries=1))
    backend.add_tasks("j", [
        TaskSpec(id="third-time", command_line=counter_script(3), max_task_retries=3),
        TaskSpec(id="gives-up", command_line=counter_script(10), max_task_retries=2),
        TaskSpec(id="job-default", command_line=counter_script(10)),
        TaskSpec(id="unlimited", command_line=counter_script(5), max_task_retries=-1),
        TaskSpec(id="none", command_line=counter_script(10), max_task_retries=0),
    ])
    wait_for(settled(backend, "j", 5), "every task")
    expect = {"third-time": ("success", 2, 3), "gives-up": ("failure", 2, 3),
              "job-default": ("failure", 1, 2), "unlimited": ("success", 4, 5),
              "none": ("failure", 0, 1)}
    for task_id, (result, retries, runs) in expect.items():
        info = backend.task("j", task_id)
        assert info is not None
        assert (info.result, info.retry_count, attempts(backend, task_id)) == (
            result, retries, runs), task_id
    reasons = [r for _, s, r in backend.store.transitions("j", "third-time") if s == "active"]
    assert reasons == ["retry", "retry"]


def test_max_wall_clock_kills_the_process_group(make_backend: MakeBackend) -> None:
    """A task over its wall clock is killed with its children, fails, and is not retried."""
    backend = make_backend()
    backend.create_job(job("j"))
    backend.add_tasks("j", [
        TaskSpec(id="slow", max_wall_clock=timedelta(seconds=0.3), max_task_retries=2,
                 command_line=sh("sleep 60 & echo $! > child.pid; wait")),
        TaskSpec(id="stubborn", max_wall_clock=timedelta(seconds=0.3),
                 command_line=sh("trap '' TERM; sleep 60 & wait; sleep 60")),
    ])
    wait_for(settled(backend, "j", 2), "both tasks to be killed")
    slow, stubborn = backend.task("j", "slow"), backend.task("j", "stubborn")
    assert slow is not None and stubborn is not None
    assert (slow.result, slow.failure_code, slow.retry_count) == (
        "failure", "MaxWallClockTimeExceeded", 0)
    assert slow.exit_code == -signal.SIGTERM
    assert (stubborn.failure_code, stubborn.exit_code) == (
        "MaxWallClockTimeExceeded", -signal.SIGKILL)
    child = int((backend.task_dir("j", "slow") / "wd" / "child.pid").read_text())
    wait_for(lambda: not alive(child), "the task's child to die")


# -- files ---------------------------------------------------------------------------------


def file_url(path: Path) -> str:
    from urllib.parse import quote

    return "file://" + quote(str(path))


def test_resource_files_are_staged(make_backend: MakeBackend, tmp_path: Path,
                                   web: dict[str, Any]) -> None:
    """file:// and http:// resource files land in the working dir before the task runs."""
    source = tmp_path / "in put" / "data #1.txt"
    source.parent.mkdir()
    source.write_text("local data")
    web["files"]["/blob.bin"] = b"web data"
    backend = make_backend()
    backend.create_job(job("j"))
    backend.add_tasks("j", [TaskSpec(
        id="t", command_line=sh("cat sub/dir/a.txt b.bin; test -x b.bin"),
        resource_files=[ResourceFile(file_url(source), "sub/dir/a.txt"),
                        ResourceFile(web["url"] + "/blob.bin?sig=SECRET", "b.bin", "0755")])])
    wait_for(settled(backend, "j", 1), "the task")
    assert task_of(backend, "j", "t").result == "success"
    assert (backend.task_dir("j", "t") / "stdout.txt").read_text() == "local dataweb data"


def test_container_resource_files_are_staged(make_backend: MakeBackend, tmp_path: Path) -> None:
    """A container + prefix resource file stages every blob under the prefix."""
    container = tmp_path / "blobs" / "frames"
    (container / "shot1").mkdir(parents=True)
    for name in ("0001.png", "0002.png"):
        (container / "shot1" / name).write_text(name)
    (container / "shot2.png").write_text("not under the prefix")
    backend = make_backend()
    backend.create_job(job("j"))
    backend.add_tasks("j", [TaskSpec(
        id="t", command_line=sh("ls -R frames-in > listing.txt"),
        output_files=[OutputFile("listing.txt", file_url(tmp_path / "out"), "listing.txt")],
        resource_files=[ResourceFile("", "frames-in", storage_container_url=file_url(container),
                                     blob_prefix="shot1/")])])
    wait_for(settled(backend, "j", 1), "the task")
    assert task_of(backend, "j", "t").result == "success"
    listing = (tmp_path / "out" / "listing.txt").read_text().split()
    assert "0001.png" in listing and "0002.png" in listing and "shot2.png" not in listing


@pytest.mark.parametrize(("resource", "code"), [
    (ResourceFile("file:///nonexistent/file", "x"), "ResourceFileDownloadError"),
    (ResourceFile("file:///etc/hostname", "../escape"), "ResourceFilePathInvalid"),
    (ResourceFile("file:///etc/hostname", "/abs/path"), "ResourceFilePathInvalid"),
])
def test_bad_resource_file_fails_the_task(make_backend: MakeBackend, resource: ResourceFile,
                                          code: str) -> None:
    """A resource file that cannot be staged fails the task before it runs."""
    backend = make_backend()
    backend.create_job(job("j"))
    backend.add_tasks("j", [TaskSpec(id="t", command_line=sh("touch ran"),
                                     resource_files=[resource])])
    wait_for(settled(backend, "j", 1), "the task")
    info = backend.task("j", "t")
    assert info is not None and (info.result, info.failure_code) == ("failure", code)
    assert not (backend.task_dir("j", "t") / "wd" / "ran").exists()
    assert not (backend.task_dir("j", "t").parent / "escape").exists()


def test_http_resource_error_hides_the_sas(make_backend: MakeBackend, web: dict[str, Any]
                                           ) -> None:
    """A failed download names the URL without its query string."""
    backend = make_backend()
    backend.create_job(job("j"))
    backend.add_tasks("j", [TaskSpec(id="t", command_line="true", resource_files=[
        ResourceFile(web["url"] + "/missing?sv=1&sig=SECRET", "x")])])
    wait_for(settled(backend, "j", 1), "the task")
    info = backend.task("j", "t")
    assert info is not None and info.failure_code == "ResourceFileDownloadError"
    assert "404" in (info.failure_message or "")
    assert "SECRET" not in (info.failure_message or "")


def outputs(dest: Path, condition: UploadCondition) -> list[OutputFile]:
    """Three outputs under ``dest/<condition>``: one plain file, a wildcard, std files."""
    url = file_url(dest / condition)
    return [OutputFile("result.txt", url, "single/renamed.txt", condition),
            OutputFile("**/*.csv", url, "tables", condition),
            OutputFile("../std*.txt", url, "logs", condition)]


def test_output_files_follow_upload_conditions(make_backend: MakeBackend, tmp_path: Path) -> None:
    """After the task, outputs whose condition matches are copied under their path."""
    backend = make_backend()
    backend.create_job(job("j"))
    write = "echo r > result.txt; mkdir -p a/b; echo 1 > top.csv; echo 2 > a/b/deep.csv"
    for task_id, exit_code in (("good", 0), ("bad", 1)):
        dest = tmp_path / task_id
        backend.add_tasks("j", [TaskSpec(
            id=task_id, command_line=sh(f"{write}; echo done; exit {exit_code}"),
            output_files=[o for c in CONDITIONS for o in outputs(dest, c)])])
    wait_for(settled(backend, "j", 2), "both tasks")
    for task_id, matching, other in (("good", "success", "failure"),
                                     ("bad", "failure", "success")):
        for condition in (matching, "completion"):
            root = tmp_path / task_id / condition
            assert (root / "single" / "renamed.txt").read_text() == "r\n"
            assert (root / "tables" / "top.csv").read_text() == "1\n"
            assert (root / "tables" / "a" / "b" / "deep.csv").read_text() == "2\n"
            assert (root / "logs" / "stdout.txt").read_text() == "done\n"
            assert (root / "logs" / "stderr.txt").exists()
        assert not (tmp_path / task_id / other).exists()
    assert task_of(backend, "j", "good").result == "success"


def test_output_upload_over_http(make_backend: MakeBackend, web: dict[str, Any]) -> None:
    """An http(s) container URL gets one Put Blob per file, keeping its query string."""
    backend = make_backend()
    backend.create_job(job("j"))
    container = web["url"] + "/container?sv=1&sig=SECRET"
    backend.add_tasks("j", [TaskSpec(
        id="t", command_line=sh("echo hello > 'out file.txt'"),
        output_files=[OutputFile("out file.txt", container, "dir/out file.txt")])])
    wait_for(settled(backend, "j", 1), "the task")
    assert task_of(backend, "j", "t").result == "success"
    assert web["puts"] == {"/container/dir/out%20file.txt?sv=1&sig=SECRET":
                           ("BlockBlob", b"hello\n")}


def test_failed_upload_fails_the_task(make_backend: MakeBackend, tmp_path: Path) -> None:
    """An output that cannot be written fails an otherwise successful task."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a directory should be")
    backend = make_backend()
    backend.create_job(job("j"))
    backend.add_tasks("j", [
        TaskSpec(id="t", command_line=sh("echo x > out.txt"),
                 output_files=[OutputFile("out.txt", file_url(blocker), "sub/out.txt")]),
        TaskSpec(id="refused", command_line="true",
                 output_files=[OutputFile("../../*", file_url(tmp_path), "x", "completion")]),
        TaskSpec(id="after", command_line="true"),
    ])
    wait_for(settled(backend, "j", 3), "the tasks")
    info = backend.task("j", "t")
    assert info is not None
    assert (info.result, info.exit_code, info.failure_code) == ("failure", 0, "FileUploadError")
    refused = backend.task("j", "refused")
    assert refused is not None and refused.failure_code == "FileUploadError"
    assert task_of(backend, "j", "after").result == "success"


def test_retention_deletes_task_directories(make_backend: MakeBackend) -> None:
    """A completed task's directory is deleted once its retention time has passed."""
    backend = make_backend(start=False)
    backend.purge_interval = 0.0
    backend.create_job(job("j"))
    backend.add_tasks("j", [TaskSpec(id="brief", command_line="true", retention=timedelta(0)),
                            TaskSpec(id="kept", command_line="true")])
    backend.start()
    wait_for(settled(backend, "j", 2), "both tasks")
    wait_for(lambda: not backend.task_dir("j", "brief").exists(), "the directory to go")
    assert (backend.task_dir("j", "kept") / "stdout.txt").exists()
    assert task_of(backend, "j", "brief").result == "success"


def test_the_backend_retention_applies_to_tasks_without_their_own(
        make_backend: MakeBackend) -> None:
    """With retention=0 (the worker passes jobs.retention) a task naming none has its
    directory deleted too; with the default (Batch's seven days) it stays."""
    backend = make_backend(start=False, retention=0.0)
    backend.purge_interval = 0.0
    backend.create_job(job("j"))
    backend.add_tasks("j", [TaskSpec(id="plain", command_line="true")])
    backend.start()
    wait_for(settled(backend, "j", 1), "the task")
    wait_for(lambda: not backend.task_dir("j", "plain").exists(), "the directory to go")
    assert task_of(backend, "j", "plain").result == "success"


# -- stopping and crash recovery ---------------------------------------------------------


def test_close_requeues_running_tasks(make_backend: MakeBackend, tmp_path: Path) -> None:
    """close() kills running tasks, which go back to active and run on the next start."""
    gate = tmp_path / "gate"
    backend = make_backend()
    backend.create_job(job("j"))
    backend.add_tasks("j", [TaskSpec(id="t", max_task_retries=0, command_line=sh(
        f"echo run >> $AZ_BATCH_NODE_SHARED_DIR/runs; while [ ! -f {gate} ]; do sleep 0.02; done"
    ))])
    info = wait_for(lambda: (i := backend.task("j", "t")) and i.state == "running" and i,
                    "the task to run")
    assert info and info.pid is not None
    backend.close()
    assert not alive(info.pid)
    again = make_backend(start=False)  # started after the look, or it may claim first
    stopped = again.task("j", "t")
    assert stopped is not None and (stopped.state, stopped.requeue_count) == ("active", 1)
    again.start()
    gate.touch()
    wait_for(settled(again, "j", 1), "the task to run again")
    done = again.task("j", "t")
    assert done is not None and (done.result, done.retry_count) == ("success", 0)
    assert (again.home / "shared" / "runs").read_text().split() == ["run", "run"]


def test_a_stop_during_a_process_start_still_ends_it() -> None:
    """A stop that lands while a process starts, before the table holds it, still sends
    that process SIGTERM; once stopping, nothing more starts."""
    table = ProcessTable()

    def start_then_stop() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
        table.signal_all(signal.SIGTERM)  # the stop, racing this start
        return proc

    proc = table.spawn(1, start_then_stop)
    assert proc is not None
    assert proc.wait(timeout=30) == -signal.SIGTERM
    assert table.spawn(2, lambda: pytest.fail("a process started while stopping")) is None


SCHEDULER = """
import sys, time
from pathlib import Path
from worker.backends.local import LocalBackend
LocalBackend(home=Path(sys.argv[1]), slots=1, poll_interval=0.02).start()
time.sleep(600)
"""


def test_recovers_after_the_scheduler_is_killed(make_backend: MakeBackend, tmp_path: Path
                                                ) -> None:
    """After SIGKILL of the scheduler's process, start() kills the orphaned task and
    runs it again exactly once, without consuming a retry."""
    home = tmp_path / "home"
    gate = tmp_path / "gate"
    backend = make_backend(start=False, home=home)
    backend.create_job(job("j"))
    backend.add_tasks("j", [TaskSpec(id="t", max_task_retries=0, command_line=sh(
        f"echo run >> $AZ_BATCH_NODE_SHARED_DIR/runs; while [ ! -f {gate} ]; do sleep 0.02; done"
    ))])
    backend.seal_job("j")
    scheduler = subprocess.Popen([sys.executable, "-c", SCHEDULER, str(home)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        info = wait_for(lambda: (i := backend.task("j", "t")) and i.state == "running" and i,
                        "the task to run in the scheduler process")
    finally:
        scheduler.kill()
        scheduler.wait()
    assert info and info.pid is not None
    orphan = info.pid
    assert alive(orphan)
    backend.start()
    wait_for(lambda: not alive(orphan), "the orphaned task to be killed")
    gate.touch()
    wait_for(lambda: status_of(backend, "j").state == "completed",
             "the job to complete")
    done = backend.task("j", "t")
    assert done is not None
    assert (done.result, done.retry_count, done.requeue_count) == ("success", 0, 1)
    assert (home / "shared" / "runs").read_text().split() == ["run", "run"]
