"""Azure Service Bus as a :class:`~worker.sources.base.Source`: a queue or a topic subscription.

Built on ``azure.servicebus.aio``. Authentication is Entra ID through azure-identity
(``DefaultAzureCredential``: workload identity, managed identity, environment, CLI) with
``[servicebus] namespace``, or a connection string when ``[servicebus]
connection_string`` is set (``UseDevelopmentEmulator=true`` included).

Concurrency. An SDK receiver is not coroutine-safe, so concurrent
:meth:`ServiceBusSource.receive` calls never share one: each call checks a receiver out
of a pool for its duration, preferring one with no unsettled messages, and the pool
grows when none is free (the consumer's N receive loops end up with N receivers). This
holds however the caller structures its tasks (the consumer wraps every receive in a
task of its own, so keying receivers by task would not work). A message remembers the
receiver that locked it (``Received.handle``) and is settled through it: the lock token
is only valid on the link that delivered it. Each receiver has an ``asyncio.Lock``, so
a settlement or renewal waits for a receive in flight on the same receiver, which only
happens once the pool is at ``max_receivers``.

Resilience. A connection fault (including the service closing an idle link) closes that
receiver and raises :class:`~worker.errors.SystemFault`; receives then wait out a
bounded, jittered backoff before a new receiver is opened. Messages locked on the old
receiver can only end in :class:`~worker.errors.LockLost`: the service redelivers them
when their lock expires, and idempotent submission makes that harmless.

Idle links. The service detaches a link no call has used for 10 minutes
(https://learn.microsoft.com/azure/service-bus-messaging/service-bus-amqp-troubleshoot),
also while a message it delivered is still locked and being processed. The lock token
is only valid on that link and the SDK fails the settlement locally ("Link already
closed."), so a renewal that finds the link detached, or such a settlement, raises
``LockLost`` and drops the receiver: the lock lapses, the message comes back, and its
redelivery finds the job sealed (nothing is added again) and completes at once.

Timeouts. Every SDK call is bounded (``operation_timeout``; a receive by its wait plus
that), so a half-open connection that swallows bytes without a reset makes the call
fail with ``SystemFault``, drop its receiver and reconnect, instead of hanging. A
receive on such a connection does not hang, though: the SDK returns no messages once
its wait is over, as on an empty queue. So after an empty receive, a receiver on which
nothing has been heard for ``operation_timeout`` gets one round trip on its connection
(a peek, which locks nothing; within the receive's bound): no answer is a timeout like
any other, and the receiver is dropped and reopened.

Errors map as: lock lost (and a settlement on a detached link) → ``LockLost``;
connection, timeout, server busy, a full entity and other transient faults →
``SystemFault``; a refused credential, a missing entity and an entity that requires
sessions → ``ConfigFault`` with a code (``Unauthorized``, ``EntityNotFound``,
``SessionRequired``) and a reason naming the cause. Descriptions never carry the
connection string or a key.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import structlog
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceNotFoundError,
)
from azure.core.pipeline.transport import AioHttpTransport
from azure.servicebus import ServiceBusMessage, ServiceBusReceiveMode, ServiceBusSubQueue
from azure.servicebus.aio import ServiceBusClient
from azure.servicebus.aio.management import ServiceBusAdministrationClient
from azure.servicebus.amqp import AmqpMessageBodyType
from azure.servicebus.exceptions import (
    MessageAlreadySettled,
    MessageLockLostError,
    MessageSizeExceededError,
    MessagingEntityDisabledError,
    MessagingEntityNotFoundError,
    ServiceBusAuthenticationError,
    ServiceBusAuthorizationError,
    ServiceBusCommunicationError,
    ServiceBusConnectionError,
    ServiceBusError,
    ServiceBusQuotaExceededError,
    SessionLockLostError,
)

from worker.config import QueueConfig, ServiceBusConfig
from worker.errors import ConfigFault, FanoutError, LockLost, SettingsError, SystemFault
from worker.routing import IDEMPOTENCY_KEY_PROPERTY
from worker.sources.base import DeadLettered, Received

if TYPE_CHECKING:
    from azure.core.credentials_async import AsyncTokenCredential
    from azure.servicebus import ServiceBusReceivedMessage
    from azure.servicebus.aio import ServiceBusReceiver, ServiceBusSender

__all__ = ["ServiceBusSource", "classify_error", "default_credential", "describe_error",
           "new_client", "to_received"]

log = structlog.get_logger(__name__)

#: The Service Bus emulator serves the administration API over plain HTTP on this port.
EMULATOR_ADMIN_PORT = 5300
#: Dead-lettered messages locked per receive while resubmit looks for one, and at most.
RESUBMIT_BATCH = 50
MAX_RESUBMIT_SCAN = 10_000
#: Longest dead-letter reason or description the service keeps.
MAX_DEAD_LETTER_TEXT = 4096
#: Standard tier limits (https://learn.microsoft.com/azure/service-bus-messaging/service-bus-quotas).
MAX_MESSAGE_ID = 128
STANDARD_MAX_MESSAGE_SIZE = 256 * 1024
#: The least one message takes to become a job (create, add tasks, seal: round trips
#: to Azure Batch); used to check that a prefetch can be handled within the lock.
MIN_SECONDS_PER_MESSAGE = 5.0
#: What the SDK raises (as ServiceBusError) for a settlement on a detached link.
_LINK_CLOSED = "Link already closed"
#: Application properties the service adds when it dead-letters; not copied on resubmit.
_DEAD_LETTER_PROPERTIES = ("DeadLetterReason", "DeadLetterErrorDescription")
_SECRET = re.compile(r"(SharedAccessKey|SharedAccessSignature|sig|skn)=[^;&\s]+",
                     re.IGNORECASE)

#: Errors after which a receiver's connection or link is not worth keeping.
_BROKEN_LINK = (ServiceBusConnectionError, ServiceBusCommunicationError, OSError, TimeoutError)
_LOCK_LOST = (MessageLockLostError, SessionLockLostError, MessageAlreadySettled)
_CONFIG = (ServiceBusAuthenticationError, ServiceBusAuthorizationError,
           MessagingEntityNotFoundError, MessagingEntityDisabledError,
           ClientAuthenticationError, ResourceNotFoundError)


# --------------------------------------------------------------------------- mapping


def _describe(exc: BaseException) -> str:
    """``TypeName: message`` with anything that looks like a key or signature masked."""
    text = _SECRET.sub(r"\1=***", str(exc)).strip()
    return f"{type(exc).__name__}: {text[:500]}" if text else type(exc).__name__


def _not_found(exc: BaseException) -> bool:
    """A missing entity: the service's 404 (at put-token the SDK raises it as an
    authentication error carrying the 404)."""
    if isinstance(exc, (MessagingEntityNotFoundError, ResourceNotFoundError)):
        return True
    inner = getattr(exc, "inner_exception", None)
    status = getattr(inner, "status_code", None) or getattr(exc, "status_code", None)
    return status == 404 or "could not be found" in str(exc)


def classify_error(exc: BaseException, action: str, entity: str = "the entity") -> FanoutError:
    """Map an SDK error raised by ``action`` on ``entity`` onto fanout's errors."""
    if isinstance(exc, FanoutError):
        return exc
    description = f"service bus {action} failed: {_describe(exc)}"
    text = str(exc)
    if isinstance(exc, _LOCK_LOST):
        return LockLost(description)
    if _LINK_CLOSED in text or (isinstance(exc, ValueError) and "closed" in text):
        return LockLost(f"service bus {action} failed: the link that locked the message "
                        f"was detached (the service closes links idle for 10 minutes); "
                        f"the lock lapses and the message is delivered again: {_describe(exc)}")
    if "requires sessions" in text:
        return ConfigFault(f"{entity} requires sessions (RequiresSession is on) and fanout "
                           f"receives without sessions: point fanout at a queue or "
                           f"subscription without sessions. {description}",
                           code="SessionRequired")
    if _not_found(exc):
        return ConfigFault(f"{entity} does not exist in the namespace (check the queue, "
                           f"topic and subscription names): {description}",
                           code="EntityNotFound")
    if isinstance(exc, _CONFIG) or (isinstance(exc, HttpResponseError)
                                    and exc.status_code in (401, 403)):
        return ConfigFault(f"the credential was refused for {entity} (a wrong key or "
                           f"token, or a missing Data Receiver/Sender role): {description}",
                           code="Unauthorized")
    if isinstance(exc, MessageSizeExceededError):
        return SystemFault(f"the message is over {entity}'s size limit (256 KB on the "
                           f"Standard tier, headers included): {description}")
    if isinstance(exc, ServiceBusQuotaExceededError):
        return SystemFault(f"{entity} is full (its maximum size is reached): {description}")
    if isinstance(exc, ServiceBusError) and not isinstance(exc, _BROKEN_LINK) \
            and "unable to process" in text:
        return SystemFault(f"{entity} refused the message (a message id over 128 "
                           f"characters or properties over 32 KB each or 64 KB in all?): "
                           f"{description}")
    return SystemFault(description)


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _properties(raw: Mapping[Any, Any] | None) -> dict[str, str]:
    """Application properties with str keys and values (the SDK hands back bytes)."""
    return {_text(k): _text(v) for k, v in (raw or {}).items() if v is not None}


def _body(message: ServiceBusReceivedMessage) -> bytes:
    """The message body as bytes: data sections joined; a value or sequence as JSON."""
    body = message.body
    if message.body_type == AmqpMessageBodyType.DATA:
        return body if isinstance(body, bytes) else b"".join(bytes(part) for part in body)
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode()
    if message.body_type == AmqpMessageBodyType.SEQUENCE:
        body = list(body)
    return json.dumps(body, default=_text).encode()


def _message_id(message: ServiceBusReceivedMessage) -> str | None:
    return None if message.message_id is None else _text(message.message_id)


def to_received(message: ServiceBusReceivedMessage, handle: Any = None) -> Received:
    """Map an SDK message onto the consumer's :class:`Received`."""
    return Received(
        body=_body(message),
        message_id=_message_id(message),
        delivery_count=message.delivery_count or 0,
        locked_until=message.locked_until_utc,
        properties=_properties(message.application_properties),
        sequence_number=message.sequence_number,
        enqueued_time=message.enqueued_time_utc,
        reply_to=message.reply_to or None,
        handle=handle,
    )


def _dead_lettered(message: ServiceBusReceivedMessage) -> DeadLettered:
    properties = _properties(message.application_properties)
    return DeadLettered(
        message_id=_message_id(message),
        sequence_number=message.sequence_number,
        reason=message.dead_letter_reason,
        description=message.dead_letter_error_description,
        body=_body(message),
        properties={k: v for k, v in properties.items() if k not in _DEAD_LETTER_PROPERTIES},
        enqueued_time=message.enqueued_time_utc,
        delivery_count=message.delivery_count or 0,
    )


def _namespace_host(namespace: str) -> str:
    """``myns``, ``myns.servicebus.windows.net`` or ``sb://myns.../`` → the host name."""
    host = urlsplit(namespace).hostname if "://" in namespace else namespace.strip().strip("/")
    host = host or namespace
    return host if "." in host else f"{host}.servicebus.windows.net"


#: ``TypeName: message`` of an SDK error, keys and signatures masked (for other modules).
describe_error = _describe


def default_credential(config: ServiceBusConfig) -> AsyncTokenCredential:
    """The Entra ID credential for ``[servicebus]``: ``DefaultAzureCredential``."""
    from azure.identity.aio import DefaultAzureCredential

    # DefaultAzureCredential covers workload identity (AKS), managed identity (a
    # user-assigned one by client id when configured), environment and CLI.
    return DefaultAzureCredential(managed_identity_client_id=config.managed_identity_client_id)


def new_client(config: ServiceBusConfig, options: Mapping[str, Any],
               credential: Callable[[], AsyncTokenCredential]) -> ServiceBusClient:
    """An async client: from the connection string when one is set, else on the
    namespace with ``credential()`` (called only then)."""
    secret = config.connection_string
    if secret is not None:
        return ServiceBusClient.from_connection_string(secret.get_secret_value(), **options)
    if config.namespace is None:
        raise SettingsError("servicebus: set namespace (Entra ID) or connection_string")
    return ServiceBusClient(_namespace_host(config.namespace), credential(), **options)


class _EmulatorTransport(AioHttpTransport):  # type: ignore[misc]
    """Sends the administration client's requests to the emulator's plain-HTTP port.

    The SDK builds ``https://<host>:<amqp port>/...`` even for ``UseDevelopmentEmulator``
    connection strings; the emulator (and the test peer) serve it on another port.
    """

    def __init__(self, port: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._port = port

    async def send(self, request: Any, **kwargs: Any) -> Any:
        parts = urlsplit(request.url)
        request.url = urlunsplit(("http", f"{parts.hostname}:{self._port}", parts.path,
                                  parts.query, parts.fragment))
        return await super().send(request, **kwargs)


def _link_closed(receiver: Any) -> bool:
    """Whether the SDK receiver's AMQP link has been detached (by the service)."""
    link = getattr(getattr(receiver, "_handler", None), "_link", None)
    return bool(getattr(link, "_is_closed", False))


# --------------------------------------------------------------------------- slots


@dataclass(eq=False)
class _Slot:
    """One pooled SDK receiver and the lock serialising its use."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    receiver: ServiceBusReceiver | None = None
    generation: int = 0
    outstanding: int = 0  # messages it locked that are not settled yet
    busy: bool = False  # checked out by a receive call
    heard: float = 0.0  # loop time of the last answer on its connection


@dataclass(eq=False, slots=True)
class _Handle:
    """``Received.handle``: the SDK message and the receiver generation that locked it."""

    slot: _Slot
    generation: int
    message: ServiceBusReceivedMessage
    settled: bool = False


# --------------------------------------------------------------------------- the source


class ServiceBusSource:
    """A peek-lock Service Bus queue or topic subscription (see the module docstring).

    ``lock_duration`` is the entity's setting on the service; ``max_delivery_count`` is
    the queue's, taken from ``[queue]`` for the consumer's bookkeeping.
    ``client_options`` are passed to the SDK clients (e.g. ``retry_total``).
    """

    def __init__(self, *, servicebus: ServiceBusConfig, queue: QueueConfig,
                 credential: AsyncTokenCredential | None = None,
                 client_options: Mapping[str, Any] | None = None,
                 emulator_admin_port: int = EMULATOR_ADMIN_PORT,
                 backoff_base: float = 0.5, backoff_max: float = 30.0,
                 max_receivers: int = 32, open_timeout: float = 30.0,
                 resubmit_wait: float = 5.0, operation_timeout: float = 30.0) -> None:
        if not servicebus.configured:
            raise SettingsError("servicebus: set namespace (Entra ID) or connection_string")
        if bool(servicebus.topic) != bool(servicebus.subscription):
            raise SettingsError("servicebus: topic and subscription go together")
        self._config = servicebus
        self._topic = servicebus.topic
        self._subscription = servicebus.subscription
        self._queue = None if self._topic else (servicebus.queue or queue.name)
        self._max_delivery_count = queue.max_delivery_count
        self._credential = credential
        self._owns_credential = credential is None
        self._options = dict(client_options or {})
        self._emulator_admin_port = emulator_admin_port
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max
        self._resubmit_wait = resubmit_wait
        self._client: ServiceBusClient | None = None
        self._admin: ServiceBusAdministrationClient | None = None
        self._sender: ServiceBusSender | None = None
        self._sender_lock = asyncio.Lock()
        self._max_receivers = max_receivers
        self._open_timeout = open_timeout
        self._timeout = operation_timeout
        self._lock_duration = queue.lock_duration
        self._slots: list[_Slot] = []
        self._failures = 0
        self._not_before = 0.0
        self._closed = False

    @classmethod
    def from_config(cls, servicebus: ServiceBusConfig, queue: QueueConfig,
                    **kwargs: Any) -> ServiceBusSource:
        """The source ``[servicebus]`` and ``[queue]`` describe."""
        kwargs.setdefault("emulator_admin_port", servicebus.emulator_admin_port)
        return cls(servicebus=servicebus, queue=queue, **kwargs)

    # ---------------------------------------------------------------- Source protocol

    @property
    def name(self) -> str:
        """The queue's name, or ``<topic>/<subscription>``."""
        return self._queue or f"{self._topic}/{self._subscription}"

    @property
    def max_delivery_count(self) -> int:
        """Deliveries after which the service dead-letters a failing message."""
        return self._max_delivery_count

    async def receive(self, max_messages: int, max_wait: float) -> list[Received]:
        """Lock up to ``min(max_messages, batch_size)`` messages, waiting at most
        ``max_wait`` s, on a receiver no other receive call is using."""
        count = max(1, min(max_messages, self._config.batch_size))
        if not await self._backed_off(max_wait):
            return []
        slot = self._checkout()
        try:
            async with slot.lock:
                try:
                    receiver = await self._ready_receiver(slot)
                    messages = await self._bounded(
                        self._receive_checked(slot, receiver, count, max_wait),
                        "receive", max_wait + self._timeout)
                except Exception as exc:
                    raise await self._fail(slot, exc, "receive") from exc
                self._failures = 0
                slot.outstanding += len(messages)
                generation = slot.generation
        finally:
            slot.busy = False
        return [to_received(m, _Handle(slot, generation, m)) for m in messages]

    async def _receive_checked(self, slot: _Slot, receiver: ServiceBusReceiver, count: int,
                               max_wait: float) -> list[ServiceBusReceivedMessage]:
        """Receive; after an empty receive on a receiver not heard from for
        ``operation_timeout``, check its connection with a peek (see Timeouts)."""
        loop = asyncio.get_running_loop()
        messages: list[ServiceBusReceivedMessage] = await receiver.receive_messages(
            max_message_count=count, max_wait_time=max_wait)
        if not messages and loop.time() - slot.heard >= self._timeout:
            await receiver.peek_messages(max_message_count=1)
        if messages or loop.time() - slot.heard >= self._timeout:
            slot.heard = loop.time()
        return messages

    async def complete(self, msg: Received) -> None:
        """Remove a processed message."""
        await self._settle(msg, "complete", lambda r, m: r.complete_message(m))

    async def abandon(self, msg: Received) -> None:
        """Unlock the message so it is delivered again (delivery count + 1)."""
        await self._settle(msg, "abandon", lambda r, m: r.abandon_message(m))

    async def dead_letter(self, msg: Received, reason: str, description: str) -> None:
        """Move the message to the dead-letter queue with a reason and description."""
        reason, description = reason[:MAX_DEAD_LETTER_TEXT], description[:MAX_DEAD_LETTER_TEXT]
        await self._settle(msg, "dead-letter", lambda r, m: r.dead_letter_message(
            m, reason=reason, error_description=description))

    async def renew_lock(self, msg: Received) -> datetime:
        """Extend the message's lock by the entity's lock duration; return the new expiry."""
        handle = self._handle(msg)
        async with handle.slot.lock:
            receiver = self._receiver_of(handle, "renew-lock")
            if _link_closed(receiver):
                # Renewing would only keep a lock nothing can settle any more.
                await self._drop_receiver(handle.slot)
                raise LockLost("service bus renew-lock failed: the link that locked the "
                               "message was detached (idle); it will be delivered again")
            try:
                locked_until: datetime = await self._bounded(
                    receiver.renew_message_lock(handle.message), "renew-lock")
            except Exception as exc:
                raise await self._fail(handle.slot, exc, "renew-lock") from exc
        msg.locked_until = locked_until
        return locked_until

    async def probe(self) -> None:
        """Attach a receive link to the entity (locking nothing) and close it: raises
        ``ConfigFault`` for a refused credential, a missing entity or one that requires
        sessions, ``SystemFault`` when the service cannot be reached."""
        receiver = self._new_receiver()
        try:
            await self._open(receiver)
            # A peek needs the Listen right and is refused on an entity that requires
            # sessions, as the receive link is; it locks nothing.
            await self._bounded(receiver.peek_messages(max_message_count=1), "probe")
        except Exception as exc:
            raise classify_error(exc, "probe", self._what()) from exc
        finally:
            await self._quietly(receiver.close(), "probe receiver")

    async def check_capacity(self, concurrency: int) -> None:
        """Refuse a prefetch the consumer cannot handle within the entity's lock.

        Prefetched messages are locked as they reach the client and their locks are not
        renewed while they wait; each receiver's buffer is drained one message at a time
        by the loop using it. The lock duration is the entity's (read from the service,
        else ``[queue] lock_duration``).
        """
        prefetch = self._config.prefetch
        if prefetch <= 0:
            return
        lock = await self._entity_lock_duration()
        wait = prefetch * MIN_SECONDS_PER_MESSAGE
        if wait <= lock:
            return
        fits = int(lock // MIN_SECONDS_PER_MESSAGE)
        raise SettingsError(
            f"servicebus.prefetch = {prefetch} cannot be processed within the lock: each of "
            f"the consumer.concurrency = {concurrency} receivers locks up to {prefetch} "
            f"messages as they arrive ({concurrency} x {prefetch} = {concurrency * prefetch} "
            f"locked at once) and its loop handles them one at a time; at "
            f"{MIN_SECONDS_PER_MESSAGE:g} s a message the last waits {prefetch} x "
            f"{MIN_SECONDS_PER_MESSAGE:g} s = {wait:g} s > the lock duration of {lock:g} s "
            f"of {self._what()}. Set servicebus.prefetch to at most {fits}, or raise the "
            f"entity's lock duration.")

    async def _entity_lock_duration(self) -> float:
        try:
            admin = self._admin_client()
            if self._topic and self._subscription:
                props: Any = await self._bounded(
                    admin.get_subscription(self._topic, self._subscription), "lock duration")
            else:
                props = await self._bounded(admin.get_queue(self._queue or ""), "lock duration")
            duration = props.lock_duration
            return float(duration.total_seconds()) if duration is not None \
                else self._lock_duration
        except Exception as exc:
            log.warning("servicebus.lock_duration_unknown", entity=self.name,
                        error=_describe(exc), using=self._lock_duration)
            return self._lock_duration

    async def depth(self) -> dict[str, int]:
        """Message counts by state from the administration client's runtime properties.

        A subscription has no ``scheduled`` count (scheduled messages wait in its topic).
        """
        admin = self._admin_client()
        try:
            if self._topic and self._subscription:
                sub = await self._bounded(admin.get_subscription_runtime_properties(
                    self._topic, self._subscription), "depth")
                return {"active": sub.active_message_count or 0,
                        "dead_letter": sub.dead_letter_message_count or 0,
                        "transfer": (sub.transfer_message_count or 0)
                        + (sub.transfer_dead_letter_message_count or 0)}
            assert self._queue is not None
            props = await self._bounded(admin.get_queue_runtime_properties(self._queue),
                                        "depth")
        except Exception as exc:
            raise classify_error(exc, "depth") from exc
        return {"active": props.active_message_count or 0,
                "dead_letter": props.dead_letter_message_count or 0,
                "scheduled": props.scheduled_message_count or 0,
                "transfer": (props.transfer_message_count or 0)
                + (props.transfer_dead_letter_message_count or 0)}

    async def send(self, body: bytes, *, message_id: str | None = None,
                   properties: Mapping[str, str] | None = None,
                   reply_to: str | None = None) -> str:
        """Enqueue a message (to the topic, for a subscription) with an optional
        ``ReplyTo``; return its message id."""
        message_id = message_id or uuid.uuid4().hex
        if len(message_id) > MAX_MESSAGE_ID:
            raise SettingsError(f"message id of {len(message_id)} characters: Service Bus "
                                f"allows at most {MAX_MESSAGE_ID}")
        application_properties: dict[str | bytes, Any] = {
            k: v for k, v in (properties or {}).items()}
        await self._send(ServiceBusMessage(body, message_id=message_id, reply_to=reply_to,
                                           application_properties=application_properties))
        return message_id

    async def dead_letters(self, limit: int = 100) -> list[DeadLettered]:
        """Peek at up to ``limit`` dead-lettered messages, oldest first, locking nothing."""
        found: list[DeadLettered] = []
        receiver = self._new_receiver(sub_queue=ServiceBusSubQueue.DEAD_LETTER)
        try:
            await self._open(receiver)
            while len(found) < limit:
                batch = await self._bounded(
                    receiver.peek_messages(max_message_count=limit - len(found)), "peek")
                if not batch:
                    break
                found.extend(_dead_lettered(m) for m in batch)
        except Exception as exc:
            raise classify_error(exc, "dead-letter peek") from exc
        finally:
            await self._quietly(receiver.close(), "dead-letter receiver")
        return found

    async def resubmit(self, sequence_number: int) -> str | None:
        """Send a copy of a dead-lettered message to the main entity and, once the
        service has accepted it, complete the dead-lettered one.

        The copy has a NEW message id (duplicate detection would drop a copy with the
        original id within its window, and the message would then be in neither queue)
        and carries the original message id in ``fanout-idempotency-key`` (unless it has
        one already), which routing uses as the key in place of the message id: the copy
        maps to the same job. Body, application properties, content type, correlation id,
        subject and ReplyTo are kept; the dead-letter properties are not.

        For a subscription the copy goes to the topic, so every subscription whose filter
        matches receives it. Returns the copy's message id, or None if no such message.
        If the send fails the dead letter stays where it was.
        """
        receiver = self._new_receiver(sub_queue=ServiceBusSubQueue.DEAD_LETTER)
        held: list[ServiceBusReceivedMessage] = []
        try:
            await self._open(receiver)
            target = await self._find_dead_lettered(receiver, sequence_number, held)
            if target is None:
                return None
            copy = self._copy(target)
            await self._send(copy)  # raises unless the service accepted the copy
            await self._bounded(receiver.complete_message(target), "dead-letter complete")
            return str(copy.message_id)
        except Exception as exc:
            raise classify_error(exc, "resubmit") from exc
        finally:
            for message in held:
                await self._quietly(receiver.abandon_message(message), "dead-letter abandon")
            await self._quietly(receiver.close(), "dead-letter receiver")

    async def close(self) -> None:
        """Close every receiver, the sender and the clients. Locks held lapse on the
        service and those messages are delivered again."""
        self._closed = True
        # Concurrently: each close drains its link, which takes the SDK up to a second.
        await asyncio.gather(*(self._drop_receiver(slot) for slot in self._slots))
        self._slots.clear()
        if self._sender is not None:
            await self._quietly(self._sender.close(), "sender")
            self._sender = None
        if self._admin is not None:
            await self._quietly(self._admin.close(), "administration client")
            self._admin = None
        if self._client is not None:
            await self._quietly(self._client.close(), "client")
            self._client = None
        if self._owns_credential and self._credential is not None:
            await self._quietly(self._credential.close(), "credential")
            self._credential = None

    # ---------------------------------------------------------------- clients

    def _emulator(self) -> bool:
        secret = self._config.connection_string
        if secret is None:
            return False
        pairs = (part.split("=", 1) for part in secret.get_secret_value().split(";"))
        settings = {p[0].strip().lower(): p[1].strip() for p in pairs if len(p) == 2}
        return settings.get("usedevelopmentemulator", "").lower() == "true"

    def _token_credential(self) -> AsyncTokenCredential:
        if self._credential is None:
            self._credential = default_credential(self._config)
        return self._credential

    def _sb_client(self) -> ServiceBusClient:
        if self._closed:
            raise SystemFault("service bus source is closed")
        if self._client is None:
            self._client = new_client(self._config, self._options, self._token_credential)
        return self._client

    def _admin_client(self) -> ServiceBusAdministrationClient:
        if self._admin is None:
            secret = self._config.connection_string
            if secret is not None:
                extra: dict[str, Any] = {}
                if self._emulator():
                    extra["transport"] = _EmulatorTransport(self._emulator_admin_port)
                self._admin = ServiceBusAdministrationClient.from_connection_string(
                    secret.get_secret_value(), **self._options, **extra)
            else:
                assert self._config.namespace is not None
                self._admin = ServiceBusAdministrationClient(
                    _namespace_host(self._config.namespace), self._token_credential(),
                    **self._options)
        return self._admin

    def _new_receiver(self, *, sub_queue: ServiceBusSubQueue | None = None,
                      prefetch: int = 0) -> ServiceBusReceiver:
        client = self._sb_client()
        options: dict[str, Any] = {"receive_mode": ServiceBusReceiveMode.PEEK_LOCK,
                                   "prefetch_count": prefetch, "sub_queue": sub_queue}
        if self._topic and self._subscription:
            return client.get_subscription_receiver(self._topic, self._subscription, **options)
        assert self._queue is not None
        return client.get_queue_receiver(self._queue, **options)

    async def _send(self, message: ServiceBusMessage) -> None:
        async with self._sender_lock:
            if self._sender is None:
                client = self._sb_client()
                self._sender = client.get_topic_sender(self._topic) if self._topic \
                    else client.get_queue_sender(self._queue or "")
            try:
                await self._bounded(self._sender.send_messages(message), "send")
            except Exception as exc:
                fault = classify_error(exc, "send", self._what())
                if not isinstance(fault, LockLost):
                    await self._quietly(self._sender.close(), "sender")
                    self._sender = None
                raise fault from exc

    # ---------------------------------------------------------------- the receiver pool

    def _checkout(self) -> _Slot:
        """A receiver for one receive call: an idle one, else a new one, else (at
        ``max_receivers``) the free one with the fewest unsettled messages."""
        free = [slot for slot in self._slots if not slot.busy]
        idle = sorted((slot for slot in free if slot.outstanding <= 0),
                      key=lambda slot: slot.receiver is None)
        if idle:
            slot = idle[0]
        elif free and len(self._slots) >= self._max_receivers:
            slot = min(free, key=lambda slot: slot.outstanding)
        else:
            slot = _Slot()
            self._slots.append(slot)
        slot.busy = True
        return slot

    async def _backed_off(self, max_wait: float) -> bool:
        """Wait out the backoff after a fault, at most ``max_wait`` s; True when over."""
        loop = asyncio.get_running_loop()
        wait = self._not_before - loop.time()
        if wait > 0:
            await asyncio.sleep(min(wait, max_wait))
        return self._not_before <= loop.time()

    async def _ready_receiver(self, slot: _Slot) -> ServiceBusReceiver:
        """The slot's receiver; a new one (a new generation) after it was dropped."""
        if slot.receiver is None:
            slot.receiver = self._new_receiver(prefetch=self._config.prefetch)
            slot.generation += 1
            slot.outstanding = 0
            await self._open(slot.receiver)
            slot.heard = asyncio.get_running_loop().time()
        return slot.receiver

    async def _open(self, receiver: ServiceBusReceiver) -> None:
        """Open the link now, bounded by ``open_timeout``: left to ``receive_messages``,
        the open would have to fit in the receive's ``max_wait``."""
        try:
            await asyncio.wait_for(receiver.__aenter__(), self._open_timeout)
        except TimeoutError as exc:
            raise TimeoutError(f"opening a link to {self.name} took over "
                               f"{self._open_timeout:g} s") from exc

    async def _fail(self, slot: _Slot, exc: Exception, action: str) -> FanoutError:
        """Classify ``exc``; drop the receiver and back off after a failed receive, or
        after a settlement or renewal that failed because the connection did."""
        fault = classify_error(exc, action, self._what())
        if isinstance(fault, LockLost):
            return fault
        if action != "receive" and not isinstance(exc, _BROKEN_LINK):
            return fault  # e.g. a renewal timed out on a link that is still up
        self._failures += 1
        delay = min(self._backoff_max, self._backoff_base * 2 ** (self._failures - 1))
        delay *= random.uniform(0.5, 1.0)
        self._not_before = asyncio.get_running_loop().time() + delay
        if isinstance(fault, SystemFault):
            fault.retry_after = delay
        log.warning("servicebus.receiver_reset", entity=self.name, action=action,
                    error=str(fault), failures=self._failures, backoff=round(delay, 3))
        await self._drop_receiver(slot)
        return fault

    async def _drop_receiver(self, slot: _Slot) -> None:
        receiver, slot.receiver = slot.receiver, None
        if receiver is not None:
            await self._quietly(receiver.close(), "receiver")

    # ---------------------------------------------------------------- settlement

    @staticmethod
    def _handle(msg: Received) -> _Handle:
        if not isinstance(msg.handle, _Handle):
            raise TypeError("this message was not received from a ServiceBusSource")
        return msg.handle

    @staticmethod
    def _receiver_of(handle: _Handle, action: str) -> ServiceBusReceiver:
        slot = handle.slot
        if slot.receiver is None or handle.generation != slot.generation:
            raise LockLost(f"service bus {action} failed: the receiver that locked the "
                           "message was closed or reconnected")
        return slot.receiver

    async def _settle(self, msg: Received, action: str,
                      operation: Callable[[ServiceBusReceiver, ServiceBusReceivedMessage],
                                          Awaitable[None]]) -> None:
        handle = self._handle(msg)
        slot = handle.slot
        try:
            async with slot.lock:
                receiver = self._receiver_of(handle, action)
                try:
                    await self._bounded(operation(receiver, handle.message), action)
                except Exception as exc:
                    if isinstance(classify_error(exc, action), LockLost) \
                            and _link_closed(receiver):
                        # The SDK shut the handler: reopen on the next receive.
                        await self._drop_receiver(slot)
                    raise await self._fail(slot, exc, action) from exc
        finally:
            if not handle.settled and handle.generation == slot.generation:
                slot.outstanding -= 1
            handle.settled = True

    # ---------------------------------------------------------------- dead-letter queue

    async def _find_dead_lettered(self, receiver: ServiceBusReceiver, sequence_number: int,
                                  held: list[ServiceBusReceivedMessage]
                                  ) -> ServiceBusReceivedMessage | None:
        """Lock dead-lettered messages, oldest first, until ``sequence_number`` turns up.

        The others stay locked in ``held`` (so the next receive moves on past them)
        until the caller abandons them.
        """
        peeked = await receiver.peek_messages(max_message_count=1,
                                              sequence_number=sequence_number)
        if not peeked or peeked[0].sequence_number != sequence_number:
            return None
        while len(held) < MAX_RESUBMIT_SCAN:
            batch = await receiver.receive_messages(max_message_count=RESUBMIT_BATCH,
                                                    max_wait_time=self._resubmit_wait)
            if not batch:
                return None
            target = next((m for m in batch if m.sequence_number == sequence_number), None)
            held.extend(m for m in batch if m is not target)
            if target is not None:
                return target
        return None

    @staticmethod
    def _copy(message: ServiceBusReceivedMessage) -> ServiceBusMessage:
        properties: dict[str | bytes, Any] = {
            k: v for k, v in (message.application_properties or {}).items()
            if _text(k) not in _DEAD_LETTER_PROPERTIES}
        original = _message_id(message)
        if original and not any(_text(k) == IDEMPOTENCY_KEY_PROPERTY for k in properties):
            properties[IDEMPOTENCY_KEY_PROPERTY] = original
        return ServiceBusMessage(
            _body(message), message_id=uuid.uuid4().hex,
            application_properties=properties, content_type=message.content_type,
            correlation_id=message.correlation_id, subject=message.subject,
            reply_to=message.reply_to)

    # ---------------------------------------------------------------- helpers

    def _what(self) -> str:
        return (f"subscription {self._subscription!r} of topic {self._topic!r}"
                if self._topic else f"queue {self._queue!r}")

    async def _bounded(self, awaitable: Awaitable[Any], what: str,
                       timeout: float | None = None) -> Any:
        """Await an SDK call for at most ``timeout`` (``operation_timeout``) seconds; a
        call that does not answer (a half-open connection) raises ``TimeoutError``."""
        limit = self._timeout if timeout is None else timeout
        try:
            return await asyncio.wait_for(awaitable, limit)
        except TimeoutError as exc:
            raise TimeoutError(f"{what} on {self.name} had no answer within {limit:g} s "
                               "(a silent connection?)") from exc

    async def _quietly(self, awaitable: Awaitable[Any], what: str) -> None:
        """Await a clean-up step (bounded); log (never raise) what goes wrong."""
        try:
            await asyncio.wait_for(awaitable, self._timeout)
        except Exception as exc:
            log.warning("servicebus.close_failed", entity=self.name, what=what,
                        error=_describe(exc))
