"""The ``Source`` protocol's behaviour (worker/sources/base.py), one suite run against
every implementation: the embedded SQLite queue, and the Service Bus source (the real
``azure-servicebus`` aio client) against the AMQP peer in tests/fakes/servicebus_peer.py.

Each case takes the ``queue`` fixture, a :class:`Queue`: ``queue.open(...)`` is an
async context manager giving a fresh source on the same queue (closed on exit), with a
lock duration of ``LOCK`` seconds of real time on both so lock expiry is the same wait
everywhere. ``queue.quiet`` is how long a receive waits when the test expects nothing.
Cases use only the protocol (plus ``send``'s ``reply_to``, which both implementations
take).

A new implementation gets this specification by adding one ``Queue`` subclass and one
entry in ``QUEUES``: the fixture is parametrized over that dict, so every case below
runs against it too. Every case passes on every implementation: the departures from
the real Service Bus this suite found were fixed, none is marked as expected to fail.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Protocol, TypeVar, cast

import pytest
from pydantic import SecretStr

from tests.fakes.servicebus_peer import ServiceBusPeer
from worker.config import QueueConfig, ServiceBusConfig
from worker.errors import LockLost
from worker.sources.base import Received, Source
from worker.sources.local import LocalQueue
from worker.sources.servicebus import ServiceBusSource

T = TypeVar("T")
NAME = "jobs"
LOCK = 1.0  # seconds: short, so lock expiry stays fast
#: Fail fast: the SDK's own retries would otherwise wait seconds per fault.
CLIENT_OPTIONS = {"retry_total": 1, "retry_backoff_factor": 0.05, "retry_backoff_max": 0.2}


class Sendable(Protocol):
    """What both implementations' ``send`` takes (the protocol's, plus ``reply_to``)."""

    async def send(self, body: bytes, *, message_id: str | None = None,
                   properties: dict[str, str] | None = None,
                   reply_to: str | None = None) -> str: ...


def run(coro: Awaitable[T]) -> T:
    """Run one scenario on a fresh event loop."""
    async def main() -> T:
        return await coro
    return asyncio.run(main())


# -- the queues ---------------------------------------------------------------------------


class Queue:
    """One implementation's queue: sources open on it, all on the same messages."""

    kind: str = ""
    #: Seconds a receive that should find nothing waits.
    quiet: float = 0.0

    def open(self, *, max_delivery_count: int = 10
             ) -> contextlib.AbstractAsyncContextManager[Source]:
        raise NotImplementedError

    def close(self) -> None:
        """Stop what the queue started."""


class SqliteQueue(Queue):
    kind = "local"
    quiet = 0.0

    def __init__(self, path: Path) -> None:
        self.path = path

    @contextlib.asynccontextmanager
    async def open(self, *, max_delivery_count: int = 10) -> AsyncIterator[LocalQueue]:
        source = LocalQueue(path=self.path, name=NAME, lock_duration=LOCK,
                            max_delivery_count=max_delivery_count)
        try:
            yield source
        finally:
            await source.close()


class ServiceBusQueue(Queue):
    """A peer per ``max_delivery_count`` asked for (the entity's own setting)."""

    kind = "servicebus"
    quiet = 0.3

    def __init__(self) -> None:
        self.peers: dict[int, ServiceBusPeer] = {}

    def peer(self, max_delivery_count: int = 10) -> ServiceBusPeer:
        if max_delivery_count not in self.peers:
            self.peers[max_delivery_count] = ServiceBusPeer(
                queues=[NAME], lock_duration=LOCK,
                max_delivery_count=max_delivery_count).start()
        return self.peers[max_delivery_count]

    @contextlib.asynccontextmanager
    async def open(self, *, max_delivery_count: int = 10) -> AsyncIterator[ServiceBusSource]:
        peer = self.peer(max_delivery_count)
        config = ServiceBusConfig(connection_string=SecretStr(peer.connection_string),
                                  queue=NAME, batch_size=10)
        source = ServiceBusSource.from_config(
            config, QueueConfig(name=NAME, lock_duration=LOCK,
                                max_delivery_count=max_delivery_count),
            client_options=CLIENT_OPTIONS, emulator_admin_port=peer.admin_port or 0,
            backoff_base=0.05, backoff_max=0.2, resubmit_wait=0.3)
        try:
            yield source
        finally:
            await source.close()

    def close(self) -> None:
        for peer in self.peers.values():
            peer.stop()


#: How to make each implementation's queue from a temporary directory: a new
#: implementation adds its entry here, and every case runs on it.
QUEUES: dict[str, Callable[[Path], Queue]] = {
    "local": lambda tmp: SqliteQueue(tmp / "queue.db"),
    "servicebus": lambda tmp: ServiceBusQueue(),
}


@pytest.fixture(params=sorted(QUEUES))
def queue(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Queue]:
    """Each implementation in turn."""
    made = QUEUES[request.param](tmp_path)
    try:
        yield made
    finally:
        made.close()


async def one(source: Source, wait: float = 3.0) -> Received:
    """Receive exactly one message or fail the test."""
    got = await source.receive(1, wait)
    assert len(got) == 1, f"expected one message, got {len(got)}"
    message: Received = got[0]
    return message


# -- the cases ------------------------------------------------------------------------------


def test_send_receive_complete_with_properties_and_reply_to(queue: Queue) -> None:
    """A sent message arrives with its id, properties, ReplyTo and broker fields;
    complete removes it. ``probe`` and ``check_capacity`` pass on a healthy queue and
    lock nothing."""
    async def scenario() -> list[Received]:
        async with queue.open() as source:
            send = cast(Sendable, source)
            sent = await send.send(b'{"handler": "sweep"}', message_id="m-1",
                                   properties={"aeg-event-type": "Notification", "k": "v"})
            assert sent == "m-1"
            await send.send(b"{}", message_id="r-1", reply_to="answers")
            await source.probe()  # locks nothing
            await source.check_capacity(1)
            got: list[Received] = []
            while len(got) < 2 and (batch := await source.receive(2, 3.0)):
                got.extend(batch)
            for msg in got:
                await source.complete(msg)
            depth = await source.depth()
            assert (depth["active"], depth["dead_letter"]) == (0, 0)
            assert await source.receive(5, queue.quiet) == []
            return got

    msg, replied = run(scenario())
    assert (msg.body, msg.message_id, msg.delivery_count) == (b'{"handler": "sweep"}', "m-1", 0)
    assert dict(msg.properties) == {"aeg-event-type": "Notification", "k": "v"}
    assert isinstance(msg.sequence_number, int)
    assert msg.enqueued_time is not None and msg.enqueued_time.tzinfo is not None
    assert msg.locked_until is not None and msg.locked_until > msg.enqueued_time
    assert (msg.reply_to, replied.message_id, replied.reply_to) == (None, "r-1", "answers")


def test_receive_takes_the_oldest_first_and_ids_are_made_unique(queue: Queue) -> None:
    """Receive locks the oldest messages first, at most ``max_messages``; a message sent
    without an id gets a 32-hex-digit one that it keeps."""
    async def scenario() -> tuple[list[str], list[Received], list[Received]]:
        async with queue.open() as source:
            ids = [await source.send(str(i).encode()) for i in range(5)]
            first = await source.receive(3, 3.0)
            rest: list[Received] = []
            while len(first) + len(rest) < 5 and (batch := await source.receive(10, 3.0)):
                rest.extend(batch)
            for msg in first + rest:
                await source.complete(msg)
            return ids, first, rest

    ids, first, rest = run(scenario())
    assert len(set(ids)) == 5 and all(len(i) == 32 for i in ids)
    assert 1 <= len(first) <= 3
    assert [m.body for m in first + rest] == [b"0", b"1", b"2", b"3", b"4"]
    assert [m.message_id for m in first + rest] == ids


def test_abandon_redelivers_one_delivery_later_and_at_the_max_dead_letters(
        queue: Queue) -> None:
    """An abandoned message comes back at once with its delivery count one higher; once
    settled, a message cannot be settled again (its lock is gone). Abandoned
    ``max_delivery_count`` times, a message is not delivered again: it is in the
    dead-letter queue, with a reason."""
    async def scenario() -> tuple[Received, Received]:
        async with queue.open(max_delivery_count=2) as source:
            assert (source.name, source.max_delivery_count) == (NAME, 2)
            await source.send(b"again", message_id="a-1", properties={"p": "1"})
            first = await one(source)
            await source.abandon(first)
            second = await one(source)
            await source.complete(second)
            with pytest.raises(LockLost):
                await source.complete(second)
            with pytest.raises(LockLost):
                await source.abandon(second)
            await source.send(b"poison", message_id="p-1")
            for count in range(2):
                msg = await one(source)
                assert (msg.message_id, msg.delivery_count) == ("p-1", count)
                await source.abandon(msg)
            assert await source.receive(1, queue.quiet) == []
            [dead] = await source.dead_letters()
            assert (dead.message_id, dead.body) == ("p-1", b"poison")
            assert dead.reason
            depth = await source.depth()
            assert (depth["active"], depth["dead_letter"]) == (0, 1)
            return first, second

    first, second = run(scenario())
    assert (first.message_id, second.message_id) == ("a-1", "a-1")
    assert (first.delivery_count, second.delivery_count) == (0, 1)
    assert (second.body, dict(second.properties)) == (b"again", {"p": "1"})


def test_dead_letter_keeps_reason_description_and_resubmit_keeps_the_key(
        queue: Queue) -> None:
    """The message leaves the queue for the dead-letter queue, where ``dead_letters``
    reads it (a peek: reading twice gives the same), oldest first, up to ``limit``.
    ``resubmit`` sends a copy with a new message id, delivery count 0, the body, the
    properties and the original id in ``fanout-idempotency-key``, and removes the dead
    letter; resubmitting it again gives None."""
    async def scenario() -> None:
        async with queue.open() as source:
            await source.send(b"not json", message_id="bad-1", properties={"p": "1"})
            for name in ("b", "c", "ok"):
                await source.send(b"x", message_id=name)
            msg = await one(source)
            assert msg.message_id == "bad-1"
            await source.dead_letter(msg, "InvalidJson", "body is not JSON: line 1 column 1")
            for _ in range(2):
                other = await one(source)
                await source.dead_letter(other, "R", str(other.message_id))
            depth = await source.depth()
            assert (depth["active"], depth["dead_letter"]) == (1, 3)
            listed = await source.dead_letters()
            assert [d.message_id for d in listed] == ["bad-1", "b", "c"]
            dead = listed[0]
            assert (dead.message_id, dead.reason, dead.description, dead.body) == (
                "bad-1", "InvalidJson", "body is not JSON: line 1 column 1", b"not json")
            assert dict(dead.properties) == {"p": "1"}
            assert isinstance(dead.sequence_number, int)
            assert [d.message_id for d in await source.dead_letters(limit=2)] == ["bad-1", "b"]
            last = await one(source)
            assert last.message_id == "ok"
            await source.complete(last)
            assert dead.sequence_number is not None
            copy_id = await source.resubmit(dead.sequence_number)
            assert copy_id and copy_id != "bad-1"
            back = await one(source)
            assert (back.message_id, back.delivery_count, back.body) == (
                copy_id, 0, b"not json")
            assert dict(back.properties) == {"p": "1", "fanout-idempotency-key": "bad-1"}
            await source.complete(back)
            assert await source.resubmit(dead.sequence_number) is None

    run(scenario())


def test_renewal_keeps_the_lock_past_its_first_expiry(queue: Queue) -> None:
    """``renew_lock`` returns ever later ``locked_until``s; renewed every quarter of the
    lock, the message is not delivered to another receive waiting for two lock
    durations, and it settles."""
    async def scenario() -> tuple[int, list[datetime]]:
        async with queue.open() as source:
            await source.send(b"long", message_id="long-1")
            msg = await one(source)
            stealer = asyncio.create_task(source.receive(1, 1.5 * LOCK))
            renewals: list[datetime] = []
            loop = asyncio.get_running_loop()
            until = loop.time() + 2 * LOCK
            while loop.time() < until:
                await asyncio.sleep(LOCK / 4)
                renewals.append(await source.renew_lock(msg))
            stolen = len(await stealer)
            await source.complete(msg)
            assert (await source.depth())["active"] == 0
            return stolen, renewals

    stolen, renewals = run(scenario())
    assert stolen == 0
    assert renewals == sorted(renewals) and renewals[-1] > renewals[0]


def test_a_lapsed_lock_redelivers_and_at_the_max_dead_letters(queue: Queue) -> None:
    """A sent message is there for a source opened after the sender closed. Held past
    its lock it is due again with one delivery more, and settling or renewing the
    lapsed delivery is ``LockLost``; a lapse on the last delivery dead-letters it."""
    async def scenario() -> Received:
        async with queue.open(max_delivery_count=2) as sender:
            await sender.send(b"durable", message_id="d", properties={"x": "y"})
        async with queue.open(max_delivery_count=2) as source:
            held = await one(source)
            assert (held.message_id, held.delivery_count) == ("d", 0)
            await asyncio.sleep(LOCK * 1.3)
            with pytest.raises(LockLost):
                await source.complete(held)
            with pytest.raises(LockLost):
                await source.renew_lock(held)
            again = await one(source)
            await asyncio.sleep(LOCK * 1.3)  # the last delivery lapses too
            assert await source.receive(1, queue.quiet) == []
            [dead] = await source.dead_letters()
            assert (dead.message_id, dead.body, bool(dead.reason)) == ("d", b"durable", True)
            return again

    again = run(scenario())
    assert (again.body, again.message_id, dict(again.properties)) == (
        b"durable", "d", {"x": "y"})
    assert again.delivery_count == 1


def test_max_delivery_dead_letter_reason_is_the_services(queue: Queue) -> None:
    """The queue's own dead-lettering at the max delivery count says
    ``MaxDeliveryCountExceeded``, as Service Bus does (the consumer's own, on a last
    delivery that fails, is fanout's ``MaxDeliveryExceeded`` with the error)."""

    async def scenario() -> str | None:
        async with queue.open(max_delivery_count=1) as source:
            await source.send(b"poison", message_id="p-1")
            await source.abandon(await one(source))
            [dead] = await source.dead_letters()
            return dead.reason

    assert run(scenario()) == "MaxDeliveryCountExceeded"
