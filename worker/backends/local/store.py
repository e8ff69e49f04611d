"""The local executor's durable state: jobs and tasks in one SQLite database.

``<home>/executor.db`` is opened in WAL mode with a busy timeout, one connection per
thread, so the daemon's scheduler, its submitter threads and a ``fanout status`` in
another process use it at once. Every write is one short ``BEGIN IMMEDIATE``
transaction; writers in one process take turns on a lock first.

Dependencies are checked without re-scanning a job per tick: a task with
dependencies starts ``waiting``; it is evaluated with indexed counts, and when it is
not yet satisfied it records how many more successes its job needs at least before
it could be (``recheck_at`` against the job's ``succeeded`` counter). A failed
dependency therefore leaves its dependents waiting for ever, as Batch's default
dependency action ("block") does.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from handlers.base import ID_PATTERN, JobSpec, OutputFile, ResourceFile, TaskSpec
from worker.backends.base import TASK_STATES, AddResult, JobState, JobStatus, TaskError
from worker.errors import BatchRejected, SystemFault

#: Batch deletes a task's directory seven days after it completes unless told otherwise.
DEFAULT_RETENTION = 7 * 24 * 3600.0
#: Largest task id still treated as a number for dependency ranges (fits SQLite's int64).
_MAX_NUMERIC_ID_DIGITS = 18
#: Ids per ``IN (...)`` query when checking a ``depends_on`` list.
_IN_CHUNK = 500
_SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL COLLATE NOCASE UNIQUE,
    pool TEXT NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    display_name TEXT,
    metadata TEXT,
    max_task_retries INTEGER,
    max_wall_clock REAL,
    uses_dependencies INTEGER NOT NULL DEFAULT 0,
    sealed INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT 'active',
    succeeded INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    completed REAL
);
CREATE INDEX IF NOT EXISTS jobs_active ON jobs(priority DESC, seq) WHERE state = 'active';
CREATE TABLE IF NOT EXISTS tasks (
    seq INTEGER PRIMARY KEY,
    job_seq INTEGER NOT NULL,
    id TEXT NOT NULL COLLATE NOCASE,
    num INTEGER,
    display_name TEXT,
    command_line TEXT NOT NULL,
    environment TEXT,
    resource_files TEXT,
    output_files TEXT,
    depends_on TEXT,
    depends_on_ranges TEXT,
    max_task_retries INTEGER,
    max_wall_clock REAL,
    retention REAL,
    required_slots INTEGER NOT NULL DEFAULT 1,
    container_image TEXT,
    state TEXT NOT NULL DEFAULT 'active',
    waiting INTEGER NOT NULL DEFAULT 0,
    recheck_at INTEGER NOT NULL DEFAULT 0,
    result TEXT,
    exit_code INTEGER,
    failure_code TEXT,
    failure_message TEXT,
    retry_count INTEGER NOT NULL DEFAULT 0,
    requeue_count INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    start_time REAL,
    end_time REAL,
    pid INTEGER,
    proc_start INTEGER,
    purge_at REAL,
    UNIQUE (job_seq, id)
);
CREATE INDEX IF NOT EXISTS tasks_state ON tasks(job_seq, state, result);
CREATE INDEX IF NOT EXISTS tasks_ready ON tasks(job_seq)
    WHERE state = 'active' AND waiting = 0;
CREATE INDEX IF NOT EXISTS tasks_waiting ON tasks(job_seq, recheck_at)
    WHERE state = 'active' AND waiting = 1;
CREATE INDEX IF NOT EXISTS tasks_num ON tasks(job_seq, num, result) WHERE num IS NOT NULL;
CREATE INDEX IF NOT EXISTS tasks_purge ON tasks(purge_at) WHERE purge_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS transitions (
    task_seq INTEGER NOT NULL,
    at REAL NOT NULL,
    state TEXT NOT NULL,
    reason TEXT
);
CREATE INDEX IF NOT EXISTS transitions_task ON transitions(task_seq);
"""

_INSERT_TASK = (
    "INSERT OR IGNORE INTO tasks (job_seq, id, num, display_name, command_line, environment,"
    " resource_files, output_files, depends_on, depends_on_ranges, max_task_retries,"
    " max_wall_clock, retention, required_slots, container_image, waiting, created)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)

_RUN_COLUMNS = (
    "t.seq, j.id, t.id, j.pool, t.command_line, t.environment, t.resource_files,"
    " t.output_files, COALESCE(t.max_task_retries, j.max_task_retries, 0),"
    " COALESCE(t.max_wall_clock, j.max_wall_clock), t.retry_count, t.required_slots,"
    " t.container_image"
)

_INFO_COLUMNS = (
    "j.id, t.id, t.display_name, t.state, t.result, t.exit_code, t.failure_code,"
    " t.failure_message, t.retry_count, t.requeue_count, t.start_time, t.end_time, t.pid,"
    " t.command_line"
)


@dataclass(frozen=True, slots=True)
class TaskRun:
    """One claimed task attempt: what the runner needs to run it."""

    seq: int
    job_id: str
    task_id: str
    pool: str
    command_line: str
    environment: dict[str, str]
    resource_files: list[ResourceFile]
    output_files: list[OutputFile]
    max_task_retries: int
    max_wall_clock: float | None
    retry_count: int
    required_slots: int
    container_image: str | None


@dataclass(frozen=True, slots=True)
class TaskInfo:
    """A task's state and last result, for ``fanout status`` and tests."""

    job_id: str
    id: str
    display_name: str | None
    state: str
    result: str | None
    exit_code: int | None
    failure_code: str | None
    failure_message: str | None
    retry_count: int
    requeue_count: int
    start_time: float | None
    end_time: float | None
    pid: int | None
    command_line: str


@dataclass(frozen=True, slots=True)
class Orphan:
    """A task found ``preparing`` or ``running`` at start-up, and its old process."""

    seq: int
    pid: int | None
    proc_start: int | None


@dataclass(frozen=True, slots=True)
class Purgeable:
    """A completed task whose retention time has passed."""

    seq: int
    job_id: str
    task_id: str


class Store:
    """SQLite-backed jobs and tasks; safe to share between threads and processes."""

    def __init__(self, *, path: Path, pool: str, busy_timeout: float = 30.0) -> None:
        self._path = path
        self._pool = pool
        self._busy_timeout = busy_timeout
        self._local = threading.local()
        self._lock = threading.Lock()
        # Writers in this process queue here rather than in SQLite's busy handler, which
        # sleeps 1 ms and more between retries: runner threads write several times per
        # task, and those sleeps were most of a trivial task's cost.
        self._write_lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self._closed = False
        self._init_schema()

    # -- connections -------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            if self._closed:
                raise RuntimeError("the executor store is closed")
            conn = sqlite3.connect(self._path, timeout=self._busy_timeout,
                                   isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
            # In WAL mode NORMAL syncs at checkpoints, not at every commit: a commit
            # survives the daemon's own crash or SIGKILL (what recovery is built for),
            # and a task's three state changes cost no fsync. A power loss may undo the
            # last commits: finished tasks then run again, and tasks added just before
            # may be lost unless their message's settlement was lost with them.
            conn.execute("PRAGMA synchronous = NORMAL")
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One short write transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``)."""
        conn = self._conn()
        with self._write_lock, _busy_is_transient():
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """One consistent read snapshot."""
        conn = self._conn()
        with _busy_is_transient():
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                conn.execute("COMMIT")

    def _init_schema(self) -> None:
        """Create the tables once; a reader of an existing database writes nothing."""
        conn = self._conn()
        if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            conn.execute("PRAGMA journal_mode = WAL")
        if self._schema_version(conn) == _SCHEMA_VERSION:
            return
        with self._write() as tx:
            if self._schema_version(tx) < _SCHEMA_VERSION:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        tx.execute(statement)
                tx.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")

    def _schema_version(self, conn: sqlite3.Connection) -> int:
        version: int = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > _SCHEMA_VERSION:
            raise RuntimeError(f"{self._path} has schema version {version}, newer than this "
                               f"fanout understands ({_SCHEMA_VERSION})")
        return version

    def release(self) -> None:
        """Close the calling thread's connection, if it has one: a thread about to end
        calls this, or its connection (and file descriptors) would stay open until
        ``close``, one more for every runner thread."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            return
        self._local.conn = None
        with self._lock:
            if conn in self._connections:
                self._connections.remove(conn)
        conn.close()

    def close(self) -> None:
        """Close every connection the store opened (call once threads are done)."""
        with self._lock:
            self._closed = True
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()
        self._local = threading.local()

    # -- jobs ----------------------------------------------------------------------

    def create_job(self, job: JobSpec) -> JobState:
        """Insert the job unless one with its id (case-insensitive) exists."""
        if not ID_PATTERN.match(job.id):
            raise BatchRejected(f"job id {job.id!r} is not 1-64 letters, digits, hyphens or "
                                "underscores", reason="InvalidPropertyValue")
        wall = job.max_wall_clock.total_seconds() if job.max_wall_clock else None
        with self._write() as conn:
            row = conn.execute("SELECT sealed FROM jobs WHERE id = ?", (job.id,)).fetchone()
            if row is not None:
                return "sealed" if row[0] else "exists"
            conn.execute(
                "INSERT INTO jobs (id, pool, priority, display_name, metadata, max_task_retries,"
                " max_wall_clock, uses_dependencies, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job.id, job.pool or self._pool, job.priority, job.display_name,
                 json.dumps(job.metadata) if job.metadata else None, job.max_task_retries,
                 wall, int(job.uses_task_dependencies), time.time()),
            )
        return "created"

    def seal_job(self, job_id: str) -> None:
        """Mark the job sealed; complete it now if every task already completed."""
        now = time.time()
        with self._write() as conn:
            row = conn.execute("SELECT seq FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise BatchRejected(f"job {job_id!r} does not exist", reason="JobNotFound")
            conn.execute("UPDATE jobs SET sealed = 1 WHERE seq = ?", (row[0],))
            # Range dependencies on ids that were never added are now moot: recheck.
            conn.execute("UPDATE tasks SET recheck_at = 0 WHERE job_seq = ? AND state = 'active'"
                         " AND waiting = 1", (row[0],))
            _complete_if_done(conn, row[0], now)

    def job_status(self, job_id: str) -> JobStatus | None:
        """One job with its task counts, or None."""
        with self._read() as conn:
            row = conn.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?",
                               (job_id,)).fetchone()
            return None if row is None else _job_status(conn, row)

    def list_jobs(self, limit: int) -> list[JobStatus]:
        """The ``limit`` newest jobs with their task counts."""
        with self._read() as conn:
            rows = conn.execute(f"SELECT {_JOB_COLUMNS} FROM jobs ORDER BY seq DESC LIMIT ?",
                                (limit,)).fetchall()
            return [_job_status(conn, row) for row in rows]

    def active_summary(self, slots: int) -> tuple[int, dict[str, int], int]:
        """Active jobs, their task counts by state, and the slots their tasks hold."""
        with self._read() as conn:
            active = conn.execute("SELECT count(*) FROM jobs WHERE state = 'active'").fetchone()[0]
            counts = dict.fromkeys(TASK_STATES, 0)
            for state, n in conn.execute(
                "SELECT state, count(*) FROM tasks WHERE job_seq IN"
                " (SELECT seq FROM jobs WHERE state = 'active') GROUP BY state"
            ):
                counts[state] = n
            busy = conn.execute(
                "SELECT COALESCE(sum(min(required_slots, ?)), 0) FROM tasks WHERE job_seq IN"
                " (SELECT seq FROM jobs WHERE state = 'active')"
                " AND state IN ('preparing', 'running')", (slots,)
            ).fetchone()[0]
        return active, counts, busy

    # -- tasks -----------------------------------------------------------------------

    def add_tasks(self, job_id: str, tasks: Sequence[TaskSpec]) -> AddResult:
        """Insert one chunk in one transaction; existing ids count as ``existed``."""
        now = time.time()
        with self._write() as conn:
            row = conn.execute("SELECT seq, state, uses_dependencies FROM jobs WHERE id = ?",
                               (job_id,)).fetchone()
            if row is None:
                raise BatchRejected(f"job {job_id!r} does not exist", reason="JobNotFound")
            job_seq, state, uses_deps = row
            if state != "active":
                raise BatchRejected(f"job {job_id!r} is completed; no task can be added",
                                    reason="JobCompleted")
            rows, errors = _task_rows(job_seq, tasks, now, bool(uses_deps))
            added = conn.executemany(_INSERT_TASK, rows).rowcount if rows else 0
        return AddResult(added=added, existed=len(rows) - added, errors=errors)

    def task(self, job_id: str, task_id: str) -> TaskInfo | None:
        """One task's state and last result, or None."""
        row = self._conn().execute(
            f"SELECT {_INFO_COLUMNS} FROM tasks t JOIN jobs j ON j.seq = t.job_seq"
            " WHERE j.id = ? AND t.id = ?", (job_id, task_id)).fetchone()
        return None if row is None else TaskInfo(*row)

    def tasks(self, job_id: str, *, state: str | None = None, limit: int = 1000) -> list[TaskInfo]:
        """A job's tasks in insertion order, optionally only those in ``state``."""
        sql = (f"SELECT {_INFO_COLUMNS} FROM tasks t JOIN jobs j ON j.seq = t.job_seq"
               " WHERE j.id = ?")
        args: list[Any] = [job_id]
        if state is not None:
            sql += " AND t.state = ?"
            args.append(state)
        rows = self._conn().execute(sql + " ORDER BY t.seq LIMIT ?", (*args, limit)).fetchall()
        return [TaskInfo(*row) for row in rows]

    def transitions(self, job_id: str, task_id: str) -> list[tuple[float, str, str | None]]:
        """A task's state transitions after it was added: (time, state, reason)."""
        return [(at, state, reason) for at, state, reason in self._conn().execute(
            "SELECT x.at, x.state, x.reason FROM transitions x JOIN tasks t ON t.seq = x.task_seq"
            " JOIN jobs j ON j.seq = t.job_seq WHERE j.id = ? AND t.id = ? ORDER BY x.rowid",
            (job_id, task_id))]

    # -- scheduler side --------------------------------------------------------------

    def recover(self) -> list[Orphan]:
        """Put tasks left ``preparing``/``running`` by a dead scheduler back to ``active``.

        Their retry count is not consumed; the caller kills their old processes.
        """
        now = time.time()
        with self._write() as conn:
            rows = conn.execute(
                "SELECT t.seq, t.pid, t.proc_start FROM tasks t WHERE t.job_seq IN"
                " (SELECT seq FROM jobs WHERE state = 'active')"
                " AND t.state IN ('preparing', 'running')").fetchall()
            conn.executemany(
                "UPDATE tasks SET state = 'active', requeue_count = requeue_count + 1,"
                " pid = NULL, proc_start = NULL WHERE seq = ?", [(r[0],) for r in rows])
            conn.executemany("INSERT INTO transitions VALUES (?, ?, 'active', 'recovered')",
                             [(r[0], now) for r in rows])
        return [Orphan(seq=r[0], pid=r[1], proc_start=r[2]) for r in rows]

    def evaluate_waiting(self) -> int:
        """Check the waiting tasks whose job gained enough successes since their last
        check; return how many became ready."""
        if self._conn().execute(_DUE_WAITING + " LIMIT 1").fetchone() is None:
            return 0
        # One write transaction, so a concurrent seal_job's reset is never overwritten.
        with self._write() as conn:
            verdicts = [(seq, succeeded, _missing(conn, job_seq, ids, ranges, bool(sealed)))
                        for seq, job_seq, ids, ranges, succeeded, sealed
                        in conn.execute(_DUE_WAITING).fetchall()]
            ready = [(seq,) for seq, _, missing in verdicts if missing == 0]
            later = [(succeeded + missing, seq) for seq, succeeded, missing in verdicts if missing]
            conn.executemany("UPDATE tasks SET waiting = 0 WHERE seq = ?", ready)
            conn.executemany("UPDATE tasks SET recheck_at = ? WHERE seq = ?", later)
        return len(ready)

    def has_ready(self) -> bool:
        """Whether any task of an active job is ready to run (a read, no lock taken)."""
        return self._conn().execute(_ANY_READY).fetchone() is not None

    def claim(self, free_slots: int, total_slots: int, limit: int | None = None) -> list[TaskRun]:
        """Mark the next ready tasks that fit in ``free_slots`` (at most ``limit`` of
        them) as ``preparing``.

        Order: job priority (highest first), job creation, task insertion. A task that
        does not fit is skipped for a later, smaller one (backfill); one that needs
        more slots than the executor has takes all of them.
        """
        if not self.has_ready():
            return []  # nothing to do: no write lock taken on an idle tick
        now = time.time()
        with self._write() as conn:
            chosen = _pick(conn, free_slots, total_slots,
                           free_slots if limit is None else limit)
            conn.executemany("UPDATE tasks SET state = 'preparing', start_time = ? WHERE seq = ?",
                             [(now, seq) for seq in chosen])
            conn.executemany("INSERT INTO transitions VALUES (?, ?, 'preparing', NULL)",
                             [(seq, now) for seq in chosen])
            runs = [self._run_row(conn, seq) for seq in chosen]
        return runs

    @staticmethod
    def _run_row(conn: sqlite3.Connection, seq: int) -> TaskRun:
        row = conn.execute(f"SELECT {_RUN_COLUMNS} FROM tasks t JOIN jobs j ON j.seq = t.job_seq"
                           " WHERE t.seq = ?", (seq,)).fetchone()
        (seq, job_id, task_id, pool, command, env, rfiles, ofiles, retries, wall, retry_count,
         slots, image) = row
        return TaskRun(
            seq=seq, job_id=job_id, task_id=task_id, pool=pool, command_line=command,
            environment=json.loads(env) if env else {},
            resource_files=[ResourceFile(*r) for r in json.loads(rfiles)] if rfiles else [],
            output_files=[OutputFile(*o) for o in json.loads(ofiles)] if ofiles else [],
            max_task_retries=retries, max_wall_clock=wall, retry_count=retry_count,
            required_slots=slots, container_image=image,
        )

    def mark_running(self, seq: int, pid: int, proc_start: int | None) -> None:
        """Record that the task's process started (its pid is its process group)."""
        now = time.time()
        with self._write() as conn:
            conn.execute("UPDATE tasks SET state = 'running', pid = ?, proc_start = ?,"
                         " start_time = ? WHERE seq = ?", (pid, proc_start, now, seq))
            conn.execute("INSERT INTO transitions VALUES (?, ?, 'running', NULL)", (seq, now))

    def finish(self, seq: int, *, success: bool, exit_code: int | None,
               failure_code: str | None, failure_message: str | None,
               retention: float | None = None) -> None:
        """Complete the task and, if its job is sealed and done, the job."""
        now = time.time()
        result = "success" if success else "failure"
        with self._write() as conn:
            job_seq, keep = conn.execute("SELECT job_seq, retention FROM tasks WHERE seq = ?",
                                         (seq,)).fetchone()
            keep = keep if keep is not None else DEFAULT_RETENTION
            conn.execute(
                "UPDATE tasks SET state = 'completed', result = ?, exit_code = ?, failure_code = ?,"
                " failure_message = ?, end_time = ?, pid = NULL, proc_start = NULL,"
                " purge_at = ? WHERE seq = ?",
                (result, exit_code, failure_code, failure_message, now, now + keep, seq))
            conn.execute("INSERT INTO transitions VALUES (?, ?, 'completed', ?)",
                         (seq, now, failure_code or result))
            if success:
                conn.execute("UPDATE jobs SET succeeded = succeeded + 1 WHERE seq = ?", (job_seq,))
            _complete_if_done(conn, job_seq, now)

    def retry(self, seq: int, *, exit_code: int | None, failure_code: str | None,
              failure_message: str | None) -> None:
        """Send a failed attempt back to ``active``, consuming one retry."""
        self._back_to_active(seq, "retry_count", "retry", exit_code, failure_code,
                             failure_message)

    def requeue(self, seq: int) -> None:
        """Send an interrupted attempt back to ``active`` without consuming a retry."""
        self._back_to_active(seq, "requeue_count", "requeued", None, None, None)

    def _back_to_active(self, seq: int, counter: str, reason: str, exit_code: int | None,
                        failure_code: str | None, failure_message: str | None) -> None:
        now = time.time()
        with self._write() as conn:
            conn.execute(
                f"UPDATE tasks SET state = 'active', {counter} = {counter} + 1, pid = NULL,"
                " proc_start = NULL, exit_code = COALESCE(?, exit_code),"
                " failure_code = COALESCE(?, failure_code),"
                " failure_message = COALESCE(?, failure_message), end_time = ? WHERE seq = ?",
                (exit_code, failure_code, failure_message, now, seq))
            conn.execute("INSERT INTO transitions VALUES (?, ?, 'active', ?)", (seq, now, reason))

    def purgeable(self, now: float, limit: int = 100) -> list[Purgeable]:
        """Completed tasks whose retention time has passed."""
        rows = self._conn().execute(
            "SELECT t.seq, j.id, t.id FROM tasks t JOIN jobs j ON j.seq = t.job_seq"
            " WHERE t.purge_at IS NOT NULL AND t.purge_at <= ? LIMIT ?", (now, limit)).fetchall()
        return [Purgeable(*row) for row in rows]

    def purged(self, seqs: Sequence[int]) -> None:
        """Record that these tasks' directories were deleted."""
        with self._write() as conn:
            conn.executemany("UPDATE tasks SET purge_at = NULL WHERE seq = ?",
                             [(s,) for s in seqs])


@contextmanager
def _busy_is_transient() -> Iterator[None]:
    """A database still locked after the busy timeout is a transient system fault."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            raise SystemFault(f"the local executor database is busy: {exc}") from exc
        raise


# -- helpers -------------------------------------------------------------------------

_ANY_READY = (
    "SELECT 1 FROM tasks WHERE job_seq IN (SELECT seq FROM jobs WHERE state = 'active')"
    " AND state = 'active' AND waiting = 0 LIMIT 1"
)

_DUE_WAITING = (
    "SELECT t.seq, t.job_seq, t.depends_on, t.depends_on_ranges, j.succeeded, j.sealed"
    " FROM tasks t JOIN jobs j ON j.seq = t.job_seq"
    " WHERE t.state = 'active' AND t.waiting = 1 AND t.recheck_at <= j.succeeded"
)

_JOB_COLUMNS = "seq, id, state, pool, display_name, created, metadata, completed"


def _job_status(conn: sqlite3.Connection, row: tuple[Any, ...]) -> JobStatus:
    seq, job_id, state, pool, display_name, created, metadata, _completed = row
    counts = dict.fromkeys(TASK_STATES, 0)
    succeeded = failed = 0
    for task_state, result, n in conn.execute(
        "SELECT state, result, count(*) FROM tasks WHERE job_seq = ? GROUP BY state, result",
        (seq,)
    ):
        counts[task_state] = counts.get(task_state, 0) + n
        if result == "success":
            succeeded += n
        elif result == "failure":
            failed += n
    return JobStatus(
        id=job_id, state=state, pool=pool, display_name=display_name,
        created=datetime.fromtimestamp(created, UTC).isoformat(), counts=counts,
        succeeded=succeeded, failed=failed,
        metadata=json.loads(metadata) if metadata else {},
    )


def _pick(conn: sqlite3.Connection, free_slots: int, total_slots: int, limit: int) -> list[int]:
    """The seqs of up to ``limit`` ready tasks fitting ``free_slots``, in claim order."""
    chosen: list[int] = []
    jobs = conn.execute("SELECT seq FROM jobs WHERE state = 'active'"
                        " ORDER BY priority DESC, seq").fetchall()
    for (job_seq,) in jobs:
        for seq, slots in conn.execute(
            "SELECT seq, required_slots FROM tasks WHERE job_seq = ? AND state = 'active'"
            " AND waiting = 0 ORDER BY seq LIMIT ?", (job_seq, free_slots + 64)
        ).fetchall():
            need = min(max(slots, 1), total_slots)
            if need <= free_slots:
                chosen.append(seq)
                free_slots -= need
                if free_slots <= 0 or len(chosen) >= limit:
                    return chosen
    return chosen


def _complete_if_done(conn: sqlite3.Connection, job_seq: int, now: float) -> None:
    conn.execute(
        "UPDATE jobs SET state = 'completed', completed = ? WHERE seq = ? AND sealed = 1"
        " AND state = 'active' AND NOT EXISTS (SELECT 1 FROM tasks WHERE job_seq = ?"
        " AND state IN ('active', 'preparing', 'running'))", (now, job_seq, job_seq))


def _numeric_id(task_id: str) -> int | None:
    """The integer a task id spells in canonical decimal (for dependency ranges)."""
    if task_id.isdigit() and len(task_id) <= _MAX_NUMERIC_ID_DIGITS and (
            task_id[0] != "0" or len(task_id) == 1):
        return int(task_id)
    return None


def _task_rows(job_seq: int, tasks: Sequence[TaskSpec], now: float,
               uses_deps: bool) -> tuple[list[tuple[Any, ...]], list[TaskError]]:
    """Validate and flatten one chunk; this is the per-task hot path of a sweep."""
    rows: list[tuple[Any, ...]] = []
    errors: list[TaskError] = []
    dumps = json.dumps
    valid_id = ID_PATTERN.match
    for t in tasks:
        tid = t.id
        if not valid_id(tid):
            errors.append(TaskError(tid, "InvalidPropertyValue",
                                    "a task id is 1-64 letters, digits, hyphens or underscores"))
            continue
        ids, ranges = t.depends_on, t.depends_on_ranges
        waiting = 0
        if ids or ranges:
            problem = _dependency_problem(ids, ranges, uses_deps)
            if problem is not None:
                errors.append(TaskError(tid, problem[0], problem[1]))
                continue
            waiting = 1
        env, rfiles, ofiles, wall, keep = (t.environment, t.resource_files, t.output_files,
                                           t.max_wall_clock, t.retention)
        rows.append((
            job_seq, tid, _numeric_id(tid) if tid.isdigit() else None, t.display_name,
            t.command_line, dumps(env) if env else None,
            dumps([[r.http_url, r.file_path, r.file_mode, r.storage_container_url,
                    r.blob_prefix] for r in rfiles]) if rfiles else None,
            dumps([[o.file_pattern, o.container_url, o.path, o.upload_condition]
                   for o in ofiles]) if ofiles else None,
            dumps(list(ids)) if ids else None,
            dumps([list(r) for r in ranges]) if ranges else None,
            t.max_task_retries, wall.total_seconds() if wall is not None else None,
            keep.total_seconds() if keep is not None else None, t.required_slots,
            t.container_image, waiting, now,
        ))
    return rows, errors


def _dependency_problem(ids: Sequence[str], ranges: Sequence[tuple[int, int]],
                        uses_deps: bool) -> tuple[str, str] | None:
    if not uses_deps:
        return ("TaskDependenciesNotSpecifiedOnJob",
                "the job was not created with uses_task_dependencies")
    for lo, hi in ranges:
        if lo < 0 or hi < lo:
            return ("InvalidPropertyValue", f"dependency range {lo}..{hi} is not 0 <= start <= end")
    return None


def _missing(conn: sqlite3.Connection, job_seq: int, ids_json: str | None,
             ranges_json: str | None, sealed: bool) -> int:
    """A lower bound on the successes the job still needs before these dependencies
    are met; 0 when they are met.

    Explicit ids must exist and succeed. Ids of a range must succeed where they exist;
    until the job is sealed, every id of the range must also exist (so an aggregate
    added before its range never runs early).
    """
    need = 0
    if ids_json:
        wanted = sorted({i.lower() for i in json.loads(ids_json)})
        ok = 0
        for start in range(0, len(wanted), _IN_CHUNK):
            part = wanted[start:start + _IN_CHUNK]
            ok += conn.execute(
                "SELECT count(*) FROM tasks WHERE job_seq = ? AND result = 'success'"
                f" AND id IN ({','.join('?' * len(part))})", (job_seq, *part)).fetchone()[0]
        need = max(need, len(wanted) - ok)
    for lo, hi in json.loads(ranges_json) if ranges_json else ():
        exist, ok = conn.execute(
            "SELECT count(*), count(CASE WHEN result = 'success' THEN 1 END) FROM tasks"
            " WHERE job_seq = ? AND num IS NOT NULL AND num BETWEEN ? AND ?",
            (job_seq, lo, hi)).fetchone()
        need = max(need, (exist if sealed else hi - lo + 1) - ok)
    return need
