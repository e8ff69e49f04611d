"""Tests for log set-up and secret redaction."""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Iterator

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.logs import _substitute, configure, redact


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Put structlog and the root logger back as they were."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)

SECRETS = {
    "sas": "https://acct.blob.core.windows.net/c/b.mp4?sv=2024-05-04&se=2026-11-25&sr=b&sp=r"
           "&sig=AbCdEf0123456789%2Bsecret%3D",
    "conn": "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=root;"
            "SharedAccessKey=c2VjcmV0a2V5c2VjcmV0a2V5c2VjcmV0a2V5=",
    "account": "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=a2V5a2V5a2V5a2V5==;",
    "shared_key": "Authorization: SharedKey acct:ZmFrZXNpZ25hdHVyZQ==",
    "bearer": "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln",
}
LEAKS = ["AbCdEf0123456789", "c2VjcmV0a2V5", "a2V5a2V5", "ZmFrZXNpZ25hdHVyZQ",
         "eyJhbGciOiJIUzI1NiJ9"]


def test_redact_removes_every_secret_shape() -> None:
    """SAS signatures, shared access keys, account keys and auth headers are scrubbed."""
    for text in SECRETS.values():
        cleaned = redact(text)
        assert "REDACTED" in cleaned
        assert not any(leak in cleaned for leak in LEAKS), cleaned
    assert redact("sig-nature and keys are words") == "sig-nature and keys are words"


def test_json_logs_are_redacted_for_structlog_and_stdlib() -> None:
    """Both structlog events and the Azure SDKs' stdlib records come out redacted."""
    stream = io.StringIO()
    configure(fmt="json", level="info", stream=stream)
    structlog.get_logger("t").info("calling", url=SECRETS["sas"], nested={"c": SECRETS["conn"]})
    logging.getLogger("azure.test").warning("request failed: %s", SECRETS["account"])
    try:
        raise RuntimeError(SECRETS["shared_key"])
    except RuntimeError:
        structlog.get_logger("t").exception("boom")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    events = [json.loads(line) for line in lines]
    assert events[0]["event"] == "calling"
    text = stream.getvalue()
    assert not any(leak in text for leak in LEAKS), text
    assert "Traceback" in events[2]["exception"]


#: Pieces of secret shapes, in mixed case, and the characters around them.
_FRAGMENTS = ["?sig=", "&skoid=", "&SKT=", "&ske=", "AccountKey=", "sharedaccesskey=",
              "SharedAccessSignature=", "SharedAccessKeyName=", "instrumentationKEY=",
              "SharedKey ", "sharedkeylite acct:", "Bearer ", "BEARER\t", '"password": "',
              "Password=", "client_secret:", "account_key = ", "acct:", "abc", "Zm9v==", ";",
              "&", "?", '"', "'", " ", ":", "=", "ſig=", "\u212a", "ı", "é", "sig", "key"]


@settings(max_examples=400, derandomize=True, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_FRAGMENTS), st.booleans()), max_size=12))
def test_redact_fast_path_changes_nothing(parts: list[tuple[str, bool]]) -> None:
    """The pre-check that returns most text untouched decides exactly as the six
    substitutions would: any text they would change, it passes on to them."""
    text = "".join(p.swapcase() if flip else p for p, flip in parts)
    assert redact(text) == _substitute(text)


def test_redact_scrubs_non_ascii_text_the_pattern_folds() -> None:
    """Non-ASCII text always gets the substitutions: ``(?i)`` folds the long s onto
    ``s``, so a lower-cased ASCII search alone would have let this one through."""
    assert redact("?ſig=secret123") == "?ſig=REDACTED"


def test_structlog_events_are_scrubbed_once_and_stdlib_records_still() -> None:
    """The formatter leaves structlog's already scrubbed events alone (no second pass)
    but scrubs the values of a stdlib record, and the rendered line either way."""
    stream = io.StringIO()
    configure(fmt="json", level="info", stream=stream)
    structlog.get_logger("t").info("calling", note="password=hunter2", count=3)
    logging.getLogger("azure.test").warning("password=hunter3 in %s", "a request")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["note"] == "password=REDACTED" and first["count"] == 3
    assert second["event"] == "password=REDACTED in a request"
    assert "hunter" not in stream.getvalue()


def test_lines_from_structlog_and_stdlib_threads_never_interleave() -> None:
    """fanout's own lines (written by structlog) and the SDKs' stdlib records (by the
    handler) go to one stream: written from many threads at once, every line is one
    whole JSON object and none is lost."""
    stream = io.StringIO()
    configure(fmt="json", level="info", stream=stream)

    def write(i: int) -> None:
        for n in range(200):
            structlog.get_logger("t").info("ours", thread=i, n=n, pad="x" * 300)
            logging.getLogger("azure.test").warning("theirs %d %d %s", i, n, "y" * 300)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(events) == 4 * 200 * 2
    assert sum(e["event"] == "ours" for e in events) == 800


class _Broken(io.StringIO):
    def write(self, text: str) -> int:
        raise OSError("the stream is gone")


def test_a_failing_stream_is_reported_not_raised(capsys: pytest.CaptureFixture[str]) -> None:
    """A line that cannot be written does not fail the code that logged it; the handler
    reports it on stderr, as stdlib logging does."""
    configure(fmt="json", level="info", stream=_Broken())
    structlog.get_logger("t").info("lost")
    assert "Logging error" in capsys.readouterr().err


def test_redaction_passes_numbers_and_none_and_scrubs_what_is_nested() -> None:
    """Plain values come back as they are; strings in mappings and lists are scrubbed."""
    from worker.logs import redact_event

    secret = "AccountKey=" + "A" * 40
    event = redact_event(None, "info", {"n": 3, "x": 0.5, "ok": True, "none": None,
                                        "nested": {"k": [secret, 7]}, "s": secret})
    assert (event["n"], event["x"], event["ok"], event["none"]) == (3, 0.5, True, None)
    assert secret not in str(event["nested"]) and secret not in event["s"]
    assert event["nested"]["k"][1] == 7
