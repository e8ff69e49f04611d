"""structlog set-up: JSON when stderr is not a terminal, console on a TTY, and
redaction of secrets in every event, including the Azure SDKs' stdlib logging.

Redaction works on text, so a secret is scrubbed wherever it hides: a SAS
signature in a URL, an ``AccountKey=`` or ``SharedAccessKey=`` in a connection
string, a ``SharedKey`` or ``Bearer`` authorization header.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO

import structlog

from worker.tracing import add_trace_ids

_SECRET_PATTERNS = [
    # SAS query parameters: the signature and the user-delegation key fields.
    (re.compile(r"(?i)([?&](?:sig|skoid|sktid|skv|sks|skt|ske)=)[^&\s\"']+"), r"\1REDACTED"),
    # Connection-string style secrets.
    (re.compile(r"(?i)((?:AccountKey|SharedAccessKey|SharedAccessSignature|"
                r"SharedAccessKeyName)=)[^;\s\"']+"), r"\1REDACTED"),
    # An Application Insights connection string's key ([tracing] azure_monitor).
    (re.compile(r"(?i)(InstrumentationKey=)[^;\s\"']+"), r"\1REDACTED"),
    # Authorization headers.
    (re.compile(r"(?i)(SharedKey(?:Lite)?\s+[^:\s]+:)[A-Za-z0-9+/=]+"), r"\1REDACTED"),
    (re.compile(r"(?i)(Bearer\s+)[A-Za-z0-9\-_.~+/=]+"), r"\1REDACTED"),
    (re.compile(r"(?i)(\"?(?:account_key|password|client_secret)\"?\s*[:=]\s*\"?)"
                r"[^\"',\s]+"), r"\1REDACTED"),
]


#: A fragment every pattern above needs, lower case. Searching lower-cased ASCII text
#: for one of them is exact (for ASCII, ``(?i)`` is just ASCII case) and much cheaper
#: than the six case-insensitive substitutions; almost no log value has one, so most
#: text is returned at once. Other text (``(?i)`` also folds a few non-ASCII letters,
#: such as the long s and the Kelvin sign, onto ASCII ones) always gets the substitutions.
_MAYBE_SECRET = re.compile(
    r"(?:sig|skoid|sktid|skv|sks|skt|ske)=|accountkey=|sharedaccess|instrumentationkey="
    r"|sharedkey|bearer|account_key|password|client_secret")


def redact(text: str) -> str:
    """Replace every secret-looking fragment of ``text`` with ``REDACTED``."""
    if text.isascii() and _MAYBE_SECRET.search(text.lower()) is None:
        return text
    return _substitute(text)


def _substitute(text: str) -> str:
    """Every pattern's substitution, unconditionally (what :func:`redact` does on a hit)."""
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


#: Values that cannot hold a secret, passed as they are: checked before ``Mapping``,
#: whose ABC instance check costs more than the rest of a number's trip through here.
_PLAIN = frozenset({int, float, bool, type(None)})


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if type(value) in _PLAIN:
        return value
    if isinstance(value, Mapping):
        return {k: _redact_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redact_value(v) for v in value]
    if isinstance(value, BaseException):
        return redact(f"{type(value).__name__}: {value}")
    return value


def redact_event(_logger: Any, _name: str,
                 event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: scrub secrets from every value of the event."""
    for key, value in list(event.items()):
        event[key] = _redact_value(value)
    return event


def _redact_foreign(logger: Any, name: str,
                    event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Formatter step: scrub the values of a stdlib record (the Azure SDKs'). A structlog
    event was scrubbed by ``redact_event`` in structlog's own chain already; scrubbing
    it again would only cost time. Runs before ``remove_processors_meta``, which drops
    the ``_from_structlog`` marker."""
    if event.get("_from_structlog"):
        return event
    return redact_event(logger, name, event)


class _RedactingRenderer:
    """Wraps the final renderer so formatted tracebacks are scrubbed too."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __call__(self, logger: Any, name: str, event: MutableMapping[str, Any]) -> str:
        return redact(str(self._inner(logger, name, event)))


class _LineWriter:
    """structlog's logger: writes each of fanout's rendered, redacted lines straight to
    the stream of the root logger's handler, under that handler's lock (so they never
    interleave with the stdlib records it writes). Going through stdlib logging cost
    more than the rest of a line: two ``LogRecord``s, a caller lookup that walks the
    stack, and a formatter pass. A failing write is reported as the handler reports
    one (``handleError``), never raised into the code that logged."""

    def __init__(self, handler: logging.StreamHandler[TextIO]) -> None:
        self._handler = handler

    def msg(self, line: str) -> None:
        """Write one line and flush."""
        handler = self._handler
        handler.acquire()
        try:
            handler.stream.write(line + "\n")
            handler.stream.flush()
        except Exception:
            handler.handleError(logging.makeLogRecord({"msg": line}))
        finally:
            handler.release()

    debug = info = warning = warn = error = critical = fatal = exception = log = msg


def configure(*, fmt: str = "auto", level: str = "info",
              stream: TextIO | None = None) -> None:
    """Configure structlog and the stdlib root logger (the Azure SDKs log there)."""
    out = stream if stream is not None else sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    renderer: Any = (structlog.processors.JSONRenderer() if use_json
                     else structlog.dev.ConsoleRenderer(colors=out.isatty()))
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_trace_ids,  # trace_id and span_id while a span is current (tracing on)
    ]
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        processors=[_redact_foreign, structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    _RedactingRenderer(renderer)],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    writer = _LineWriter(handler)
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info if use_json
                    else structlog.dev.set_exc_info,
                    redact_event, _RedactingRenderer(renderer)],
        logger_factory=lambda *_args: writer,
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelName(level.upper())),
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # The Azure SDKs log every HTTP request at INFO: keep them to warnings.
    for noisy in ("azure", "azure.core.pipeline.policies.http_logging_policy", "uamqp",
                  "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
