"""Tests of the embedded events destination (worker/sinks/local.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from worker.config import EventsConfig
from worker.errors import ConfigFault
from worker.sinks.base import CLOUDEVENTS_JSON
from worker.sinks.local import LocalEventSink
from worker.sources.local import LocalQueue

START = 1_700_000_000.0


class FakeClock:
    """A settable clock standing in for time.time."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    """The sink's clock."""
    return FakeClock()


@pytest.fixture
def sink(tmp_path: Path, clock: FakeClock) -> Iterator[LocalEventSink]:
    """A sink at <tmp>/home/events.db, default queue name, a 600 s window."""
    made = LocalEventSink(tmp_path / "home" / "events.db", "fanout.events", 600.0, clock=clock)
    yield made
    asyncio.run(made.close())


def run(coro: Any) -> Any:
    """Run one coroutine on a fresh event loop."""
    return asyncio.run(coro)


def test_from_config_names_the_file_and_queue(tmp_path: Path) -> None:
    """[events] queue names the queue; the file is <home>/events.db."""
    sink = LocalEventSink.from_config(tmp_path, EventsConfig(queue="done"))
    assert sink.destination == "done"
    assert sink.path_for() == tmp_path / "events.db"
    assert sink.path_for("done") == tmp_path / "events.db"
    assert sink.path_for("answers") == tmp_path / "answers.events.db"


def test_publish_then_peek_without_consuming(sink: LocalEventSink, tmp_path: Path) -> None:
    """A published event is on the queue with its id, content type and properties; peek
    leaves it there for a consumer."""
    async def scenario() -> tuple[Any, Any, Any]:
        await sink.publish(b'{"id": "e1"}', message_id="e1", properties={"job": "j1"})
        await sink.publish(b'{"id": "e2"}', message_id="e2")
        first = await sink.peek()
        second = await sink.peek(1, from_sequence=first[1].sequence_number)
        reader = LocalQueue(path=tmp_path / "home" / "events.db", name="fanout.events")
        try:
            received = await reader.receive(10, 0)
        finally:
            await reader.close()
        return first, second, received

    first, second, received = run(scenario())
    assert [(p.message_id, p.body) for p in first] == [("e1", b'{"id": "e1"}'),
                                                       ("e2", b'{"id": "e2"}')]
    assert first[0].properties == {"content-type": CLOUDEVENTS_JSON, "job": "j1"}
    assert first[0].enqueued_time is not None
    assert [p.message_id for p in second] == ["e2"]
    assert [m.message_id for m in received] == ["e1", "e2"]


def test_duplicate_dropped_within_the_window_kept_after(sink: LocalEventSink,
                                                        clock: FakeClock) -> None:
    """A repeated event id within 600 s is dropped; past the window it is kept."""
    async def scenario() -> list[Any]:
        await sink.publish(b"1", message_id="e")
        clock.now += 599
        await sink.publish(b"2", message_id="e")
        clock.now += 2
        await sink.publish(b"3", message_id="e")
        return await sink.peek()

    assert [p.body for p in run(scenario())] == [b"1", b"3"]


def test_no_window_keeps_every_copy(tmp_path: Path) -> None:
    """Without a window nothing is dropped (the control for the test above)."""
    sink = LocalEventSink(tmp_path / "events.db", duplicate_window=None)

    async def scenario() -> list[Any]:
        try:
            await sink.publish(b"1", message_id="e")
            await sink.publish(b"2", message_id="e")
            return await sink.peek()
        finally:
            await sink.close()

    assert [p.body for p in run(scenario())] == [b"1", b"2"]


def test_reply_to_goes_to_its_own_queue_file(sink: LocalEventSink, tmp_path: Path) -> None:
    """`to` names a queue in <home>/<to>.events.db; the configured queue does not get it."""
    async def scenario() -> tuple[list[Any], list[Any]]:
        await sink.publish(b"r", message_id="e-r", to="answers")
        await sink.publish(b"r", message_id="e-r", to="answers")  # a duplicate there too
        reply = LocalQueue(path=tmp_path / "home" / "answers.events.db", name="answers")
        try:
            got = await reply.receive(10, 0)
        finally:
            await reply.close()
        return got, await sink.peek()

    got, main = run(scenario())
    assert [(m.message_id, m.body) for m in got] == [("e-r", b"r")]
    assert main == []


@pytest.mark.parametrize("bad", ["../x", "a/b", ".hidden", "x..y", "", "sp ace"])
def test_reply_to_must_be_a_plain_name(sink: LocalEventSink, bad: str) -> None:
    """A reply-to that is not a plain queue name is refused, not turned into a path."""
    with pytest.raises(ConfigFault, match="not a plain queue name"):
        run(sink.publish(b"x", message_id="e", to=bad))
