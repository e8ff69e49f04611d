"""A small AMQP 1.0 **test peer** that speaks enough of Azure Service Bus's dialect for the
real ``azure-servicebus`` SDK (sync and async clients) to talk to it.

This is a test fixture, not a product and not an emulator: one process, plain TCP, no
TLS, every SAS token accepted, no sessions, no scheduling, no transactions, no filters,
no persistence. It exists so that fanout's Service Bus source and event sink can be
tested through the real SDK in every CI run, offline. The wire facts it relies on are
given where they are used, each with its source.

Clients connect with::

    Endpoint=sb://127.0.0.1:<port>;SharedAccessKeyName=k;SharedAccessKey=x;UseDevelopmentEmulator=true

What it does:

- SASL ANONYMOUS and the ``$cbs`` put-token exchange: every token is accepted (202),
  but a token for an entity that does not exist is answered 404 "The messaging entity
  '...' could not be found", as the service does: that is where a client first learns
  of a missing entity (the SDK raises ``ServiceBusAuthenticationError`` carrying the
  404; https://learn.microsoft.com/azure/service-bus-messaging/service-bus-messaging-exceptions
  under MessagingEntityNotFoundException).
- Sender links to queues and topics. A topic copies each message to every one of its
  subscriptions (no filter rules: each subscription has the default ``1=1`` filter,
  https://learn.microsoft.com/azure/service-bus-messaging/topic-filters). The SDK's
  subscription receiver attaches to ``<topic>/Subscriptions/<subscription>`` (the
  entity path ``get_subscription_receiver`` builds, and the path the administration
  API uses); a queue or topic sender to ``<entity>``.
  ``send_messages([...])`` batches (message-format 0x80013700, recognised by their
  shape since proton hides the format).
- Duplicate detection per queue or topic (``requires_duplicate_detection``): a message
  whose MessageId was sent to the entity within its
  ``duplicate_detection_history_time_window`` (10 minutes unless given) is accepted
  and silently dropped; on a topic, before it is copied to any subscription
  (https://learn.microsoft.com/azure/service-bus-messaging/duplicate-detection).
- The Standard tier's limits, on unless a test turns them off
  (https://learn.microsoft.com/azure/service-bus-messaging/service-bus-quotas):
  a transfer over ``max_message_size`` (256 KB, the whole encoded message: the size
  "includes the size of properties (system and user) and the size of payload") is
  rejected with ``amqp:link:message-size-exceeded`` and the service's wording "The
  received message (size: N bytes) exceeds the limit (M bytes) currently allowed on the
  link." (the SDK raises ``MessageSizeExceededError``, not retried). A message id over
  128 characters, an application property over 32 KB, or a header (message
  annotations, properties and application properties) over 64 KB is rejected with
  ``amqp:internal-error`` "The service was unable to process the request; please retry
  the operation.": the quotas page only says an exception is raised (.NET's
  ``SerializationException``), and that generic answer is what the service sends for an
  oversized property (https://github.com/Azure/azure-sdk-for-net/issues/15325); the
  SDK raises a plain ``ServiceBusError``. The SDK itself refuses a message id over
  128 characters before sending (``ValueError: message_id cannot be longer than 128
  characters.``, azure/servicebus/_common/message.py), so only a client that skips
  that check reaches the peer's rule.
- Sessions: a queue created with ``requires_session`` refuses a receive link without a
  session filter with ``amqp:not-allowed`` "It is not possible for an entity that
  requires sessions to create a non-sessionful message receiver." (the service's
  words and condition; https://learn.microsoft.com/azure/service-bus-messaging/message-sessions:
  a session-aware entity is received from with a session receiver only). The SDK
  raises ``ServiceBusError`` (``amqp:not-allowed`` is in its no-retry list). The peer
  has no sessions: a session receiver is refused with ``amqp:not-implemented``.
- Idle links: a receive or send link on which the client makes no call (no flow, no
  transfer, no disposition) for ``link_idle_timeout`` (10 minutes, as the service)
  is detached with ``amqp:link:detach-forced`` "... Detach origin:
  AmqpMessageConsumer.IdleTimerExpired: Idle timeout: 00:10:00." while the
  connection stays up (https://learn.microsoft.com/azure/service-bus-messaging/service-bus-amqp-troubleshoot).
  Messages locked on it stay locked until the lock expires; the SDK then fails every
  settlement of them locally: its link raises ``ValueError("Link already closed.")``
  (azure/servicebus/_pyamqp/aio/_receiver_async.py), which it does not retry through
  the management link (it does that only on ``RuntimeError``) and raises as
  ``ServiceBusError("Handler failed: Link already closed..")``, shutting the handler.
- Fault injection on send: ``busy_sends`` transfers are rejected with
  ``com.microsoft:server-busy`` (SDK ``ServiceBusServerBusyError``, retried by the
  SDK; ServerBusyException in
  https://learn.microsoft.com/azure/service-bus-messaging/service-bus-messaging-exceptions),
  ``quota_exceeded_sends`` with ``amqp:resource-limit-exceeded`` (SDK
  ``ServiceBusQuotaExceededError``, not retried; QuotaExceededException: the entity
  is at its maximum size).
- Receiver links in peek-lock (16-byte delivery tags = lock tokens, locked-until and
  sequence-number annotations, an explicit header delivery-count) and in
  receive-and-delete mode; ``<entity>/$DeadLetterQueue`` sub-queues.
- Dispositions: complete (accepted), abandon (modified), defer (modified,
  undeliverable-here), dead-letter (rejected with ``com.microsoft:dead-letter`` and
  DeadLetterReason/DeadLetterErrorDescription), release; each echoed back settled, as
  the SDK waits for. A settlement after the lock expired is answered
  ``com.microsoft:message-lock-lost``.
- Lock expiry redelivers with delivery count + 1; reaching the entity's max delivery
  count dead-letters with reason ``MaxDeliveryCountExceeded``, as the service does.
- ``$management``: renew-lock, peek-message, update-disposition.
- An HTTP server answering the administration client's entity GET (ATOM XML with the
  runtime counts) for ``get_queue_runtime_properties`` and
  ``get_subscription_runtime_properties``.
- A thread-safe API for tests: :meth:`ServiceBusPeer.counts`,
  :meth:`ServiceBusPeer.messages`, :meth:`ServiceBusPeer.put`,
  :meth:`ServiceBusPeer.drop_connections`, :meth:`ServiceBusPeer.detach_receivers`.

Run it by hand for a manual ``fanout run``::

    python -m tests.fakes.servicebus_peer --port 5672 --admin-port 5300 --queue fanout
"""

from __future__ import annotations

import argparse
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse
from xml.sax.saxutils import escape

import cproton
from proton import (
    UNDESCRIBED,
    Array,
    Condition,
    Connection,
    Data,
    Delivery,
    Described,
    Endpoint,
    Link,
    Message,
    int32,
    symbol,
    timestamp,
    uint,
    ulong,
)
from proton.handlers import FlowController
from proton.reactor import ApplicationEvent, Container, EventInjector

if TYPE_CHECKING:
    from proton._data import PythonAMQPData

__all__ = ["PeerMessage", "ServiceBusPeer"]

log = logging.getLogger(__name__)

DEAD_LETTER_SUFFIX = "/$DeadLetterQueue"
MANAGEMENT_SUFFIX = "/$management"
CBS_NODE = "$cbs"
TICK = 0.05  # seconds between lock-expiry sweeps
#: Standard tier limits (https://learn.microsoft.com/azure/service-bus-messaging/service-bus-quotas).
STANDARD_MAX_MESSAGE_SIZE = 256 * 1024
MAX_MESSAGE_ID_LENGTH = 128
MAX_PROPERTY_SIZE = 32 * 1024
MAX_HEADER_SIZE = 64 * 1024
#: The service detaches a link unused for 10 minutes
#: (https://learn.microsoft.com/azure/service-bus-messaging/service-bus-amqp-troubleshoot).
LINK_IDLE_TIMEOUT = 600.0
SESSION_REQUIRED = ("It is not possible for an entity that requires sessions to create a "
                    "non-sessionful message receiver.")
UNABLE_TO_PROCESS = "The service was unable to process the request; please retry the operation."
SESSION_FILTER = "com.microsoft:session-filter"
#: The service's default duplicate detection history time window: 10 minutes
#: (https://learn.microsoft.com/azure/service-bus-messaging/duplicate-detection).
DEFAULT_DUPLICATE_WINDOW = 600.0

_HEADER, _DELIVERY_ANNOTATIONS, _MESSAGE_ANNOTATIONS = 0x70, 0x71, 0x72
_PROPERTIES, _APPLICATION_PROPERTIES = 0x73, 0x74
_DATA, _SEQUENCE, _VALUE, _FOOTER = 0x75, 0x76, 0x77, 0x78
_SYMBOLIC_DESCRIPTORS = {
    "amqp:header:list": _HEADER,
    "amqp:delivery-annotations:map": _DELIVERY_ANNOTATIONS,
    "amqp:message-annotations:map": _MESSAGE_ANNOTATIONS,
    "amqp:properties:list": _PROPERTIES,
    "amqp:application-properties:map": _APPLICATION_PROPERTIES,
    "amqp:data:binary": _DATA,
    "amqp:amqp-sequence:list": _SEQUENCE,
    "amqp:amqp-value:*": _VALUE,
    "amqp:footer:map": _FOOTER,
}


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class PeerMessage:
    """A snapshot of one stored message, for tests to inspect."""

    entity: str
    sequence_number: int
    message_id: Any
    body: bytes
    properties: dict[str, Any]
    delivery_count: int
    state: str  # active | locked | deferred
    dead_letter_reason: str | None
    dead_letter_description: str | None
    reply_to: str | None = None
    content_type: str | None = None


@dataclass(slots=True)
class _Stored:
    """One message held by an entity: the client's sections plus the broker's state."""

    sequence_number: int
    enqueued_at: float
    annotations: dict[Any, Any]
    properties_raw: bytes
    application_properties: dict[str, Any]
    body_raw: bytes
    delivery_count: int = 0
    state: str = "active"
    lock_token: uuid.UUID | None = None
    locked_until: float = 0.0
    dead_letter_source: str | None = None


def _sections(encoded: bytes) -> list[tuple[int, bytes, Any]]:
    """Split an encoded AMQP message into (descriptor code, raw bytes, decoded value)."""
    out: list[tuple[int, bytes, Any]] = []
    offset = 0
    while offset < len(encoded):
        data = Data()
        used = data.decode(encoded[offset:])
        data.rewind()
        data.next()
        value = _own(data.get_object())
        code = -1
        if isinstance(value, Described):
            descriptor = value.descriptor
            if isinstance(descriptor, symbol):
                code = _SYMBOLIC_DESCRIPTORS.get(str(descriptor), -1)
            elif isinstance(descriptor, int):  # a ulong
                code = int(descriptor)
        out.append((code, bytes(encoded[offset:offset + used]), value))
        offset += used
    return out


def _own(value: Any) -> Any:
    """Copy binaries out of proton's buffer at once: its memoryviews go stale."""
    if isinstance(value, memoryview):
        return bytes(value)
    if isinstance(value, Described):
        return Described(value.descriptor, _own(value.value))
    if isinstance(value, dict):
        return {_own(k): _own(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_own(v) for v in value]
    return value


def _batch_parts(sections: list[tuple[int, bytes, Any]]) -> list[bytes] | None:
    """The encoded messages inside a batch envelope, or None if this is a plain message.

    Proton does not expose the transfer's message-format (0x80013700 for a batch), so a
    batch is recognised by its shape: an envelope (the SDK copies the first message's
    properties onto it) whose data sections are each a whole encoded message.
    """
    body = [(code, value) for code, _, value in sections if code >= _DATA]
    if not body or any(code != _DATA for code, _ in body):
        return None
    parts = [bytes(value.value) for _, value in body]
    try:
        if all(_sections(p) and _sections(p)[0][0] in range(_HEADER, _FOOTER) for p in parts):
            return parts
    except Exception:  # not AMQP inside: a plain message with data sections
        return None
    return None


def _stored_from(encoded: bytes, sequence_number: int) -> _Stored:
    annotations: dict[Any, Any] = {}
    application_properties: dict[str, Any] = {}
    properties_raw = b""
    body: list[bytes] = []
    for code, raw, value in _sections(encoded):
        if code == _MESSAGE_ANNOTATIONS:
            annotations = dict(value.value or {})
        elif code == _PROPERTIES:
            properties_raw = raw
        elif code == _APPLICATION_PROPERTIES:
            application_properties = dict(value.value or {})
        elif code in (_DATA, _SEQUENCE, _VALUE, _FOOTER):
            body.append(raw)
    return _Stored(sequence_number, time.time(), annotations, properties_raw,
                   application_properties, b"".join(body))


def _amqp_map(mapping: Mapping[str, Any]) -> dict[PythonAMQPData, PythonAMQPData]:
    """A copy of ``mapping`` typed as the AMQP map proton encodes."""
    return {key: value for key, value in mapping.items()}


def _message_properties(message: Message) -> dict[Any, Any]:
    """A decoded message's application properties, {} when it has none (proton's
    ``Message.__init__`` sets the attribute to None, so mypy infers only None)."""
    properties: dict[Any, Any] | None = message.properties
    return properties or {}


def _encoded(value: Any) -> bytes:
    data = Data()
    data.put_object(value)
    return bytes(data.encode())


def _ms(seconds: float) -> timestamp:
    return timestamp(int(seconds * 1000))


def _encode_for_delivery(stored: _Stored, *, locked: bool) -> bytes:
    """The message as the SDK expects it from the service."""
    # The header's delivery-count is written explicitly: proton omits a 0 and the SDK
    # then reports None.
    header = Described(ulong(_HEADER), [None, None, None, None, uint(stored.delivery_count)])
    annotations = dict(stored.annotations)
    annotations[symbol("x-opt-sequence-number")] = stored.sequence_number
    annotations[symbol("x-opt-enqueued-time")] = _ms(stored.enqueued_at)
    if locked:
        annotations[symbol("x-opt-locked-until")] = _ms(stored.locked_until)
    if stored.dead_letter_source:
        annotations[symbol("x-opt-deadletter-source")] = stored.dead_letter_source
    parts = [_encoded(header), _encoded(Described(ulong(_MESSAGE_ANNOTATIONS), annotations)),
             stored.properties_raw]
    if stored.application_properties:
        parts.append(_encoded(Described(ulong(_APPLICATION_PROPERTIES),
                                        _amqp_map(stored.application_properties))))
    parts.append(stored.body_raw)
    return b"".join(parts)


def _property(stored: _Stored, index: int) -> Any:
    """A field of the properties section: 0 message-id, 4 reply-to, 6 content-type."""
    if not stored.properties_raw:
        return None
    fields = _sections(stored.properties_raw)[0][2].value
    return fields[index] if fields and len(fields) > index else None


def _message_id(stored: _Stored) -> Any:
    return _property(stored, 0)


def _body_bytes(stored: _Stored) -> bytes:
    out = []
    for code, _, value in _sections(stored.body_raw) if stored.body_raw else []:
        if code == _DATA:
            out.append(bytes(value.value))
        elif code == _VALUE:
            inner = value.value
            out.append(inner if isinstance(inner, bytes) else str(inner).encode())
    return b"".join(out)


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


# --------------------------------------------------------------------------- entities


@dataclass(slots=True)
class _History:
    """Duplicate detection of one queue or topic: message ids by when first sent."""

    window: float
    sent: dict[Any, float] = field(default_factory=dict)

    def seen(self, message_id: Any, now: float) -> bool:
        """True if ``message_id`` was sent within the window; else log it as sent now.

        A dropped duplicate is not logged again: the window runs from the first send.
        """
        for old in [k for k, at in self.sent.items() if at <= now - self.window]:
            del self.sent[old]
        if message_id in self.sent:
            return True
        self.sent[message_id] = now
        return False


@dataclass(slots=True)
class _Entity:
    """A queue, a topic subscription, or one's dead-letter sub-queue."""

    path: str
    lock_duration: float
    max_delivery_count: int
    dead_letter: _Entity | None = None
    messages: dict[int, _Stored] = field(default_factory=dict)
    links: list[Link] = field(default_factory=list)

    def next_active(self) -> _Stored | None:
        for stored in self.messages.values():
            if stored.state == "active":
                return stored
        return None


def _path(address: str | None) -> str:
    """``amqps://host:port/q1/$DeadLetterQueue`` -> ``q1/$DeadLetterQueue``."""
    if not address:
        return ""
    if "://" in address:
        address = urlparse(address).path
    return unquote(address).strip("/")


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _raw_tag(delivery: Delivery) -> bytes:
    # Delivery.tag decodes the tag as UTF-8, which a random lock token is not.
    return bytes(cproton.bytes2pybytes(cproton.lib.pn_delivery_tag(delivery._impl)))


def _links(connection: Connection) -> Iterator[Link]:
    link = connection.link_head(0)
    while link is not None:
        yield link
        link = link.next(0)


# --------------------------------------------------------------------------- the peer


class ServiceBusPeer:
    """A Service Bus test peer on 127.0.0.1; :meth:`start` it, :meth:`stop` it.

    ``queues`` are created up front (more with :meth:`create_queue`, or any name on first
    use with ``auto_create``); ``topics`` maps a topic to its subscription names;
    ``requires_session`` names queues that require sessions.
    ``lock_duration`` and ``max_delivery_count`` are the entities' (the service's) settings.
    ``duplicate_detection`` maps queue or topic names to their duplicate detection
    history window in seconds (None: the service's default, 10 minutes); ``clock``
    is what that window is measured with. ``max_message_size`` (bytes; the Standard
    tier's 256 KB unless given, None: no limit) rejects larger transfers;
    ``property_limits`` the Standard tier's message id and property limits.
    ``link_idle_timeout`` (seconds, 10 minutes unless given, None: never) detaches a
    link the client has not used for that long.
    """

    def __init__(self, *, queues: Iterable[str] = ("fanout",),
                 topics: Mapping[str, Sequence[str]] | None = None,
                 lock_duration: float = 30.0, max_delivery_count: int = 10,
                 auto_create: bool = False, host: str = "127.0.0.1", port: int = 0,
                 admin_port: int | None = 0,
                 duplicate_detection: Mapping[str, float | None] | None = None,
                 max_message_size: int | None = STANDARD_MAX_MESSAGE_SIZE,
                 property_limits: bool = True,
                 link_idle_timeout: float | None = LINK_IDLE_TIMEOUT,
                 requires_session: Iterable[str] = (),
                 clock: Callable[[], float] = time.time) -> None:
        self.host = host
        self.port = port
        self.admin_port = admin_port
        self.lock_duration = lock_duration
        self.max_delivery_count = max_delivery_count
        self.auto_create = auto_create
        #: Answer this many ``$management`` requests with 503 server-busy (fault injection).
        self.busy_management = 0
        #: (audience, token) of every ``$cbs`` put-token, all accepted.
        self.cbs_tokens: list[tuple[str, str]] = []
        self.connections_opened = 0
        #: Messages dropped by duplicate detection.
        self.duplicates_dropped = 0
        self.max_message_size = max_message_size
        self.property_limits = property_limits
        self.link_idle_timeout = link_idle_timeout
        #: Reject this many transfers to a queue or topic with server-busy (injection).
        self.busy_sends = 0
        #: Reject this many transfers with resource-limit-exceeded (injection).
        self.quota_exceeded_sends = 0
        #: Links detached for idleness.
        self.idle_detaches = 0
        self.clock = clock
        self._sessionful: set[str] = set()
        self._histories: dict[str, _History] = {}
        self._lock = threading.RLock()
        self._entities: dict[str, _Entity] = {}
        self._topics: dict[str, list[_Entity]] = {}
        self._locks: dict[bytes, tuple[_Entity, int]] = {}
        self._sequence = 0
        self._handler = _Handler(self)
        self._container: Container | None = None
        self._injector: EventInjector | None = None
        self._thread: threading.Thread | None = None
        self._http: ThreadingHTTPServer | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        for name in queues:
            self.create_queue(name)
        for name in requires_session:
            self.create_queue(name, requires_session=True)
        for topic, subscriptions in (topics or {}).items():
            self.create_topic(topic, subscriptions)
        for entity, window in (duplicate_detection or {}).items():
            if entity.lower() not in self._entities and entity.lower() not in self._topics:
                raise ValueError(f"duplicate_detection names no queue or topic: {entity}")
            self._detect_duplicates(entity, True, window)

    # ---------------------------------------------------------------- lifecycle

    @property
    def connection_string(self) -> str:
        """A connection string the SDK accepts for this peer (the key is not checked)."""
        return (f"Endpoint=sb://{self.host}:{self.port};SharedAccessKeyName=peer;"
                "SharedAccessKey=bm90LWEtc2VjcmV0;UseDevelopmentEmulator=true")

    def start(self) -> ServiceBusPeer:
        """Listen on the AMQP (and admin HTTP) ports and run the reactor in a thread."""
        self.port = self.port or _free_port(self.host)
        self._container = Container(self._handler)
        self._container.container_id = "servicebus-peer"
        self._injector = EventInjector()
        self._container.selectable(self._injector)
        self._thread = threading.Thread(target=self._run, name="servicebus-peer", daemon=True)
        self._thread.start()
        if not self._ready.wait(10) or self._start_error is not None:
            raise RuntimeError(f"servicebus peer did not start: {self._start_error!r}")
        if self.admin_port is not None:
            self._http = ThreadingHTTPServer((self.host, self.admin_port), _admin_handler(self))
            self._http.daemon_threads = True
            self.admin_port = int(self._http.server_address[1])
            threading.Thread(target=self._http.serve_forever, args=(TICK,),
                             name="servicebus-peer-http", daemon=True).start()
        return self

    def _run(self) -> None:
        assert self._container is not None
        try:
            self._container.run()
        except BaseException as exc:  # surfaced by start() or logged at stop
            self._start_error = exc
            self._ready.set()
            log.exception("servicebus peer reactor stopped")

    def stop(self) -> None:
        """Close every connection, stop the reactor and the HTTP server, join the threads."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._thread is not None and self._injector is not None:
            self._injector.trigger(ApplicationEvent("peer_stop"))
            self._thread.join(10)
            self._injector.close()
            self._thread = None

    def __enter__(self) -> ServiceBusPeer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---------------------------------------------------------------- entities

    def create_queue(self, name: str, *, lock_duration: float | None = None,
                     max_delivery_count: int | None = None,
                     requires_duplicate_detection: bool = False,
                     duplicate_detection_history_time_window: float | None = None,
                     requires_session: bool = False) -> None:
        """Create a queue (and its dead-letter queue); existing queues are left alone.

        With ``requires_duplicate_detection`` a repeated message id within the window
        (seconds; 10 minutes by default, as on the service) is accepted and dropped.
        With ``requires_session`` receivers without a session are refused.
        """
        with self._lock:
            self._create(name, lock_duration, max_delivery_count)
            if requires_session:
                self._sessionful.add(name.lower())
            self._detect_duplicates(name, requires_duplicate_detection,
                                    duplicate_detection_history_time_window)

    def create_topic(self, topic: str, subscriptions: Sequence[str], *,
                     requires_duplicate_detection: bool = False,
                     duplicate_detection_history_time_window: float | None = None) -> None:
        """Create a topic whose messages are copied to each ``<topic>/Subscriptions/<sub>``
        (subscriptions added to an existing topic); duplicate detection as for queues,
        on the topic (the service has none on subscriptions)."""
        with self._lock:
            subs = self._topics.setdefault(topic.lower(), [])
            for sub in subscriptions:
                entity = self._create(f"{topic}/Subscriptions/{sub}", None, None)
                if entity not in subs:
                    subs.append(entity)
            self._detect_duplicates(topic, requires_duplicate_detection,
                                    duplicate_detection_history_time_window)

    def _detect_duplicates(self, entity: str, required: bool, window: float | None) -> None:
        if not required:
            return
        window = DEFAULT_DUPLICATE_WINDOW if window is None else window
        if window <= 0:
            raise ValueError("duplicate_detection_history_time_window must be > 0")
        self._histories[entity.lower()] = _History(window)

    def _create(self, path: str, lock_duration: float | None,
                max_delivery_count: int | None) -> _Entity:
        key = path.lower()
        if key in self._entities:
            return self._entities[key]
        lock = lock_duration or self.lock_duration
        deliveries = max_delivery_count or self.max_delivery_count
        dlq = _Entity(path + DEAD_LETTER_SUFFIX, lock, deliveries)
        entity = _Entity(path, lock, deliveries, dead_letter=dlq)
        self._entities[key] = entity
        self._entities[dlq.path.lower()] = dlq
        return entity

    def _entity(self, path: str) -> _Entity | None:
        entity = self._entities.get(path.lower())
        if entity is None and self.auto_create and path and "$" not in path.split("/")[0]:
            base = path[: -len(DEAD_LETTER_SUFFIX)] if path.lower().endswith(
                DEAD_LETTER_SUFFIX.lower()) else path
            self._create(base, None, None)
            entity = self._entities.get(path.lower())
        return entity

    def _known(self, path: str) -> bool:
        """Whether a token audience's path names an entity (or the namespace itself)."""
        for suffix in (MANAGEMENT_SUFFIX, DEAD_LETTER_SUFFIX):
            if path.lower().endswith(suffix.lower()):
                path = path[: -len(suffix)]
        return not path or path.lower() in self._topics or self._entity(path) is not None

    def _targets(self, path: str) -> list[_Entity] | None:
        """Where a message sent to ``path`` goes: the queue, or the topic's subscriptions."""
        topic = self._topics.get(path.lower())
        if topic is not None:
            return topic
        entity = self._entity(path)
        return [entity] if entity is not None and not entity.path.endswith(DEAD_LETTER_SUFFIX) \
            else None

    # ---------------------------------------------------------------- test API

    def counts(self, entity: str) -> dict[str, int]:
        """Messages of a queue by state: active, locked, deferred, dead_letter."""
        with self._lock:
            self._expire_locks()
            found = self._entities[entity.lower()]
            states = [m.state for m in found.messages.values()]
            return {
                "active": states.count("active"),
                "locked": states.count("locked"),
                "deferred": states.count("deferred"),
                "dead_letter": len(found.dead_letter.messages) if found.dead_letter else 0,
            }

    def messages(self, entity: str) -> list[PeerMessage]:
        """Snapshots of every message in ``entity`` (e.g. ``q/$DeadLetterQueue``)."""
        with self._lock:
            self._expire_locks()
            found = self._entities[entity.lower()]
            return [self._snapshot(found, m) for m in found.messages.values()]

    def dead_letters(self, queue: str) -> list[PeerMessage]:
        """Snapshots of the messages in ``queue``'s dead-letter queue."""
        return self.messages(queue + DEAD_LETTER_SUFFIX)

    def put(self, entity: str, body: bytes, *, message_id: str | None = None,
            properties: Mapping[str, Any] | None = None) -> list[int]:
        """Enqueue a message as if a client had sent it (or, for ``<q>/$DeadLetterQueue``,
        as if the service had dead-lettered it); returns its sequence numbers."""
        fields: list[PythonAMQPData] = [message_id] if message_id is not None else []
        raw = b"".join([
            _encoded(Described(ulong(_PROPERTIES), fields)) if fields else b"",
            _encoded(Described(ulong(_APPLICATION_PROPERTIES), _amqp_map(properties)))
            if properties else b"",
            _encoded(Described(ulong(_DATA), body)),
        ])
        with self._lock:
            sequence_numbers = self._enqueue(entity, raw, dead_letter_ok=True)
        self._wake()
        return sequence_numbers

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
        """Poll ``predicate`` until it holds or ``timeout`` passes; return its last value."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(TICK)
        return predicate()

    def drop_connections(self) -> None:
        """Close every client connection with ``amqp:connection:forced``, as the service
        does on maintenance; the clients must reconnect."""
        if self._injector is not None:
            done = threading.Event()
            self._injector.trigger(ApplicationEvent("peer_drop", subject=done))
            done.wait(10)

    def detach_receivers(self) -> None:
        """Detach every link clients receive on with ``amqp:link:detach-forced``, as the
        service does to links idle for 10 minutes; connections stay up."""
        if self._injector is not None:
            done = threading.Event()
            self._injector.trigger(ApplicationEvent("peer_detach", subject=done))
            done.wait(10)

    def _wake(self) -> None:
        if self._injector is not None:
            self._injector.trigger(ApplicationEvent("peer_pump"))

    def _snapshot(self, entity: _Entity, stored: _Stored) -> PeerMessage:
        props = stored.application_properties
        return PeerMessage(
            entity=entity.path, sequence_number=stored.sequence_number,
            message_id=_message_id(stored), body=_body_bytes(stored),
            properties=dict(props), delivery_count=stored.delivery_count, state=stored.state,
            dead_letter_reason=_text(props.get("DeadLetterReason")),
            dead_letter_description=_text(props.get("DeadLetterErrorDescription")),
            reply_to=_text(_property(stored, 4)), content_type=_text(_property(stored, 6)),
        )

    # ---------------------------------------------------------------- broker logic
    # Everything below runs under self._lock.

    def _enqueue(self, path: str, encoded: bytes, *, dead_letter_ok: bool = False) -> list[int]:
        found = self._entity(path)
        targets = [found] if dead_letter_ok and found is not None else self._targets(path)
        if targets is None:
            raise KeyError(path)
        parts = _batch_parts(_sections(encoded)) or [encoded]
        history = self._histories.get(path.lower())
        numbers = []
        for part in parts:
            if history is not None:
                message_id = _message_id(_stored_from(part, 0))
                # The service drops a repeat "instantly" after accepting the send
                # (docs above); a message without an id is never a duplicate.
                if message_id is not None and history.seen(message_id, self.clock()):
                    self.duplicates_dropped += 1
                    continue
            for entity in targets:
                self._sequence += 1
                entity.messages[self._sequence] = _stored_from(part, self._sequence)
                numbers.append(self._sequence)
        return numbers

    def _refusal(self, payload: bytes) -> tuple[str, str] | None:
        """Why a transfer to a queue or topic is rejected, as (condition, description):
        the injected faults, then the Standard tier's limits (module docstring)."""
        with self._lock:
            if self.busy_sends > 0:
                self.busy_sends -= 1
                return ("com.microsoft:server-busy", "The request was terminated because the "
                        "entity is being throttled. Please wait 10 seconds and try again.")
            if self.quota_exceeded_sends > 0:
                self.quota_exceeded_sends -= 1
                return ("amqp:resource-limit-exceeded", "The maximum entity size has been "
                        "reached or exceeded. Please wait and try again.")
        limit = self.max_message_size
        if limit is not None and len(payload) > limit:
            return ("amqp:link:message-size-exceeded",
                    f"The received message (size: {len(payload)} bytes) exceeds the limit "
                    f"({limit} bytes) currently allowed on the link.")
        if not self.property_limits:
            return None
        for part in _batch_parts(_sections(payload)) or [payload]:
            sections = _sections(part)
            header = sum(len(raw) for code, raw, _ in sections
                         if code in (_HEADER, _MESSAGE_ANNOTATIONS, _PROPERTIES,
                                     _APPLICATION_PROPERTIES))
            message_id = next((v.value[0] for code, _, v in sections
                               if code == _PROPERTIES and v.value), None)
            properties = next((dict(v.value or {}) for code, _, v in sections
                               if code == _APPLICATION_PROPERTIES), {})
            too_big = [k for k, v in properties.items()
                       if len(_encoded(k)) + len(_encoded(v)) > MAX_PROPERTY_SIZE]
            if (message_id is not None and len(str(_text(message_id))) > MAX_MESSAGE_ID_LENGTH) \
                    or too_big or header > MAX_HEADER_SIZE:
                return ("amqp:internal-error", UNABLE_TO_PROCESS)
        return None

    def _lock_message(self, entity: _Entity, stored: _Stored) -> bytes:
        stored.state = "locked"
        stored.lock_token = uuid.uuid4()
        stored.locked_until = time.time() + entity.lock_duration
        tag = stored.lock_token.bytes_le
        self._locks[tag] = (entity, stored.sequence_number)
        return tag

    def _locked(self, tag: bytes) -> tuple[_Entity, _Stored] | None:
        """The message this lock token still holds, after expiring what is due."""
        self._expire_locks()
        entry = self._locks.get(tag)
        if entry is None:
            return None
        entity, sequence_number = entry
        return entity, entity.messages[sequence_number]

    def _release_lock(self, stored: _Stored) -> None:
        if stored.lock_token is not None:
            self._locks.pop(stored.lock_token.bytes_le, None)
        stored.lock_token = None
        stored.locked_until = 0.0

    def _expire_locks(self) -> None:
        now = time.time()
        for entity, sequence_number in list(self._locks.values()):
            stored = entity.messages[sequence_number]
            if stored.locked_until <= now:
                self._abandon(entity, stored)

    def _complete(self, entity: _Entity, stored: _Stored) -> None:
        self._release_lock(stored)
        del entity.messages[stored.sequence_number]

    def _abandon(self, entity: _Entity, stored: _Stored) -> None:
        self._release_lock(stored)
        stored.delivery_count += 1
        stored.state = "active"
        if stored.delivery_count >= entity.max_delivery_count and entity.dead_letter is not None:
            self._dead_letter(entity, stored, "MaxDeliveryCountExceeded",
                              f"Message could not be consumed after "
                              f"{entity.max_delivery_count} delivery attempts.")

    def _release(self, entity: _Entity, stored: _Stored) -> None:
        self._release_lock(stored)
        stored.state = "active"

    def _defer(self, entity: _Entity, stored: _Stored) -> None:
        self._release_lock(stored)
        stored.state = "deferred"

    def _dead_letter(self, entity: _Entity, stored: _Stored, reason: str | None,
                     description: str | None) -> None:
        self._release_lock(stored)
        del entity.messages[stored.sequence_number]
        if entity.dead_letter is None:  # dead-lettering from a dead-letter queue: drop it
            return
        stored.state = "active"
        stored.dead_letter_source = entity.path
        if reason is not None:
            stored.application_properties["DeadLetterReason"] = reason
        if description is not None:
            stored.application_properties["DeadLetterErrorDescription"] = description
        entity.dead_letter.messages[stored.sequence_number] = stored
        entity.dead_letter.messages = dict(sorted(entity.dead_letter.messages.items()))

    def _settle(self, entity: _Entity, stored: _Stored, outcome: str,
                reason: str | None = None, description: str | None = None) -> None:
        """Apply one settlement outcome (complete | abandon | defer | dead-letter | release)."""
        actions: dict[str, Callable[[_Entity, _Stored], None]] = {
            "complete": self._complete, "abandon": self._abandon, "defer": self._defer,
            "release": self._release,
        }
        if outcome == "dead-letter":
            self._dead_letter(entity, stored, reason, description)
        else:
            actions[outcome](entity, stored)

    def _sorted_messages(self, entity: _Entity) -> list[_Stored]:
        return sorted(entity.messages.values(), key=lambda m: m.sequence_number)

    # ---------------------------------------------------------------- management

    def _management(self, entity: _Entity, operation: str,
                    body: Mapping[str, Any]) -> tuple[int, Any, str | None]:
        """Answer one ``$management`` request: (status code, body, error condition)."""
        if self.busy_management > 0:
            self.busy_management -= 1
            return 503, None, "com.microsoft:server-busy"
        if operation == "com.microsoft:renew-lock":
            return self._renew(body)
        if operation == "com.microsoft:peek-message":
            if entity.path.lower() in self._sessionful:
                # The service refuses a peek without a session too (as the receive link).
                return 400, None, "amqp:not-allowed"
            return self._peek(entity, body)
        if operation == "com.microsoft:update-disposition":
            return self._update_disposition(body)
        return 501, None, "com.microsoft:not-implemented"

    def _renew(self, body: Mapping[str, Any]) -> tuple[int, Any, str | None]:
        expirations = []
        for token in _elements(body.get("lock-tokens")):
            found = self._locked(_uuid(token).bytes_le)
            if found is None:
                return 410, None, "com.microsoft:message-lock-lost"
            entity, stored = found
            stored.locked_until = time.time() + entity.lock_duration
            expirations.append(_ms(stored.locked_until))
        # proton annotates Array's descriptor as AMQP data, though UNDESCRIBED (a Constant)
        # is its documented value for an undescribed array
        expiring = Array(UNDESCRIBED, Data.TIMESTAMP, *expirations)  # type: ignore[arg-type]
        return 200, {"expirations": expiring}, None

    def _peek(self, entity: _Entity, body: Mapping[str, Any]) -> tuple[int, Any, str | None]:
        start = int(body.get("from-sequence-number") or 0)
        count = int(body.get("message-count") or 1)
        found = [m for m in self._sorted_messages(entity) if m.sequence_number >= start][:count]
        if not found:
            return 204, None, None
        return 200, {"messages": [{"message": _encode_for_delivery(m, locked=False)}
                                  for m in found]}, None

    def _update_disposition(self, body: Mapping[str, Any]) -> tuple[int, Any, str | None]:
        outcome = {"completed": "complete", "abandoned": "abandon", "defered": "defer",
                   "suspended": "dead-letter"}.get(_text(body.get("disposition-status")) or "")
        if outcome is None:
            return 400, None, "amqp:invalid-field"
        for token in _elements(body.get("lock-tokens")):
            found = self._locked(_uuid(token).bytes_le)
            if found is None:
                return 410, None, "com.microsoft:message-lock-lost"
            self._settle(*found, outcome, _text(body.get("deadletter-reason")),
                         _text(body.get("deadletter-description")))
        return 200, {}, None


def _info() -> dict[PythonAMQPData, PythonAMQPData]:
    """An error's info map: pyamqp indexes it unconditionally."""
    return {symbol("com.microsoft:tracking-id"): str(uuid.uuid4())}


def _session_filter(link: Link) -> Any:
    """The session id a receive link's source filter asks for, or None."""
    try:
        filters = link.remote_source.filter
        filters.rewind()
        found = filters.get_object() if filters.next() else None
    except Exception:  # no filter set
        return None
    if isinstance(found, dict):
        for key, value in found.items():
            if str(key) == SESSION_FILTER:
                return value if value is not None else ""
    return None


def _elements(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, Array):
        return list(value.elements)
    return list(value)


def _uuid(value: Any) -> uuid.UUID:
    if isinstance(value, uuid.UUID):
        return value
    if isinstance(value, bytes):
        return uuid.UUID(bytes=value)
    return uuid.UUID(str(value))


# --------------------------------------------------------------------------- AMQP handler


_OUTCOMES: dict[int, str] = {
    Delivery.ACCEPTED: "complete",
    Delivery.RELEASED: "release",
}


class _Handler(FlowController):
    """The proton event handler: links, transfers, dispositions, timers. Reactor thread."""

    def __init__(self, peer: ServiceBusPeer) -> None:
        super().__init__(window=100)
        self.peer = peer
        self.connections: set[Connection] = set()
        self.replies: list[tuple[Connection, str, Message]] = []
        self.stopping = False

    # -- reactor

    def on_reactor_init(self, event: Any) -> None:
        peer = self.peer
        try:
            event.container.listen(f"{peer.host}:{peer.port}")
        except BaseException as exc:
            peer._start_error = exc
        peer._ready.set()
        event.container.schedule(TICK, self)

    def on_timer_task(self, event: Any) -> None:
        if self.stopping:
            return
        self._detach_idle()
        self.pump()
        event.container.schedule(TICK, self)

    def _detach_idle(self) -> None:
        """Detach the send and receive links unused for the idle timeout."""
        timeout = self.peer.link_idle_timeout
        if timeout is None:
            return
        now = time.monotonic()
        for connection in list(self.connections):
            for link in list(_links(connection)):
                node = getattr(link, "node", "")
                if node == CBS_NODE or node.endswith(MANAGEMENT_SUFFIX) \
                        or getattr(link, "entity", None) is None \
                        or not link.state & Endpoint.LOCAL_ACTIVE \
                        or now - getattr(link, "last_used", now) <= timeout:
                    continue
                self._forget(link)
                role = "receiver" if link.is_sender else "publisher"
                origin = "AmqpMessageConsumer" if link.is_sender else "AmqpMessagePublisher"
                minutes, seconds = divmod(int(timeout), 60)
                link.condition = Condition(
                    "amqp:link:detach-forced",
                    f"The link '{link.name}' is force detached by the broker due to errors "
                    f"occurred in {role}. Detach origin: {origin}.IdleTimerExpired: Idle "
                    f"timeout: 00:{minutes:02d}:{seconds:02d}.", _info())
                link.close()
                self.peer.idle_detaches += 1

    def on_peer_pump(self, event: Any) -> None:
        self.pump()

    def on_peer_drop(self, event: Any) -> None:
        for connection in list(self.connections):
            # With an info map: pyamqp indexes the error's third field unconditionally.
            connection.condition = Condition(
                "amqp:connection:forced", "the test peer dropped the connection",
                {symbol("com.microsoft:tracking-id"): str(uuid.uuid4())})
            connection.close()
        self.connections.clear()
        event.subject.set()

    def on_peer_detach(self, event: Any) -> None:
        with self.peer._lock:
            links = [link for entity in self.peer._entities.values() for link in entity.links]
        for link in links:
            self._forget(link)
            link.condition = Condition(
                "amqp:link:detach-forced", "the link was idle; the test peer detached it",
                {symbol("com.microsoft:tracking-id"): str(uuid.uuid4())})
            link.close()
        event.subject.set()

    def on_peer_stop(self, event: Any) -> None:
        self.stopping = True
        for connection in list(self.connections):
            connection.close()
        self.connections.clear()
        assert self.peer._container is not None
        self.peer._container.stop()

    # -- endpoints

    def on_connection_remote_open(self, event: Any) -> None:
        connection = event.connection
        if connection.state & Endpoint.LOCAL_UNINIT:
            connection.open()
        self.connections.add(connection)
        self.peer.connections_opened += 1

    def on_connection_remote_close(self, event: Any) -> None:
        self.connections.discard(event.connection)
        if not event.connection.state & Endpoint.LOCAL_CLOSED:
            event.connection.close()

    def on_transport_closed(self, event: Any) -> None:
        if event.connection is not None:
            self.connections.discard(event.connection)
            self._forget_links(event.connection)

    def on_session_remote_open(self, event: Any) -> None:
        if event.session.state & Endpoint.LOCAL_UNINIT:
            event.session.open()

    def on_session_remote_close(self, event: Any) -> None:
        if not event.session.state & Endpoint.LOCAL_CLOSED:
            event.session.close()

    def on_link_remote_open(self, event: Any) -> None:
        link = event.link
        if not link.state & Endpoint.LOCAL_UNINIT:
            return
        link.source.copy(link.remote_source)
        link.target.copy(link.remote_target)
        link.snd_settle_mode = link.remote_snd_settle_mode
        link.rcv_settle_mode = link.remote_rcv_settle_mode
        address = _path(link.remote_source.address if link.is_sender
                        else link.remote_target.address)
        link.node = address
        link.last_used = time.monotonic()
        error = self._bind(link, address)
        link.open()
        if error is not None:
            link.entity = None
            link.condition = Condition(*error, _info())
            link.close()
        elif link.is_sender:
            self.pump()
        super().on_link_remote_open(event)

    def _bind(self, link: Link, address: str) -> tuple[str, str] | None:
        """Attach the link to its node; return (condition, description) to refuse it."""
        link.entity = None
        missing = ("amqp:not-found", f"The messaging entity '{address}' could not be found.")
        if address == CBS_NODE or address.endswith(MANAGEMENT_SUFFIX):
            if address.endswith(MANAGEMENT_SUFFIX):
                with self.peer._lock:
                    link.entity = self.peer._entity(address[: -len(MANAGEMENT_SUFFIX)])
                if link.entity is None:
                    return missing
            return None
        with self.peer._lock:
            if link.is_sender:
                entity = self.peer._entity(address)
                if entity is not None and _session_filter(link) is not None:
                    return ("amqp:not-implemented", "the test peer has no sessions")
                if entity is not None and entity.path.lower() in self.peer._sessionful:
                    # The service's condition and words (see the module docstring).
                    return ("amqp:not-allowed", SESSION_REQUIRED)
                link.entity = entity
                if entity is not None:
                    entity.links.append(link)
            elif self.peer._targets(address) is not None:
                link.entity = address
        if link.entity is None:
            return missing
        return None

    def on_link_remote_close(self, event: Any) -> None:
        self._forget(event.link)
        if not event.link.state & Endpoint.LOCAL_CLOSED:
            event.link.close()

    def _forget(self, link: Link) -> None:
        entity = getattr(link, "entity", None)
        if isinstance(entity, _Entity):
            with self.peer._lock:
                if link in entity.links:
                    entity.links.remove(link)
        # Messages this link holds stay locked until their lock expires, as on the service.

    def _forget_links(self, connection: Connection) -> None:
        for link in _links(connection):
            self._forget(link)

    # -- transfers

    def on_link_flow(self, event: Any) -> None:
        super().on_link_flow(event)
        event.link.last_used = time.monotonic()  # a receive call: the link is in use
        if event.link.is_sender:
            self.pump()

    def on_delivery(self, event: Any) -> None:
        super().on_delivery(event)
        delivery = event.delivery
        if delivery.link.connection.state & Endpoint.LOCAL_CLOSED:
            return  # frames that cross our close are ignored, as the service does
        delivery.link.last_used = time.monotonic()  # a send or a settlement
        if delivery.link.is_receiver:
            self._on_transfer(delivery)
        else:
            self._on_disposition(delivery)

    def _on_transfer(self, delivery: Delivery) -> None:
        if not delivery.readable or delivery.partial:
            return
        link = delivery.link
        payload = bytes(link.recv(delivery.pending) or b"")  # copy at once: proton reuses it
        link.advance()
        node = link.node
        if link.state & Endpoint.LOCAL_CLOSED:
            # A transfer on a link the peer refused (e.g. no such entity) that crossed
            # the detach: left unanswered, the sender fails with the detach's error, as
            # with the service.
            return
        try:
            if node == CBS_NODE:
                self._answer_cbs(link, payload)
            elif node.endswith(MANAGEMENT_SUFFIX):
                self._answer_management(link, payload)
            else:
                refusal = self.peer._refusal(payload)
                if refusal is not None:
                    # pyamqp indexes the error's info field unconditionally.
                    delivery.local.condition = Condition(*refusal, _info())
                    delivery.update(Delivery.REJECTED)
                    delivery.settle()
                    return
                with self.peer._lock:
                    self.peer._enqueue(node, payload)
                self.pump()
            delivery.update(Delivery.ACCEPTED)
        except Exception as exc:
            log.exception("servicebus peer could not take a transfer on %s", node)
            delivery.local.condition = Condition("amqp:internal-error", str(exc))
            delivery.update(Delivery.REJECTED)
        delivery.settle()

    def _on_disposition(self, delivery: Delivery) -> None:
        state = delivery.remote_state
        terminal = (Delivery.ACCEPTED, Delivery.REJECTED, Delivery.RELEASED, Delivery.MODIFIED)
        if getattr(delivery, "answered", False) or state not in terminal:
            return
        with self.peer._lock:
            found = self.peer._locked(_raw_tag(delivery))
            if found is not None:
                entity, stored = found
                outcome, reason, description = self._outcome(delivery)
                self.peer._settle(entity, stored, outcome, reason, description)
        delivery.answered = True
        if delivery.settled:  # settled by the client already: nothing to echo
            delivery.settle()
            self.pump()
            return
        if found is None:
            delivery.local.condition = Condition(
                "com.microsoft:message-lock-lost",
                "The lock supplied is invalid. Either the lock expired, or the message "
                "has already been removed from the queue.")
            delivery.update(Delivery.REJECTED)
        else:
            # The SDK waits for the service to settle with the outcome it asked for.
            if state == Delivery.MODIFIED:
                delivery.local.failed = delivery.remote.failed
                delivery.local.undeliverable = delivery.remote.undeliverable
            delivery.update(state)
        delivery.settle()
        self.pump()

    @staticmethod
    def _outcome(delivery: Delivery) -> tuple[str, str | None, str | None]:
        state = delivery.remote_state
        if state == Delivery.REJECTED:
            condition = delivery.remote.condition
            info = condition.info if condition is not None else None
            if not isinstance(info, dict):
                info = {}
            return ("dead-letter", _text(info.get(symbol("DeadLetterReason"),
                                                  info.get("DeadLetterReason"))),
                    _text(info.get(symbol("DeadLetterErrorDescription"),
                                   info.get("DeadLetterErrorDescription"))))
        if state == Delivery.MODIFIED:
            return ("defer" if delivery.remote.undeliverable else "abandon"), None, None
        return _OUTCOMES[state], None, None

    def pump(self) -> None:
        """Deliver what there is to every receiving link with credit; send queued replies."""
        with self.peer._lock:
            self.peer._expire_locks()
            for entity in list(self.peer._entities.values()):
                for link in list(entity.links):
                    self._feed(entity, link)
        self._flush_replies()

    def _feed(self, entity: _Entity, link: Link) -> None:
        if not link.state & Endpoint.LOCAL_ACTIVE or link.state & Endpoint.REMOTE_CLOSED:
            return
        presettled = link.remote_snd_settle_mode == Link.SND_SETTLED
        while link.credit > 0:
            stored = entity.next_active()
            if stored is None:
                break
            if presettled:  # receive-and-delete
                del entity.messages[stored.sequence_number]
                # proton annotates the tag as str; AMQP tags are binary (a random tag here)
                delivery = link.delivery(uuid.uuid4().bytes_le)  # type: ignore[arg-type]
                link.send(_encode_for_delivery(stored, locked=False))
                link.advance()
                delivery.settle()
            else:
                tag = self.peer._lock_message(entity, stored)
                link.delivery(tag)  # type: ignore[arg-type]  # the lock token's 16 bytes
                link.send(_encode_for_delivery(stored, locked=True))
                link.advance()
        if link.drain_mode:
            link.drained()

    # -- request/reply nodes

    def _answer_cbs(self, link: Link, payload: bytes) -> None:
        request = Message()
        request.decode(payload)
        audience = _text(_message_properties(request).get("name")) or ""
        with self.peer._lock:
            self.peer.cbs_tokens.append((audience, _text(request.body) or ""))
            known = self.peer._known(_path(audience))
        if known:
            self._reply(link, CBS_NODE, request, 202, "Accepted", None, None)
        else:
            self._reply(link, CBS_NODE, request, 404,
                        f"The messaging entity '{audience}' could not be found. To know "
                        "more visit https://aka.ms/sbResourceMgrExceptions.", None, None)

    def _answer_management(self, link: Link, payload: bytes) -> None:
        request = Message()
        request.decode(payload)
        props = {str(k): v for k, v in _message_properties(request).items()}
        body = {str(k): v for k, v in (request.body or {}).items()} \
            if isinstance(request.body, dict) else {}
        with self.peer._lock:
            status, answer, condition = self.peer._management(
                link.entity, str(props.get("operation")), body)
        reply_to = _path(request.reply_to) or link.node
        description = SESSION_REQUIRED if condition == "amqp:not-allowed" else \
            "OK" if status < 300 else "Failed"
        self._reply(link, reply_to, request, status, description,
                    condition, answer, status_key="statusCode")
        self.pump()

    def _reply(self, link: Link, address: str, request: Message, status: int,
               description: str, condition: str | None, body: Any,
               status_key: str = "status-code") -> None:
        prefix = "status" if status_key == "statusCode" else "status-"
        properties: dict[str, Any] = {
            status_key: int32(status),
            (prefix + "Description" if prefix == "status" else prefix + "description"):
                description,
        }
        if condition:
            properties["errorCondition"] = symbol(condition)
        reply = Message(correlation_id=request.id, properties=properties, body=body)
        self.replies.append((link.connection, address, reply))
        self._flush_replies()

    def _flush_replies(self) -> None:
        waiting = []
        for connection, address, reply in self.replies:
            target = next((lk for lk in _links(connection) if lk.is_sender
                           and _path(lk.remote_source.address) == address
                           and lk.state & Endpoint.LOCAL_ACTIVE), None)
            if target is None or target.credit <= 0:
                if connection.state & Endpoint.LOCAL_ACTIVE:
                    waiting.append((connection, address, reply))
                continue
            delivery = target.send(reply)
            delivery.settle()
        self.replies = waiting


# --------------------------------------------------------------------------- admin HTTP

_ENTRY = """<?xml version="1.0" encoding="utf-8"?>
<entry xmlns="http://www.w3.org/2005/Atom">
<id>https://{host}/{path}?api-version=2021-05</id>
<title type="text">{name}</title>
<published>{now}</published><updated>{now}</updated>
<author><name>servicebus-peer</name></author>
<link rel="self" href="https://{host}/{path}?api-version=2021-05"/>
<content type="application/xml">
<{kind} xmlns="http://schemas.microsoft.com/netservices/2010/10/servicebus/connect"
 xmlns:i="http://www.w3.org/2001/XMLSchema-instance">
<LockDuration>PT{lock}S</LockDuration>
<MaxDeliveryCount>{max_delivery}</MaxDeliveryCount>
<SizeInBytes>0</SizeInBytes>
<MessageCount>{total}</MessageCount>
<CreatedAt>{now}</CreatedAt><UpdatedAt>{now}</UpdatedAt><AccessedAt>{now}</AccessedAt>
<CountDetails xmlns:d2p1="http://schemas.microsoft.com/netservices/2011/06/servicebus">
<d2p1:ActiveMessageCount>{active}</d2p1:ActiveMessageCount>
<d2p1:DeadLetterMessageCount>{dead_letter}</d2p1:DeadLetterMessageCount>
<d2p1:ScheduledMessageCount>0</d2p1:ScheduledMessageCount>
<d2p1:TransferMessageCount>0</d2p1:TransferMessageCount>
<d2p1:TransferDeadLetterMessageCount>0</d2p1:TransferDeadLetterMessageCount>
</CountDetails>
<Status>Active</Status>
</{kind}>
</content>
</entry>
"""


def _admin_handler(peer: ServiceBusPeer) -> type[BaseHTTPRequestHandler]:
    class AdminHandler(BaseHTTPRequestHandler):
        """``GET /<queue>`` and ``GET /<topic>/Subscriptions/<sub>``: runtime properties."""

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            path = _path(urlparse(self.path).path)
            with peer._lock:
                entity = peer._entities.get(path.lower())
                if entity is None or entity.path.endswith(DEAD_LETTER_SUFFIX):
                    self.send_error(404, "entity not found")
                    return
                counts = peer.counts(entity.path)
                kind = "SubscriptionDescription" if "/subscriptions/" in path.lower() \
                    else "QueueDescription"
                body = _ENTRY.format(
                    host=escape(self.headers.get("Host", "localhost")), path=escape(entity.path),
                    name=escape(entity.path.rsplit("/", 1)[-1]), kind=kind,
                    now=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                    lock=int(entity.lock_duration), max_delivery=entity.max_delivery_count,
                    total=counts["active"] + counts["locked"] + counts["deferred"],
                    # The service counts locked messages as active.
                    active=counts["active"] + counts["locked"], dead_letter=counts["dead_letter"],
                ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/atom+xml;type=entry;charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            log.debug("servicebus peer admin: " + format, *args)

    return AdminHandler


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> None:
    """Run the peer in the foreground until interrupted (for a manual ``fanout run``)."""
    parser = argparse.ArgumentParser(description="Service Bus AMQP test peer (not a product)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5672)
    parser.add_argument("--admin-port", type=int, default=5300)
    parser.add_argument("--queue", action="append", default=[])
    parser.add_argument("--lock-duration", type=float, default=30.0)
    parser.add_argument("--max-delivery-count", type=int, default=10)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    peer = ServiceBusPeer(queues=args.queue or ["fanout"], host=args.host, port=args.port,
                          admin_port=args.admin_port, lock_duration=args.lock_duration,
                          max_delivery_count=args.max_delivery_count)
    with peer:
        print(peer.connection_string, flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
