"""Tests of the Service Bus source (worker/sources/servicebus.py) through the real SDK.

Every test starts the AMQP test peer (tests/fakes/servicebus_peer.py) on a free port
and points the real ``azure-servicebus`` aio client at it with a
``UseDevelopmentEmulator=true`` connection string.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime
from types import TracebackType
from typing import Any, TypedDict

import pytest
from azure.core.credentials import AccessToken
from azure.servicebus import ServiceBusClient, ServiceBusSubQueue
from azure.servicebus.exceptions import (
    MessageLockLostError,
    MessagingEntityNotFoundError,
    OperationTimeoutError,
    ServiceBusAuthorizationError,
    ServiceBusConnectionError,
    ServiceBusServerBusyError,
)
from pydantic import SecretStr

from tests.fakes.servicebus_peer import ServiceBusPeer
from worker.config import QueueConfig, ServiceBusConfig
from worker.errors import ConfigFault, LockLost, SystemFault
from worker.sources.base import Received
from worker.sources.servicebus import ServiceBusSource, _namespace_host, classify_error

QUEUE = "jobs"
LOCK = 1.0  # the peer's lock duration, seconds: short so expiry tests stay fast


class RetryOptions(TypedDict):
    """The SDK clients' retry keywords (typed, so ``**CLIENT_OPTIONS`` type-checks)."""

    retry_total: int
    retry_backoff_factor: float
    retry_backoff_max: float


#: Fail fast: the SDK's own retries would otherwise wait seconds per fault.
CLIENT_OPTIONS: RetryOptions = {"retry_total": 1, "retry_backoff_factor": 0.05,
                                "retry_backoff_max": 0.2}

MakePeer = Callable[..., ServiceBusPeer]


@pytest.fixture
def make_peer() -> Iterator[MakePeer]:
    """A factory of started peers (queue ``jobs``, 1 s locks); stops them all after."""
    peers: list[ServiceBusPeer] = []

    def make(**kwargs: Any) -> ServiceBusPeer:
        kwargs.setdefault("queues", [QUEUE])
        kwargs.setdefault("lock_duration", LOCK)
        peer = ServiceBusPeer(**kwargs).start()
        peers.append(peer)
        return peer

    yield make
    for peer in peers:
        peer.stop()


@pytest.fixture
def peer(make_peer: MakePeer) -> ServiceBusPeer:
    """One started peer with the queue ``jobs``."""
    return make_peer()


@contextlib.asynccontextmanager
async def open_source(peer: ServiceBusPeer, *, max_delivery_count: int = 10,
                      **servicebus: Any) -> AsyncIterator[ServiceBusSource]:
    """A ServiceBusSource on the peer, closed on exit."""
    servicebus.setdefault("queue", QUEUE)
    servicebus.setdefault("batch_size", 10)
    config = ServiceBusConfig(connection_string=SecretStr(peer.connection_string), **servicebus)
    source = ServiceBusSource.from_config(
        config, QueueConfig(name=QUEUE, lock_duration=LOCK,
                            max_delivery_count=max_delivery_count),
        client_options=CLIENT_OPTIONS, emulator_admin_port=peer.admin_port or 0,
        backoff_base=0.05, backoff_max=0.2, resubmit_wait=1.0)
    try:
        yield source
    finally:
        await source.close()


def run(coro: Any) -> Any:
    """Run one scenario on a fresh event loop."""
    return asyncio.run(coro)


async def receive_one(source: ServiceBusSource, wait: float = 3.0) -> Received:
    """Receive exactly one message or fail the test."""
    got = await source.receive(1, wait)
    assert len(got) == 1, f"expected one message, got {len(got)}"
    return got[0]


def sdk_dead_letters(peer: ServiceBusPeer, queue: str = QUEUE) -> list[tuple[Any, ...]]:
    """(message id, reason, description, body) of the dead-letter queue, read with the
    synchronous SDK in receive-and-delete mode."""
    with ServiceBusClient.from_connection_string(peer.connection_string, **CLIENT_OPTIONS) as c, \
            c.get_queue_receiver(queue, sub_queue=ServiceBusSubQueue.DEAD_LETTER,
                                 receive_mode="receiveanddelete") as receiver:
        return [(m.message_id, m.dead_letter_reason, m.dead_letter_error_description,
                 b"".join(m.body)) for m in receiver.receive_messages(10, max_wait_time=2)]


# --------------------------------------------------------------------------- settlement


def test_event_grid_properties_pass_through(peer: ServiceBusPeer) -> None:
    """Event Grid's aeg-* application properties reach the consumer as strings."""
    props = {"aeg-event-type": "Notification", "aeg-subscription-name": "BLOBS",
             "aeg-delivery-count": "0", "aeg-output-event-id": "7d1c8a2e"}
    peer.put(QUEUE, b"[]", message_id="evt-1", properties=props)

    async def scenario() -> Received:
        async with open_source(peer) as source:
            msg = await receive_one(source)
            await source.complete(msg)
            return msg

    msg = run(scenario())
    assert msg.message_id == "evt-1"
    assert dict(msg.properties) == props


def test_dead_letter_reason_and_description_readable_through_sdk(peer: ServiceBusPeer) -> None:
    """dead_letter() lands reason and description in the SDK's dead-letter fields."""
    peer.put(QUEUE, b"not json", message_id="bad-1")

    async def scenario() -> None:
        async with open_source(peer) as source:
            msg = await receive_one(source)
            await source.dead_letter(msg, "InvalidJson", "body is not JSON: line 1 column 1")

    run(scenario())
    assert peer.counts(QUEUE)["active"] == 0
    assert sdk_dead_letters(peer) == [
        ("bad-1", "InvalidJson", "body is not JSON: line 1 column 1", b"not json")]


def test_renewal_keeps_a_message_locked_for_three_lock_durations(peer: ServiceBusPeer) -> None:
    """Renewing every quarter of the lock keeps the message ours past 3x the lock duration."""
    peer.put(QUEUE, b"long job", message_id="long-1")

    async def scenario() -> tuple[int, list[datetime]]:
        async with open_source(peer) as source:
            msg = await receive_one(source)
            # Meanwhile another receiver keeps asking for the message.
            stealer = asyncio.create_task(source.receive(1, 2.5 * LOCK))
            expiries = []
            loop = asyncio.get_running_loop()
            until = loop.time() + 3.5 * LOCK
            while loop.time() < until:
                await asyncio.sleep(LOCK / 4)
                expiries.append(await source.renew_lock(msg))
            await source.complete(msg)
            return len(await stealer), expiries

    stolen, expiries = run(scenario())
    assert stolen == 0
    assert expiries == sorted(expiries) and expiries[-1] > expiries[0]
    assert peer.counts(QUEUE) == {"active": 0, "locked": 0, "deferred": 0, "dead_letter": 0}


def test_a_busy_renewal_is_a_system_fault_and_keeps_the_receiver(peer: ServiceBusPeer) -> None:
    """A renewal the service answers with server-busy raises SystemFault; the message
    stays settleable on the same receiver."""
    peer.put(QUEUE, b"busy", message_id="b-1")

    async def scenario() -> None:
        async with open_source(peer) as source:
            msg = await receive_one(source)
            peer.busy_management = 5  # more than the SDK's own retries
            with pytest.raises(SystemFault):
                await source.renew_lock(msg)
            peer.busy_management = 0
            await source.renew_lock(msg)
            await source.complete(msg)

    run(scenario())
    assert peer.counts(QUEUE) == {"active": 0, "locked": 0, "deferred": 0, "dead_letter": 0}


def test_topic_subscription(make_peer: MakePeer) -> None:
    """A source on a topic subscription sends to the topic and receives from the subscription."""
    peer = make_peer(queues=[], topics={"events": ["fanout", "audit"]})

    async def scenario() -> tuple[Received, dict[str, int]]:
        async with open_source(peer, queue=None, topic="events",
                               subscription="fanout") as source:
            assert source.name == "events/fanout"
            await source.send(b"hello", message_id="t-1")
            msg = await receive_one(source)
            depth = await source.depth()
            await source.complete(msg)
            return msg, depth

    msg, depth = run(scenario())
    assert msg.message_id == "t-1"
    assert depth == {"active": 1, "dead_letter": 0, "transfer": 0}
    assert peer.counts("events/Subscriptions/audit")["active"] == 1


class FakeTokenCredential:
    """An async token credential standing in for DefaultAzureCredential."""

    def __init__(self) -> None:
        self.scopes: list[tuple[str, ...]] = []

    async def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        self.scopes.append(scopes)
        return AccessToken("entra-token-for-tests", int(time.time()) + 3600)

    async def close(self) -> None:
        pass

    async def __aenter__(self) -> FakeTokenCredential:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None = None,
                        exc_value: BaseException | None = None,
                        traceback: TracebackType | None = None) -> None:
        await self.close()


def test_entra_id_credential_path(peer: ServiceBusPeer) -> None:
    """With a namespace and no connection string the source authenticates with the
    token credential: the service receives its bearer token on $cbs."""
    credential = FakeTokenCredential()

    async def scenario() -> Received:
        source = ServiceBusSource(
            servicebus=ServiceBusConfig(namespace=f"127.0.0.1:{peer.port}", queue=QUEUE),
            queue=QueueConfig(name=QUEUE), credential=credential,
            client_options={**CLIENT_OPTIONS, "use_tls": False})  # the peer has no TLS
        try:
            await source.send(b"entra", message_id="e-1")
            msg = await receive_one(source)
            await source.complete(msg)
            return msg
        finally:
            await source.close()

    assert run(scenario()).message_id == "e-1"
    assert credential.scopes and all(
        scopes == ("https://servicebus.azure.net//.default",) for scopes in credential.scopes)
    assert {token for _, token in peer.cbs_tokens} == {"entra-token-for-tests"}


# --------------------------------------------------------------------------- concurrency


def test_concurrent_receives_use_their_own_receivers(peer: ServiceBusPeer) -> None:
    """Concurrent receive calls each get messages, settled later from other tasks."""
    for i in range(6):
        peer.put(QUEUE, b"x", message_id=f"c-{i}")

    async def scenario() -> list[str]:
        async with open_source(peer, batch_size=2) as source:
            batches = await asyncio.gather(*(source.receive(2, 3.0) for _ in range(3)))
            received = [m for batch in batches for m in batch]
            await asyncio.gather(*(asyncio.create_task(source.complete(m)) for m in received))
            return sorted(m.message_id or "" for m in received)

    assert run(scenario()) == [f"c-{i}" for i in range(6)]
    assert peer.counts(QUEUE)["active"] == 0


# --------------------------------------------------------------------------- resilience


def test_survives_the_peer_dropping_its_connections(peer: ServiceBusPeer) -> None:
    """After the service drops every connection, receive works again on a new one."""
    peer.put(QUEUE, b"before", message_id="r-1")

    async def scenario() -> tuple[Received, list[str]]:
        async with open_source(peer) as source:
            first = await receive_one(source)
            await source.complete(first)
            opened = peer.connections_opened
            await asyncio.to_thread(peer.drop_connections)
            peer.put(QUEUE, b"after", message_id="r-2")
            faults: list[str] = []
            for _ in range(20):
                try:
                    got = await source.receive(1, 1.0)
                except SystemFault as fault:
                    faults.append(fault.description)
                    continue
                if got:
                    await source.complete(got[0])
                    assert peer.connections_opened > opened
                    return got[0], faults
            raise AssertionError(f"no message after reconnecting; faults: {faults}")

    after, _ = run(scenario())
    assert after.message_id == "r-2"
    assert peer.counts(QUEUE)["active"] == 0


def test_survives_the_service_detaching_an_idle_link(peer: ServiceBusPeer) -> None:
    """After the service force-detaches the receive link, receiving works again."""
    async def scenario() -> Received:
        async with open_source(peer) as source:
            assert await source.receive(1, 0.3) == []  # the link is open, and idle
            await asyncio.to_thread(peer.detach_receivers)
            peer.put(QUEUE, b"after detach", message_id="i-1")
            for _ in range(20):
                with contextlib.suppress(SystemFault):
                    got = await source.receive(1, 1.0)
                    if got:
                        await source.complete(got[0])
                        return got[0]
            raise AssertionError("nothing received after the link was detached")

    assert run(scenario()).message_id == "i-1"
    assert peer.counts(QUEUE)["active"] == 0


def test_settling_after_a_reconnect_is_lock_lost(peer: ServiceBusPeer) -> None:
    """A message locked on a receiver that was reset cannot be settled: LockLost."""
    peer.put(QUEUE, b"held", message_id="h-1")

    async def scenario() -> Received:
        async with open_source(peer) as source:
            held = await receive_one(source)
            await asyncio.to_thread(peer.drop_connections)
            with pytest.raises(LockLost):
                await source.complete(held)
            # The lock lapses on the service and the message comes back.
            for _ in range(20):
                with contextlib.suppress(SystemFault):
                    got = await source.receive(1, 1.0)
                    if got:
                        await source.complete(got[0])
                        return got[0]
            raise AssertionError("the held message was not redelivered")

    again = run(scenario())
    assert again.message_id == "h-1" and again.delivery_count == 1


def test_missing_entity_is_a_config_fault(peer: ServiceBusPeer) -> None:
    """Receiving from a queue that does not exist is a configuration fault."""
    async def scenario() -> None:
        async with open_source(peer, queue="nope") as source:
            with pytest.raises(ConfigFault):
                await source.receive(1, 1.0)

    run(scenario())


# --------------------------------------------------------------------------- depth and DLQ


def test_depth_from_runtime_properties(peer: ServiceBusPeer) -> None:
    """depth() reads active and dead-letter counts through the administration client."""
    for i in range(3):
        peer.put(QUEUE, b"d", message_id=f"d-{i}")

    async def scenario() -> dict[str, int]:
        async with open_source(peer) as source:
            msg = await receive_one(source)
            await source.dead_letter(msg, "InvalidParams", "bad")
            return await source.depth()

    assert run(scenario()) == {"active": 2, "dead_letter": 1, "scheduled": 0, "transfer": 0}


def test_dead_letters_and_resubmit_keep_the_idempotency_key(peer: ServiceBusPeer) -> None:
    """dead_letters() lists reasons; resubmit() sends a copy with a new message id, the
    same properties and the original id as fanout-idempotency-key to the queue and
    removes the dead-lettered one."""
    peer.put(QUEUE, b"keep", message_id="k-1", properties={"aeg-event-type": "Notification"})
    peer.put(QUEUE, b"other", message_id="k-2")

    async def scenario() -> tuple[Any, ...]:
        async with open_source(peer) as source:
            for msg in await source.receive(2, 3.0):
                await source.dead_letter(msg, "NoRoute", f"no route for {msg.message_id}")
            listed = await source.dead_letters()
            target = next(d for d in listed if d.message_id == "k-1")
            assert target.sequence_number is not None
            resubmitted = await source.resubmit(target.sequence_number)
            missing = await source.resubmit(10_000)
            back = await receive_one(source)
            await source.complete(back)
            left = await source.dead_letters()
            return listed, resubmitted, missing, back, left

    listed, resubmitted, missing, back, left = run(scenario())
    assert sorted((d.message_id, d.reason, d.description) for d in listed) == [
        ("k-1", "NoRoute", "no route for k-1"), ("k-2", "NoRoute", "no route for k-2")]
    assert [d.properties for d in listed if d.message_id == "k-1"] == [
        {"aeg-event-type": "Notification"}]
    assert resubmitted not in (None, "k-1") and missing is None
    assert (back.message_id, back.body) == (resubmitted, b"keep")
    assert dict(back.properties) == {"aeg-event-type": "Notification",
                                     "fanout-idempotency-key": "k-1"}
    assert [d.message_id for d in left] == ["k-2"]


def test_resubmit_finds_a_message_deep_in_the_dead_letter_queue(peer: ServiceBusPeer) -> None:
    """Resubmit scans past more dead letters than one receive returns, and leaves the
    others where they were."""
    dlq = QUEUE + "/$DeadLetterQueue"
    numbers = [peer.put(dlq, b"dead", message_id=f"dl-{i}",
                        properties={"DeadLetterReason": "NoRoute"})[0] for i in range(70)]

    async def scenario() -> str | None:
        async with open_source(peer) as source:
            return await source.resubmit(numbers[64])

    copy_id = run(scenario())
    [copy] = peer.messages(QUEUE)
    assert copy_id not in (None, "dl-64") and copy.message_id == copy_id
    assert copy.properties["fanout-idempotency-key"] == "dl-64"
    left = peer.dead_letters(QUEUE)
    assert len(left) == 69 and {m.state for m in left} == {"active"}


# --------------------------------------------------------------------------- error mapping


@pytest.mark.parametrize(("error", "expected"), [
    (MessageLockLostError(message="lock expired"), LockLost),
    (ServiceBusConnectionError(message="link detached"), SystemFault),
    (OperationTimeoutError(message="timed out"), SystemFault),
    (ServiceBusServerBusyError(message="busy"), SystemFault),
    (ServiceBusAuthorizationError(message="Unauthorized"), ConfigFault),
    (MessagingEntityNotFoundError(message="no such queue"), ConfigFault),
    (OSError("connection reset"), SystemFault),
])
def test_classify_error(error: Exception, expected: type[Exception]) -> None:
    """SDK errors map onto LockLost, SystemFault or ConfigFault."""
    assert type(classify_error(error, "complete")) is expected


def test_error_descriptions_never_carry_keys() -> None:
    """Keys and SAS signatures in an SDK error message are masked."""
    error = ServiceBusConnectionError(
        message="Endpoint=sb://x/;SharedAccessKeyName=root;SharedAccessKey=c2VjcmV0PQ==;"
                " token SharedAccessSignature sr=x&sig=abcDEF%3D&se=1&skn=root")
    text = str(classify_error(error, "receive"))
    assert "c2VjcmV0PQ==" not in text and "abcDEF" not in text
    assert "SharedAccessKey=***" in text


@pytest.mark.parametrize("namespace", [
    "sb-fanout", "sb-fanout.servicebus.windows.net", "sb://sb-fanout.servicebus.windows.net/",
    "https://sb-fanout.servicebus.windows.net:443/"])
def test_namespace_forms(namespace: str) -> None:
    """A bare name, a host name or a URL all name the same namespace host."""
    assert _namespace_host(namespace) == "sb-fanout.servicebus.windows.net"


def test_source_needs_a_namespace_or_connection_string() -> None:
    """Without namespace or connection string the source refuses to start."""
    from worker.errors import SettingsError

    with pytest.raises(SettingsError):
        ServiceBusSource(servicebus=ServiceBusConfig(), queue=QueueConfig())
    with pytest.raises(SettingsError):
        ServiceBusSource(servicebus=ServiceBusConfig(namespace="ns", topic="t"),
                         queue=QueueConfig())


# --------------------------------------------------------------------------- service rules


def test_resubmit_to_a_queue_with_duplicate_detection_loses_nothing(
        make_peer: MakePeer) -> None:
    """On a queue with duplicate detection (as the Bicep queue) the resubmitted copy is
    not dropped: it has a new message id; the dead letter is gone only once it is in."""
    peer = make_peer(duplicate_detection={QUEUE: 3600.0})

    async def scenario() -> tuple[str | None, Received]:
        async with open_source(peer) as source:
            await source.send(b'{"handler": "sweep"}', message_id="orig")
            msg = await receive_one(source)
            await source.dead_letter(msg, "NoRoute", "x")
            [dead] = await source.dead_letters()
            assert dead.sequence_number is not None
            copy_id = await source.resubmit(dead.sequence_number)
            back = await receive_one(source)
            await source.complete(back)
            return copy_id, back

    copy_id, back = run(scenario())
    assert back.message_id == copy_id
    assert back.properties["fanout-idempotency-key"] == "orig"
    assert peer.duplicates_dropped == 0 and peer.dead_letters(QUEUE) == []


def test_a_failed_resubmit_send_keeps_the_dead_letter(make_peer: MakePeer) -> None:
    """When the service refuses the copy (quota exceeded), the dead letter stays."""
    peer = make_peer()
    peer.put(QUEUE + "/$DeadLetterQueue", b"x", message_id="d-1",
             properties={"DeadLetterReason": "NoRoute"})

    async def scenario() -> None:
        async with open_source(peer) as source:
            [dead] = await source.dead_letters()
            assert dead.sequence_number is not None
            peer.quota_exceeded_sends = 5
            with pytest.raises(SystemFault, match="is full"):
                await source.resubmit(dead.sequence_number)

    run(scenario())
    assert [m.message_id for m in peer.dead_letters(QUEUE)] == ["d-1"]
    assert peer.messages(QUEUE) == []


def test_a_session_queue_is_a_config_fault_naming_sessions(make_peer: MakePeer) -> None:
    """Receiving from (and probing) a queue that requires sessions is a ConfigFault
    with code SessionRequired; a missing queue is EntityNotFound."""
    peer = make_peer(queues=[], requires_session=[QUEUE])

    async def scenario() -> list[ConfigFault]:
        faults = []
        async with open_source(peer) as source:
            with pytest.raises(ConfigFault) as caught:
                await source.receive(1, 1.0)
            faults.append(caught.value)
            with pytest.raises(ConfigFault) as caught:
                await source.probe()
            faults.append(caught.value)
        async with open_source(peer, queue="missing") as source:
            with pytest.raises(ConfigFault) as caught:
                await source.probe()
            faults.append(caught.value)
        return faults

    receive, probe, missing = run(scenario())
    assert (receive.code, probe.code) == ("SessionRequired", "SessionRequired")
    assert "requires sessions" in probe.description
    assert missing.code == "EntityNotFound" and "'missing'" in missing.description


def test_a_prefetch_beyond_the_lock_is_refused(peer: ServiceBusPeer) -> None:
    """prefetch x the least a message takes over the lock duration is a SettingsError
    with the arithmetic; a prefetch that fits passes."""
    from worker.errors import SettingsError

    async def scenario(prefetch: int) -> None:
        async with open_source(peer, prefetch=prefetch) as source:
            await source.check_capacity(4)

    with pytest.raises(SettingsError) as caught:
        run(scenario(3))  # 3 x 5 s = 15 s > the 1 s lock
    text = str(caught.value)
    assert "servicebus.prefetch = 3" in text and "consumer.concurrency = 4" in text
    assert "15 s > the lock duration of 1 s" in text and "at most 0" in text
    run(scenario(0))


def test_a_message_over_the_size_limit_names_the_limit(peer: ServiceBusPeer) -> None:
    """A body over the Standard tier's 256 KB is refused; the fault names the limit."""
    async def scenario() -> None:
        async with open_source(peer) as source:
            with pytest.raises(SystemFault) as caught:
                await source.send(b"x" * (300 * 1024), message_id="big")
            assert "size limit" in caught.value.description
            assert "262144 bytes" in caught.value.description

    run(scenario())
    assert peer.messages(QUEUE) == []


def test_a_settlement_on_a_detached_link_is_lock_lost(make_peer: MakePeer) -> None:
    """The service detaches the idle link while a message is held; renewal and
    complete raise LockLost (not a generic fault), and the message comes back and
    settles on a new link."""
    peer = make_peer(lock_duration=2.0, link_idle_timeout=0.3)
    peer.put(QUEUE, b"held", message_id="h-1")

    async def scenario() -> Received:
        async with open_source(peer) as source:
            held = await receive_one(source)
            while peer.idle_detaches == 0:
                await asyncio.sleep(0.05)
            with pytest.raises(LockLost):
                for _ in range(20):  # the detach is read off the connection
                    await source.renew_lock(held)
                    await asyncio.sleep(0.1)
            with pytest.raises(LockLost):
                await source.complete(held)
            for _ in range(40):
                with contextlib.suppress(SystemFault):  # the detach, seen by a receive
                    got = await source.receive(1, 0.5)
                    if got:
                        await source.complete(got[0])
                        return got[0]
            raise AssertionError("not redelivered")

    again = run(scenario())
    assert (again.message_id, again.delivery_count) == ("h-1", 1)
    assert peer.counts(QUEUE)["active"] == 0
