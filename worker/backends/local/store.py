"""The local executor's durable state: jobs and tasks in one SQLite database.

``<home>/executor.db`` is opened in WAL mode with a busy timeout, one connection per
thread, so the daemon's scheduler, its submitter threads and a ``fanout status`` in
another process use it at once. Every write is one short ``BEGIN IMMEDIATE``
transaction; writers in one process take turns on a lock first.

Dependencies are checked without re-scanning a job per tick: a task with
dependencies starts ``waiting``; it is evaluated with indexed counts, and when it is
not yet satisfied it records how many more satisfying ends its job needs at least
before it could be (``recheck_at`` against the job's ``satisfied`` counter). A task
*satisfies* its dependents when its exit conditions' dependency action for the way
it ended is ``satisfy`` (Batch's default: only for success); the finishing
transaction decides it (``tasks.satisfies``) and bumps the counter. A dependency that
ended with ``block`` therefore leaves its dependents waiting for ever, as on Batch.

Jobs keep Batch's outcome fields: ``terminate_reason``, ``completed`` (the end
time) and ``state_changed``; a job's ``deadline`` (creation plus its max wall clock,
Batch's ``constraints.maxWallClockTime``) is found by an index when it passes.

Schema versions: 1 had no exit conditions and counted successes (``succeeded``);
opening such a database upgrades it in place to 2 (see ``_MIGRATE_1_TO_2``).

A task's container settings are kept in the ``container_image`` column: a JSON object
(``{"image", "run_options", "working_directory", "registry"}``; the registry's server
and user name only, never a password: the local engine pulls with its own
credentials), or, as written before container settings had more than an image, the
bare image name. Image names never start with ``{``, so both read back without a
schema change.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from bisect import bisect_left, bisect_right, insort
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, cast

from handlers.base import (
    ID_PATTERN,
    ContainerRegistry,
    ContainerSettings,
    DependencyAction,
    ExitConditions,
    ExitOptions,
    JobAction,
    JobSpec,
    OutputFile,
    ResourceFile,
    TaskEnd,
    TaskSpec,
)
from worker.backends.base import (
    META_WINDOW,
    REASON_ALL_COMPLETE,
    REASON_TASK_FAILED,
    TASK_STATES,
    AddResult,
    FailedTask,
    FailureCategory,
    JobRecord,
    JobState,
    JobStatus,
    TaskCounts,
    TaskError,
)
from worker.errors import BatchRejected, SystemFault

#: Batch deletes a task's directory seven days after it completes unless told otherwise.
DEFAULT_RETENTION = 7 * 24 * 3600.0
#: Largest task id still treated as a number for dependency ranges (fits SQLite's int64).
_MAX_NUMERIC_ID_DIGITS = 18
#: Ids per ``IN (...)`` query when checking a ``depends_on`` list.
_IN_CHUNK = 500
_SCHEMA_VERSION = 2
#: The failure code of a task ended by its job's termination (Batch's ``TaskEnded``).
TASK_ENDED = "TaskEnded"
#: ``jobs.on_task_failure``: 1 for Batch's ``performexitoptionsjobaction``.
_ACTS = "performexitoptionsjobaction"

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
    satisfied INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    completed REAL,
    on_task_failure INTEGER NOT NULL DEFAULT 0,
    deadline REAL,
    terminate_reason TEXT,
    state_changed REAL
);
CREATE INDEX IF NOT EXISTS jobs_active ON jobs(priority DESC, seq) WHERE state = 'active';
CREATE INDEX IF NOT EXISTS jobs_deadline ON jobs(deadline)
    WHERE state = 'active' AND deadline IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_changed ON jobs(state_changed) WHERE state = 'completed';
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
    exit_conditions TEXT,
    satisfies INTEGER,
    category TEXT,
    UNIQUE (job_seq, id)
);
CREATE INDEX IF NOT EXISTS tasks_state ON tasks(job_seq, state, result);
CREATE INDEX IF NOT EXISTS tasks_ready ON tasks(job_seq)
    WHERE state = 'active' AND waiting = 0;
CREATE INDEX IF NOT EXISTS tasks_waiting ON tasks(job_seq, recheck_at)
    WHERE state = 'active' AND waiting = 1;
CREATE INDEX IF NOT EXISTS tasks_range ON tasks(job_seq, num, satisfies)
    WHERE num IS NOT NULL;
CREATE INDEX IF NOT EXISTS tasks_purge ON tasks(purge_at) WHERE purge_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS transitions (
    task_seq INTEGER NOT NULL,
    at REAL NOT NULL,
    state TEXT NOT NULL,
    reason TEXT
);
CREATE INDEX IF NOT EXISTS transitions_task ON transitions(task_seq);
"""

#: Version 1 to 2: exit conditions, the satisfied counter (a version-1 task satisfied
#: its dependents exactly when it succeeded, so the success counter carries over), the
#: jobs' outcome fields and the failed tasks' categories. Version-1 jobs get no
#: deadline: their max wall clock was a default for their tasks, not the job's own.
#: The statements after these are ``_SCHEMA``'s, which add the new indexes.
_MIGRATE_1_TO_2 = (
    "DROP INDEX IF EXISTS tasks_num",
    "ALTER TABLE jobs RENAME COLUMN succeeded TO satisfied",
    "ALTER TABLE jobs ADD COLUMN on_task_failure INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE jobs ADD COLUMN deadline REAL",
    "ALTER TABLE jobs ADD COLUMN terminate_reason TEXT",
    "ALTER TABLE jobs ADD COLUMN state_changed REAL",
    f"UPDATE jobs SET state_changed = COALESCE(completed, created), terminate_reason ="
    f" CASE WHEN state = 'completed' THEN '{REASON_ALL_COMPLETE}' END",
    "ALTER TABLE tasks ADD COLUMN exit_conditions TEXT",
    "ALTER TABLE tasks ADD COLUMN satisfies INTEGER",
    "ALTER TABLE tasks ADD COLUMN category TEXT",
    "UPDATE tasks SET satisfies = (result = 'success') WHERE state = 'completed'",
    "UPDATE tasks SET category = CASE"
    " WHEN failure_code = 'MaxWallClockTimeExceeded' THEN 'wall_clock_timeout'"
    " WHEN failure_code LIKE 'ResourceFile%' THEN 'resource_file_failure'"
    " WHEN failure_code = 'FileUploadError' THEN 'output_upload_failure'"
    " ELSE 'exit_code' END WHERE result = 'failure'",
)

_INSERT_TASK = (
    "INSERT OR IGNORE INTO tasks (job_seq, id, num, display_name, command_line, environment,"
    " resource_files, output_files, depends_on, depends_on_ranges, max_task_retries,"
    " max_wall_clock, retention, required_slots, container_image, waiting, created,"
    " exit_conditions) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)

_RUN_COLUMNS = (
    "t.seq, j.id, t.id, j.pool, t.command_line, t.environment, t.resource_files,"
    " t.output_files, COALESCE(t.max_task_retries, j.max_task_retries, 0),"
    " t.max_wall_clock, t.retry_count, t.required_slots,"
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
    #: The container it runs in (registry without its password), or None.
    container: ContainerSettings | None


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
    #: It runs in a container (whose engine may still run it: remove it too).
    container: bool = False


@dataclass(frozen=True, slots=True)
class Purgeable:
    """A completed task whose retention time has passed."""

    seq: int
    job_id: str
    task_id: str


class Store:
    """SQLite-backed jobs and tasks; safe to share between threads and processes."""

    def __init__(self, *, path: Path, pool: str, busy_timeout: float = 30.0,
                 retention: float = DEFAULT_RETENTION) -> None:
        """``retention``: seconds a completed task's directory is kept when the task
        names no retention of its own (Batch's default is seven days; the worker
        passes ``jobs.retention``, so records and directories go together)."""
        self._path = path
        self._pool = pool
        self._busy_timeout = busy_timeout
        self._retention = retention
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
        """Create the tables once, or upgrade a version-1 database; a reader of an
        up-to-date database writes nothing."""
        conn = self._conn()
        if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            conn.execute("PRAGMA journal_mode = WAL")
        if self._schema_version(conn) == _SCHEMA_VERSION:
            return
        with self._write() as tx:
            version = self._schema_version(tx)
            if version < _SCHEMA_VERSION:
                for statement in (*(_MIGRATE_1_TO_2 if version == 1 else ()),
                                  *_SCHEMA.split(";")):
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
        now = time.time()
        with self._write() as conn:
            # Insert first (the usual case: one statement), look only when the id exists.
            if conn.execute(
                "INSERT INTO jobs (id, pool, priority, display_name, metadata, max_task_retries,"
                " max_wall_clock, uses_dependencies, created, on_task_failure, deadline,"
                " state_changed) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (id) DO NOTHING",
                (job.id, job.pool or self._pool, job.priority, job.display_name,
                 json.dumps(job.metadata) if job.metadata else None, job.max_task_retries,
                 wall, int(job.uses_task_dependencies), now, int(job.on_task_failure == _ACTS),
                 None if wall is None else now + wall, now),
            ).rowcount:
                return "created"
            row = conn.execute("SELECT sealed FROM jobs WHERE id = ?", (job.id,)).fetchone()
        return "sealed" if row is not None and row[0] else "exists"

    def seal_job(self, job_id: str) -> None:
        """Mark the job sealed; complete it now if every task already completed."""
        now = time.time()
        with self._write() as conn:
            row = conn.execute("SELECT seq, uses_dependencies FROM jobs WHERE id = ?",
                               (job_id,)).fetchone()
            if row is None:
                raise _job_not_found("seal", job_id)
            conn.execute("UPDATE jobs SET sealed = 1 WHERE seq = ?", (row[0],))
            if row[1]:  # only such a job has waiting tasks
                # Range dependencies on ids that were never added are now moot: recheck.
                conn.execute("UPDATE tasks SET recheck_at = 0 WHERE job_seq = ?"
                             " AND state = 'active' AND waiting = 1", (row[0],))
            _complete_if_done(conn, row[0], now)

    def job_status(self, job_id: str) -> JobStatus | None:
        """One job with its task counts, or None: one statement (a consistent snapshot
        of its own), as the submitter and monitor ask this for every message."""
        rows = self._conn().execute(_JOB_STATUS, (job_id,)).fetchall()
        if not rows:
            return None
        return _status_of(rows[0][:8], [(state, result, n) for *_, state, result, n in rows
                                        if state is not None])

    def list_jobs(self, limit: int) -> list[JobStatus]:
        """The ``limit`` newest jobs with their task counts."""
        with self._read() as conn:
            rows = conn.execute(f"SELECT {_JOB_COLUMNS} FROM jobs ORDER BY seq DESC LIMIT ?",
                                (limit,)).fetchall()
            return [_job_status(conn, row) for row in rows]

    def terminate_job(self, job_id: str, reason: str) -> list[int]:
        """Complete an active job now with ``reason``; return the seqs of its tasks that
        were preparing or running (now completed as ended), for the caller to stop.
        A completed or missing job is left as it is (an empty list)."""
        with self._write() as conn:
            row = conn.execute("SELECT seq FROM jobs WHERE id = ? AND state = 'active'",
                               (job_id,)).fetchone()
            return [] if row is None else _terminate(conn, row[0], reason, time.time(),
                                                     self._retention)

    def expired_jobs(self, now: float) -> list[str]:
        """The active jobs whose max wall clock (from their creation) has passed."""
        return [r[0] for r in self._conn().execute(
            "SELECT id FROM jobs WHERE state = 'active' AND deadline IS NOT NULL"
            " AND deadline <= ?", (now,))]

    def delete_job(self, job_id: str) -> tuple[str, list[int]] | None:
        """Delete the job with its tasks and their transitions; return its id as stored
        and the seqs of its tasks that were preparing or running, or None if there is
        no such job."""
        with self._write() as conn:
            row = conn.execute("SELECT seq, id FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            job_seq, stored = row
            running = [r[0] for r in conn.execute(
                "SELECT seq FROM tasks WHERE job_seq = ? AND state IN ('preparing', 'running')",
                (job_seq,))]
            conn.execute("DELETE FROM transitions WHERE task_seq IN"
                         " (SELECT seq FROM tasks WHERE job_seq = ?)", (job_seq,))
            conn.execute("DELETE FROM tasks WHERE job_seq = ?", (job_seq,))
            conn.execute("DELETE FROM jobs WHERE seq = ?", (job_seq,))
        return stored, running

    def update_metadata(self, job_id: str, metadata: dict[str, str]) -> bool:
        """Replace the job's metadata (completed jobs too); False when there is no such
        job, which is left as it is: Batch answers 404 ``JobNotFound`` to Job - Update
        (``PATCH /jobs/{jobId}``) of a missing job, and the Azure backend ignores that as
        it does for terminate and delete."""
        with self._write() as conn:
            return conn.execute("UPDATE jobs SET metadata = ? WHERE id = ?",
                                (json.dumps(metadata) if metadata else None,
                                 job_id)).rowcount > 0

    def job_record(self, job_id: str) -> JobRecord | None:
        """One job as the monitor reads it, or None."""
        row = self._conn().execute(f"SELECT {_RECORD_COLUMNS} FROM jobs WHERE id = ?",
                                   (job_id,)).fetchone()
        return None if row is None else _job_record(row)

    def fanout_jobs(self, completed_since: float | None) -> list[JobRecord]:
        """Jobs whose metadata names a fanout handler: every active one, and the
        completed ones whose state changed at or after ``completed_since`` (all if None)."""
        return self.fanout_jobs_page(completed_since)[0]

    def fanout_jobs_page(self, completed_since: float | None, *, after: int = 0,
                         limit: int = -1) -> tuple[list[JobRecord], int | None]:
        """:meth:`fanout_jobs` in creation order from after the job numbered ``after``,
        at most ``limit`` (-1: no limit); with the number to continue after, None once
        none are left."""
        # Records are built as rows are stepped, not from a fetchall: a page never
        # holds every row and every record at once.
        rows = self._conn().execute(
            f"SELECT seq, {_RECORD_COLUMNS} FROM jobs WHERE seq > ? AND metadata IS NOT NULL"
            " AND json_extract(metadata, '$.\"fanout-handler\"') IS NOT NULL"
            " AND (state != 'completed' OR ? IS NULL OR state_changed >= ?)"
            " ORDER BY seq LIMIT ?", (after, completed_since, completed_since, limit))
        records, last = [], after
        for row in rows:
            last = row[0]
            records.append(_job_record(row[1:]))
        return records, (last if 0 <= limit <= len(records) else None)

    def task_counts(self, job_id: str) -> TaskCounts | None:
        """The job's task counts (``running`` includes ``preparing``), or None."""
        with self._read() as conn:
            row = conn.execute("SELECT seq FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            counts = TaskCounts()
            for state, result, n in conn.execute(
                "SELECT state, result, count(*) FROM tasks WHERE job_seq = ?"
                " GROUP BY state, result", (row[0],)
            ):
                if state == "active":
                    counts.active += n
                elif state == "completed":
                    counts.completed += n
                    if result == "success":
                        counts.succeeded += n
                    else:
                        counts.failed += n
                else:
                    counts.running += n
            return counts

    def failed_tasks(self, job_id: str, limit: int) -> tuple[str, list[FailedTask]]:
        """The job's id as stored and up to ``limit`` of its failed tasks, in insertion
        order (``logs`` left for the caller, who knows the task directories)."""
        with self._read() as conn:
            row = conn.execute("SELECT seq, id FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return job_id, []
            rows = conn.execute(
                "SELECT id, category, exit_code, failure_code, failure_message, start_time,"
                " end_time, retry_count, display_name FROM tasks WHERE job_seq = ?"
                " AND state = 'completed' AND result = 'failure' ORDER BY seq LIMIT ?",
                (row[0], limit)).fetchall()
        return row[1], [FailedTask(
            id=tid, category=cast(FailureCategory, category or category_for(code)),
            exit_code=exit_code, failure_code=code, failure_message=message,
            start_time=_aware(start), end_time=_aware(end), retry_count=retries,
            display_name=name)
            for tid, category, exit_code, code, message, start, end, retries, name in rows]

    def usage(self, job_id: str) -> tuple[float, int] | None:
        """The job's slot-seconds and how many tasks they cover: over its completed
        tasks that started, each one's last attempt (``end_time - start_time``, as
        Batch's ``executionInfo`` reports it) times its required slots; None if there
        is no such job."""
        with self._read() as conn:
            row = conn.execute("SELECT seq FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            seconds, tasks = conn.execute(
                "SELECT COALESCE(SUM(MAX(end_time - start_time, 0) * required_slots), 0),"
                " count(*) FROM tasks WHERE job_seq = ? AND state = 'completed'"
                " AND start_time IS NOT NULL AND end_time IS NOT NULL", (row[0],)).fetchone()
        return float(seconds), int(tasks)

    def existing_tasks(self, job_id: str, task_ids: Sequence[str]) -> set[str]:
        """Which of ``task_ids`` the job has (ids compared case-insensitively)."""
        found: set[str] = set()
        with self._read() as conn:
            row = conn.execute("SELECT seq FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return found
            for task_id in task_ids:
                if conn.execute("SELECT 1 FROM tasks WHERE job_seq = ? AND id = ?",
                                (row[0], task_id)).fetchone() is not None:
                    found.add(task_id)
        return found

    def blocked_tasks(self, job_id: str, limit: int) -> list[str] | None:
        """The job's active tasks that can never run: a dependency of theirs completed
        with dependency action ``block``, or is itself such a task. None when the job
        has more than ``limit`` active tasks; [] for a missing job."""
        with self._read() as conn:
            row = conn.execute("SELECT seq FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return []
            job_seq = row[0]
            active = conn.execute(
                "SELECT id, num, depends_on, depends_on_ranges FROM tasks WHERE job_seq = ?"
                " AND state = 'active' ORDER BY seq LIMIT ?", (job_seq, limit + 1)).fetchall()
            if len(active) > limit:
                return None
            return _blocked(conn, job_seq, active)

    def task_ids(self, job_id: str, task_id: str) -> tuple[str, str] | None:
        """The job's and the task's ids as stored (they name its directory), or None."""
        row = self._conn().execute(
            "SELECT j.id, t.id FROM tasks t JOIN jobs j ON j.seq = t.job_seq"
            " WHERE j.id = ? AND t.id = ?", (job_id, task_id)).fetchone()
        return None if row is None else (row[0], row[1])

    def ended_among(self, seqs: Sequence[int]) -> list[int]:
        """Those of ``seqs`` (tasks this process runs) that were completed or deleted
        meanwhile: by a job's termination or deletion, maybe in another process."""
        if not seqs:
            return []
        live = {r[0] for r in self._conn().execute(
            f"SELECT seq FROM tasks WHERE seq IN ({','.join('?' * len(seqs))})"
            " AND state != 'completed'", tuple(seqs))}
        return [seq for seq in seqs if seq not in live]

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
        """Insert one chunk in one transaction; existing ids count as ``existed``.

        As Batch's Task - Add Collection (``POST /jobs/{jobId}/addtaskcollection``)
        answers, in its order:

        - a missing job is 404 ``JobNotFound``: a ``SystemFault`` here, as on the Azure
          backend (the job was deleted after it was created, or is not visible yet: a
          redelivery of the message creates it again);
        - a malformed task (an id, or a dependency id, that is not 1-64 letters, digits,
          hyphens or underscores; a dependency range not ``0 <= start <= end``) fails the
          whole request, 400 ``InvalidPropertyValue``: ``BatchRejected``, and no task of
          the chunk is added (the body is validated before any task is added; the Azure
          backend maps that 400 to ``BatchRejected``);
        - a completed job is 409 ``JobCompleted``. The Azure backend counts the chunk
          as existing when the job was sealed (an earlier delivery added every task
          before it sealed the job, which has completed since), and the same is done
          here; for a window job (``fanout-window`` metadata), which the monitor seals
          whatever events are still to come, it stays ``BatchRejected`` with reason
          ``JobCompleted``, so the submitter's late-event fallback runs the event in a
          job of its own (worker/submit.py).
        """
        now = time.time()
        with self._write() as conn:
            row = conn.execute(
                "SELECT seq, state, uses_dependencies, sealed, metadata FROM jobs WHERE id = ?",
                (job_id,)).fetchone()
            if row is None:
                raise _job_not_found("add tasks to", job_id)
            job_seq, state, uses_deps, sealed, metadata = row
            rows, errors = _task_rows(job_seq, tasks, now, bool(uses_deps))
            if state != "active":
                if sealed and not _is_window(metadata):
                    return AddResult(existed=len(tasks))
                raise BatchRejected(f"job {job_id!r} is completed; no task can be added",
                                    reason="JobCompleted")
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
                "SELECT t.seq, t.pid, t.proc_start, t.container_image IS NOT NULL"
                " FROM tasks t WHERE t.job_seq IN"
                " (SELECT seq FROM jobs WHERE state = 'active')"
                " AND t.state IN ('preparing', 'running')").fetchall()
            conn.executemany(
                "UPDATE tasks SET state = 'active', requeue_count = requeue_count + 1,"
                " pid = NULL, proc_start = NULL WHERE seq = ?", [(r[0],) for r in rows])
            conn.executemany("INSERT INTO transitions VALUES (?, ?, 'active', 'recovered')",
                             [(r[0], now) for r in rows])
        return [Orphan(seq=r[0], pid=r[1], proc_start=r[2], container=bool(r[3]))
                for r in rows]

    def evaluate_waiting(self) -> int:
        """Check the waiting tasks whose job gained enough satisfying ends since their
        last check; return how many became ready."""
        if self._conn().execute(_DUE_WAITING + " LIMIT 1").fetchone() is None:
            return 0
        # One write transaction, so a concurrent seal_job's reset is never overwritten.
        with self._write() as conn:
            return _evaluate(conn)

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
        with self._write() as conn:
            return self._claim(conn, free_slots, total_slots,
                               free_slots if limit is None else limit, time.time())

    def _claim(self, conn: sqlite3.Connection, free_slots: int, total_slots: int, limit: int,
               now: float) -> list[TaskRun]:
        chosen = _pick(conn, free_slots, total_slots, limit)
        conn.executemany("UPDATE tasks SET state = 'preparing', start_time = ? WHERE seq = ?",
                         [(now, seq) for seq in chosen])
        conn.executemany("INSERT INTO transitions VALUES (?, ?, 'preparing', NULL)",
                         [(seq, now) for seq in chosen])
        return [self._run_row(conn, seq) for seq in chosen]

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
            required_slots=slots, container=container_of(image),
        )

    def mark_running(self, seq: int, pid: int, proc_start: int | None) -> None:
        """Record that the task's process started (its pid is its process group); a
        task its job's termination already completed is left as it is."""
        now = time.time()
        with self._write() as conn:
            if conn.execute("UPDATE tasks SET state = 'running', pid = ?, proc_start = ?,"
                            " start_time = ? WHERE seq = ? AND state = 'preparing'",
                            (pid, proc_start, now, seq)).rowcount:
                conn.execute("INSERT INTO transitions VALUES (?, ?, 'running', NULL)",
                             (seq, now))

    def finish(self, seq: int, *, success: bool, exit_code: int | None,
               failure_code: str | None, failure_message: str | None,
               end: TaskEnd = "exit", category: FailureCategory | None = None
               ) -> list[int] | None:
        """Complete the task, applying its exit conditions for how it ended: whether it
        satisfies its dependents and what it does to its job (a ``terminate`` job
        action, on a job whose ``on_task_failure`` lets it act, completes the job as
        ``TaskFailed``); then complete a sealed job whose tasks are all done.

        Returns None, or when the task's end terminated its job the seqs of the job's
        other tasks that ended with it, for the caller to stop. A task no longer
        preparing or running (its job was terminated or deleted meanwhile) is left as
        it is.
        """
        return self.finish_and_claim(
            seq, success=success, exit_code=exit_code, failure_code=failure_code,
            failure_message=failure_message, end=end, category=category)[0]

    def finish_and_claim(self, seq: int, *, success: bool, exit_code: int | None,
                         failure_code: str | None, failure_message: str | None,
                         end: TaskEnd = "exit", category: FailureCategory | None = None,
                         claim: tuple[int, int] | None = None
                         ) -> tuple[list[int] | None, list[TaskRun]]:
        """:meth:`finish`, then, with ``claim = (free_slots, total_slots)``, check the
        waiting tasks and :meth:`claim` the next task in the same transaction: a runner
        that just finished one task needs the next, and one commit instead of two
        halves the store's cost of a trivial task's end. Returns what ``finish`` does
        and the claimed tasks (at most one)."""
        now = time.time()
        with self._write() as conn:
            ended = self._finish(conn, seq, success=success, exit_code=exit_code,
                                 failure_code=failure_code, failure_message=failure_message,
                                 end=end, category=category, now=now)
            if claim is None or ended is not None:  # not after the job's termination
                return ended, []
            _evaluate(conn)
            return None, self._claim(conn, claim[0], claim[1], 1, now)

    def _finish(self, conn: sqlite3.Connection, seq: int, *, success: bool,
                exit_code: int | None, failure_code: str | None, failure_message: str | None,
                end: TaskEnd, category: FailureCategory | None, now: float
                ) -> list[int] | None:
        result = "success" if success else "failure"
        row = conn.execute(
            "SELECT t.job_seq, t.retention, t.exit_conditions, j.on_task_failure, t.state"
            " FROM tasks t JOIN jobs j ON j.seq = t.job_seq WHERE t.seq = ?",
            (seq,)).fetchone()
        if row is None or row[4] not in ("preparing", "running"):
            return None
        job_seq, keep, conditions, acts, _ = row
        job_action, dependency_action = _options(conditions, end, exit_code, success,
                                                 bool(acts))
        satisfies = dependency_action == "satisfy"
        keep = keep if keep is not None else self._retention
        conn.execute(
            "UPDATE tasks SET state = 'completed', result = ?, exit_code = ?, failure_code = ?,"
            " failure_message = ?, end_time = ?, pid = NULL, proc_start = NULL,"
            " purge_at = ?, satisfies = ?, category = ? WHERE seq = ?",
            (result, exit_code, failure_code, failure_message, now, now + keep,
             int(satisfies), None if success else (category or category_for(failure_code)),
             seq))
        conn.execute("INSERT INTO transitions VALUES (?, ?, 'completed', ?)",
                     (seq, now, failure_code or result))
        if satisfies:
            conn.execute("UPDATE jobs SET satisfied = satisfied + 1 WHERE seq = ?",
                         (job_seq,))
        if job_action == "terminate":
            return _terminate(conn, job_seq, REASON_TASK_FAILED, now, self._retention)
        _complete_if_done(conn, job_seq, now)
        return None

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
            if conn.execute(
                f"UPDATE tasks SET state = 'active', {counter} = {counter} + 1, pid = NULL,"
                " proc_start = NULL, exit_code = COALESCE(?, exit_code),"
                " failure_code = COALESCE(?, failure_code),"
                " failure_message = COALESCE(?, failure_message), end_time = ? WHERE seq = ?"
                " AND state IN ('preparing', 'running')",
                (exit_code, failure_code, failure_message, now, seq)
            ).rowcount:
                conn.execute("INSERT INTO transitions VALUES (?, ?, 'active', ?)",
                             (seq, now, reason))

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
    "SELECT t.seq, t.job_seq, t.depends_on, t.depends_on_ranges, j.satisfied, j.sealed"
    " FROM tasks t JOIN jobs j ON j.seq = t.job_seq"
    " WHERE j.state = 'active' AND t.state = 'active' AND t.waiting = 1"
    " AND t.recheck_at <= j.satisfied"
)

_JOB_COLUMNS = "seq, id, state, pool, display_name, created, metadata, completed"
#: A job's columns and its tasks' counts by state and result in one statement (one row
#: with a NULL state for a job without tasks).
_JOB_STATUS = (
    "SELECT j.seq, j.id, j.state, j.pool, j.display_name, j.created, j.metadata, j.completed,"
    " t.state, t.result, count(t.seq) FROM jobs j LEFT JOIN tasks t ON t.job_seq = j.seq"
    " WHERE j.id = ? GROUP BY t.state, t.result"
)
_RECORD_COLUMNS = ("id, state, metadata, pool, created, completed, terminate_reason,"
                   " state_changed, sealed")


def _aware(at: float | None) -> datetime | None:
    return None if at is None else datetime.fromtimestamp(at, UTC)


def _job_record(row: tuple[Any, ...]) -> JobRecord:
    job_id, state, metadata, pool, created, completed, reason, changed, sealed = row
    return JobRecord(id=job_id, state=state, metadata=json.loads(metadata) if metadata else {},
                     pool=pool, created=_aware(created), start_time=_aware(created),
                     end_time=_aware(completed), terminate_reason=reason,
                     state_changed=_aware(changed if changed is not None else created),
                     sealed=bool(sealed))


def category_for(failure_code: str | None) -> FailureCategory:
    """A failed task's category from its failure code alone (the runner knows better:
    it passes one to :meth:`Store.finish`; this is the fallback)."""
    if failure_code == "MaxWallClockTimeExceeded":
        return "wall_clock_timeout"
    if failure_code == TASK_ENDED:
        return "cancelled"
    if failure_code == "FileUploadError":
        return "output_upload_failure"
    if failure_code and failure_code.startswith("ResourceFile"):
        return "resource_file_failure"
    return "exit_code"


def _terminate(conn: sqlite3.Connection, job_seq: int, reason: str, now: float,
               retention: float) -> list[int]:
    """Complete the job with ``reason``; its preparing and running tasks complete as
    ended (Batch's ``TaskEnded``); its active ones stay active and never run, as Batch
    leaves them. Returns the ended tasks' seqs."""
    ended = [r[0] for r in conn.execute(
        "SELECT seq FROM tasks WHERE job_seq = ? AND state IN ('preparing', 'running')",
        (job_seq,))]
    conn.executemany(
        "UPDATE tasks SET state = 'completed', result = 'failure', exit_code = NULL,"
        " failure_code = ?, failure_message = ?, end_time = ?, pid = NULL, proc_start = NULL,"
        " purge_at = ? + COALESCE(retention, ?), satisfies = 0, category = 'cancelled'"
        " WHERE seq = ?",
        [(TASK_ENDED, f"the task was ended because its job was terminated ({reason})", now,
          now, retention, seq) for seq in ended])
    conn.executemany("INSERT INTO transitions VALUES (?, ?, 'completed', ?)",
                     [(seq, now, TASK_ENDED) for seq in ended])
    conn.execute("UPDATE jobs SET state = 'completed', completed = ?, state_changed = ?,"
                 " terminate_reason = ? WHERE seq = ?", (now, now, reason, job_seq))
    return ended


def _options(conditions: str | None, end: TaskEnd, exit_code: int | None, success: bool,
             acts: bool) -> tuple[JobAction, DependencyAction]:
    """The job and dependency actions for a task's end (Batch's defaults without exit
    conditions: satisfy and no action on success; block and, when the job lets exit
    options act, terminate otherwise)."""
    if conditions is None:
        if success:
            return "none", "satisfy"
        return ("terminate" if acts else "none"), "block"
    return _parse_conditions(conditions).options_for(end, exit_code, acts)


def _options_json(options: ExitOptions | None) -> list[str | None] | None:
    return None if options is None else [options.job_action, options.dependency_action]


def _options_of(value: list[Any] | None) -> ExitOptions | None:
    return None if value is None else ExitOptions(job_action=value[0],
                                                  dependency_action=value[1])


@lru_cache(maxsize=256)
def conditions_json(conditions: ExitConditions) -> str:
    """Compact JSON of a task's exit conditions (cached: a sweep's tasks share a few)."""
    return json.dumps({
        "codes": [[code, *(_options_json(o) or ())] for code, o in conditions.exit_codes],
        "ranges": [[lo, hi, *(_options_json(o) or ())]
                   for lo, hi, o in conditions.exit_code_ranges],
        "pre": _options_json(conditions.pre_processing_error),
        "upload": _options_json(conditions.file_upload_error),
        "default": _options_json(conditions.default),
    }, separators=(",", ":"))


@lru_cache(maxsize=256)
def _parse_conditions(text: str) -> ExitConditions:
    data = json.loads(text)
    return ExitConditions(
        exit_codes=tuple((c[0], ExitOptions(c[1], c[2])) for c in data["codes"]),
        exit_code_ranges=tuple((r[0], r[1], ExitOptions(r[2], r[3])) for r in data["ranges"]),
        pre_processing_error=_options_of(data["pre"]),
        file_upload_error=_options_of(data["upload"]),
        default=_options_of(data["default"]),
    )


#: Stands in for a stored registry's password: the local executor never keeps one (the
#: engine pulls with its own credentials), but ``ContainerRegistry`` wants one.
_NO_PASSWORD = "-"


@lru_cache(maxsize=256)
def container_json(settings: ContainerSettings) -> str:
    """A task's container settings as stored (cached: a job's tasks share one)."""
    data: dict[str, Any] = {"image": settings.image}
    if settings.run_options:
        data["run_options"] = settings.run_options
    if settings.working_directory != "taskWorkingDirectory":
        data["working_directory"] = settings.working_directory
    registry = settings.registry
    if registry is not None:
        data["registry"] = {k: v for k, v in (
            ("server", registry.server), ("name", registry.name),
            ("identity", registry.identity_reference),
            ("username", registry.username)) if v is not None}
    return json.dumps(data, separators=(",", ":"))


@lru_cache(maxsize=256)
def container_of(stored: str | None) -> ContainerSettings | None:
    """Read ``container_json`` back; a bare image name is a pre-JSON row's."""
    if not stored:
        return None
    if not stored.startswith("{"):
        return ContainerSettings(image=stored)
    data = json.loads(stored)
    reg = data.get("registry")
    registry = None
    if reg:
        identity = reg.get("identity")
        registry = ContainerRegistry(
            server=reg["server"], identity_reference=identity, username=reg.get("username"),
            password=None if identity else _NO_PASSWORD, name=reg.get("name"))
    return ContainerSettings(image=data["image"], registry=registry,
                             run_options=data.get("run_options"),
                             working_directory=data.get("working_directory",
                                                        "taskWorkingDirectory"))


def _job_status(conn: sqlite3.Connection, row: tuple[Any, ...]) -> JobStatus:
    return _status_of(row, conn.execute(
        "SELECT state, result, count(*) FROM tasks WHERE job_seq = ? GROUP BY state, result",
        (row[0],)).fetchall())


def _status_of(row: Sequence[Any], groups: Sequence[tuple[str, str | None, int]]
               ) -> JobStatus:
    """A job's status from its ``_JOB_COLUMNS`` and its tasks' (state, result, count)."""
    _seq, job_id, state, pool, display_name, created, metadata, _completed = row
    counts = dict.fromkeys(TASK_STATES, 0)
    succeeded = failed = 0
    for task_state, result, n in groups:
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
        # Stepped, not fetched whole: the first row usually fits, and the look-ahead
        # for backfill (a task that does not fit is skipped) costs only when it is used.
        for seq, slots in conn.execute(
            "SELECT seq, required_slots FROM tasks WHERE job_seq = ? AND state = 'active'"
            " AND waiting = 0 ORDER BY seq LIMIT ?", (job_seq, free_slots + 64)
        ):
            need = min(max(slots, 1), total_slots)
            if need <= free_slots:
                chosen.append(seq)
                free_slots -= need
                if free_slots <= 0 or len(chosen) >= limit:
                    return chosen
    return chosen


def _complete_if_done(conn: sqlite3.Connection, job_seq: int, now: float) -> None:
    conn.execute(
        "UPDATE jobs SET state = 'completed', completed = ?, state_changed = ?,"
        " terminate_reason = ? WHERE seq = ? AND sealed = 1"
        " AND state = 'active' AND NOT EXISTS (SELECT 1 FROM tasks WHERE job_seq = ?"
        " AND state IN ('active', 'preparing', 'running'))",
        (now, now, REASON_ALL_COMPLETE, job_seq, job_seq))


def _numeric_id(task_id: str) -> int | None:
    """The integer a task id spells in canonical decimal (for dependency ranges)."""
    if task_id.isdigit() and len(task_id) <= _MAX_NUMERIC_ID_DIGITS and (
            task_id[0] != "0" or len(task_id) == 1):
        return int(task_id)
    return None


def _task_rows(job_seq: int, tasks: Sequence[TaskSpec], now: float,
               uses_deps: bool) -> tuple[list[tuple[Any, ...]], list[TaskError]]:
    """Validate and flatten one chunk; this is the per-task hot path of a sweep.

    A malformed task is ``BatchRejected`` for the whole chunk (see ``_malformed``);
    what Batch reports per task in a 200 answer (dependencies on a job without them)
    is a ``TaskError``."""
    rows: list[tuple[Any, ...]] = []
    errors: list[TaskError] = []
    dumps = json.dumps
    valid_id = ID_PATTERN.match
    for t in tasks:
        tid = t.id
        ids, ranges = t.depends_on, t.depends_on_ranges
        if not valid_id(tid) or ((ids or ranges) and _bad_dependencies(ids, ranges)):
            raise _malformed(t)
        waiting = 0
        if ids or ranges:
            if not uses_deps:
                # Batch reports this one per task, in the 200 answer's results (409
                # TaskDependenciesNotSpecifiedOnJob)
                errors.append(TaskError(tid, "TaskDependenciesNotSpecifiedOnJob",
                                        "the job was not created with uses_task_dependencies"))
                continue
            waiting = 1
        env, rfiles, ofiles, wall, keep, exits = (t.environment, t.resource_files,
                                                  t.output_files, t.max_wall_clock,
                                                  t.retention, t.exit_conditions)
        if exits is not None and _disables(exits):
            errors.append(TaskError(tid, "InvalidPropertyValue", _NO_DISABLE))
            continue
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
            container_json(t.container) if t.container is not None else None, waiting, now,
            conditions_json(exits) if exits is not None else None,
        ))
    return rows, errors


_NO_DISABLE = ("the local executor does not take exit options with job action 'disable' "
               "(it has no way to enable a job again)")


@lru_cache(maxsize=256)
def _disables(conditions: ExitConditions) -> bool:
    """Whether any of the exit options has job action ``disable``."""
    options: list[ExitOptions | None] = [o for _, o in conditions.exit_codes]
    options += [o for _, _, o in conditions.exit_code_ranges]
    options += [conditions.pre_processing_error, conditions.file_upload_error,
                conditions.default]
    return any(o is not None and o.job_action == "disable" for o in options)


def _malformed(task: TaskSpec) -> BatchRejected:
    """The whole chunk refused for one malformed task, as Batch's body validation
    refuses an add-collection request: 400 ``InvalidPropertyValue`` ("The value
    provided for one of the properties in the request body is invalid", with the
    property's name; the REST spec's TaskAddParameter ``id``: "can contain any
    combination of alphanumeric characters including hyphens and underscores, and
    cannot contain more than 64 characters"; the same for each of ``dependsOn``'s
    ``taskIds``, and a ``taskIdRanges`` entry whose start is negative or past its end).
    The Azure backend maps that answer to ``BatchRejected`` with the service's code
    first in the description, and so is this."""
    if not ID_PATTERN.match(task.id):
        what = f"id {task.id!r}: a task id is 1-64 letters, digits, hyphens or underscores"
    elif bad := [d for d in task.depends_on if not ID_PATTERN.match(d)]:
        what = (f"dependsOn.taskIds {bad[0]!r}: a task id is 1-64 letters, digits, "
                "hyphens or underscores")
    else:
        lo, hi = next(r for r in task.depends_on_ranges if r[0] < 0 or r[1] < r[0])
        what = f"dependsOn.taskIdRanges {lo}..{hi}: a range needs 0 <= start <= end"
    return BatchRejected(f"InvalidPropertyValue: task {task.id}: {what}; no task of the "
                         "request was added")


def _bad_dependencies(ids: Sequence[str], ranges: Sequence[tuple[int, int]]) -> bool:
    return not all(map(ID_PATTERN.match, ids)) or any(lo < 0 or hi < lo for lo, hi in ranges)


def _job_not_found(what: str, job_id: str) -> SystemFault:
    """A job that is gone: Batch answers 404 ``JobNotFound``, which the Azure backend
    takes as transient (deleted since it was created, or not visible yet), so the
    message is delivered again and its redelivery creates the job again."""
    return SystemFault(f"{what} job {job_id}: JobNotFound: the job does not exist")


def _is_window(metadata: str | None) -> bool:
    """Whether the job's metadata (as stored) marks a window job."""
    return bool(metadata) and META_WINDOW in json.loads(metadata or "{}")


def _evaluate(conn: sqlite3.Connection) -> int:
    """Within a write transaction: mark ready the waiting tasks whose dependencies are
    met, record for the others how many satisfying ends they still need at least;
    return how many became ready."""
    verdicts = [(seq, satisfied, _missing(conn, job_seq, ids, ranges, bool(sealed)))
                for seq, job_seq, ids, ranges, satisfied, sealed
                in conn.execute(_DUE_WAITING).fetchall()]
    ready = [(seq,) for seq, _, missing in verdicts if missing == 0]
    later = [(satisfied + missing, seq) for seq, satisfied, missing in verdicts if missing]
    conn.executemany("UPDATE tasks SET waiting = 0 WHERE seq = ?", ready)
    conn.executemany("UPDATE tasks SET recheck_at = ? WHERE seq = ?", later)
    return len(ready)


def _missing(conn: sqlite3.Connection, job_seq: int, ids_json: str | None,
             ranges_json: str | None, sealed: bool) -> int:
    """A lower bound on the satisfying ends the job still needs before these
    dependencies are met; 0 when they are met.

    Explicit ids must exist and satisfy (succeed, or fail with dependency action
    ``satisfy``). Ids of a range must satisfy where they exist; until the job is
    sealed, every id of the range must also exist (so an aggregate added before its
    range never runs early).
    """
    need = 0
    if ids_json:
        wanted = sorted({i.lower() for i in json.loads(ids_json)})
        ok = 0
        for start in range(0, len(wanted), _IN_CHUNK):
            part = wanted[start:start + _IN_CHUNK]
            ok += conn.execute(
                "SELECT count(*) FROM tasks WHERE job_seq = ? AND satisfies = 1"
                f" AND id IN ({','.join('?' * len(part))})", (job_seq, *part)).fetchone()[0]
        need = max(need, len(wanted) - ok)
    for lo, hi in json.loads(ranges_json) if ranges_json else ():
        exist, ok = conn.execute(
            "SELECT count(*), count(CASE WHEN satisfies = 1 THEN 1 END) FROM tasks"
            " WHERE job_seq = ? AND num IS NOT NULL AND num BETWEEN ? AND ?",
            (job_seq, lo, hi)).fetchone()
        need = max(need, (exist if sealed else hi - lo + 1) - ok)
    return need


def _blocked(conn: sqlite3.Connection, job_seq: int,
             active: Sequence[tuple[str, int | None, str | None, str | None]]) -> list[str]:
    """Which of the job's ``active`` tasks (all of them) wait on a dependency that
    completed with dependency action ``block``, directly or through another of them."""
    deps = [(tid, num, [i.lower() for i in json.loads(ids)] if ids else [],
             [tuple(r) for r in json.loads(ranges)] if ranges else [])
            for tid, num, ids, ranges in active if ids or ranges]
    wanted = sorted({i for _, _, ids, _ in deps for i in ids})
    blockers: set[str] = set()
    for start in range(0, len(wanted), _IN_CHUNK):
        part = wanted[start:start + _IN_CHUNK]
        blockers.update(r[0].lower() for r in conn.execute(
            "SELECT id FROM tasks WHERE job_seq = ? AND state = 'completed' AND satisfies = 0"
            f" AND id IN ({','.join('?' * len(part))})", (job_seq, *part)))
    blocking_ranges = {r for _, _, _, ranges in deps for r in ranges if conn.execute(
        "SELECT 1 FROM tasks WHERE job_seq = ? AND num BETWEEN ? AND ?"
        " AND state = 'completed' AND satisfies = 0 LIMIT 1", (job_seq, *r)).fetchone()}
    blocked: set[str] = set()
    nums: list[int] = []  # the blocked tasks' numeric ids, sorted
    changed = True
    while changed:  # to a fixed point: a dependent of a blocked task is blocked too
        changed = False
        for tid, num, ids, ranges in deps:
            if tid in blocked:
                continue
            if any(i in blockers for i in ids) or any(
                    r in blocking_ranges or bisect_left(nums, r[0]) < bisect_right(nums, r[1])
                    for r in ranges):
                blocked.add(tid)
                blockers.add(tid.lower())
                if num is not None:
                    insort(nums, num)
                changed = True
    return [tid for tid, *_ in deps if tid in blocked]
