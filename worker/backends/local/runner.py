"""One attempt of one task: stage its files, run its process, upload its outputs.

The command line runs without a shell, as on Azure Batch: ``shlex.split`` and
``Popen`` in a new session, in ``<home>/tasks/<job>/<task>/wd``, with ``stdout.txt``
and ``stderr.txt`` beside the working directory and Batch's ``AZ_BATCH_*``
variables in the environment.

How an attempt ended decides which of the task's exit options apply (``Outcome.end``):
a task that could not start (a resource file failed to stage, the command line does
not parse, its program is missing or not runnable: Batch reports those as scheduling
errors such as ``CommandProgramNotFound`` before any process runs) ended with a
pre-processing error; one whose output files failed to upload with a file upload
error; any other with its exit code.

A task with container settings runs in a container of Docker or Podman
(``container.py``): the engine's client is the process here, in the same process
group, and a stopped or killed task's container is removed after it. With no engine
the task fails as a pre-processing error (``ContainerUnavailable``); the executor
refuses such tasks when they are added, so this happens only to tasks stored before.
A container task never runs on the host.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import os
import shlex
import signal
import struct
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from handlers.base import TaskEnd
from worker.backends.base import FailureCategory
from worker.backends.local import container as containers
from worker.backends.local import process, transfer
from worker.backends.local.store import TASK_ENDED, TaskRun
from worker.storage.base import Storage

log = structlog.get_logger(__name__)

#: Variables a task inherits from the executor's own environment.
INHERITED_ENV = ("PATH", "HOME", "LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "LC_MESSAGES",
                 "TMPDIR", "TMP", "TEMP", "TZ", "USER", "LOGNAME", "SHELL")

#: Exit codes a shell would report for a program it cannot find or cannot run.
_NOT_FOUND, _NOT_RUNNABLE = 127, 126

#: How ``stdout.txt`` and ``stderr.txt`` are opened: one ``open`` system call each
#: (a retry's attempt empties them, as ``"wb"`` did), and no Python file object, whose
#: ``fstat``, ``ioctl`` and ``lseek`` cost as much again.
_LOG_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC

#: ext2/3/4's per-directory "top of a hierarchy" flag (``chattr +T``), set through
#: the ``FS_IOC_GETFLAGS``/``FS_IOC_SETFLAGS`` ioctls.
_FS_IOC_GETFLAGS, _FS_IOC_SETFLAGS, _FS_TOPDIR_FL = 0x80086601, 0x40086602, 0x00020000


@dataclass(frozen=True, slots=True)
class Node:
    """What every attempt on this executor shares: its directories and settings."""

    home: Path
    user: str
    kill_grace: float
    storage: Storage | None = None
    #: Runs container tasks (Docker or Podman, found on first use).
    containers: containers.ContainerRuntime = field(
        default_factory=lambda: containers.ContainerRuntime("none"))
    #: The variables of ``INHERITED_ENV`` the executor had when it was created: read
    #: once, as the daemon's environment does not change while it runs, rather than
    #: through ``os.environ``'s encoding and decoding for every task.
    inherited: dict[str, str] = field(default_factory=lambda: inherited_environment())

    @property
    def shared_dir(self) -> Path:
        return self.home / "shared"

    @property
    def tasks_dir(self) -> Path:
        return self.home / "tasks"

    def task_dir(self, job_id: str, task_id: str) -> Path:
        return self.home / "tasks" / job_id / task_id

    def task_path(self, job_id: str, task_id: str) -> str:
        """:meth:`task_dir` as a string, for the per-task path (no ``Path`` objects)."""
        return f"{self.home}/tasks/{job_id}/{task_id}"

    def prepare(self) -> None:
        """Create ``shared/`` and ``tasks/``, the latter spreading its job directories
        (see :func:`spread_subdirectories`)."""
        self.shared_dir.mkdir(parents=True, exist_ok=True)
        self.tasks_dir.mkdir(parents=True, exist_ok=True)
        spread_subdirectories(self.tasks_dir)

    @classmethod
    def create(cls, *, home: Path, kill_grace: float, storage: Storage | None,
               container_engine: str = "auto") -> Node:
        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = "local"
        return cls(home=home, user=user, kill_grace=kill_grace, storage=storage,
                   containers=containers.ContainerRuntime(container_engine))


@dataclass(frozen=True, slots=True)
class Outcome:
    """How an attempt ended. ``retryable``: its process ran and exited non-zero;
    ``interrupted``: the executor stopped it (the task goes back to ``active``);
    ``ended``: its job's termination or deletion ended it (already recorded);
    ``end``: which exit options apply."""

    exit_code: int | None
    failure_code: str | None = None
    failure_message: str | None = None
    retryable: bool = False
    interrupted: bool = False
    end: TaskEnd = "exit"
    ended: bool = False

    @property
    def success(self) -> bool:
        return self.exit_code == 0 and self.failure_code is None

    @property
    def category(self) -> FailureCategory | None:
        """Why a failed attempt failed (None for a success)."""
        if self.success:
            return None
        if self.failure_code == TASK_ENDED:
            return "cancelled"
        if self.end == "file_upload_error":
            return "output_upload_failure"
        if self.end == "pre_processing_error":
            if (self.failure_code or "").startswith("Container"):
                return "start_task_failed"  # as Batch's Container* codes
            # A command line that does not parse or a program that cannot start (it
            # reports a shell's exit code, 127 or 126) is the command's own fault.
            return ("exit_code" if (self.failure_code or "").startswith("Command")
                    else "resource_file_failure")
        if self.failure_code == "MaxWallClockTimeExceeded":
            return "wall_clock_timeout"
        return "exit_code"


_ENDED = Outcome(None, ended=True)


class ProcessTable:
    """The running task processes, so :meth:`stop` can end them all, and
    :meth:`end` those of a terminated or deleted job."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        #: Tasks ended by their job's termination or deletion, until their attempt ends.
        self._ended: set[int] = set()
        self.stopping = False

    def spawn(self, seq: int,
              start: Callable[[], subprocess.Popen[bytes]]) -> subprocess.Popen[bytes] | None:
        """Start a process unless the executor is stopping or the task was ended
        (then None).

        The process starts outside the lock, so one runner's start (a fork and exec)
        does not hold up the others; a stop or end that came meanwhile missed this
        process, so it is sent the SIGTERM here.
        """
        if self.stopping or seq in self._ended:
            return None
        proc = start()
        with self._lock:
            self._procs[seq] = proc
            missed = self.stopping or seq in self._ended
        if missed:
            process.signal_group(proc.pid, signal.SIGTERM)
        return proc

    def remove(self, seq: int) -> None:
        with self._lock:
            self._procs.pop(seq, None)

    def end(self, seqs: Sequence[int]) -> None:
        """SIGTERM the process groups of these tasks; those not started yet never
        start (their attempts end as :meth:`ended`). The caller passes only attempts
        under way, and :meth:`forget` each at its attempt's end."""
        with self._lock:
            procs = [p for s in seqs if (p := self._procs.get(s)) is not None]
            self._ended.update(seqs)
        for proc in procs:
            process.signal_group(proc.pid, signal.SIGTERM)

    def kill(self, seqs: Sequence[int]) -> None:
        """SIGKILL the process groups of those of these tasks still running."""
        with self._lock:
            procs = [p for s in seqs if (p := self._procs.get(s)) is not None]
        for proc in procs:
            if proc.returncode is None:
                process.signal_group(proc.pid, signal.SIGKILL)

    def ended(self, seq: int) -> bool:
        """Whether the task was ended by :meth:`end` during this attempt."""
        return seq in self._ended

    def forget(self, seq: int) -> None:
        """The task's attempt is over: drop its end mark."""
        with self._lock:
            self._ended.discard(seq)

    def running(self) -> list[int]:
        """The seqs of the tasks whose processes run."""
        with self._lock:
            return list(self._procs)

    def signal_all(self, sig: int) -> int:
        """Mark the table stopping and signal every live process group."""
        with self._lock:
            self.stopping = True
            procs = list(self._procs.values())
        for proc in procs:
            process.signal_group(proc.pid, sig)
        return len(procs)


def inherited_environment() -> dict[str, str]:
    """The subset of os.environ a task inherits (``PATH`` at least)."""
    env = {k: os.environ[k] for k in INHERITED_ENV if k in os.environ}
    env.setdefault("PATH", os.defpath)
    return env


def environment(run: TaskRun, node: Node, task_dir: str, wd: str) -> dict[str, str]:
    """The inherited subset of os.environ, the task's own variables, then Batch's."""
    env = dict(node.inherited)
    env.update(run.environment)
    env.update({
        "AZ_BATCH_ACCOUNT_NAME": "local",
        "AZ_BATCH_POOL_ID": run.pool,
        "AZ_BATCH_NODE_ID": "local",
        "AZ_BATCH_NODE_IS_DEDICATED": "true",
        "AZ_BATCH_NODE_ROOT_DIR": str(node.home),
        "AZ_BATCH_NODE_SHARED_DIR": str(node.shared_dir),
        "AZ_BATCH_JOB_ID": run.job_id,
        "AZ_BATCH_TASK_ID": run.task_id,
        "AZ_BATCH_TASK_DIR": task_dir,
        "AZ_BATCH_TASK_WORKING_DIR": wd,
        "AZ_BATCH_TASK_USER": node.user,
    })
    return env


def spread_subdirectories(directory: Path | str) -> bool:
    """Have ext4 place each new subdirectory of ``directory`` in a block group of its
    own choosing rather than the directory's (the Orlov allocator's treatment of
    top-level directories); False where the file system has no such flag.

    Set on ``tasks/`` and on every job's directory, so each task's four new inodes
    (its directory, ``wd/``, ``stdout.txt``, ``stderr.txt``) land in a block group
    with few directories and many free inodes. Without it they all land in the
    home's group, and on a journal-less ext4 every inode allocated there scans past
    each inode deleted there in the last minutes (the previous job's purged
    directories, other programs' deleted files): up to 0.3 ms of system CPU per inode
    on a busy machine, against 0.02 ms spread.
    """
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        flags = struct.unpack("i", fcntl.ioctl(fd, _FS_IOC_GETFLAGS, bytes(4)))[0]
        if not flags & _FS_TOPDIR_FL:
            fcntl.ioctl(fd, _FS_IOC_SETFLAGS, struct.pack("i", flags | _FS_TOPDIR_FL))
    except OSError:  # not ext2/3/4 (tmpfs, xfs, btrfs...), or not the owner
        return False
    finally:
        os.close(fd)
    return True


def make_task_dirs(task_dir: str, wd: str) -> None:
    """Create the task's directory and its ``wd/`` with one ``mkdir`` each (an earlier
    attempt's stay as they are); the job's directory, spread, for its first task."""
    try:
        os.mkdir(task_dir)
    except FileExistsError:
        pass
    except FileNotFoundError:
        job_dir = os.path.dirname(task_dir)
        for directory in (os.path.dirname(job_dir), job_dir):
            try:
                os.makedirs(directory)
            except FileExistsError:
                continue
            spread_subdirectories(directory)
        os.makedirs(task_dir, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(wd)


#: Characters after which a command line needs ``shlex`` (quotes, escapes) or which
#: ``str.split`` takes for whitespace and ``shlex`` does not.
_SHLEX_ONLY = frozenset("'\"\\\x0b\x0c\x1c\x1d\x1e\x1f")


def split_command(command_line: str) -> list[str]:
    """``shlex.split(command_line)``; a plain ASCII line with no quote or backslash
    splits the same on whitespace, at a tenth of shlex's cost (its per-character
    state machine was 3% of a runner's CPU)."""
    if command_line.isascii() and _SHLEX_ONLY.isdisjoint(command_line):
        return command_line.split()
    return shlex.split(command_line)


_devnull_fd: int | None = None
_devnull_lock = threading.Lock()


def _devnull() -> int:
    """One ``/dev/null`` descriptor for every task's stdin, opened on first use and
    kept (``subprocess.DEVNULL`` opens and closes one for every process)."""
    global _devnull_fd
    if _devnull_fd is None:
        with _devnull_lock:
            if _devnull_fd is None:
                _devnull_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    return _devnull_fd


def run_attempt(run: TaskRun, node: Node, table: ProcessTable,
                on_running: Callable[[int, int | None], None]) -> Outcome:
    """Run one attempt of ``run`` to its end; never raises for the task's own faults.

    ``on_running(pid, start_time)`` is called once the process has started.
    """
    task_dir = node.task_path(run.job_id, run.task_id)  # strings: see Node.task_path
    wd = f"{task_dir}/wd"
    make_task_dirs(task_dir, wd)
    env = environment(run, node, task_dir, wd)
    try:
        if run.resource_files:
            transfer.stage(run.resource_files, Path(wd), node.storage)
    except transfer.TransferError as exc:
        _note(task_dir, f"resource files: {exc.message}")
        return Outcome(None, exc.code, exc.message, end="pre_processing_error")
    if table.ended(run.seq):
        return _ENDED
    if table.stopping:
        return Outcome(None, interrupted=True)
    try:
        argv = split_command(run.command_line)
    except ValueError as exc:
        argv, problem = [], f"the command line does not parse: {exc}"
    else:
        # an empty command line runs a container image's own ENTRYPOINT, as on Batch
        problem = "the command line is empty" if run.container is None and not argv else ""
    if problem:
        _note(task_dir, problem)
        return Outcome(None, "CommandLineInvalid", problem, end="pre_processing_error")
    in_container: _InContainer | None = None
    if run.container is not None:
        prepared = _in_container(run, node, argv, env, Path(task_dir), Path(wd))
        if isinstance(prepared, Outcome):
            return prepared
        in_container = prepared
        argv, popen_env = prepared.argv, prepared.env
    else:
        popen_env = env
    started = _start(run, argv, popen_env, task_dir, wd, table)
    if isinstance(started, Outcome):
        return started
    try:
        return _finish(run, started, node, table, on_running, task_dir, wd, env)
    finally:
        if in_container is not None and started.returncode != 0:
            # a container whose client was stopped or killed may still run
            containers.remove(in_container.engine, in_container.name)


@dataclass(frozen=True, slots=True)
class _InContainer:
    """What runs a container task: the engine's command and environment."""

    engine: containers.Engine
    name: str
    argv: list[str]
    env: dict[str, str]


def _in_container(run: TaskRun, node: Node, argv: list[str], env: dict[str, str],
                  task_dir: Path, wd: Path) -> _InContainer | Outcome:
    """The engine command for a container task, or the pre-processing failure of one
    that no engine can run (never the host)."""
    assert run.container is not None
    engine = node.containers.engine()
    if engine is None:
        message = node.containers.refusal(run.container.image)
        _note(task_dir, message)
        return Outcome(None, containers.CONTAINER_UNAVAILABLE, message,
                       end="pre_processing_error")
    # The task's own variables and Batch's, by name; the engine's client reads their
    # values from its environment: this process's (DOCKER_HOST, XDG_RUNTIME_DIR...) with
    # them on top.
    names = [k for k in env if k in run.environment or k.startswith("AZ_BATCH_")]
    name = containers.container_name(node.home, run.seq)
    node.shared_dir.mkdir(parents=True, exist_ok=True)
    command = containers.run_argv(
        engine, run.container, argv, name=name, mounts=[task_dir, node.shared_dir.absolute()],
        workdir=wd, env_names=names,
        labels={"fanout.job": run.job_id, "fanout.task": run.task_id})
    log.debug("task.container", job_id=run.job_id, task_id=run.task_id,
              image=run.container.image, engine=engine.name, container=name)
    return _InContainer(engine=engine, name=name, argv=command,
                        env={**os.environ, **{k: env[k] for k in names}})


def _start(run: TaskRun, argv: list[str], env: dict[str, str], task_dir: str, wd: str,
           table: ProcessTable) -> subprocess.Popen[bytes] | Outcome:
    out = os.open(f"{task_dir}/stdout.txt", _LOG_FLAGS, 0o666)
    try:
        err = os.open(f"{task_dir}/stderr.txt", _LOG_FLAGS, 0o666)
    except BaseException:
        os.close(out)
        raise
    try:
        proc = table.spawn(run.seq, lambda: subprocess.Popen(
            argv, cwd=wd, env=env, stdin=_devnull(), stdout=out, stderr=err,
            start_new_session=True))
    except (OSError, ValueError) as exc:  # ValueError: a NUL in argv or env
        missing = isinstance(exc, FileNotFoundError)
        reason = exc.strerror if isinstance(exc, OSError) else str(exc)
        message = f"cannot start {argv[0]!r}: {reason or type(exc).__name__}"
        os.write(err, message.encode() + b"\n")
        return Outcome(_NOT_FOUND if missing else _NOT_RUNNABLE,
                       "CommandProgramNotFound" if missing else "CommandProgramNotStarted",
                       message, end="pre_processing_error")
    finally:
        os.close(out)
        os.close(err)
    if proc is None:
        return _ENDED if table.ended(run.seq) else Outcome(None, interrupted=True)
    return proc


def _finish(run: TaskRun, proc: subprocess.Popen[bytes], node: Node, table: ProcessTable,
            on_running: Callable[[int, int | None], None], task_dir: str, wd: str,
            env: dict[str, str]) -> Outcome:
    timed_out = False
    try:
        on_running(proc.pid, process.start_time(proc.pid))
        if not process.wait_exit(proc, run.max_wall_clock):
            timed_out = True
            process.end_group(proc, node.kill_grace)
        # Anything the task left running in its group ends with it, as on Batch.
        process.signal_group(proc.pid, signal.SIGKILL)
    except BaseException:
        process.end_group(proc, node.kill_grace)
        raise
    finally:
        table.remove(run.seq)
        code = proc.wait()
    if table.ended(run.seq):
        return _ENDED
    if table.stopping and not timed_out:
        return Outcome(code, interrupted=True)
    if timed_out:
        outcome = Outcome(code, "MaxWallClockTimeExceeded",
                          f"the task ran longer than its max wall clock of "
                          f"{run.max_wall_clock:g} s and was killed")
    elif code == containers.ENGINE_ERROR_EXIT and run.container is not None:
        # the engine could not run the container (a pull, an option): see stderr.txt
        outcome = Outcome(code, "ContainerMiscError",
                          f"the container engine could not run image {run.container.image} "
                          f"(exit {code}; its error is in stderr.txt)",
                          end="pre_processing_error")
    elif code != 0:
        outcome = Outcome(code, "FailureExitCode", f"the task exited with code {code}",
                          retryable=True)
    else:
        outcome = Outcome(0)
    return _upload(run, outcome, task_dir, wd, env, node)


def _upload(run: TaskRun, outcome: Outcome, task_dir: str, wd: str, env: dict[str, str],
            node: Node) -> Outcome:
    if not run.output_files:
        return outcome
    try:
        transfer.upload(run.output_files, success=outcome.success, task_dir=Path(task_dir),
                        wd=Path(wd), env=env, storage=node.storage)
    except transfer.TransferError as exc:
        _note(task_dir, f"output files: {exc.message}")
        return Outcome(outcome.exit_code, exc.code, exc.message, retryable=outcome.retryable,
                       end="file_upload_error")
    return outcome


def _note(task_dir: Path | str, message: str) -> None:
    """Append an executor message to the task's ``fanout.txt`` (like Batch's
    ``fileuploaderr.txt``), so a user reading the task directory sees why it failed."""
    os.makedirs(task_dir, exist_ok=True)
    with open(os.path.join(task_dir, "fanout.txt"), "a", encoding="utf-8") as fh:
        fh.write(message + "\n")
