"""The embedded durable queue: a peek-lock queue in one SQLite file.

It stands in for Azure Service Bus with the same semantics: ``receive`` locks the
oldest available messages for ``lock_duration`` seconds under a fresh lock token;
``complete``, ``abandon``, ``dead_letter`` and ``renew_lock`` work only while the
caller still holds that lock (else ``LockLost``); a lock that expires counts as a
delivery, and a message that reaches ``max_delivery_count`` deliveries is
dead-lettered by the queue itself with reason ``MaxDeliveryCountExceeded``, the reason
Service Bus gives when it dead-letters a message whose delivery count passed the
entity's ``MaxDeliveryCount``
(https://learn.microsoft.com/azure/service-bus-messaging/service-bus-dead-letter-queues,
its table of the reasons the broker sets). The consumer's own
dead-letter of a message failing its last delivery keeps fanout's reason
``MaxDeliveryExceeded`` (with the error).

A message keeps its ``reply_to`` (Service Bus's ``ReplyTo``). With a
``duplicate_window``, a send whose message id was already sent within that many
seconds is accepted and silently dropped, as Service Bus duplicate detection does
(https://learn.microsoft.com/azure/service-bus-messaging/duplicate-detection): the
window counts from the first send of the id, and a dropped repeat does not extend
it. ``peek`` reads active messages without locking them.

Files written before ``reply_to`` and duplicate detection existed are migrated in
place when first opened (a column and a table are added; nothing is rewritten).

The file is shared safely between processes (``fanout send`` writing while the
daemon reads) through WAL mode, a busy timeout and ``BEGIN IMMEDIATE``
transactions. Within one process every SQLite call of a ``LocalQueue`` runs on one
dedicated thread holding one connection, so the event loop never blocks and
SQLite's single writer is not fought over by threads of our own. The thread takes
its jobs from a plain queue and answers through the event loop's
``call_soon_threadsafe``: a third cheaper a call than a thread pool's futures
chained to an asyncio future, and three calls a message.
"""

from __future__ import annotations

import asyncio
import functools
import json
import queue
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import structlog

from worker.errors import LockLost, SystemFault
from worker.handoff import answer, fail, post
from worker.routing import IDEMPOTENCY_KEY_PROPERTY
from worker.sources.base import DeadLettered, Received

__all__ = ["LocalQueue"]

log = structlog.get_logger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

#: Longest dead-letter reason or description kept (Service Bus keeps 4096 chars).
MAX_DESCRIPTION = 4096
#: How long a statement waits for another connection's write lock.
BUSY_TIMEOUT_MS = 30_000
#: Poll delays of an empty ``receive``: start short, grow by half up to the cap.
POLL_FIRST = 0.05
POLL_MAX = 0.25

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id TEXT NOT NULL,
    body BLOB NOT NULL,
    properties TEXT NOT NULL DEFAULT '{}',
    state TEXT NOT NULL CHECK (state IN ('active', 'dead_letter', 'scheduled')),
    enqueued_at REAL NOT NULL,
    scheduled_at REAL,
    delivery_count INTEGER NOT NULL DEFAULT 0,
    expired_count INTEGER NOT NULL DEFAULT 0,
    lock_token TEXT,
    locked_until REAL,
    dead_letter_reason TEXT,
    dead_letter_description TEXT,
    dead_lettered_at REAL,
    reply_to TEXT
);
CREATE TABLE IF NOT EXISTS duplicates (
    message_id TEXT PRIMARY KEY,
    sent_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS duplicates_sent ON duplicates(sent_at);
CREATE INDEX IF NOT EXISTS messages_ready ON messages(seq)
    WHERE state = 'active' AND lock_token IS NULL;
CREATE INDEX IF NOT EXISTS messages_locked ON messages(locked_until)
    WHERE lock_token IS NOT NULL;
CREATE INDEX IF NOT EXISTS messages_state ON messages(state, scheduled_at);
"""
# Queries name their index (INDEXED BY): without ANALYZE statistics the planner would
# pick messages_state and sort or scan every active message on each receive.

# Unlock and count one more delivery; dead-letter the message if that reaches the
# maximum, with the broker's reason: Service Bus dead-letters such a message as
# MaxDeliveryCountExceeded ("Message couldn't be consumed after maximum delivery
# attempts", service-bus-dead-letter-queues), whether its lock lapsed or it was
# abandoned. Right-hand sides see the row's old values. Parameters: now, max, expired.
_REDELIVER = """
    lock_token = NULL, locked_until = NULL,
    delivery_count = delivery_count + 1,
    expired_count = expired_count + :expired,
    state = CASE WHEN delivery_count + 1 >= :max THEN 'dead_letter' ELSE state END,
    dead_letter_reason = CASE WHEN delivery_count + 1 >= :max
        THEN 'MaxDeliveryCountExceeded' ELSE dead_letter_reason END,
    dead_letter_description = CASE WHEN delivery_count + 1 >= :max
        THEN 'delivered ' || (delivery_count + 1) || ' times, reaching the max delivery '
            || 'count of ' || :max || ': its lock expired ' || (expired_count + :expired)
            || ' times and it was abandoned '
            || (delivery_count + 1 - expired_count - :expired) || ' times'
        ELSE dead_letter_description END,
    dead_lettered_at = CASE WHEN delivery_count + 1 >= :max
        THEN :now ELSE dead_lettered_at END
"""
_HELD = "seq = :seq AND lock_token = :token AND locked_until > :now AND state = 'active'"

_INSERT = """INSERT INTO messages (message_id, body, properties, state, enqueued_at,
    scheduled_at, reply_to) VALUES (?, ?, ?, ?, ?, ?, ?)"""
# Duplicate detection: forget ids older than the window, then log the id unless it is
# already logged (then the send is a duplicate and dropped).
_FORGET = "DELETE FROM duplicates WHERE sent_at <= ?"
_REMEMBER = "INSERT INTO duplicates (message_id, sent_at) VALUES (?, ?) ON CONFLICT DO NOTHING"
_PEEK = """SELECT seq, message_id, body, properties, enqueued_at, delivery_count, reply_to
    FROM messages WHERE seq >= :start
    AND (state = 'active' OR (state = 'scheduled' AND scheduled_at <= :now))
    ORDER BY seq LIMIT :limit"""
_PROMOTE = """UPDATE messages INDEXED BY messages_state SET state = 'active'
    WHERE state = 'scheduled' AND scheduled_at <= ?"""
_EXPIRE = f"""UPDATE messages INDEXED BY messages_locked SET {_REDELIVER}
    WHERE lock_token IS NOT NULL AND locked_until <= :now AND state = 'active'
    RETURNING seq, message_id, state, dead_letter_description"""
_LOCK = """UPDATE messages SET lock_token = lower(hex(randomblob(16))), locked_until = ?
    WHERE seq IN (SELECT seq FROM messages INDEXED BY messages_ready
                  WHERE state = 'active' AND lock_token IS NULL
                  ORDER BY seq LIMIT ?)
    RETURNING seq, message_id, body, properties, enqueued_at, delivery_count,
              lock_token, locked_until, reply_to"""
_UNLOCK = "UPDATE messages SET lock_token = NULL, locked_until = NULL WHERE lock_token = ?"
_COMPLETE = f"DELETE FROM messages WHERE {_HELD}"
_ABANDON = f"UPDATE messages SET {_REDELIVER} WHERE {_HELD}"
_DEAD_LETTER = f"""UPDATE messages SET state = 'dead_letter', lock_token = NULL,
    locked_until = NULL, dead_letter_reason = :reason, dead_letter_description = :description,
    dead_lettered_at = :now WHERE {_HELD}"""
_RENEW = f"UPDATE messages SET locked_until = :until WHERE {_HELD}"
_DEPTH = """SELECT
    coalesce(sum(state = 'active' OR (state = 'scheduled' AND scheduled_at <= :now)), 0),
    coalesce(sum(state = 'dead_letter'), 0),
    coalesce(sum(state = 'scheduled' AND scheduled_at > :now), 0)
    FROM messages"""
_DEAD_LETTERS = """SELECT message_id, seq, dead_letter_reason, dead_letter_description, body,
    properties, enqueued_at, delivery_count FROM messages WHERE state = 'dead_letter'
    ORDER BY dead_lettered_at, seq LIMIT ?"""
_RESUBMIT = """INSERT INTO messages (message_id, body, properties, state, enqueued_at,
    reply_to)
    SELECT :new_id, body, CASE WHEN json_extract(properties, '$."' || :key || '"') IS NULL
            THEN json_set(properties, '$."' || :key || '"', message_id) ELSE properties END,
        'active', :now, reply_to FROM messages
    WHERE seq = :seq AND state = 'dead_letter' RETURNING message_id"""


def _utc(timestamp: float) -> datetime:
    """An aware UTC datetime from epoch seconds."""
    return datetime.fromtimestamp(timestamp, tz=UTC)


def _props(text: str) -> dict[str, str]:
    """Message properties as stored (a JSON object of strings)."""
    value: dict[str, str] = json.loads(text)
    return value


@contextmanager
def _immediate(db: sqlite3.Connection) -> Iterator[None]:
    """A write transaction that takes SQLite's write lock up front.

    Taking it at BEGIN (not at the first write) is what keeps two receivers from
    locking the same message, and lets the busy timeout apply instead of failing.
    """
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.commit()
    finally:
        if db.in_transaction:  # the body or the commit failed
            db.rollback()


@contextmanager
def _durable(db: sqlite3.Connection) -> Iterator[None]:
    """Commit with an fsync of the log (synchronous FULL) instead of the default NORMAL."""
    db.execute("PRAGMA synchronous = FULL")
    try:
        yield
    finally:
        db.execute("PRAGMA synchronous = NORMAL")


class LocalQueue:
    """A durable peek-lock queue in one SQLite file (the ``Source`` protocol)."""

    def __init__(self, *, path: Path, name: str = "fanout", lock_duration: float = 60.0,
                 max_delivery_count: int = 10,
                 clock: Callable[[], float] = time.time,
                 duplicate_window: float | None = None) -> None:
        if lock_duration <= 0 or max_delivery_count < 1:
            raise ValueError("lock_duration must be > 0 and max_delivery_count >= 1")
        if duplicate_window is not None and duplicate_window <= 0:
            raise ValueError("duplicate_window must be > 0 (or None: no duplicate detection)")
        self._duplicate_window = duplicate_window
        self._path = path
        self._name = name
        self._lock_duration = lock_duration
        self._max = max_delivery_count
        self._clock = clock
        self._thread = _Thread(f"fanout-queue-{name}")
        self._conn: sqlite3.Connection | None = None  # used only on the queue's thread
        self._owner: int | None = None  # that thread's ident
        self._closed = False
        #: Transactions that committed sends (one per group): fewer than the sends
        #: when senders wait together.
        self.send_commits = 0

    @property
    def name(self) -> str:
        """The queue's name, used as the ``queue`` label of metrics."""
        return self._name

    @property
    def max_delivery_count(self) -> int:
        """Deliveries after which a failing message is dead-lettered."""
        return self._max

    @property
    def lock_duration(self) -> float:
        """Seconds a ``receive`` locks a message for."""
        return self._lock_duration

    @property
    def duplicate_window(self) -> float | None:
        """Seconds a message id is remembered for duplicate detection (None: off)."""
        return self._duplicate_window

    # -- the Source protocol ---------------------------------------------------

    async def send(self, body: bytes, *, message_id: str | None = None,
                   properties: Mapping[str, str] | None = None,
                   scheduled_at: datetime | None = None, reply_to: str | None = None) -> str:
        """Enqueue a message (delivered no earlier than ``scheduled_at``); return its id.

        With duplicate detection on, a message id already sent within the window is
        accepted (its id returned) and dropped; :meth:`sent` tells the two apart.
        """
        message_id = message_id or uuid.uuid4().hex
        await self._send(body, message_id, properties, scheduled_at, reply_to)
        return message_id

    async def sent(self, body: bytes, *, message_id: str,
                   properties: Mapping[str, str] | None = None,
                   scheduled_at: datetime | None = None, reply_to: str | None = None) -> bool:
        """Like :meth:`send`; True if the message was enqueued, False if it was dropped
        as a duplicate."""
        return await self._send(body, message_id, properties, scheduled_at, reply_to)

    async def _send(self, body: bytes, message_id: str, properties: Mapping[str, str] | None,
                    scheduled_at: datetime | None, reply_to: str | None) -> bool:
        """Queue the send for the thread's next group commit and await that commit.

        Sends waiting together are committed in one fsynced transaction (see
        :meth:`_send_group`): each caller is answered only after the commit that made
        its message durable, so concurrent senders share an fsync instead of queueing
        for one each."""
        if self._closed:
            raise RuntimeError(f"queue {self._name!r} is closed")
        props = json.dumps(dict(properties or {}), separators=(",", ":"))
        due = scheduled_at.timestamp() if scheduled_at is not None else None
        loop = asyncio.get_running_loop()
        send = _Send(self._send_group, loop, loop.create_future(), message_id, bytes(body),
                     props, due, reply_to)
        self._thread.put(send)
        return await send.waiter

    async def receive(self, max_messages: int, max_wait: float) -> list[Received]:
        """Lock and return up to ``max_messages``, polling for at most ``max_wait`` s."""
        deadline = time.monotonic() + max(0.0, max_wait)
        delay = POLL_FIRST
        while True:
            got = await self._lock_batch(max(1, max_messages))
            left = deadline - time.monotonic()
            if got or left <= 0:
                return got
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 1.5, POLL_MAX)

    async def complete(self, msg: Received) -> None:
        """Delete a processed message; ``LockLost`` unless its lock is still held."""
        await self._call(self._settle_sync, _COMPLETE, self._held(msg))

    async def abandon(self, msg: Received) -> None:
        """Unlock for redelivery (delivery count + 1), dead-lettering at the maximum."""
        params = {**self._held(msg), "max": self._max, "expired": 0}
        await self._call(self._settle_sync, _ABANDON, params)

    async def dead_letter(self, msg: Received, reason: str, description: str) -> None:
        """Move the message to the dead-letter queue with a reason and description."""
        params = {**self._held(msg), "reason": reason[:MAX_DESCRIPTION],
                  "description": description[:MAX_DESCRIPTION]}
        await self._call(self._settle_sync, _DEAD_LETTER, params)

    async def renew_lock(self, msg: Received) -> datetime:
        """Extend the lock by ``lock_duration`` from now; return (and set) ``locked_until``."""
        params = self._held(msg)
        until = float(params["now"]) + self._lock_duration
        await self._call(self._settle_sync, _RENEW, {**params, "until": until})
        msg.locked_until = _utc(until)
        return msg.locked_until

    async def depth(self) -> dict[str, int]:
        """Message counts: ``active`` (including locked), ``dead_letter``, ``scheduled``."""
        active, dead, scheduled = await self._call(self._depth_sync)
        return {"active": active, "dead_letter": dead, "scheduled": scheduled}

    async def peek(self, limit: int = 100, *,
                   from_sequence: int | None = None) -> list[Received]:
        """Up to ``limit`` active messages (locked ones included), oldest first, from
        sequence number ``from_sequence`` on, without locking or counting a delivery.

        The results carry no lock (``locked_until`` and ``handle`` are None): they
        cannot be settled.
        """
        if limit < 1:
            return []
        return await self._call(self._peek_sync, limit, from_sequence or 0)

    async def dead_letters(self, limit: int = 100) -> list[DeadLettered]:
        """Dead-lettered messages, oldest first, without locking anything."""
        return await self._call(self._dead_letters_sync, limit)

    async def resubmit(self, sequence_number: int) -> str | None:
        """Move a dead-lettered message back to the queue as a fresh copy (delivery count
        0) in one transaction; return the copy's message id, or None if there is no such
        message.

        As with Service Bus, the copy gets a NEW message id and carries the original one
        in the ``fanout-idempotency-key`` property (unless it has one), so it maps to the
        same job and duplicate detection cannot drop it."""
        return await self._call(self._resubmit_sync, sequence_number)

    async def probe(self) -> None:
        """Read the queue's counts: raises ``SystemFault`` if the file cannot be used."""
        await self._call(self._depth_sync)

    async def check_capacity(self, concurrency: int) -> None:
        """Nothing to check: the local queue has no prefetch."""

    async def close(self) -> None:
        """Close the connection; locks still held lapse and those messages return."""
        if self._closed:
            return
        self._closed = True
        try:  # the jobs queued before it run first; then the thread ends
            await self._await(self._close_sync, None)
        finally:
            self._thread.stop()

    # -- running SQLite work on the queue's thread -----------------------------

    async def _call(self, fn: Callable[Concatenate[sqlite3.Connection, P], T],
                    *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn(connection, ...)`` on the queue's thread and await its result."""
        if self._closed:
            raise RuntimeError(f"queue {self._name!r} is closed")
        return await self._await(functools.partial(self._run, fn, *args, **kwargs), None)

    async def _await(self, work: Callable[[], T],
                     unclaimed: Callable[[T], None] | None) -> T:
        """Run ``work()`` on the queue's thread and await its result.

        Cancelled before the thread starts it, the work is skipped. Cancelled while it
        runs, it finishes, and ``unclaimed`` gets the result nobody awaits (on the
        event loop, or on the queue's thread if the loop has closed)."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[T] = loop.create_future()

        def job() -> None:
            if waiter.cancelled():  # a read of the future's state, safe from here
                return
            try:
                value = work()
            except BaseException as exc:  # handed to the awaiting coroutine
                post(loop, functools.partial(fail, waiter, exc))
                return
            if not post(loop, functools.partial(answer, waiter, value, unclaimed)) \
                    and unclaimed is not None:
                unclaimed(value)  # the loop has closed: nobody awaits it

        self._thread.put(job)
        return await waiter

    def _run(self, fn: Callable[Concatenate[sqlite3.Connection, P], T],
             *args: P.args, **kwargs: P.kwargs) -> T:
        """Call ``fn`` with the connection; SQLite's transient errors become SystemFault."""
        try:
            return fn(self._db(), *args, **kwargs)
        except sqlite3.OperationalError as exc:  # locked past the timeout, disk full, I/O
            raise SystemFault(f"SQLite queue {self._name!r}: {exc}") from exc

    def _db(self) -> sqlite3.Connection:
        """The connection, opened (and the schema created) on first use."""
        if self._conn is None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self._path, isolation_level=None,
                                 timeout=BUSY_TIMEOUT_MS / 1000, cached_statements=64)
            try:
                self._prepare(db)
            except BaseException:
                db.close()
                raise
            self._conn, self._owner = db, threading.get_ident()
        return self._conn

    @staticmethod
    def _prepare(db: sqlite3.Connection) -> None:
        """Set the connection's pragmas and create the schema if it is missing."""
        db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        db.execute("PRAGMA journal_mode = WAL")
        # NORMAL by default, FULL around sends (see _durable). In WAL mode NORMAL
        # survives a crash of the process but may lose the last commits on power loss.
        # A lost receive or settle only means a redelivery (delivery is at least once
        # and submission idempotent), and skipping its fsync makes it several times
        # faster; a lost send would lose a message its producer was told is queued,
        # so sends pay for the fsync.
        db.execute("PRAGMA synchronous = NORMAL")
        with _immediate(db):
            for statement in filter(str.strip, _SCHEMA.split(";")):
                db.execute(statement)
            # Migrate a file created before reply_to existed (CREATE TABLE IF NOT
            # EXISTS left its messages table as it was). Under the write lock, so two
            # processes opening the same old file cannot both add the column.
            columns = {row[1] for row in db.execute("PRAGMA table_info(messages)")}
            if "reply_to" not in columns:
                db.execute("ALTER TABLE messages ADD COLUMN reply_to TEXT")

    def _held(self, msg: Received) -> dict[str, Any]:
        """Parameters naming the lock a settlement must still hold."""
        if msg.sequence_number is None or not isinstance(msg.handle, str):
            raise ValueError("not a message received from a LocalQueue")
        return {"seq": msg.sequence_number, "token": msg.handle, "now": self._clock()}

    # -- the SQLite work itself (runs on the queue's thread) -------------------

    def _send_group(self, sends: list[_Send]) -> None:
        """Commit the sends waiting together in one fsynced transaction, then answer
        each caller (on the queue's thread).

        A send cancelled before the group starts is skipped. Each send runs under a
        savepoint: one that fails (its error goes to its caller) is rolled back alone,
        and the others still commit. A failure of the transaction itself (the write
        lock, the commit, the fsync) fails every send of the group, none of which was
        answered yet, so no caller is told a message is queued that is not."""
        live = [send for send in sends if not send.waiter.cancelled()]
        if not live:
            return
        outcomes: list[bool | BaseException] = []
        try:
            db = self._db()
            with _durable(db), _immediate(db):
                if self._duplicate_window is not None:
                    db.execute(_FORGET, (self._clock() - self._duplicate_window,))
                outcomes = [self._send_one(db, send) for send in live]
            self.send_commits += 1
        except sqlite3.OperationalError as exc:  # locked past the timeout, disk full, I/O
            fault = SystemFault(f"SQLite queue {self._name!r}: {exc}")
            fault.__cause__ = exc
            outcomes = [fault] * len(live)
        except BaseException as exc:  # handed to every caller of the group
            outcomes = [exc] * len(live)
        for send, outcome in zip(live, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                post(send.loop, functools.partial(fail, send.waiter, outcome))
            else:
                post(send.loop, functools.partial(answer, send.waiter, outcome, None))

    def _send_one(self, db: sqlite3.Connection, send: _Send) -> bool | BaseException:
        """One send of a group under its own savepoint: True if enqueued, False if
        dropped as a duplicate, or the error that rolled it back alone."""
        now = self._clock()
        state = "scheduled" if send.due is not None and send.due > now else "active"
        row = (send.message_id, send.body, send.props, state, now, send.due, send.reply_to)
        db.execute("SAVEPOINT fanout_send")
        try:
            if self._duplicate_window is not None and \
                    db.execute(_REMEMBER, (send.message_id, now)).rowcount == 0:
                log.debug("queue.duplicate_dropped", queue=self._name,
                          message_id=send.message_id)
                return False
            db.execute(_INSERT, row)
            return True
        except sqlite3.Error as exc:
            db.execute("ROLLBACK TO fanout_send")
            if isinstance(exc, sqlite3.OperationalError):
                fault = SystemFault(f"SQLite queue {self._name!r}: {exc}")
                fault.__cause__ = exc
                return fault
            return exc
        finally:
            db.execute("RELEASE fanout_send")

    async def _lock_batch(self, n: int) -> list[Received]:
        """One locking attempt; if cancelled mid-flight, give back what it locked.

        A receive cancelled before its job starts locks nothing; a job already running
        finishes, and what it locked is unlocked (``_unlock_unclaimed``)."""
        if self._closed:
            raise RuntimeError(f"queue {self._name!r} is closed")
        return await self._await(functools.partial(self._run, self._lock_sync, n),
                                 self._unlock_unclaimed)

    def _lock_sync(self, db: sqlite3.Connection, n: int) -> list[Received]:
        now = self._clock()
        with _immediate(db):
            db.execute(_PROMOTE, (now,))
            expired = db.execute(_EXPIRE, {"now": now, "max": self._max, "expired": 1})
            for seq, message_id, state, description in expired.fetchall():
                if state == "dead_letter":
                    log.warning("queue.max_delivery_exceeded", queue=self._name, seq=seq,
                                message_id=message_id, description=description)
            rows = db.execute(_LOCK, (now + self._lock_duration, n)).fetchall()
        return [self._received(row) for row in sorted(rows)]

    @staticmethod
    def _received(row: tuple[Any, ...]) -> Received:
        seq, message_id, body, props, enqueued_at, count, token, until, reply_to = row
        return Received(body=bytes(body), message_id=message_id, delivery_count=count,
                        locked_until=_utc(until), properties=_props(props),
                        sequence_number=seq, enqueued_time=_utc(enqueued_at),
                        reply_to=reply_to, handle=token)

    def _unlock_unclaimed(self, got: list[Received]) -> None:
        """Release locks taken for a receive whose caller was cancelled (no delivery).

        Called on the event loop once the job has ended (the unlock is queued behind
        the jobs already waiting), or on the queue's thread if the loop has closed."""
        if not got:
            return
        tokens = [(msg.handle,) for msg in got]
        try:
            if threading.get_ident() == self._owner:
                self._run(self._unlock_sync, tokens)
            elif self._closed:
                raise RuntimeError(f"queue {self._name!r} is closed")
            else:
                self._thread.put(functools.partial(self._unlock_quietly, tokens))
        except (RuntimeError, SystemFault):  # closed, or SQLite failing: the locks lapse
            self._unlock_failed(tokens)

    def _unlock_quietly(self, tokens: list[tuple[str]]) -> None:
        """Unlock on the queue's thread; a failure is logged (the locks lapse)."""
        try:
            self._run(self._unlock_sync, tokens)
        except SystemFault:
            self._unlock_failed(tokens)

    def _unlock_failed(self, tokens: list[tuple[str]]) -> None:
        log.warning("queue.unlock_failed", queue=self._name, messages=len(tokens),
                    exc_info=True)

    def _unlock_sync(self, db: sqlite3.Connection, tokens: list[tuple[str]]) -> None:
        with _immediate(db):
            db.executemany(_UNLOCK, tokens)

    def _settle_sync(self, db: sqlite3.Connection, sql: str, params: dict[str, Any]) -> None:
        if db.execute(sql, params).rowcount == 0:
            raise LockLost(f"lock on message {params['seq']} of queue {self._name!r} "
                           "is gone (expired, or settled elsewhere)")

    def _depth_sync(self, db: sqlite3.Connection) -> tuple[int, int, int]:
        active, dead, scheduled = db.execute(_DEPTH, {"now": self._clock()}).fetchone()
        return int(active), int(dead), int(scheduled)

    def _peek_sync(self, db: sqlite3.Connection, limit: int, start: int) -> list[Received]:
        rows = db.execute(_PEEK, {"start": start, "now": self._clock(), "limit": limit})
        return [Received(body=bytes(body), message_id=mid, delivery_count=count,
                         locked_until=None, properties=_props(props), sequence_number=seq,
                         enqueued_time=_utc(enq), reply_to=reply_to)
                for seq, mid, body, props, enq, count, reply_to in rows.fetchall()]

    def _dead_letters_sync(self, db: sqlite3.Connection, limit: int) -> list[DeadLettered]:
        rows = db.execute(_DEAD_LETTERS, (limit,)).fetchall()
        return [DeadLettered(message_id=mid, sequence_number=seq, reason=reason,
                             description=desc, body=bytes(body), properties=_props(props),
                             enqueued_time=_utc(enq), delivery_count=count)
                for mid, seq, reason, desc, body, props, enq, count in rows]

    def _resubmit_sync(self, db: sqlite3.Connection, seq: int) -> str | None:
        with _durable(db), _immediate(db):
            new_id = uuid.uuid4().hex
            rows = db.execute(_RESUBMIT, {"new_id": new_id, "key": IDEMPOTENCY_KEY_PROPERTY,
                                          "now": self._clock(), "seq": seq}).fetchall()
            if not rows:
                return None
            if self._duplicate_window is not None:
                db.execute(_REMEMBER, (new_id, self._clock()))
            db.execute("DELETE FROM messages WHERE seq = ?", (seq,))
        message_id: str = rows[0][0]
        return message_id

    def _close_sync(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


#: Most sends one transaction commits.
MAX_GROUP = 256


@dataclass(slots=True, eq=False)
class _Send:
    """A send waiting on the queue's thread; ``group`` commits it with the sends queued
    right behind it."""

    group: Callable[[list[_Send]], None]
    loop: asyncio.AbstractEventLoop
    waiter: asyncio.Future[bool]
    message_id: str
    body: bytes
    props: str
    due: float | None
    reply_to: str | None


class _Thread:
    """The queue's own thread, fed from a plain queue: started by the first job, ended
    by ``stop`` once the jobs queued before it have run.

    A daemon thread: an interpreter exiting with the queue unclosed is not held up by
    it. SQLite's commits are atomic, so one cut short loses nothing a caller was told
    is done (a send returns only after its commit)."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._jobs: queue.SimpleQueue[Callable[[], None] | _Send | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start = threading.Lock()

    def put(self, job: Callable[[], None] | _Send) -> None:
        """Run ``job()`` on the thread after the jobs already queued (a send: in one
        group with the sends queued right behind it)."""
        if self._thread is None:
            with self._start:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._serve, name=self._name,
                                                    daemon=True)
                    self._thread.start()
        self._jobs.put(job)

    def stop(self) -> None:
        """End the thread after the jobs queued so far (without waiting for it)."""
        with self._start:
            if self._thread is not None:
                self._jobs.put(None)

    def _serve(self) -> None:
        job = self._jobs.get()
        while job is not None:
            taken: list[Callable[[], None] | _Send | None] = []
            try:
                if isinstance(job, _Send):
                    group, taken = self._group(job)
                    job.group(group)
                else:
                    job()
            except BaseException:  # a job's own errors reach its caller; this is a bug
                log.exception("queue.job_failed", thread=self._name)
            job = taken[0] if taken else self._jobs.get()

    def _group(self, first: _Send) -> tuple[list[_Send], list[Callable[[], None] | _Send | None]]:
        """``first`` and the sends queued right behind it (up to :data:`MAX_GROUP`),
        and the job taken after them if any (run next, so the queue's order holds; a
        stop taken there still ends the thread after the group)."""
        group = [first]
        while len(group) < MAX_GROUP:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if not isinstance(job, _Send):
                return group, [job]
            group.append(job)
        return group, []
