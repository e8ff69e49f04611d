"""The embedded events destination: a second SQLite queue, ``<home>/events.db``.

:class:`LocalEventSink` publishes each completion event to a
:class:`~worker.sources.local.LocalQueue` named by ``[events] queue`` (default
``fanout.events``) with duplicate detection over ``[events] duplicate_window``
seconds, so an event published twice (the monitor publishes at least once, with the
event id as message id) is there once, as on a Service Bus queue with duplicate
detection. Anything that reads a ``LocalQueue`` can consume the events; ``peek``
reads them without consuming (``fanout events``).

Reply-to. A local queue file holds one queue, so a reply-to entity ``to`` is a queue
of its own in the same directory: ``<home>/<to>.events.db`` (same duplicate
detection), created on first publish; :meth:`LocalEventSink.path_for` names the
file. ``to`` equal to the configured queue's name is the configured queue. A name
that is not a plain file name (a path separator, ``..``, a leading dot, characters
outside letters, digits and ``._-``) is refused with ``ConfigFault``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import structlog

from worker.config import EventsConfig
from worker.errors import ConfigFault
from worker.sinks.base import CLOUDEVENTS_JSON, Published
from worker.sources.local import LocalQueue

__all__ = ["EVENTS_FILE", "LocalEventSink"]

log = structlog.get_logger(__name__)

#: The events queue's file under the home directory.
EVENTS_FILE = "events.db"
#: A reply-to queue ``<to>`` lives in ``<to><REPLY_SUFFIX>`` next to it.
REPLY_SUFFIX = ".events.db"
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
#: The application property carrying the content type (a local queue has no
#: ContentType field of its own).
CONTENT_TYPE_PROPERTY = "content-type"


class LocalEventSink:
    """The ``EventSink`` on the embedded queue (see the module docstring).

    ``path`` is the events queue's file, ``name`` its queue name, ``duplicate_window``
    the duplicate detection window in seconds (None: off); ``clock`` is the queues'
    clock (epoch seconds).
    """

    def __init__(self, path: Path, name: str = "fanout.events",
                 duplicate_window: float | None = 600.0, *,
                 clock: Callable[[], float] = time.time) -> None:
        self._path = path
        self._clock = clock
        self._name = name
        self._window = duplicate_window
        self._queues: dict[str, LocalQueue] = {}

    @classmethod
    def from_config(cls, home: Path, events: EventsConfig) -> LocalEventSink:
        """The sink ``[events]`` describes, at ``<home>/events.db``."""
        return cls(home / EVENTS_FILE, events.queue or "fanout.events", events.duplicate_window)

    @property
    def destination(self) -> str:
        """The events queue's name."""
        return self._name

    def path_for(self, to: str | None = None) -> Path:
        """The file of the configured queue (``to`` None or its name) or of ``to``."""
        if to is None or to == self._name:
            return self._path
        if not _PLAIN_NAME.fullmatch(to) or ".." in to:
            raise ConfigFault(f"local events: reply-to {to!r} is not a plain queue name "
                              "(letters, digits, '.', '_', '-')", code="InvalidReplyTo")
        return self._path.parent / f"{to}{REPLY_SUFFIX}"

    def queue(self, to: str | None = None) -> LocalQueue:
        """The queue events for ``to`` go to (the configured one when None), opened once."""
        key = self._name if to is None else to
        queue = self._queues.get(key)
        if queue is None:
            queue = LocalQueue(path=self.path_for(to), name=key,
                               duplicate_window=self._window, clock=self._clock)
            self._queues[key] = queue
        return queue

    async def publish(self, body: bytes, *, message_id: str, to: str | None = None,
                      properties: Mapping[str, str] | None = None) -> None:
        """Enqueue the event; a message id already sent within the window is dropped."""
        props = {CONTENT_TYPE_PROPERTY: CLOUDEVENTS_JSON, **(properties or {})}
        queue = self.queue(to)
        if not await queue.sent(body, message_id=message_id, properties=props):
            log.debug("events.duplicate_dropped", queue=queue.name, message_id=message_id)

    async def peek(self, limit: int = 100, *,
                   from_sequence: int | None = None) -> list[Published]:
        """Events on the configured queue, oldest first, without consuming them."""
        found = await self.queue().peek(limit, from_sequence=from_sequence)
        return [Published(message_id=m.message_id, body=m.body,
                          sequence_number=m.sequence_number, enqueued_time=m.enqueued_time,
                          properties=dict(m.properties)) for m in found]

    async def close(self) -> None:
        """Close every queue opened."""
        queues, self._queues = list(self._queues.values()), {}
        for queue in queues:
            await queue.close()
