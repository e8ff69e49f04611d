"""The Source protocol: a peek-lock queue the consumer receives messages from.

Implementations: ``local.py`` (durable SQLite, the embedded default) and
``servicebus.py`` (Azure Service Bus). The consumer knows only this protocol.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, Protocol, get_args

#: Queue depth states reported by ``Source.depth`` (a subset per implementation).
DEPTH_STATES = ("active", "dead_letter", "scheduled", "transfer")
#: How a message is settled: the name of the ``Source`` method the consumer calls
#: (``complete``, ``dead_letter``, ``abandon``), and the ``action`` label of
#: ``fanout_settle_failures_total``.
SettleAction = Literal["complete", "dead_letter", "abandon"]
SETTLE_ACTIONS: tuple[SettleAction, ...] = get_args(SettleAction)


@dataclass(slots=True)
class Received:
    """One locked message as the consumer sees it, whatever queue it came from.

    ``delivery_count`` counts earlier deliveries: 0 on the first delivery, as
    Service Bus reports it. ``handle`` is the implementation's own object.
    """

    body: bytes
    message_id: str | None
    delivery_count: int
    locked_until: datetime | None
    properties: Mapping[str, str] = field(default_factory=dict)
    sequence_number: int | None = None
    enqueued_time: datetime | None = None
    #: Service Bus's ``ReplyTo`` (the local queue keeps it too): where the sender
    #: wants the job's completion event, if the operator allows that entity.
    reply_to: str | None = None
    handle: Any = None


@dataclass(slots=True)
class DeadLettered:
    """A message in the dead-letter queue, for ``fanout dlq``."""

    message_id: str | None
    sequence_number: int | None
    reason: str | None
    description: str | None
    body: bytes
    properties: Mapping[str, str] = field(default_factory=dict)
    enqueued_time: datetime | None = None
    delivery_count: int = 0


class Source(Protocol):
    """A peek-lock queue. Every method may raise ``SystemFault`` on transient errors;
    settling a message whose lock is gone raises ``LockLost``."""

    @property
    def name(self) -> str:
        """The queue's name, used as the ``queue`` label of metrics."""
        ...

    @property
    def max_delivery_count(self) -> int:
        """Deliveries after which a failing message is dead-lettered."""
        ...

    async def receive(self, max_messages: int, max_wait: float) -> list[Received]:
        """Lock and return up to ``max_messages``, waiting at most ``max_wait`` s."""
        ...

    async def complete(self, msg: Received) -> None:
        """Remove a processed message."""
        ...

    async def abandon(self, msg: Received) -> None:
        """Release the lock so the message is delivered again (delivery count + 1)."""
        ...

    async def dead_letter(self, msg: Received, reason: str, description: str) -> None:
        """Move the message to the dead-letter queue with a reason and description."""
        ...

    async def renew_lock(self, msg: Received) -> datetime:
        """Extend the message's lock; return the new ``locked_until``."""
        ...

    async def depth(self) -> dict[str, int]:
        """Message counts by state (see ``DEPTH_STATES``)."""
        ...

    async def send(self, body: bytes, *, message_id: str | None = None,
                   properties: Mapping[str, str] | None = None) -> str:
        """Enqueue a message; return its message id."""
        ...

    async def dead_letters(self, limit: int = 100) -> list[DeadLettered]:
        """Peek at the dead-letter queue without locking anything."""
        ...

    async def resubmit(self, sequence_number: int) -> str | None:
        """Send a dead-lettered message's copy to the main queue and, once it is
        accepted, remove it from the dead-letter queue; return the copy's message id,
        None if absent. The copy has a new message id (duplicate detection would drop
        the original) and the original in the ``fanout-idempotency-key`` property."""
        ...

    async def probe(self) -> None:
        """A cheap call that raises ``ConfigFault`` while the queue cannot be used
        (a refused credential, a missing entity, one that requires sessions) and
        ``SystemFault`` while it cannot be reached; the consumer calls it at start and
        while unready."""
        ...

    async def check_capacity(self, concurrency: int) -> None:
        """Raise ``SettingsError`` for settings the queue cannot honour with
        ``concurrency`` receive loops (a prefetch not processable within the lock)."""
        ...

    async def close(self) -> None:
        """Release connections; pending locks lapse and messages are redelivered."""
        ...
