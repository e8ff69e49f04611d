"""Tests of the Service Bus events destination (worker/sinks/servicebus.py) through the
real ``azure-servicebus`` aio SDK talking to the AMQP test peer."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from pydantic import SecretStr

from tests.fakes.servicebus_peer import ServiceBusPeer
from worker.config import EventsConfig, QueueConfig, ServiceBusConfig
from worker.errors import ConfigFault
from worker.sinks.base import CLOUDEVENTS_JSON
from worker.sinks.servicebus import EventTooLarge, ServiceBusEventSink
from worker.sources.servicebus import ServiceBusSource

EVENTS = "fanout.events"
WINDOW = 60.0
CLIENT_OPTIONS = {"retry_total": 0, "retry_backoff_factor": 0.05, "retry_backoff_max": 0.2}


class FakeClock:
    """The peer's duplicate detection clock."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def peer(clock: FakeClock) -> Iterator[ServiceBusPeer]:
    """Events queue (duplicate detection, 60 s), a reply queue, topic ``done`` with
    subscriptions ``a`` and ``b``; nothing else exists."""
    with ServiceBusPeer(queues=[EVENTS, "answers"], topics={"done": ["a", "b"]},
                        duplicate_detection={EVENTS: WINDOW}, clock=clock,
                        max_message_size=64 * 1024) as started:
        yield started


def config(peer: ServiceBusPeer) -> ServiceBusConfig:
    return ServiceBusConfig(connection_string=SecretStr(peer.connection_string))


@contextlib.asynccontextmanager
async def open_sink(peer: ServiceBusPeer, **events: Any) -> AsyncIterator[ServiceBusEventSink]:
    """A sink on the peer from [servicebus] and [events], closed on exit."""
    peek_subscription = events.pop("peek_subscription", None)
    max_bytes = events.pop("max_message_bytes", 256 * 1024)
    sink = ServiceBusEventSink.from_config(
        config(peer), EventsConfig(**events), client_options=CLIENT_OPTIONS,
        peek_subscription=peek_subscription, max_message_bytes=max_bytes)
    try:
        yield sink
    finally:
        await sink.close()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_publish_sets_id_content_type_and_properties(peer: ServiceBusPeer) -> None:
    """The event is one message: message id = event id, the CloudEvents content type,
    the application properties given."""
    async def scenario() -> None:
        async with open_sink(peer) as sink:
            assert sink.destination == EVENTS
            await sink.publish(b'{"id": "e1"}', message_id="e1",
                               properties={"fanout-job": "j1"})

    run(scenario())
    [stored] = peer.messages(EVENTS)
    assert (stored.message_id, stored.body) == ("e1", b'{"id": "e1"}')
    assert stored.content_type == CLOUDEVENTS_JSON
    assert stored.properties == {"fanout-job": "j1"}


def test_peek_does_not_consume(peer: ServiceBusPeer) -> None:
    """Peek returns events oldest first, from a sequence number on, locking nothing."""
    async def scenario() -> tuple[list[Any], list[Any]]:
        async with open_sink(peer) as sink:
            for i in range(3):
                await sink.publish(f"{i}".encode(), message_id=f"e{i}",
                                   properties={"n": str(i)})
            everything = await sink.peek()
            later = await sink.peek(5, from_sequence=everything[1].sequence_number)
            return everything, later

    everything, later = run(scenario())
    assert [(p.message_id, p.body, dict(p.properties)) for p in everything] == [
        ("e0", b"0", {"n": "0"}), ("e1", b"1", {"n": "1"}), ("e2", b"2", {"n": "2"})]
    assert [p.message_id for p in later] == ["e1", "e2"]
    assert all(p.enqueued_time is not None for p in everything)
    assert peer.counts(EVENTS) == {"active": 3, "locked": 0, "deferred": 0, "dead_letter": 0}


def test_duplicate_dropped_within_window_kept_after(peer: ServiceBusPeer,
                                                    clock: FakeClock) -> None:
    """Publishing the same event id again within the entity's window leaves one message;
    after the window a new copy is kept."""
    async def scenario() -> None:
        async with open_sink(peer) as sink:
            await sink.publish(b"1", message_id="same")
            clock.now += WINDOW - 1
            await sink.publish(b"2", message_id="same")
            clock.now += 2
            await sink.publish(b"3", message_id="same")

    run(scenario())
    assert [m.body for m in peer.messages(EVENTS)] == [b"1", b"3"]
    assert peer.duplicates_dropped == 1


def test_topic_reaches_both_subscriptions(peer: ServiceBusPeer) -> None:
    """With [events] topic, each subscription gets the event: peeked on ``a`` through the
    sink, received on ``b`` by the Service Bus source."""
    async def scenario() -> tuple[list[Any], Any]:
        async with open_sink(peer, topic="done", peek_subscription="a") as sink:
            assert sink.destination == "done"
            await sink.publish(b"t", message_id="e-t")
            peeked = await sink.peek()
        source = ServiceBusSource.from_config(
            ServiceBusConfig(connection_string=SecretStr(peer.connection_string),
                             topic="done", subscription="b"),
            QueueConfig(), client_options=CLIENT_OPTIONS,
            emulator_admin_port=peer.admin_port or 0)
        try:
            [got] = await source.receive(1, 3)
            await source.complete(got)
        finally:
            await source.close()
        return peeked, got

    peeked, got = run(scenario())
    assert [(p.message_id, p.body) for p in peeked] == [("e-t", b"t")]
    assert (got.message_id, got.body) == ("e-t", b"t")
    assert peer.counts("done/Subscriptions/a")["active"] == 1


def test_topic_peek_needs_a_subscription(peer: ServiceBusPeer) -> None:
    """A topic holds no messages itself: peek without a subscription is refused."""
    async def scenario() -> None:
        async with open_sink(peer, topic="done") as sink:
            await sink.peek()

    with pytest.raises(ConfigFault, match="is a topic"):
        run(scenario())


def test_reply_to_entity(peer: ServiceBusPeer) -> None:
    """``to`` sends to that queue or topic instead of the configured queue."""
    async def scenario() -> None:
        async with open_sink(peer) as sink:
            await sink.publish(b"r", message_id="e-r", to="answers")
            await sink.publish(b"r2", message_id="e-r2", to="done")
            await sink.publish(b"r3", message_id="e-r3", to="answers")  # cached sender

    run(scenario())
    assert [m.message_id for m in peer.messages("answers")] == ["e-r", "e-r3"]
    assert [m.message_id for m in peer.messages("done/Subscriptions/b")] == ["e-r2"]
    assert peer.messages(EVENTS) == []


def test_missing_entity_is_a_config_fault(peer: ServiceBusPeer) -> None:
    """A reply-to or events queue that does not exist is a ConfigFault naming the entity
    and the cause; the sink keeps working for entities that exist."""
    async def scenario() -> list[ConfigFault]:
        faults = []
        async with open_sink(peer) as sink:
            with pytest.raises(ConfigFault) as caught:
                await sink.publish(b"x", message_id="e", to="nowhere")
            faults.append(caught.value)
            await sink.publish(b"ok", message_id="e-ok")
        async with open_sink(peer, queue="absent") as sink:
            with pytest.raises(ConfigFault) as caught:
                await sink.peek()
            faults.append(caught.value)
        return faults

    sent, peeked = run(scenario())
    assert "'nowhere'" in sent.description and "does not exist" in sent.description
    assert sent.code == "MessagingEntityNotFound"
    assert "'absent'" in peeked.description and "does not exist" in peeked.description
    assert "SharedAccessKey=" not in sent.description + peeked.description
    assert [m.message_id for m in peer.messages(EVENTS)] == ["e-ok"]


def test_too_large_names_the_limit(peer: ServiceBusPeer) -> None:
    """Over the sink's limit the event is refused before sending; over the entity's
    (the peer's 64 KiB) the service's refusal is reported; both name the limit."""
    async def scenario() -> tuple[EventTooLarge, EventTooLarge]:
        async with open_sink(peer, max_message_bytes=1000) as sink:
            with pytest.raises(EventTooLarge) as local:
                await sink.publish(b"x" * 1001, message_id="big")
            await sink.publish(b"x" * 1000, message_id="fits")
        async with open_sink(peer) as sink:
            with pytest.raises(EventTooLarge) as remote:
                await sink.publish(b"x" * 100_000, message_id="bigger")
        return local.value, remote.value

    local, remote = run(scenario())
    assert "1000-byte limit" in local.description
    assert "65536 bytes" in remote.description
    assert [m.message_id for m in peer.messages(EVENTS)] == ["fits"]
