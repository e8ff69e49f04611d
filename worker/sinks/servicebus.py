"""Completion events to an Azure Service Bus queue or topic.

:class:`ServiceBusEventSink` sends each event as one ``ServiceBusMessage`` with
``message_id`` = the event id (so an entity with duplicate detection drops a repeat,
https://learn.microsoft.com/azure/service-bus-messaging/duplicate-detection),
``content_type`` ``application/cloudevents+json; charset=utf-8`` and the given
application properties, to ``[events] topic`` if set, else ``[events] queue``.

Credentials are the Service Bus source's: the ``[servicebus]`` connection string, or
Entra ID on ``[servicebus] namespace`` through ``DefaultAzureCredential`` (with
``managed_identity_client_id``); the client helpers are shared with
:mod:`worker.sources.servicebus`.

Reply-to. ``publish(..., to=entity)`` sends to that queue or topic instead (the
operator's ``allowed_reply_to`` is checked by the caller). Over AMQP a queue and a
topic are both addressed by their entity name, so one kind of sender serves either.
Senders are cached per entity.

Peek. ``peek`` reads the events queue without locking. A topic holds no messages
itself (its subscriptions do), so for a topic ``peek`` reads the subscription given
as ``peek_subscription`` and raises ``ConfigFault`` when none is.

Errors. A missing entity, or a credential refused, → ``ConfigFault`` whose description
names the entity and the cause; a message over the entity's size limit →
:class:`EventTooLarge` (a ``ConfigFault``) naming the limit; server busy, timeouts
and connection errors → ``SystemFault``. Descriptions never carry the connection
string or a signature.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import structlog
from azure.servicebus import ServiceBusMessage, ServiceBusReceiveMode
from azure.servicebus.exceptions import (
    MessageSizeExceededError,
    MessagingEntityDisabledError,
    MessagingEntityNotFoundError,
    ServiceBusAuthenticationError,
    ServiceBusAuthorizationError,
)

from worker.config import EventsConfig, ServiceBusConfig
from worker.errors import ConfigFault, FanoutError, SettingsError, SystemFault
from worker.sinks.base import CLOUDEVENTS_JSON, Published
from worker.sources.servicebus import (
    _body,
    _message_id,
    _properties,
    classify_error,
    default_credential,
    describe_error,
    new_client,
)

if TYPE_CHECKING:
    from azure.core.credentials_async import AsyncTokenCredential
    from azure.servicebus.aio import ServiceBusClient, ServiceBusReceiver, ServiceBusSender

__all__ = ["DEFAULT_MAX_MESSAGE_BYTES", "EventTooLarge", "ServiceBusEventSink"]

log = structlog.get_logger(__name__)

#: The Standard tier's largest message, 256 KB
#: (https://learn.microsoft.com/azure/service-bus-messaging/service-bus-quotas).
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024


class EventTooLarge(ConfigFault):
    """Raised when an event is larger than the destination accepts; the description
    names the limit. Retrying cannot help: the event must be made smaller."""

    def __init__(self, description: str) -> None:
        super().__init__(description, code="MessageSizeExceeded")


class ServiceBusEventSink:
    """The ``EventSink`` on Service Bus (see the module docstring).

    ``queue`` or ``topic`` (one of them) is the configured destination.
    ``max_message_bytes`` is checked before sending (the service's own limit is
    reported too, by :class:`EventTooLarge`). ``client_options`` go to the SDK client
    (e.g. ``retry_total``).
    """

    def __init__(self, *, servicebus: ServiceBusConfig, queue: str | None = None,
                 topic: str | None = None, peek_subscription: str | None = None,
                 credential: AsyncTokenCredential | None = None,
                 client_options: Mapping[str, Any] | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        if not servicebus.configured:
            raise SettingsError("servicebus: set namespace (Entra ID) or connection_string")
        if not (queue or topic):
            raise SettingsError("events: set queue or topic for Service Bus events")
        self._config = servicebus
        self._topic = topic or None
        self._queue = None if topic else queue
        self._peek_subscription = peek_subscription
        self._credential = credential
        self._owns_credential = credential is None
        self._options = dict(client_options or {})
        self._max_bytes = max_message_bytes
        self._client: ServiceBusClient | None = None
        self._senders: dict[str, ServiceBusSender] = {}
        self._lock = asyncio.Lock()
        self._peeker: ServiceBusReceiver | None = None
        self._closed = False

    @classmethod
    def from_config(cls, servicebus: ServiceBusConfig, events: EventsConfig,
                    **kwargs: Any) -> ServiceBusEventSink:
        """The sink ``[servicebus]`` (credentials) and ``[events]`` (entity) describe."""
        return cls(servicebus=servicebus, queue=events.queue, topic=events.topic, **kwargs)

    @property
    def destination(self) -> str:
        """The events topic's or queue's name."""
        return self._topic or self._queue or ""

    # ---------------------------------------------------------------- EventSink

    async def publish(self, body: bytes, *, message_id: str, to: str | None = None,
                      properties: Mapping[str, str] | None = None) -> None:
        """Send the event to the configured entity, or to ``to``."""
        entity = to or self.destination
        if len(body) > self._max_bytes:
            raise EventTooLarge(
                f"service bus events: event {message_id} is {len(body)} bytes, over the "
                f"{self._max_bytes}-byte limit of a message to {entity!r}")
        application_properties: dict[str | bytes, Any] = dict((properties or {}).items())
        message = ServiceBusMessage(bytes(body), message_id=message_id,
                                    content_type=CLOUDEVENTS_JSON,
                                    application_properties=application_properties)
        async with self._lock:
            sender = self._sender(entity)
            try:
                await sender.send_messages(message)
            except Exception as exc:
                self._senders.pop(entity, None)
                await self._quietly(sender.close(), "sender")
                raise self._fault(exc, "send", entity) from exc

    async def peek(self, limit: int = 100, *,
                   from_sequence: int | None = None) -> list[Published]:
        """Up to ``limit`` events on the events queue (or the topic's
        ``peek_subscription``), oldest first, from ``from_sequence`` on."""
        if self._topic and not self._peek_subscription:
            raise ConfigFault(f"service bus events: {self._topic!r} is a topic; peeking "
                              "needs one of its subscriptions (peek_subscription)",
                              code="PeekUnsupported")
        entity = f"{self._topic}/Subscriptions/{self._peek_subscription}" if self._topic \
            else self.destination
        found: list[Published] = []
        start = from_sequence or 1
        async with self._lock:
            try:
                receiver = await self._peek_receiver()
                while len(found) < limit:
                    batch = await receiver.peek_messages(max_message_count=limit - len(found),
                                                         sequence_number=start)
                    if not batch:
                        break
                    found.extend(_published(m) for m in batch)
                    start = max((m.sequence_number or 0) for m in batch) + 1
            except Exception as exc:
                if self._peeker is not None:
                    await self._quietly(self._peeker.close(), "peek receiver")
                    self._peeker = None
                raise self._fault(exc, "peek", entity) from exc
        return found

    async def close(self) -> None:
        """Close the senders, the peek receiver, the client and an own credential."""
        self._closed = True
        senders, self._senders = list(self._senders.values()), {}
        await asyncio.gather(*(self._quietly(s.close(), "sender") for s in senders))
        if self._peeker is not None:
            await self._quietly(self._peeker.close(), "peek receiver")
            self._peeker = None
        if self._client is not None:
            await self._quietly(self._client.close(), "client")
            self._client = None
        if self._owns_credential and self._credential is not None:
            await self._quietly(self._credential.close(), "credential")
            self._credential = None

    # ---------------------------------------------------------------- helpers

    def _token_credential(self) -> AsyncTokenCredential:
        if self._credential is None:
            self._credential = default_credential(self._config)
        return self._credential

    def _sb_client(self) -> ServiceBusClient:
        if self._closed:
            raise SystemFault("service bus event sink is closed")
        if self._client is None:
            self._client = new_client(self._config, self._options, self._token_credential)
        return self._client

    def _sender(self, entity: str) -> ServiceBusSender:
        sender = self._senders.get(entity)
        if sender is None:
            # A queue sender on a topic's name is a topic sender: both attach to <entity>.
            sender = self._sb_client().get_queue_sender(entity)
            self._senders[entity] = sender
        return sender

    async def _peek_receiver(self) -> ServiceBusReceiver:
        if self._peeker is None:
            client = self._sb_client()
            options: dict[str, Any] = {"receive_mode": ServiceBusReceiveMode.PEEK_LOCK,
                                       "prefetch_count": 0}
            if self._topic:
                assert self._peek_subscription is not None
                receiver = client.get_subscription_receiver(
                    self._topic, self._peek_subscription, **options)
            else:
                receiver = client.get_queue_receiver(self.destination, **options)
            await receiver.__aenter__()
            self._peeker = receiver
        return self._peeker

    def _fault(self, exc: BaseException, action: str, entity: str) -> FanoutError:
        """Map an SDK error onto fanout's errors with a description naming the cause."""
        where = f"service bus events {action} to {entity!r}" if action == "send" \
            else f"service bus events {action} of {entity!r}"
        detail = describe_error(exc)
        if isinstance(exc, MessageSizeExceededError):
            return EventTooLarge(f"{where}: the message is over the entity's size limit "
                                 f"({detail})")
        if isinstance(exc, MessagingEntityNotFoundError) or _token_not_found(exc):
            return ConfigFault(f"{where}: the entity does not exist on the namespace "
                               f"({detail})", code="MessagingEntityNotFound")
        if isinstance(exc, MessagingEntityDisabledError):
            return ConfigFault(f"{where}: the entity is disabled ({detail})",
                               code="MessagingEntityDisabled")
        if isinstance(exc, ServiceBusAuthenticationError | ServiceBusAuthorizationError):
            role, right = ("Sender", "Send") if action == "send" else ("Receiver", "Listen")
            return ConfigFault(f"{where}: the credential was refused; it needs the Azure "
                               f"Service Bus Data {role} role (or a {right} SAS rule) on "
                               f"the entity ({detail})", code=type(exc).__name__)
        fault = classify_error(exc, f"events {action} to {entity!r}")
        if isinstance(fault, ConfigFault | SystemFault):
            return fault
        return SystemFault(fault.args[0] if fault.args else where)

    async def _quietly(self, awaitable: Any, what: str) -> None:
        try:
            await awaitable
        except Exception as exc:
            log.warning("events.close_failed", destination=self.destination, what=what,
                        error=describe_error(exc))


def _token_not_found(exc: BaseException) -> bool:
    """The service refuses a token for an entity that does not exist with status 404
    ("The messaging entity ... could not be found"); the SDK raises that as a
    ``ServiceBusAuthenticationError`` (its put-token failed) whose inner exception
    carries the 404, not as not-found."""
    if not isinstance(exc, ServiceBusAuthenticationError):
        return False
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        if getattr(current, "status_code", None) == 404 or "could not be found" in str(current):
            return True
        current = getattr(current, "inner_exception", None) or current.__cause__ \
            or current.__context__
    return False


def _published(message: Any) -> Published:
    return Published(message_id=_message_id(message), body=_body(message),
                     sequence_number=message.sequence_number,
                     enqueued_time=message.enqueued_time_utc,
                     properties=_properties(message.application_properties))
