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
or every ``poll_interval`` for other processes' additions), re-checks dependencies,
terminates jobs whose max wall clock has passed, stops tasks whose job another
process terminated or deleted, and purges old task directories. Only one process may
run the scheduler on a home (an exclusive lock on ``<home>/executor.lock``).

Job outcomes follow Batch: a task's exit conditions decide whether its dependents may
run and, on a job with ``on_task_failure = "performexitoptionsjobaction"``, whether
its end terminates the job (``TaskFailed``); a job's max wall clock counts from its
creation (``MaxWallClockTimeExpiry``); terminating a job ends its running tasks as
``TaskEnded`` and leaves its active ones active, never to run.
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
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import IO

import structlog

from handlers.base import JobSpec, TaskSpec
from worker.backends.base import (
    REASON_TASK_FAILED,
    REASON_WALL_CLOCK,
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
    TaskCounts,
)
from worker.backends.local import container as containers
from worker.backends.local import process
from worker.backends.local.runner import Node, Outcome, ProcessTable, run_attempt
from worker.backends.local.store import DEFAULT_RETENTION, Store, TaskInfo, TaskRun
from worker.errors import ConfigFault, ContainerUnavailable
from worker.storage.base import Storage

log = structlog.get_logger(__name__)

#: Seconds between sweeps for task directories whose retention time has passed.
PURGE_INTERVAL = 60.0
#: The local executor's "VM size", for ``[cost.prices]``.
LOCAL_VM_SIZE = "local"


class LocalBackend:
    """Runs jobs' tasks as processes on this machine, with Batch's semantics.

    ``slots`` is how many task slots run at once; ``poll_interval`` bounds how long a
    task added by another process waits to be seen; ``kill_grace`` is the time
    between SIGTERM and SIGKILL when a task's process group is stopped.
    """

    def __init__(self, *, home: Path, slots: int, pool: str = "local",
                 poll_interval: float = 0.2, storage: Storage | None = None,
                 kill_grace: float = 5.0, retention: float = DEFAULT_RETENTION,
                 container_engine: str = "auto") -> None:
        """``container_engine`` runs container tasks: ``auto`` (Docker, else Podman,
        whichever answers ``info``; found on the first container task), ``docker``,
        ``podman`` or ``none`` (container tasks are refused)."""
        if slots < 1:
            raise ValueError(f"slots must be at least 1, not {slots}")
        self.home = Path(home).absolute()
        self.slots = slots
        self.pool = pool
        self.poll_interval = poll_interval
        self.home.mkdir(parents=True, exist_ok=True)
        self.store = Store(path=self.home / "executor.db", pool=pool, retention=retention)
        self._node = Node.create(home=self.home, kill_grace=kill_grace, storage=storage,
                                 container_engine=container_engine)
        self._lock = threading.Lock()
        #: Runners with nothing to claim wait here; notified when work may have appeared.
        self._work = threading.Condition(self._lock)
        self._busy = 0
        #: The seqs of the attempts under way, from their claim to the end of their
        #: attempt (a deletion waits for its tasks' to end).
        self._inflight: set[int] = set()
        self._settled = threading.Condition(self._lock)
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
        case-insensitively) count in ``existed``. As on Azure Batch (see
        ``Store.add_tasks``): a missing job is a ``SystemFault``, a malformed task
        refuses the whole chunk (``BatchRejected``), and a completed job that was sealed
        counts the chunk as existing (a window job's is ``BatchRejected``
        ``JobCompleted``).

        A chunk with a container task when no container engine answers is refused
        whole, before anything is stored: ``ContainerUnavailable`` naming the image (the
        message is dead-lettered; the task never runs on the host)."""
        for task in tasks:
            if task.container is not None:
                if self._node.containers.engine() is None:
                    raise ContainerUnavailable(
                        f"task {task.id} of job {job_id}: "
                        f"{self._node.containers.refusal(task.container.image)}")
                break
        result = self.store.add_tasks(job_id, tasks)
        if result.added:
            self._wake.set()
        return result

    def seal_job(self, job_id: str) -> None:
        """The job completes once every task has completed. A missing job is a
        ``SystemFault``, as Batch's 404 ``JobNotFound`` is on the Azure backend."""
        self.store.seal_job(job_id)
        self._wake.set()

    def job_status(self, job_id: str) -> JobStatus | None:
        """One job's state and task counts, None if there is no such job."""
        return self.store.job_status(job_id)

    def list_jobs(self, limit: int = 50) -> list[JobStatus]:
        """Recent jobs with their task counts, newest first."""
        return self.store.list_jobs(limit)

    def stats(self) -> BackendStats:
        """Slots by state (as nodes), active jobs and their task counts, and the pool's
        capacity for admission: its slots as nodes of one slot each, the active tasks of
        its active jobs as pending (no resize errors: the pool never resizes)."""
        active, counts, busy = self.store.active_summary(self.slots)
        busy = min(busy, self.slots)
        capacity = PoolCapacity(
            pool=self.pool, nodes={"running": busy, "idle": self.slots - busy},
            pending=counts.get("active", 0),
            running=counts.get("running", 0) + counts.get("preparing", 0),
            current=self.slots, target=self.slots, current_dedicated=self.slots,
            target_dedicated=self.slots)
        return BackendStats(
            pools={self.pool: capacity},
            pool_nodes={(self.pool, "running"): busy, (self.pool, "idle"): self.slots - busy},
            pool_size={(self.pool, "current_dedicated"): 1, (self.pool, "target_dedicated"): 1,
                       (self.pool, "current_low_priority"): 0,
                       (self.pool, "target_low_priority"): 0},
            active_jobs=active,
            job_tasks=counts,
        )

    # -- what the job monitor needs ---------------------------------------------------

    def list_fanout_jobs(self, *, completed_since: datetime | None = None
                         ) -> list[JobRecord]:
        """fanout's jobs: every one not completed, and the completed ones whose state
        changed at or after ``completed_since`` (all of them when it is None)."""
        return self.store.fanout_jobs(
            None if completed_since is None else completed_since.timestamp())

    def list_fanout_jobs_page(self, *, completed_since: datetime | None = None,
                              after: int = 0, limit: int = 1000
                              ) -> tuple[list[JobRecord], int | None]:
        """One page of :meth:`list_fanout_jobs`: up to ``limit`` jobs created after the
        one numbered ``after`` (0: from the first), and the number the next page starts
        after (None: this was the last). The monitor follows a page before reading the
        next, so a backlog of thousands of queued jobs costs it a page of records at a
        time, as Azure's listing of 1,000-job pages does, not all of them at once."""
        return self.store.fanout_jobs_page(
            None if completed_since is None else completed_since.timestamp(),
            after=after, limit=limit)

    def get_job(self, job_id: str) -> JobRecord | None:
        """One job, None if there is no such job."""
        return self.store.job_record(job_id)

    def task_counts(self, job_id: str) -> TaskCounts | None:
        """The job's task counts (``running`` includes ``preparing``), or None."""
        return self.store.task_counts(job_id)

    def failed_tasks(self, job_id: str, limit: int) -> list[FailedTask]:
        """Up to ``limit`` failed tasks with their category and failure info; ``logs``
        is the task's directory (``stdout.txt``, ``stderr.txt``, ``fanout.txt``)."""
        stored, failed = self.store.failed_tasks(job_id, limit)
        for task in failed:
            task.logs = str(self._node.task_dir(stored, task.id))
        return failed

    def job_usage(self, job_id: str, pool: str | None = None) -> JobUsage | None:
        """The job's slot-seconds (each completed task's last attempt times its
        required slots) from the store; this machine is one node of ``slots`` slots,
        its VM size ``local`` (``[cost.prices] local = ...`` prices it)."""
        found = self.store.usage(job_id)
        if found is None:
            return None
        return JobUsage(slot_seconds=found[0], tasks=found[1], vm_size=LOCAL_VM_SIZE,
                        slots_per_node=self.slots)

    def existing_tasks(self, job_id: str, task_ids: Sequence[str]) -> set[str]:
        """Which of ``task_ids`` the job has (compared case-insensitively)."""
        return self.store.existing_tasks(job_id, task_ids)

    def blocked_tasks(self, job_id: str, limit: int) -> list[str] | None:
        """Active tasks that can never run (a dependency ended with ``block``, directly
        or through another blocked task); None past ``limit`` active tasks."""
        return self.store.blocked_tasks(job_id, limit)

    def terminate_job(self, job_id: str, reason: str) -> None:
        """Complete the job now with ``reason``: its running tasks are stopped (their
        process groups get SIGTERM, then SIGKILL after the kill grace) and complete as
        ``TaskEnded``; its active tasks stay active and never run. A completed or
        missing job is left as it is."""
        ended = self.store.terminate_job(job_id, reason)
        self._end(ended)
        log.info("job.terminated", job_id=job_id, reason=reason, tasks_ended=len(ended))

    def delete_job(self, job_id: str) -> None:
        """Stop the job's running tasks, delete its records and its task directories
        (``<home>/tasks/<job>/``); a missing job is no error."""
        deleted = self.store.delete_job(job_id)
        if deleted is None:
            return
        stored, running = deleted
        self._end(running)
        # Let the stopped attempts finish with their files before the directory goes.
        deadline = time.monotonic() + self._node.kill_grace + 2.0
        with self._settled:
            while (self._inflight.intersection(running)
                   and (left := deadline - time.monotonic()) > 0):
                self._settled.wait(left)
        shutil.rmtree(self.home / "tasks" / stored, ignore_errors=True)
        log.info("job.deleted", job_id=stored, tasks_ended=len(running))

    def update_job_metadata(self, job_id: str, metadata: dict[str, str]) -> None:
        """Replace the job's metadata (completed jobs too). A missing job is left as
        it is, as on the Azure backend, where Job - Update answers 404 ``JobNotFound``
        and is ignored like a terminate or delete of a job that is gone."""
        if not self.store.update_metadata(job_id, metadata):
            log.info("job.metadata_skipped", job_id=job_id, code="JobNotFound")

    def preempted_tasks(self, pool: str) -> list[Preemption]:
        """None: this machine is never preempted (the monitor counts zero)."""
        return []

    def move_task(self, job_id: str, task_id: str, *, to_job: str, pool: str,
                  metadata: dict[str, str]) -> MoveResult:
        """Nothing to move to: the local executor has one pool and no preemption."""
        return "unmovable"

    def task_log_tail(self, job_id: str, task_id: str, name: str = "stderr.txt",
                      max_bytes: int = 4096) -> str | None:
        """The last ``max_bytes`` of one of the task's files (``stdout.txt``,
        ``stderr.txt``, ``fanout.txt``), read from its end; None where there is none."""
        if not name or name != Path(name).name or name in (".", ".."):
            raise ValueError(f"{name!r} is not a file name")
        ids = self.store.task_ids(job_id, task_id)
        if ids is None or max_bytes <= 0:
            return None
        try:
            with open(self._node.task_dir(*ids) / name, "rb") as fh:
                size = fh.seek(0, os.SEEK_END)
                start = max(0, size - max_bytes)
                fh.seek(start)
                data = fh.read(max_bytes)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        if start:
            # The cut may fall inside a character: drop its continuation bytes.
            skip = 0
            while skip < min(3, len(data)) and data[skip] & 0xC0 == 0x80:
                skip += 1
            data = data[skip:]
        return data.decode("utf-8", errors="replace")

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
        self._node.prepare()
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
        boxed = [o.seq for o in orphans if o.container]
        engine = self._node.containers.engine() if boxed else None
        if engine is not None:
            for seq in boxed:
                # The engine's client died with the scheduler; its container may run on.
                containers.remove(engine, containers.container_name(self.home, seq))
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
        """One scheduling round: purge, end jobs past their max wall clock and tasks
        ended elsewhere, unblock dependents, wake a runner if work waits."""
        now = time.time()
        if now - self._last_purge >= self.purge_interval:
            self._last_purge = now
            self._purge(now)
        for job_id in self.store.expired_jobs(now):
            self.terminate_job(job_id, REASON_WALL_CLOCK)
        if running := self._table.running():
            # Another process (``fanout cancel``, the monitor) may have terminated or
            # deleted the job of a task this one runs: only this process can stop it.
            self._end(self.store.ended_among(running))
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
        """A runner thread: claim a task that fits, run it, record it; until stopped.

        A task that completes is recorded in the transaction that claims the runner's
        next task (its slots pass from the one to the other under the slot lock)."""
        try:
            claimed = self._next()
            while claimed is not None:
                run, need = claimed
                following: tuple[TaskRun, int] | None = None
                try:
                    following = self._attempt(run, need)
                finally:
                    if following is None:
                        with self._lock:
                            self._busy -= need
                claimed = following if following is not None else self._next()
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
                    self._inflight.add(run.seq)
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

    def _attempt(self, run: TaskRun, need: int) -> tuple[TaskRun, int] | None:
        """One attempt, then its outcome recorded; a fault puts the task back to active.
        Returns the runner's next task and its slots when the recording claimed it
        (``need`` slots, this task's, went to it)."""
        started = time.monotonic()
        following: list[tuple[TaskRun, int]] = []
        try:
            outcome = run_attempt(run, self._node, self._table,
                                  lambda pid, start: self._running(run, pid, start))
            self._record(run, outcome, time.monotonic() - started, need, following)
        except Exception:
            log.exception("task.attempt_failed", job_id=run.job_id, task_id=run.task_id,
                          detail="the task goes back to active")
            with contextlib.suppress(Exception):
                self.store.requeue(run.seq)
        finally:
            with self._settled:
                self._table.forget(run.seq)
                self._inflight.discard(run.seq)
                self._settled.notify_all()
        return following[0] if following else None

    def _running(self, run: TaskRun, pid: int, start: int | None) -> None:
        self.store.mark_running(run.seq, pid, start)
        log.debug("task.started", job_id=run.job_id, task_id=run.task_id, pid=pid,
                  retry_count=run.retry_count)

    def _end(self, seqs: Sequence[int]) -> None:
        """Stop these tasks' processes (SIGTERM, SIGKILL after the kill grace); those
        not started yet never start."""
        if not seqs:
            return
        # Only attempts under way are marked: a mark outliving its attempt would stop
        # a later task that reuses the seq (a deleted job's seqs may be reused).
        with self._lock:
            self._table.end([seq for seq in seqs if seq in self._inflight])
        timer = threading.Timer(self._node.kill_grace, self._table.kill, args=(list(seqs),))
        timer.daemon = True
        timer.start()

    def _record(self, run: TaskRun, outcome: Outcome, duration: float, need: int,
                following: list[tuple[TaskRun, int]]) -> None:
        """Record the attempt's outcome; a completed task's record claims the next task
        into ``following`` (see :meth:`_finish_and_claim`)."""
        if outcome.ended:
            log.info("task.ended", job_id=run.job_id, task_id=run.task_id,
                     detail="its job was terminated or deleted")
            return
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
        ended = self._finish_and_claim(run, outcome, need, following)
        if ended is not None:
            self._end(ended)
            log.info("job.terminated", job_id=run.job_id, reason=REASON_TASK_FAILED,
                     task_id=run.task_id, tasks_ended=len(ended))
        # One line per task would swamp the log of a 100,000-task sweep: successes
        # are debug; failures, which someone must read, are warnings.
        emit = log.debug if outcome.success else log.warning
        emit("task.completed", job_id=run.job_id, task_id=run.task_id,
             exit_code=outcome.exit_code, duration=round(duration, 3),
             result="success" if outcome.success else "failure",
             failure_code=outcome.failure_code)

    def _finish_and_claim(self, run: TaskRun, outcome: Outcome, need: int,
                          following: list[tuple[TaskRun, int]]) -> list[int] | None:
        """Complete the task and, unless stopping, claim the next one that fits the
        slots it frees and those free, in one store transaction under the slot lock
        (as :meth:`_next` claims); the claim lands in ``following`` at once, so no
        later fault can lose it. Returns what ``Store.finish`` does."""
        with self._work:
            claim = None if self._stop.is_set() else (self.slots - self._busy + need,
                                                      self.slots)
            ended, runs = self.store.finish_and_claim(
                run.seq, success=outcome.success, exit_code=outcome.exit_code,
                failure_code=outcome.failure_code, failure_message=outcome.failure_message,
                end=outcome.end, category=outcome.category, claim=claim)
            if runs:
                new = runs[0]
                new_need = min(max(new.required_slots, 1), self.slots)
                self._busy += new_need - need
                self._inflight.add(new.seq)
                following.append((new, new_need))
                if self._busy < self.slots:
                    self._work.notify()
        return ended

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
