"""Tests of the embedded SQLite peek-lock queue (worker/sources/local.py)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import json
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from worker.errors import LockLost, SystemFault
from worker.sources.base import Received
from worker.sources.local import MAX_DESCRIPTION, LocalQueue

LOCK = 30.0
START = 1_700_000_000.0


class FakeClock:
    """A settable clock standing in for time.time."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


MakeQueue = Callable[..., LocalQueue]


@pytest.fixture
def clock() -> FakeClock:
    """A fake clock for lock expiry and scheduling."""
    return FakeClock()


@pytest.fixture
def make_queue(tmp_path: Path, clock: FakeClock) -> Iterator[MakeQueue]:
    """A factory of queues on one file (fake clock unless given); closes them all after."""
    made: list[LocalQueue] = []

    def make(**kwargs: Any) -> LocalQueue:
        kwargs.setdefault("path", tmp_path / "queue.db")
        kwargs.setdefault("lock_duration", LOCK)
        kwargs.setdefault("clock", clock)
        queue = LocalQueue(**kwargs)
        made.append(queue)
        return queue

    yield make
    for queue in made:
        asyncio.run(queue.close())


def run(coro: Any) -> Any:
    """Run one coroutine to completion in a fresh event loop."""
    return asyncio.run(coro)


def receive_one(queue: LocalQueue) -> Received:
    """Receive exactly one message (the queue must have one available)."""
    got = run(queue.receive(1, 0))
    assert len(got) == 1
    message: Received = got[0]
    return message


def test_send_receive_complete(make_queue: MakeQueue) -> None:
    """A sent message is received once with its metadata, and complete removes it."""
    queue = make_queue()
    sent_id = run(queue.send(b"payload", message_id="m-1", properties={"k": "v"}))
    msg = receive_one(queue)
    assert sent_id == "m-1"
    assert (msg.body, msg.message_id, msg.properties) == (b"payload", "m-1", {"k": "v"})
    assert msg.delivery_count == 0
    assert msg.enqueued_time == datetime.fromtimestamp(START, tz=UTC)
    assert msg.locked_until == datetime.fromtimestamp(START + LOCK, tz=UTC)
    assert isinstance(msg.sequence_number, int) and isinstance(msg.handle, str)
    assert run(queue.receive(5, 0)) == []  # locked, so not delivered twice
    run(queue.complete(msg))
    assert run(queue.depth()) == {"active": 0, "dead_letter": 0, "scheduled": 0}


def test_receive_returns_oldest_first_up_to_max(make_queue: MakeQueue) -> None:
    """Receive locks the oldest messages first, at most max_messages of them."""
    queue = make_queue()
    for i in range(5):
        run(queue.send(str(i).encode()))
    first = run(queue.receive(3, 0))
    rest = run(queue.receive(10, 0))
    assert [m.body for m in first] == [b"0", b"1", b"2"]
    assert [m.body for m in rest] == [b"3", b"4"]
    assert len({m.handle for m in first + rest}) == 5


def test_abandon_redelivers_with_count(make_queue: MakeQueue) -> None:
    """An abandoned message comes back at once with its delivery count increased."""
    queue = make_queue()
    run(queue.send(b"x"))
    first = receive_one(queue)
    run(queue.abandon(first))
    second = receive_one(queue)
    assert second.message_id == first.message_id
    assert second.delivery_count == 1
    assert second.handle != first.handle


def test_max_delivery_count_dead_letters(make_queue: MakeQueue) -> None:
    """Abandoning up to the max delivery count dead-letters with the service's reason,
    MaxDeliveryCountExceeded (the consumer's own is MaxDeliveryExceeded)."""
    queue = make_queue(max_delivery_count=3)
    run(queue.send(b"x", message_id="bad"))
    for _ in range(3):
        run(queue.abandon(receive_one(queue)))
    assert run(queue.receive(1, 0)) == []
    assert run(queue.depth()) == {"active": 0, "dead_letter": 1, "scheduled": 0}
    [dead] = run(queue.dead_letters())
    assert (dead.message_id, dead.reason, dead.delivery_count) == (
        "bad", "MaxDeliveryCountExceeded", 3)
    assert "abandoned 3 times" in (dead.description or "")


def test_lock_expiry_redelivers_and_counts(make_queue: MakeQueue, clock: FakeClock) -> None:
    """A message whose lock expired is delivered again, counting the lapsed delivery."""
    queue = make_queue()
    run(queue.send(b"x"))
    first = receive_one(queue)
    clock.advance(LOCK - 1)
    assert run(queue.receive(1, 0)) == []  # still locked
    clock.advance(2)
    second = receive_one(queue)
    assert (second.message_id, second.delivery_count) == (first.message_id, 1)
    with pytest.raises(LockLost):
        run(queue.complete(first))
    run(queue.complete(second))


def test_lock_expiry_reaching_max_dead_letters(make_queue: MakeQueue, clock: FakeClock) -> None:
    """Expired locks that reach the max delivery count dead-letter instead of delivering."""
    queue = make_queue(max_delivery_count=2)
    run(queue.send(b"x"))
    receive_one(queue)
    clock.advance(LOCK + 1)
    assert receive_one(queue).delivery_count == 1
    clock.advance(LOCK + 1)
    assert run(queue.receive(1, 0)) == []
    [dead] = run(queue.dead_letters())
    assert dead.reason == "MaxDeliveryCountExceeded"
    assert "lock expired 2 times" in (dead.description or "")


def test_renew_lock_extends(make_queue: MakeQueue, clock: FakeClock) -> None:
    """Renewing moves locked_until to now + lock duration and keeps the lock past the old."""
    queue = make_queue()
    run(queue.send(b"x"))
    msg = receive_one(queue)
    clock.advance(LOCK - 5)
    until = run(queue.renew_lock(msg))
    assert until == datetime.fromtimestamp(clock.now + LOCK, tz=UTC) == msg.locked_until
    clock.advance(10)  # past the first lock, within the renewed one
    assert run(queue.receive(1, 0)) == []
    run(queue.complete(msg))


@pytest.mark.parametrize("settle", ["complete", "abandon", "dead_letter", "renew_lock"])
def test_settling_an_expired_lock_raises(make_queue: MakeQueue, clock: FakeClock,
                                         settle: str) -> None:
    """Every settlement of a message whose lock expired raises LockLost and changes nothing."""
    queue = make_queue()
    run(queue.send(b"x"))
    msg = receive_one(queue)
    clock.advance(LOCK)
    args = ("Reason", "description") if settle == "dead_letter" else ()
    with pytest.raises(LockLost):
        run(getattr(queue, settle)(msg, *args))
    assert run(queue.depth())["active"] == 1
    assert receive_one(queue).delivery_count == 1


def test_dead_letter_keeps_reason_and_description(make_queue: MakeQueue) -> None:
    """dead_letter stores the reason and the description, truncated to 4096 characters."""
    queue = make_queue()
    run(queue.send(b"body", message_id="m", properties={"p": "1"}))
    run(queue.send(b"second"))
    run(queue.dead_letter(receive_one(queue), "InvalidJson", "y" * 5000))
    [dead] = run(queue.dead_letters())
    assert (dead.message_id, dead.reason, dead.body) == ("m", "InvalidJson", b"body")
    assert dead.description == "y" * MAX_DESCRIPTION
    assert dead.properties == {"p": "1"}
    assert run(queue.depth()) == {"active": 1, "dead_letter": 1, "scheduled": 0}


def test_resubmit_ignores_active_messages(make_queue: MakeQueue) -> None:
    """Resubmit finds only dead-lettered messages."""
    queue = make_queue()
    run(queue.send(b"x"))
    msg = receive_one(queue)
    assert msg.sequence_number is not None
    assert run(queue.resubmit(msg.sequence_number)) is None
    assert run(queue.depth())["active"] == 1


def test_depth_by_state_and_scheduling(make_queue: MakeQueue, clock: FakeClock) -> None:
    """Depth counts each state; a scheduled message is held until its time comes."""
    queue = make_queue()
    later = datetime.fromtimestamp(clock.now + 100, tz=UTC)
    run(queue.send(b"later", scheduled_at=later))
    run(queue.send(b"now"))
    run(queue.send(b"dead"))
    got = run(queue.receive(10, 0))
    assert [m.body for m in got] == [b"now", b"dead"]
    run(queue.dead_letter(got[1], "R", "d"))
    assert run(queue.depth()) == {"active": 1, "dead_letter": 1, "scheduled": 1}
    clock.advance(100)
    assert run(queue.depth()) == {"active": 2, "dead_letter": 1, "scheduled": 0}
    assert receive_one(queue).body == b"later"


KILLED_SENDER = """
import asyncio, os, sys
from pathlib import Path
from worker.sources.local import LocalQueue

asyncio.run(LocalQueue(path=Path(sys.argv[1])).send(b"kept", message_id="k"))
os._exit(0)  # no close, no clean shutdown
"""


def test_sent_message_survives_sender_exiting_without_close(make_queue: MakeQueue,
                                                            tmp_path: Path) -> None:
    """A send that returned is on disk even if its process dies without closing."""
    path = tmp_path / "queue.db"
    subprocess.run([sys.executable, "-c", KILLED_SENDER, str(path)], check=True)
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert receive_one(make_queue()).message_id == "k"


def test_closed_queue_refuses_work(make_queue: MakeQueue) -> None:
    """Calls after close raise instead of hanging."""
    queue = make_queue()
    run(queue.close())
    with pytest.raises(RuntimeError, match="closed"):
        run(queue.send(b"x"))


def test_close_runs_the_work_queued_before_it_then_ends_the_thread(
        make_queue: MakeQueue) -> None:
    """Sends already queued when close is called are stored; the queue's thread ends,
    and a receive after close raises."""
    queue = make_queue()

    async def scenario() -> None:
        sends = [asyncio.ensure_future(queue.send(b"x", message_id=f"m{i}"))
                 for i in range(20)]
        await asyncio.sleep(0)  # every send handed to the queue's thread
        await queue.close()
        assert [s.result() for s in sends] == [f"m{i}" for i in range(20)]
        with pytest.raises(RuntimeError, match="closed"):
            await queue.receive(1, 0)

    run(scenario())
    thread = queue._thread._thread
    assert thread is not None
    thread.join(10)
    assert not thread.is_alive()
    assert run(make_queue().depth())["active"] == 20


def test_a_failing_call_raises_in_its_caller_and_the_queue_goes_on(
        make_queue: MakeQueue) -> None:
    """An error on the queue's thread reaches the awaiting coroutine; later calls work."""
    queue = make_queue()
    run(queue.send(b"x"))
    msg = receive_one(queue)
    run(queue.complete(msg))
    with pytest.raises(LockLost):
        run(queue.complete(msg))
    run(queue.send(b"y"))
    assert receive_one(queue).body == b"y"


def test_a_receive_whose_loop_closed_gives_back_its_locks(make_queue: MakeQueue) -> None:
    """A lock job that ends after its event loop has closed unlocks what it locked."""
    queue = make_queue()
    run(queue.send(b"x"))
    gate = threading.Event()
    queue._thread.put(lambda: None if gate.wait(10) else None)
    loop = asyncio.new_event_loop()
    task = loop.create_task(queue.receive(1, 0))
    loop.run_until_complete(asyncio.sleep(0.05))  # the lock job waits behind the gate
    loop.close()  # (the task is dropped unfinished: nobody will take its messages)
    gate.set()
    assert receive_one(queue).delivery_count == 0
    del task


def test_unopenable_file_is_a_system_fault(tmp_path: Path, make_queue: MakeQueue) -> None:
    """SQLite's operational errors surface as SystemFault."""
    queue = make_queue(path=tmp_path)  # a directory, not a database file
    with pytest.raises(SystemFault, match="SQLite queue"):
        run(queue.send(b"x"))


def test_cancelled_receive_stops_waiting(make_queue: MakeQueue) -> None:
    """Cancelling a receive that is waiting on an empty queue ends it with CancelledError."""
    queue = make_queue()

    async def scenario() -> None:
        task = asyncio.create_task(queue.receive(1, 3600))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(scenario())


def test_cancelled_receive_gives_back_its_locks(make_queue: MakeQueue) -> None:
    """Messages locked for a receive cancelled mid-flight are unlocked without a delivery."""
    queue = make_queue()
    run(queue.send(b"x"))
    gate = threading.Event()

    async def scenario() -> None:
        queue._thread.put(lambda: None if gate.wait(10) else None)  # the lock job queues
        task = asyncio.create_task(queue.receive(1, 0))
        await asyncio.sleep(0.05)
        task.cancel()
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(scenario())
    assert receive_one(queue).delivery_count == 0


def test_receive_cancelled_while_locking_gives_back_its_locks(make_queue: MakeQueue) -> None:
    """A receive cancelled while its lock statement runs: the statement finishes, and
    what it locked is unlocked again without counting a delivery."""
    queue = make_queue()
    run(queue.send(b"x"))
    locked, gate = threading.Event(), threading.Event()
    real = queue._lock_sync

    def lock_then_wait(db: sqlite3.Connection, n: int) -> list[Received]:
        got = real(db, n)
        locked.set()
        gate.wait(10)
        return got

    async def scenario() -> None:
        task = asyncio.create_task(queue.receive(1, 0))
        assert await asyncio.to_thread(locked.wait, 10)
        task.cancel()
        await asyncio.sleep(0)
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await task

    queue._lock_sync = lock_then_wait  # type: ignore[method-assign]
    run(scenario())
    queue._lock_sync = real  # type: ignore[method-assign]
    assert receive_one(queue).delivery_count == 0


def drain(queue: LocalQueue, seen: collections.Counter[str], guard: threading.Lock,
          done: Callable[[], bool]) -> None:
    """Receive and complete messages, counting them in ``seen``, until ``done()``."""

    async def loop() -> None:
        while True:
            with guard:
                if done():
                    return
            for msg in await queue.receive(8, 0.2):
                await queue.complete(msg)
                with guard:
                    seen[msg.body.decode()] += 1

    asyncio.run(loop())


def run_threads(targets: list[Callable[[], None]]) -> None:
    """Start one thread per target and join them all."""
    threads = [threading.Thread(target=t) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


SENDER = """
import asyncio, sys
from pathlib import Path
from worker.sources.local import LocalQueue

async def main() -> None:
    queue = LocalQueue(path=Path(sys.argv[1]))
    for i in range(int(sys.argv[2])):
        await queue.send(str(i).encode())
    await queue.close()

asyncio.run(main())
"""

RECEIVER = """
import asyncio, json, sys
from pathlib import Path
from worker.sources.local import LocalQueue

async def main() -> None:
    queue = LocalQueue(path=Path(sys.argv[1]))
    done = []
    while True:
        got = await queue.receive(8, 0.2)
        if not got and (await queue.depth())["active"] == 0:
            break
        for msg in got:
            await queue.complete(msg)
            done.append(msg.body.decode())
    await queue.close()
    print(json.dumps(done))

asyncio.run(main())
"""


def test_receivers_in_threads_while_another_process_sends(make_queue: MakeQueue,
                                                          tmp_path: Path) -> None:
    """Four receiver threads draining what another process sends complete each message once."""
    total = 500
    path = tmp_path / "queue.db"
    run(make_queue(clock=time.time).depth())  # create the schema first
    sender = subprocess.Popen([sys.executable, "-c", SENDER, str(path), str(total)])
    seen: collections.Counter[str] = collections.Counter()
    guard = threading.Lock()
    queues = [make_queue(clock=time.time) for _ in range(4)]

    def done() -> bool:  # all seen, or the sender failed (then the last assert says so)
        return sum(seen.values()) >= total or sender.poll() not in (None, 0)

    try:
        run_threads([functools.partial(drain, q, seen, guard, done) for q in queues])
    finally:
        assert sender.wait(timeout=60) == 0
    assert seen == collections.Counter(str(i) for i in range(total))


def test_receivers_in_other_processes_and_threads(make_queue: MakeQueue,
                                                  tmp_path: Path) -> None:
    """Two receiver processes and two threads on one file never get the same message twice."""
    total = 500
    path = tmp_path / "queue.db"
    producer = make_queue(clock=time.time)
    for i in range(total):
        run(producer.send(str(i).encode()))
    procs = [subprocess.Popen([sys.executable, "-c", RECEIVER, str(path)],
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    seen: collections.Counter[str] = collections.Counter()
    guard = threading.Lock()
    queues = [make_queue(clock=time.time) for _ in range(2)]

    def drain_until_empty(queue: LocalQueue) -> None:
        async def loop() -> None:
            while (got := await queue.receive(8, 0.2)) or (await queue.depth())["active"]:
                for msg in got:
                    await queue.complete(msg)
                    with guard:
                        seen[msg.body.decode()] += 1
        asyncio.run(loop())

    run_threads([functools.partial(drain_until_empty, q) for q in queues])
    for proc in procs:
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0
        seen.update(json.loads(out))
    assert seen == collections.Counter(str(i) for i in range(total))


def test_concurrent_coroutines_on_one_queue(make_queue: MakeQueue) -> None:
    """Four coroutines sharing one queue object complete each message exactly once."""
    queue = make_queue(clock=time.time)
    total = 200
    seen: collections.Counter[str] = collections.Counter()

    async def scenario() -> None:
        for i in range(total):
            await queue.send(str(i).encode())

        async def consume() -> None:
            while got := await queue.receive(4, 0):
                for msg in got:
                    await asyncio.sleep(0)  # let the others interleave
                    await queue.complete(msg)
                    seen[msg.body.decode()] += 1

        await asyncio.gather(*(consume() for _ in range(4)))

    run(scenario())
    assert seen == collections.Counter(str(i) for i in range(total))


# ------------------------------------------------------------- reply-to, duplicates, peek


def test_reply_to_round_trip_and_resubmit(make_queue: MakeQueue) -> None:
    """send(reply_to=...) comes back on Received.reply_to, also after a dead-letter and
    resubmit; a message sent without one has None."""
    queue = make_queue()
    run(queue.send(b"a", message_id="with", reply_to="answers"))
    run(queue.send(b"b", message_id="without"))
    first, second = run(queue.receive(2, 0))
    assert (first.reply_to, second.reply_to) == ("answers", None)
    run(queue.dead_letter(first, "R", "d"))
    assert run(queue.resubmit(first.sequence_number)) not in (None, "with")
    run(queue.complete(second))
    assert receive_one(queue).reply_to == "answers"


def test_duplicate_window_drops_repeats_within_it(make_queue: MakeQueue,
                                                  clock: FakeClock) -> None:
    """Within the window a repeated id is accepted (its id returned) and dropped; the
    window runs from the first send; after it the id is kept again."""
    queue = make_queue(duplicate_window=10.0)
    assert run(queue.sent(b"1", message_id="m")) is True
    clock.advance(9)
    assert run(queue.send(b"2", message_id="m")) == "m"
    assert run(queue.sent(b"other", message_id="o")) is True
    clock.advance(1.5)  # 10.5 s after the first send
    assert run(queue.sent(b"3", message_id="m")) is True
    assert [m.body for m in run(queue.peek())] == [b"1", b"other", b"3"]


def test_no_duplicate_window_keeps_repeats(make_queue: MakeQueue) -> None:
    """Without a window (the default) a repeated id is a new message."""
    queue = make_queue()
    run(queue.send(b"1", message_id="m"))
    assert run(queue.sent(b"2", message_id="m")) is True
    assert [m.body for m in run(queue.peek())] == [b"1", b"2"]


def test_peek_locks_nothing(make_queue: MakeQueue) -> None:
    """peek returns active messages from a sequence number on, locked ones included,
    without locking or counting a delivery; dead-lettered ones are not shown."""
    queue = make_queue()
    for i in range(4):
        run(queue.send(f"{i}".encode(), message_id=f"p{i}", properties={"i": str(i)},
                       reply_to="r" if i == 0 else None))
    locked = receive_one(queue)  # p0, now locked
    dead = receive_one(queue)
    run(queue.dead_letter(dead, "R", "d"))  # p1 leaves the active messages
    peeked = run(queue.peek())
    assert [(m.message_id, m.delivery_count, m.locked_until) for m in peeked] == [
        ("p0", 0, None), ("p2", 0, None), ("p3", 0, None)]
    assert peeked[0].reply_to == "r" and peeked[0].properties == {"i": "0"}
    assert [m.message_id for m in run(queue.peek(1, from_sequence=peeked[1].sequence_number))
            ] == ["p2"]
    assert [m.message_id for m in run(queue.receive(10, 0))] == ["p2", "p3"]
    run(queue.complete(locked))  # still held: peek took no lock


_OLD_SCHEMA = """
CREATE TABLE messages (
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
    dead_lettered_at REAL
);
"""


def test_file_from_before_reply_to_is_migrated(tmp_path: Path, make_queue: MakeQueue) -> None:
    """A queue.db written before reply_to and duplicate detection existed opens: its
    message is received (reply_to None) and new sends keep reply_to and deduplicate."""
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(_OLD_SCHEMA)
    db.execute("INSERT INTO messages (message_id, body, state, enqueued_at) "
               "VALUES ('old', x'6f6c64', 'active', ?)", (START,))
    db.commit()
    db.close()
    queue = make_queue(path=path, duplicate_window=60.0)
    old = receive_one(queue)
    assert (old.message_id, old.body, old.reply_to) == ("old", b"old", None)
    run(queue.send(b"new", message_id="n", reply_to="answers"))
    run(queue.send(b"again", message_id="n"))
    run(queue.complete(old))
    [new] = run(queue.receive(10, 0))
    assert (new.body, new.reply_to) == (b"new", "answers")
    columns = {row[1] for row in sqlite3.connect(path).execute("PRAGMA table_info(messages)")}
    assert "reply_to" in columns


def test_resubmit_survives_duplicate_detection(make_queue: MakeQueue) -> None:
    """With duplicate detection on, a resubmitted copy is not dropped as a duplicate of
    the original (a new id); a copy resubmitted again keeps the first key."""
    queue = make_queue(max_delivery_count=1, duplicate_window=3600.0)
    run(queue.send(b"x", message_id="orig"))
    run(queue.abandon(receive_one(queue)))
    [dead] = run(queue.dead_letters())
    assert dead.sequence_number is not None
    copy_id = run(queue.resubmit(dead.sequence_number))
    assert [m.message_id for m in run(queue.peek())] == [copy_id]
    run(queue.abandon(receive_one(queue)))
    [dead] = run(queue.dead_letters())
    assert dead.sequence_number is not None
    run(queue.resubmit(dead.sequence_number))
    [again] = run(queue.peek())
    assert again.properties == {"fanout-idempotency-key": "orig"}


async def _grouped_sends(queue: LocalQueue, ids: list[str]) -> list[Any]:
    """Send ``ids`` while the queue's thread is held, so they all wait together, then
    let it go: they are one group."""
    gate = threading.Event()
    queue._thread.put(lambda: None if gate.wait(10) else None)
    sends = [asyncio.ensure_future(queue.sent(i.encode(), message_id=i)) for i in ids]
    while queue._thread._jobs.qsize() < len(ids):  # every send is queued behind the gate
        await asyncio.sleep(0.01)
    gate.set()
    return await asyncio.gather(*sends, return_exceptions=True)


def test_sends_waiting_together_commit_in_one_transaction(make_queue: MakeQueue,
                                                          tmp_path: Path) -> None:
    """Group commit: 40 sends waiting together cost one commit, and every one is in the
    file (read by another connection) once its caller is answered."""
    queue = make_queue()
    run(queue.send(b"first"))
    assert queue.send_commits == 1
    ids = [f"m{i}" for i in range(40)]
    assert run(_grouped_sends(queue, ids)) == [True] * 40
    assert queue.send_commits == 2
    with contextlib.closing(sqlite3.connect(tmp_path / "queue.db")) as db:
        stored = [row[0] for row in db.execute("SELECT message_id FROM messages ORDER BY seq")]
    assert stored == [stored[0], *ids]


def test_a_failing_send_of_a_group_fails_alone(make_queue: MakeQueue, tmp_path: Path) -> None:
    """One send of a group refused by the database gets its error; the others of the
    same transaction are committed and answered."""
    queue = make_queue()
    run(queue.send(b"first"))
    with contextlib.closing(sqlite3.connect(tmp_path / "queue.db")) as db:
        db.execute("""CREATE TRIGGER refuse BEFORE INSERT ON messages
                      WHEN NEW.message_id = 'bad' BEGIN SELECT RAISE(ABORT, 'refused'); END""")
        db.commit()
    outcomes = run(_grouped_sends(queue, ["a", "bad", "b"]))
    assert outcomes[0] is True and outcomes[2] is True
    assert isinstance(outcomes[1], sqlite3.IntegrityError)
    assert queue.send_commits == 2
    bodies = sorted(m.body for m in run(queue.peek(10)))
    assert bodies == [b"a", b"b", b"first"]


def test_a_group_that_cannot_commit_fails_every_send(make_queue: MakeQueue,
                                                     tmp_path: Path) -> None:
    """When the transaction itself fails (here the write lock held elsewhere past the
    busy timeout), no send of the group is acknowledged and none is stored."""
    queue = make_queue()
    run(queue.send(b"first"))

    def short_timeout() -> None:
        assert queue._conn is not None
        queue._conn.execute("PRAGMA busy_timeout = 50")

    queue._thread.put(short_timeout)
    with contextlib.closing(sqlite3.connect(tmp_path / "queue.db",
                                            isolation_level=None)) as holder:
        holder.execute("BEGIN IMMEDIATE")
        outcomes = run(_grouped_sends(queue, ["a", "b", "c"]))
        holder.execute("ROLLBACK")
    assert all(isinstance(o, SystemFault) for o in outcomes)
    assert queue.send_commits == 1
    assert [m.body for m in run(queue.peek(10))] == [b"first"]


def test_a_repeat_within_one_group_is_dropped(make_queue: MakeQueue) -> None:
    """Duplicate detection holds inside a group: the second send of an id is dropped."""
    queue = make_queue(duplicate_window=60.0)
    run(queue.send(b"first"))
    assert run(_grouped_sends(queue, ["x", "y", "x"])) == [True, True, False]
    assert [m.message_id for m in run(queue.peek(10))][1:] == ["x", "y"]
