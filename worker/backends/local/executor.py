"""The local executor: Azure Batch-style jobs and tasks run as processes here.

:class:`LocalBackend` implements the ``Backend`` protocol on a SQLite store
(``<home>/executor.db``). Constructing one only opens the store, so ``fanout
status`` can read jobs while the daemon runs them; :meth:`LocalBackend.start` starts
the scheduler thread and :meth:`LocalBackend.close` stops it, killing running tasks
and putting them back to ``active`` so they run again on the next start.

Each ready task gets its ``required_slots`` of a fixed number of slots, in order of
job priority, job creation and task insertion. One long-lived runner thread per slot
claims a task that fits the free slots, runs it, records the outcome and claims the
next, without handing work between threads (a thread per task cost more than a
trivial task itself). The scheduler thread does what no runner is there to do: it
notices tasks added while runners sleep (woken by ``add_tasks`` and ``seal_job``,
or every ``poll_interval`` for other processes' additions), re-checks dependencies
and purges old task directories. Only one process may run the scheduler on a home
(an exclusive lock on ``<home>/executor.lock``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO

import structlog

from handlers.base import JobSpec, TaskSpec
from worker.backends.base import AddResult, BackendStats, JobState, JobStatus
from worker.backends.local import process
from worker.backends.local.runner import Node, Outcome, ProcessTable, run_attempt
from worker.backends.local.store import Store, TaskInfo, TaskRun
from worker.errors import ConfigFault
from worker.storage.base import Storage

log = structlog.get_logger(__name__)

#: Seconds between sweeps for task directories whose retention time has passed.
PURGE_INTERVAL = 60.0


class LocalBackend:
    """Runs jobs' tasks as processes on this machine, with Batch's semantics.

    ``slots`` is how many task slots run at once; ``poll_interval`` bounds how long a
    task added by another process waits to be seen; ``kill_grace`` is the time
    between SIGTERM and SIGKILL when a task's process group is stopped.
    """

    def __init__(self, *, home: Path, slots: int, pool: str = "local",
                 poll_interval: float = 0.2, storage: Storage | None = None,
                 kill_grace: float = 5.0) -> None:
        if slots < 1:
            raise ValueError(f"slots must be at least 1, not {slots}")
        self.home = Path(home).absolute()
        self.slots = slots
        self.pool = pool
        self.poll_interval = poll_interval
        self.home.mkdir(parents=True, exist_ok=True)
        self.store = Store(path=self.home / "executor.db", pool=pool)
        self._node = Node.create(home=self.home, kill_grace=kill_grace, storage=storage)
        self._lock = threading.Lock()
        #: Runners with nothing to claim wait here; notified when work may have appeared.
        self._work = threading.Condition(self._lock)
        self._busy = 0
        self._runners: list[threading.Thread] = []
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._table = ProcessTable()
        self._thread: threading.Thread | None = None
        self._lockfile: IO[str] | None = None
        self._last_purge = 0.0
        #: Seconds between sweeps for expired task directories.
        self.purge_interval = PURGE_INTERVAL

    # -- Backend protocol --------------------------------------------------------------

    @property
    def max_tasks_per_request(self) -> int:
        """The largest chunk ``add_tasks`` takes, as on Azure Batch."""
        return 100

    def probe(self) -> None:
        """Nothing to check: the local executor has no credentials or quotas."""

    def create_job(self, job: JobSpec) -> JobState:
        """Create the job (``"created"``), or report ``"exists"`` / ``"sealed"``."""
        return self.store.create_job(job)

    def add_tasks(self, job_id: str, tasks: Sequence[TaskSpec]) -> AddResult:
        """Add one chunk in one transaction; ids already in the job (compared
        case-insensitively) count in ``existed``."""
        result = self.store.add_tasks(job_id, tasks)
        if result.added:
            self._wake.set()
        return result

    def seal_job(self, job_id: str) -> None:
        """The job completes once every task has completed."""
        self.store.seal_job(job_id)
        self._wake.set()

    def job_status(self, job_id: str) -> JobStatus | None:
        """One job's state and task counts, None if there is no such job."""
        return self.store.job_status(job_id)

    def list_jobs(self, limit: int = 50) -> list[JobStatus]:
        """Recent jobs with their task counts, newest first."""
        return self.store.list_jobs(limit)

    def stats(self) -> BackendStats:
        """Slots by state (as nodes), active jobs and their task counts."""
        active, counts, busy = self.store.active_summary(self.slots)
        busy = min(busy, self.slots)
        return BackendStats(
            pool_nodes={(self.pool, "running"): busy, (self.pool, "idle"): self.slots - busy},
            pool_size={(self.pool, "current_dedicated"): 1, (self.pool, "target_dedicated"): 1,
                       (self.pool, "current_low_priority"): 0,
                       (self.pool, "target_low_priority"): 0},
            active_jobs=active,
            job_tasks=counts,
        )

    def close(self) -> None:
        """Stop the scheduler (running tasks are killed and go back to ``active``)
        and close the store."""
        self.stop()
        self.store.close()

    # -- beyond the protocol ----------------------------------------------------------

    def task(self, job_id: str, task_id: str) -> TaskInfo | None:
        """One task's state and last result, None if there is no such task."""
        return self.store.task(job_id, task_id)

    def tasks(self, job_id: str, *, state: str | None = None, limit: int = 1000) -> list[TaskInfo]:
        """A job's tasks in insertion order, optionally only those in ``state``."""
        return self.store.tasks(job_id, state=state, limit=limit)

    def task_dir(self, job_id: str, task_id: str) -> Path:
        """Where a task's ``stdout.txt``, ``stderr.txt`` and ``wd/`` live."""
        return self._node.task_dir(job_id, task_id)

    def __enter__(self) -> LocalBackend:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- the scheduler ----------------------------------------------------------------

    def start(self) -> None:
        """Recover tasks a dead scheduler left running, then start scheduling.

        Raises ``ConfigFault`` when another process already runs the scheduler here.
        """
        if self._thread is not None:
            return
        self._lockfile = _exclusive_lock(self.home / "executor.lock")
        self._node.shared_dir.mkdir(parents=True, exist_ok=True)
        self._recover()
        self._stop.clear()
        self._table = ProcessTable()
        self._runners = [threading.Thread(target=self._serve, name=f"fanout-local-runner-{i}",
                                          daemon=True) for i in range(self.slots)]
        for runner in self._runners:
            runner.start()
        self._thread = threading.Thread(target=self._loop, name="fanout-local-scheduler",
                                        daemon=True)
        self._thread.start()
        log.info("executor.started", home=str(self.home), slots=self.slots, pool=self.pool)

    def stop(self) -> None:
        """Stop scheduling and end running tasks; they go back to ``active``."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        self._wake.set()
        self._kick(every=True)
        thread.join()
        killed = self._table.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self._node.kill_grace
        for runner in self._runners:
            runner.join(max(0.0, deadline - time.monotonic()))
        if any(r.is_alive() for r in self._runners):
            self._table.signal_all(signal.SIGKILL)
        for runner in self._runners:
            runner.join()
        self._runners = []
        if self._lockfile is not None:
            self._lockfile.close()
            self._lockfile = None
        log.info("executor.stopped", home=str(self.home), tasks_interrupted=killed)

    def _recover(self) -> None:
        orphans = self.store.recover()
        for orphan in orphans:
            if orphan.pid is not None and process.kill_orphan(orphan.pid, orphan.proc_start):
                log.warning("task.orphan_killed", pid=orphan.pid)
        if orphans:
            log.warning("executor.recovered", tasks=len(orphans),
                        detail="tasks left running by a stopped scheduler will run again")

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                self._tick()
            except Exception:
                log.exception("executor.tick_failed", detail="retrying after the poll interval")
            self._wake.wait(self.poll_interval)

    def _tick(self) -> None:
        """One scheduling round: purge, unblock dependents, wake a runner if work waits."""
        now = time.time()
        if now - self._last_purge >= self.purge_interval:
            self._last_purge = now
            self._purge(now)
        self.store.evaluate_waiting()
        with self._lock:
            free = self.slots - self._busy
        if free > 0 and self.store.has_ready():
            self._kick()

    def _kick(self, *, every: bool = False) -> None:
        """Wake one waiting runner (it wakes the next if slots stay free), or all."""
        with self._work:
            if every:
                self._work.notify_all()
            else:
                self._work.notify()

    # -- the runners ------------------------------------------------------------------

    def _serve(self) -> None:
        """A runner thread: claim a task that fits, run it, record it; until stopped."""
        try:
            while (claimed := self._next()) is not None:
                run, need = claimed
                try:
                    self._attempt(run)
                finally:
                    with self._lock:
                        self._busy -= need
        finally:
            self.store.release()  # this thread ends: its connection goes with it

    def _next(self) -> tuple[TaskRun, int] | None:
        """The next task and the slots it holds; waits while none fits; None once stopping.

        Claims are made under the slot lock, so two runners never count the same free
        slot; a runner that leaves slots free wakes another waiting one.
        """
        with self._work:
            while not self._stop.is_set():
                free = self.slots - self._busy
                run = self._claim(free) if free > 0 else None
                if run is not None:
                    need = min(max(run.required_slots, 1), self.slots)
                    self._busy += need
                    if self._busy < self.slots:
                        self._work.notify()
                    return run, need
                self._work.wait()
        return None

    def _claim(self, free: int) -> TaskRun | None:
        """Claim one ready task fitting ``free`` slots; a store fault is logged and the
        runner waits for the next wake-up (or poll) to try again."""
        try:
            self.store.evaluate_waiting()
            runs = self.store.claim(free, self.slots, limit=1)
        except Exception:
            log.exception("executor.claim_failed", detail="retrying after the poll interval")
            return None
        return runs[0] if runs else None

    def _attempt(self, run: TaskRun) -> None:
        """One attempt, then its outcome recorded; a fault puts the task back to active."""
        started = time.monotonic()
        try:
            outcome = run_attempt(run, self._node, self._table,
                                  lambda pid, start: self._running(run, pid, start))
            self._record(run, outcome, time.monotonic() - started)
        except Exception:
            log.exception("task.attempt_failed", job_id=run.job_id, task_id=run.task_id,
                          detail="the task goes back to active")
            with contextlib.suppress(Exception):
                self.store.requeue(run.seq)

    def _running(self, run: TaskRun, pid: int, start: int | None) -> None:
        self.store.mark_running(run.seq, pid, start)
        log.debug("task.started", job_id=run.job_id, task_id=run.task_id, pid=pid,
                  retry_count=run.retry_count)

    def _record(self, run: TaskRun, outcome: Outcome, duration: float) -> None:
        if outcome.interrupted:
            self.store.requeue(run.seq)
            log.info("task.interrupted", job_id=run.job_id, task_id=run.task_id)
            return
        retries = run.max_task_retries
        if outcome.retryable and (retries < 0 or run.retry_count < retries):
            self.store.retry(run.seq, exit_code=outcome.exit_code,
                             failure_code=outcome.failure_code,
                             failure_message=outcome.failure_message)
            log.info("task.retrying", job_id=run.job_id, task_id=run.task_id,
                     exit_code=outcome.exit_code, retry_count=run.retry_count + 1)
            return
        self.store.finish(run.seq, success=outcome.success, exit_code=outcome.exit_code,
                          failure_code=outcome.failure_code,
                          failure_message=outcome.failure_message)
        # One line per task would swamp the log of a 100,000-task sweep: successes
        # are debug; failures, which someone must read, are warnings.
        emit = log.debug if outcome.success else log.warning
        emit("task.completed", job_id=run.job_id, task_id=run.task_id,
             exit_code=outcome.exit_code, duration=round(duration, 3),
             result="success" if outcome.success else "failure",
             failure_code=outcome.failure_code)

    def _purge(self, now: float) -> None:
        """Delete the directories of tasks whose retention time has passed, as Batch does."""
        due = self.store.purgeable(now)
        for item in due:
            shutil.rmtree(self._node.task_dir(item.job_id, item.task_id), ignore_errors=True)
        if due:
            self.store.purged([item.seq for item in due])
            log.debug("executor.purged", tasks=len(due))


def _exclusive_lock(path: Path) -> IO[str]:
    """Hold ``path`` locked for as long as the returned file is open."""
    fh = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held until stop()
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise ConfigFault(f"another process runs the local executor on {path.parent}",
                          code="ExecutorBusy") from None
    fh.truncate(0)
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    return fh
