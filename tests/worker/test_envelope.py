"""Tests for parsing message bodies into envelopes and blob events."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from handlers.errors import MessageFault
from worker.envelope import BlobEvent, Envelope, parse_body

SAMPLES = Path(__file__).resolve().parents[1] / "handlers" / "samples"


def test_envelope_with_all_fields() -> None:
    """A full envelope parses with its job options."""
    body = json.dumps({"handler": "sweep", "id": "run-1", "params": {"a": 1},
                       "job": {"pool": "cpu", "priority": 10, "max_wall_clock": "PT2H",
                               "display_name": "nightly"}}).encode()
    env = parse_body(body)
    assert isinstance(env, Envelope)
    assert (env.handler, env.id, env.params) == ("sweep", "run-1", {"a": 1})
    assert env.job.pool == "cpu" and env.job.priority == 10
    assert env.job.max_wall_clock is not None and env.job.max_wall_clock.total_seconds() == 7200


def test_handler_from_application_property() -> None:
    """With no handler in the body, the `handler` application property names it."""
    env = parse_body(b'{"params": {}}', {"handler": "render"})
    assert isinstance(env, Envelope) and env.handler == "render"


@pytest.mark.parametrize("body, reason", [
    (b"", "InvalidJson"),
    (b"   \n", "InvalidJson"),
    (b"not json", "InvalidJson"),
    (b"\xff\xfe\x00binary", "InvalidJson"),
    (b'{"handler": "sweep", "params": {"x": NaN}}', "InvalidJson"),
    (b'{"handler": "sweep"', "InvalidJson"),
    (b"[" * 100000, "InvalidJson"),
    (b"42", "InvalidEnvelope"),
    (b'"sweep"', "InvalidEnvelope"),
    (b"null", "InvalidEnvelope"),
    (b'{"params": {}}', "InvalidEnvelope"),
    (b'{"handler": 5}', "InvalidEnvelope"),
    (b'{"handler": "sweep", "params": []}', "InvalidEnvelope"),
    (b'{"handler": "sweep", "extra": 1}', "InvalidEnvelope"),
    (b'{"handler": "sweep", "job": {"priority": 5000}}', "InvalidEnvelope"),
    (b'{"handler": "sweep", "job": {"priority": "high"}}', "InvalidEnvelope"),
    (b'{"handler": "sweep", "job": {"pool": "a b"}}', "InvalidEnvelope"),
    (b'{"handler": "sweep", "job": {"max_wall_clock": "forever"}}', "InvalidEnvelope"),
    (b'{"handler": "sweep", "id": ""}', "InvalidEnvelope"),
    (b"[]", "InvalidEnvelope"),
    (b"[1]", "InvalidEnvelope"),
    (b'{"eventType": "Microsoft.Storage.BlobDeleted", "id": "1", "data": {}}', "NoRoute"),
    (b'{"specversion": "1.0", "type": "Microsoft.Storage.BlobCreated", "id": "1"}',
     "InvalidEnvelope"),
])
def test_bad_bodies_have_reason_codes(body: bytes, reason: str) -> None:
    """Each malformed body fails with its documented reason code and a description."""
    with pytest.raises(MessageFault) as info:
        parse_body(body)
    assert info.value.reason == reason
    assert info.value.description


def test_oversized_body_is_over_budget() -> None:
    """A body over queue.max_message_bytes is BudgetExceeded, before it is parsed."""
    with pytest.raises(MessageFault) as info:
        parse_body(b" " * 2000, max_bytes=1000)
    assert info.value.reason == "BudgetExceeded"


@pytest.mark.parametrize("name, schema", [("eventgrid-blobcreated.json", "eventgrid"),
                                          ("cloudevents-blobcreated.json", "cloudevents")])
def test_sample_events_parse(name: str, schema: str) -> None:
    """Both shared samples parse into one complete BlobEvent with its id and URL."""
    raw = json.loads((SAMPLES / name).read_text())
    events = parse_body((SAMPLES / name).read_bytes())
    assert isinstance(events, list) and len(events) == 1
    event = events[0]
    assert isinstance(event, BlobEvent)
    assert (event.id, event.url, event.schema) == (raw["id"], raw["data"]["url"], schema)
    assert event.complete


def test_array_of_events() -> None:
    """A JSON array of events yields each of them."""
    one = json.loads((SAMPLES / "eventgrid-blobcreated.json").read_text())
    two = {**one, "id": "second"}
    events = parse_body(json.dumps([one, two]).encode())
    assert isinstance(events, list)
    assert [e.id for e in events] == [one["id"], "second"]


@pytest.mark.parametrize("api, complete", [("FlushWithClose", True), ("CreateFile", False)])
def test_gen2_only_flush_with_close_is_complete(api: str, complete: bool) -> None:
    """On Data Lake Gen2, only FlushWithClose means the file is fully written."""
    raw = json.loads((SAMPLES / "eventgrid-blobcreated.json").read_text())
    raw["data"]["api"] = api
    raw["data"]["url"] = raw["data"]["url"].replace(".blob.", ".dfs.")
    events = parse_body(json.dumps(raw).encode())
    assert isinstance(events, list) and events[0].complete is complete
