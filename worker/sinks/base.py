"""The EventSink protocol: where the job monitor publishes completion events.

Implementations: ``local.py`` (a second embedded SQLite queue, ``fanout.events`` by
default, with duplicate detection) and ``servicebus.py`` (a Service Bus queue or
topic). Events go out at least once; each carries a deterministic message id (the
event id), so a destination with duplicate detection drops repeats.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

#: The content type of a CloudEvents 1.0 event in structured JSON mode.
CLOUDEVENTS_JSON = "application/cloudevents+json; charset=utf-8"


@dataclass(slots=True)
class Published:
    """One event found on the events destination, for ``fanout events``."""

    message_id: str | None
    body: bytes
    sequence_number: int | None = None
    enqueued_time: datetime | None = None
    properties: Mapping[str, str] = field(default_factory=dict)


class EventSink(Protocol):
    """A destination for completion events. Methods raise ``SystemFault`` for
    transient failures and ``ConfigFault`` when the destination does not exist or
    the credential is refused."""

    @property
    def destination(self) -> str:
        """The configured destination's name (queue or topic), for logs and metrics."""
        ...

    async def publish(self, body: bytes, *, message_id: str, to: str | None = None,
                      properties: Mapping[str, str] | None = None) -> None:
        """Send one event with ``message_id`` to the configured destination, or to
        ``to`` (an entity the operator allowed as a reply-to)."""
        ...

    async def peek(self, limit: int = 100, *,
                   from_sequence: int | None = None) -> list[Published]:
        """Events on the configured destination without consuming them, oldest first,
        from ``from_sequence`` on (for ``fanout events`` and ``--follow``)."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...
