"""Tests of the Service Bus AMQP test peer itself, through the real synchronous SDK.

They pin the parts of the dialect the source's tests rely on without exercising them
directly: batches, receive-and-delete, defer, peek, release on close, topics.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypedDict

import pytest
from azure.servicebus import (
    ServiceBusClient,
    ServiceBusMessage,
    ServiceBusReceiveMode,
)
from azure.servicebus.exceptions import (
    MessagingEntityNotFoundError,
    ServiceBusAuthenticationError,
)

from tests.fakes.servicebus_peer import ServiceBusPeer


class RetryOptions(TypedDict):
    """The SDK clients' retry keywords (typed, so ``**OPTIONS`` type-checks)."""

    retry_total: int
    retry_backoff_factor: float


OPTIONS: RetryOptions = {"retry_total": 0, "retry_backoff_factor": 0.05}


@pytest.fixture
def peer() -> Iterator[ServiceBusPeer]:
    """A peer with queue ``q`` and topic ``t`` (subscriptions ``a`` and ``b``), 1 s locks."""
    with ServiceBusPeer(queues=["q"], topics={"t": ["a", "b"]}, lock_duration=1.0) as started:
        yield started


@pytest.fixture
def client(peer: ServiceBusPeer) -> Iterator[ServiceBusClient]:
    """A synchronous SDK client on the peer."""
    with ServiceBusClient.from_connection_string(peer.connection_string, **OPTIONS) as made:
        yield made


def test_batch_send_stores_each_message(peer: ServiceBusPeer, client: ServiceBusClient) -> None:
    """send_messages([...]) is one transfer; the peer stores each message of the batch."""
    with client.get_queue_sender("q") as sender:
        sender.send_messages([ServiceBusMessage(b"one", message_id="1"),
                              ServiceBusMessage(b"two", message_id="2",
                                                application_properties={"k": "v"})])
    stored = peer.messages("q")
    assert [(m.message_id, m.body, m.properties) for m in stored] == [
        ("1", b"one", {}), ("2", b"two", {"k": "v"})]
    assert stored[0].sequence_number < stored[1].sequence_number


def test_receive_and_delete_removes_at_once(peer: ServiceBusPeer,
                                            client: ServiceBusClient) -> None:
    """Receive-and-delete deliveries come pre-settled and leave nothing locked."""
    peer.put("q", b"gone", message_id="g")
    with client.get_queue_receiver(
            "q", receive_mode=ServiceBusReceiveMode.RECEIVE_AND_DELETE) as receiver:
        [msg] = receiver.receive_messages(1, max_wait_time=2)
    assert b"".join(msg.body) == b"gone"
    assert peer.counts("q") == {"active": 0, "locked": 0, "deferred": 0, "dead_letter": 0}


def test_defer_and_peek(peer: ServiceBusPeer, client: ServiceBusClient) -> None:
    """A deferred message is held; peek shows every message without locking it."""
    peer.put("q", b"later", message_id="d")
    peer.put("q", b"now", message_id="n")
    with client.get_queue_receiver("q") as receiver:
        first = receiver.receive_messages(1, max_wait_time=2)[0]
        receiver.defer_message(first)
        peeked = receiver.peek_messages(10, sequence_number=1)
    assert [m.message_id for m in peeked] == ["d", "n"]
    assert [m.state for m in peer.messages("q")] == ["deferred", "active"]


def test_lock_expiry_redelivers_with_delivery_count_plus_one(
        peer: ServiceBusPeer, client: ServiceBusClient) -> None:
    """An unsettled message comes back after the lock duration, delivery count + 1."""
    peer.put("q", b"x", message_id="e")
    with client.get_queue_receiver("q") as receiver:
        first = receiver.receive_messages(1, max_wait_time=2)[0]
        assert peer.wait_for(lambda: peer.counts("q")["active"] == 1, timeout=5)
        second = receiver.receive_messages(1, max_wait_time=2)[0]
        receiver.complete_message(second)
    assert (first.delivery_count, second.delivery_count) == (0, 1)
    assert first.lock_token != second.lock_token


def test_prefetched_messages_are_released_on_close(peer: ServiceBusPeer,
                                                   client: ServiceBusClient) -> None:
    """Messages buffered by prefetch are released, not left locked, when the receiver closes."""
    for i in range(4):
        peer.put("q", b"p", message_id=f"p{i}")
    with client.get_queue_receiver("q", prefetch_count=4) as receiver:
        [msg] = receiver.receive_messages(1, max_wait_time=2)
        receiver.complete_message(msg)
    assert peer.counts("q")["locked"] == 0
    assert [(m.state, m.delivery_count) for m in peer.messages("q")] == [("active", 0)] * 3


def test_topic_copies_to_each_subscription(peer: ServiceBusPeer,
                                           client: ServiceBusClient) -> None:
    """A message sent to a topic lands in every subscription."""
    with client.get_topic_sender("t") as sender:
        sender.send_messages(ServiceBusMessage(b"fan", message_id="f"))
    with client.get_subscription_receiver("t", "b") as receiver:
        [msg] = receiver.receive_messages(1, max_wait_time=2)
        receiver.complete_message(msg)
    assert peer.counts("t/Subscriptions/a")["active"] == 1
    assert peer.counts("t/Subscriptions/b")["active"] == 0


def test_unknown_entity_is_not_found(peer: ServiceBusPeer, client: ServiceBusClient) -> None:
    """A queue that does not exist is refused at put-token with 404, as by the service;
    the SDK reports the failed put-token as an authentication error naming the entity."""
    with pytest.raises(ServiceBusAuthenticationError) as caught, \
            client.get_queue_receiver("missing") as receiver:
        receiver.receive_messages(1, max_wait_time=1)
    inner = caught.value.inner_exception
    assert getattr(inner, "status_code", None) == 404
    assert "/missing' could not be found" in str(inner)
    audiences = [audience for audience, _ in peer.cbs_tokens]
    assert any(audience.endswith("/missing") for audience in audiences)


def test_link_to_unknown_entity_is_not_found(peer: ServiceBusPeer) -> None:
    """Past put-token (a token for another entity), attaching to a missing entity is
    refused with amqp:not-found, which the SDK raises as MessagingEntityNotFoundError."""
    with peer._lock:
        known = peer._known
        peer._known = lambda path: True  # type: ignore[method-assign]
    try:
        with ServiceBusClient.from_connection_string(peer.connection_string, **OPTIONS) as c, \
                pytest.raises(MessagingEntityNotFoundError), \
                c.get_queue_receiver("missing") as receiver:
            receiver.receive_messages(1, max_wait_time=1)
    finally:
        peer._known = known  # type: ignore[method-assign]


class FakeClock:
    """A settable clock for the peer's duplicate detection window."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def test_duplicate_detection_drops_a_repeat_within_the_window() -> None:
    """A repeated message id is accepted and dropped within the window, kept after it;
    the window runs from the first send, not from the dropped repeat."""
    clock = FakeClock()
    with ServiceBusPeer(queues=["q", "plain"], duplicate_detection={"q": 60.0},
                        clock=clock) as peer, \
            ServiceBusClient.from_connection_string(peer.connection_string, **OPTIONS) as c:
        with c.get_queue_sender("q") as sender:
            sender.send_messages(ServiceBusMessage(b"first", message_id="dup"))
            clock.now += 59
            sender.send_messages([ServiceBusMessage(b"again", message_id="dup"),
                                  ServiceBusMessage(b"other", message_id="other")])
            clock.now += 2  # 61 s after the first send, 2 s after the dropped repeat
            sender.send_messages(ServiceBusMessage(b"later", message_id="dup"))
        with c.get_queue_sender("plain") as sender:
            sender.send_messages(ServiceBusMessage(b"a", message_id="dup"))
            sender.send_messages(ServiceBusMessage(b"b", message_id="dup"))
        assert [(m.message_id, m.body) for m in peer.messages("q")] == [
            ("dup", b"first"), ("other", b"other"), ("dup", b"later")]
        assert peer.duplicates_dropped == 1
        assert [m.body for m in peer.messages("plain")] == [b"a", b"b"]


def test_duplicate_detection_default_window_is_ten_minutes() -> None:
    """Enabled without a window, duplicate detection remembers ids for 600 s."""
    clock = FakeClock()
    with ServiceBusPeer(queues=[], clock=clock) as peer:
        peer.create_queue("q", requires_duplicate_detection=True)
        peer.put("q", b"1", message_id="m")
        clock.now += 599
        peer.put("q", b"2", message_id="m")
        clock.now += 1.5
        peer.put("q", b"3", message_id="m")
        assert [m.body for m in peer.messages("q")] == [b"1", b"3"]


def test_topic_duplicate_detection_applies_before_the_copies() -> None:
    """On a topic with duplicate detection a repeat reaches no subscription; every
    subscription gets one copy of the first."""
    with ServiceBusPeer(queues=[], topics={"t": ["a", "b"]},
                        duplicate_detection={"t": None}) as peer, \
            ServiceBusClient.from_connection_string(peer.connection_string, **OPTIONS) as c:
        with c.get_topic_sender("t") as sender:
            for _ in range(2):
                sender.send_messages(ServiceBusMessage(b"e", message_id="once"))
        for sub in ("a", "b"):
            assert [m.message_id for m in peer.messages(f"t/Subscriptions/{sub}")] == ["once"]
        assert peer.duplicates_dropped == 1


def test_reply_to_and_content_type_are_kept(peer: ServiceBusPeer,
                                            client: ServiceBusClient) -> None:
    """The properties section travels unchanged: ReplyTo and ContentType come back."""
    with client.get_queue_sender("q") as sender:
        sender.send_messages(ServiceBusMessage(b"{}", message_id="r", reply_to="answers",
                                               content_type="application/json"))
    [stored] = peer.messages("q")
    assert (stored.reply_to, stored.content_type) == ("answers", "application/json")
    with client.get_queue_receiver("q") as receiver:
        [msg] = receiver.receive_messages(1, max_wait_time=2)
        receiver.complete_message(msg)
    assert (msg.reply_to, msg.content_type) == ("answers", "application/json")


def test_message_over_the_size_limit_is_rejected() -> None:
    """Past ``max_message_size`` the send fails with the SDK's size error; nothing is kept."""
    from azure.servicebus.exceptions import MessageSizeExceededError

    with ServiceBusPeer(queues=["q"], max_message_size=1024) as peer, \
            ServiceBusClient.from_connection_string(peer.connection_string, **OPTIONS) as c, \
            c.get_queue_sender("q") as sender:
        sender.send_messages(ServiceBusMessage(b"x" * 100, message_id="small"))
        with pytest.raises(MessageSizeExceededError, match="1024 bytes"):
            sender.send_messages(ServiceBusMessage(b"x" * 4096, message_id="big"))
        assert [m.message_id for m in peer.messages("q")] == ["small"]


# --------------------------------------------------------------------------- service rules


def test_duplicate_detection_is_on_for_a_queue_created_with_it() -> None:
    """A queue created as the Bicep queue is (duplicate detection, one-hour window)
    accepts a repeated message id and silently drops it: the send succeeds."""
    with ServiceBusPeer(queues=[]) as peer:
        peer.create_queue("q", requires_duplicate_detection=True,
                          duplicate_detection_history_time_window=3600.0)
        with ServiceBusClient.from_connection_string(peer.connection_string, **OPTIONS) as c, \
                c.get_queue_sender("q") as sender:
            sender.send_messages(ServiceBusMessage(b"first", message_id="same"))
            sender.send_messages(ServiceBusMessage(b"second", message_id="same"))
        assert [m.body for m in peer.messages("q")] == [b"first"]
        assert peer.duplicates_dropped == 1


def test_a_session_queue_refuses_a_receiver_without_a_session() -> None:
    """A queue that requires sessions refuses a plain receive link with amqp:not-allowed
    and the service's sentence; the SDK raises ServiceBusError (not retried)."""
    from azure.servicebus.exceptions import ServiceBusError

    with ServiceBusPeer(queues=["plain"], requires_session=["sessions"]) as peer, \
            ServiceBusClient.from_connection_string(peer.connection_string, **OPTIONS) as c:
        with pytest.raises(ServiceBusError) as caught, \
                c.get_queue_receiver("sessions") as receiver:
            receiver.receive_messages(1, max_wait_time=1)
        assert "requires sessions to create a non-sessionful message receiver" in str(
            caught.value)
        assert "not-allowed" in repr(caught.value.inner_exception) or \
            "not-allowed" in str(caught.value)
        with c.get_queue_receiver("plain") as receiver:  # other queues are unaffected
            assert receiver.receive_messages(1, max_wait_time=0.5) == []


def test_the_standard_tier_message_size_limit_is_on_by_default() -> None:
    """Without max_message_size the peer has the Standard tier's 256 KB limit."""
    from azure.servicebus.exceptions import MessageSizeExceededError

    with ServiceBusPeer(queues=["q"]) as peer, \
            ServiceBusClient.from_connection_string(peer.connection_string, **OPTIONS) as c, \
            c.get_queue_sender("q") as sender:
        sender.send_messages(ServiceBusMessage(b"x" * 200_000, message_id="fits"))
        with pytest.raises(MessageSizeExceededError, match="262144 bytes"):
            sender.send_messages(ServiceBusMessage(b"x" * (256 * 1024), message_id="over"))
        assert [m.message_id for m in peer.messages("q")] == ["fits"]


def test_property_limits_reject_the_message() -> None:
    """A property over 32 KB, or 64 KB of properties in all, is refused with the
    service's generic answer (a ServiceBusError); nothing is stored."""
    from azure.servicebus.exceptions import ServiceBusError

    with ServiceBusPeer(queues=["q"]) as peer, \
            ServiceBusClient.from_connection_string(peer.connection_string, **OPTIONS) as c, \
            c.get_queue_sender("q") as sender:
        sender.send_messages(ServiceBusMessage(b"ok", message_id="ok", application_properties={
            "p": "v" * 30_000}))
        with pytest.raises(ServiceBusError, match="unable to process"):
            sender.send_messages(ServiceBusMessage(b"x", application_properties={
                "big": "v" * (33 * 1024)}))
        with pytest.raises(ServiceBusError, match="unable to process"):
            sender.send_messages(ServiceBusMessage(b"x", application_properties={
                f"p{i}": "v" * 12_000 for i in range(6)}))
        assert [m.message_id for m in peer.messages("q")] == ["ok"]


def test_a_message_id_over_128_characters() -> None:
    """The SDK refuses a message id over 128 characters itself; a client that sends one
    anyway is refused by the peer."""
    from proton import Described, ulong

    from tests.fakes.servicebus_peer import _DATA, _PROPERTIES, _encoded

    with pytest.raises(ValueError, match="128"):
        ServiceBusMessage(b"x", message_id="i" * 129)
    peer = ServiceBusPeer(queues=["q"])
    raw = (_encoded(Described(ulong(_PROPERTIES), ["i" * 129]))
           + _encoded(Described(ulong(_DATA), b"x")))
    assert peer._refusal(raw) == ("amqp:internal-error",
                                  "The service was unable to process the request; please "
                                  "retry the operation.")
    ok = _encoded(Described(ulong(_PROPERTIES), ["i" * 128])) + _encoded(
        Described(ulong(_DATA), b"x"))
    assert peer._refusal(ok) is None


def test_server_busy_and_quota_exceeded_on_send() -> None:
    """Injected faults: server-busy (ServiceBusServerBusyError) and
    resource-limit-exceeded (ServiceBusQuotaExceededError); then sends work again."""
    from azure.servicebus.exceptions import (
        ServiceBusQuotaExceededError,
        ServiceBusServerBusyError,
    )

    with ServiceBusPeer(queues=["q"]) as peer, \
            ServiceBusClient.from_connection_string(peer.connection_string, **OPTIONS) as c, \
            c.get_queue_sender("q") as sender:
        peer.busy_sends = 1
        with pytest.raises(ServiceBusServerBusyError):
            sender.send_messages(ServiceBusMessage(b"x", message_id="busy"))
        peer.quota_exceeded_sends = 1
        with pytest.raises(ServiceBusQuotaExceededError):
            sender.send_messages(ServiceBusMessage(b"x", message_id="full"))
        sender.send_messages(ServiceBusMessage(b"x", message_id="fine"))
        assert [m.message_id for m in peer.messages("q")] == ["fine"]


def test_an_idle_receive_link_is_detached_while_its_message_is_locked() -> None:
    """A receive link unused for the idle timeout is detached (the connection stays);
    the message it locked stays locked, and the SDK's complete then fails locally:
    ServiceBusError "Handler failed: Link already closed.." (the SDK shuts the handler)."""
    import asyncio

    from azure.servicebus.aio import ServiceBusClient as AsyncClient
    from azure.servicebus.exceptions import ServiceBusError

    async def scenario(peer: ServiceBusPeer) -> str:
        async with AsyncClient.from_connection_string(peer.connection_string, **OPTIONS) as c, \
                c.get_queue_receiver("q") as receiver:
            [msg] = await receiver.receive_messages(1, max_wait_time=2)
            while peer.idle_detaches == 0:
                await asyncio.sleep(0.05)
            # A management call reads the detach off the shared connection.
            await receiver.renew_message_lock(msg)
            assert peer.counts("q")["locked"] == 1
            try:
                await receiver.complete_message(msg)
            except ServiceBusError as exc:
                return str(exc)
            return "completed"

    with ServiceBusPeer(queues=["q"], lock_duration=30, link_idle_timeout=0.3) as peer:
        peer.put("q", b"held", message_id="h")
        assert asyncio.run(scenario(peer)) == "Handler failed: Link already closed.."
        assert peer.counts("q")["locked"] == 1
        assert peer.connections_opened == 1
