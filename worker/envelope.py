"""Raw message body -> an :class:`Envelope`, or the blob-created events it carries.

Two shapes of body arrive on the queue:

- an envelope, ``{"handler": "sweep", "id": "...", "job": {...}, "params": {...}}``
  (the handler may instead come from the application property ``handler``);
- a cancel request, ``{"cancel": "<job id>"}`` or ``{"cancel": {"id": "<idempotency
  key>", "handler": "sweep"}}``: the job is terminated, outcome ``cancelled``;
- Storage events that Event Grid delivers: one ``Microsoft.Storage.BlobCreated``
  event per body in the Event Grid schema or the CloudEvents 1.0 schema, or a JSON
  array of them (some producers batch).

Every failure is a ``MessageFault`` with a specific reason code and description.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from handlers.errors import (
    BudgetExceeded,
    InvalidEnvelope,
    InvalidJson,
    NoRoute,
    describe_validation,
)

BLOB_CREATED = "Microsoft.Storage.BlobCreated"
#: Data Lake Gen2 APIs; of these only FlushWithClose means a file is complete.
GEN2_APIS = frozenset({"CreateFile", "FlushWithClose", "RenameFile", "CreateDirectory"})


class TaskDefaults(BaseModel):
    """``job.task``: per-task constraints for every task a handler yields that does not
    set its own (any handler, plug-ins included); checked against the same limits."""

    model_config = ConfigDict(extra="forbid")

    max_task_retries: Annotated[int, Field(ge=-1, strict=True)] | None = None
    max_wall_clock: timedelta | None = None


#: A cost tag's value: 1-128 letters, digits and ``_ . : / @ + = -``, with inner spaces.
_TAG_VALUE = re.compile(r"^[A-Za-z0-9_.:/@+=-](?:[A-Za-z0-9 _.:/@+=-]{0,126}[A-Za-z0-9_.:/@+=-])?$")
_TAG_KEY = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


class JobOptions(BaseModel):
    """Job options a message may set; the worker checks them against its limits.

    ``tags`` are cost tags (``{"team": "vision"}``): only keys the operator allows
    (``cost.allowed_tags``, checked by the planner), kept in the job's metadata."""

    model_config = ConfigDict(extra="forbid")

    pool: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")] | None = None
    priority: Annotated[int, Field(ge=-1000, le=1000, strict=True)] | None = None
    max_task_retries: Annotated[int, Field(ge=-1, strict=True)] | None = None
    max_wall_clock: timedelta | None = None
    display_name: Annotated[str, Field(min_length=1, max_length=1024)] | None = None
    task: TaskDefaults | None = None
    tags: dict[str, str] | None = None

    @field_validator("tags", mode="before")
    @classmethod
    def _tags_well_formed(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, dict):
            raise ValueError('tags must be an object of strings, {"team": "vision"}')
        for key, item in value.items():
            if not isinstance(key, str) or not _TAG_KEY.match(key):
                raise ValueError(f"tag key {str(key)[:40]!r} is not 1-32 lower-case letters, "
                                 "digits and underscores starting with a letter")
            if not isinstance(item, str):
                raise ValueError(f"tag {key!r}: the value must be a string")
            if not _TAG_VALUE.match(item):
                raise ValueError(f"tag {key!r}: the value {item[:40]!r} is not 1-128 letters, "
                                 "digits, spaces (not at the ends) and _ . : / @ + = -")
        return value


class _EnvelopeModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    handler: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    id: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    job: JobOptions = Field(default_factory=JobOptions)
    params: dict[str, Any] = Field(default_factory=dict)
    reply_to: Annotated[str, Field(min_length=1, max_length=260)] | None = None


_JOB_ID = r"^[A-Za-z0-9_-]{1,64}$"


class _CancelTarget(BaseModel):
    model_config = ConfigDict(extra="forbid")

    job: Annotated[str, Field(pattern=_JOB_ID)] | None = None
    id: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    handler: Annotated[str, Field(min_length=1, max_length=64,
                                  pattern=r"^[A-Za-z0-9_.-]+$")] | None = None


class _CancelModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cancel: Annotated[str, Field(pattern=_JOB_ID)] | _CancelTarget


@dataclass(frozen=True, slots=True)
class Envelope:
    """A validated work request for one handler."""

    handler: str
    id: str | None
    job: JobOptions
    params: dict[str, Any]
    reply_to: str | None = None


@dataclass(frozen=True, slots=True)
class Cancel:
    """A request to terminate a job: by its id, or by the idempotency key and handler
    of the message that created it."""

    job_id: str | None = None
    key: str | None = None
    handler: str | None = None


@dataclass(frozen=True, slots=True)
class BlobEvent:
    """One Microsoft.Storage.BlobCreated event, whichever schema carried it."""

    id: str
    type: str
    url: str
    api: str
    subject: str = ""
    content_type: str | None = None
    content_length: int | None = None
    source: str = ""
    time: str | None = None
    schema: str = "eventgrid"
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_gen2(self) -> bool:
        """True for Data Lake Gen2 events (dfs endpoint, or a Gen2 API)."""
        host = urlsplit(self.url).hostname or ""
        return ".dfs." in host or self.api in GEN2_APIS

    @property
    def complete(self) -> bool:
        """False for Gen2 events other than FlushWithClose: the file is not yet written."""
        return not self.is_gen2 or self.api == "FlushWithClose"


Parsed = Envelope | Cancel | list[BlobEvent]


def parse_body(body: bytes, properties: Mapping[str, str] | None = None, *,
               max_bytes: int = 256 * 1024) -> Parsed:
    """Parse one message body; raise a ``MessageFault`` with a reason code."""
    props = properties or {}
    if len(body) > max_bytes:
        raise BudgetExceeded(f"the message body is {len(body)} bytes; this worker takes at "
                             f"most {max_bytes} (queue.max_message_bytes)")
    data = decode_json(body)
    if isinstance(data, list) or _looks_like_event(data):
        return parse_events(data)
    if not isinstance(data, dict):
        raise InvalidEnvelope(f"the body is a JSON {_json_type(data)}; expected an object "
                              'such as {"handler": "sweep", "params": {...}}')
    if "cancel" in data:
        return parse_cancel(data)
    if "handler" not in data and props.get("handler"):
        data = {**data, "handler": props["handler"]}
    if "handler" not in data:
        raise InvalidEnvelope("no handler: set \"handler\" in the body or the message's "
                              "application property 'handler'")
    try:
        model = _EnvelopeModel.model_validate(data)
    except ValidationError as exc:
        raise InvalidEnvelope(describe_validation(exc)) from None
    return Envelope(handler=model.handler, id=model.id, job=model.job, params=model.params,
                    reply_to=model.reply_to)


def parse_cancel(data: dict[str, Any]) -> Cancel:
    """``{"cancel": "<job id>"}`` or ``{"cancel": {"job"} | {"id", "handler"}}``."""
    try:
        model = _CancelModel.model_validate(data)
    except ValidationError as exc:
        raise InvalidEnvelope("cancel: " + describe_validation(exc)) from None
    target = model.cancel
    if isinstance(target, str):
        return Cancel(job_id=target)
    if target.job:
        return Cancel(job_id=target.job)
    if target.id and target.handler:
        return Cancel(key=target.id, handler=target.handler)
    raise InvalidEnvelope('cancel: name the job ({"cancel": "<job id>"}) or the message '
                          'that created it ({"cancel": {"id": "<key>", "handler": "<name>"}})')


def decode_json(body: bytes) -> Any:
    """UTF-8 JSON text to a value; NaN and Infinity are refused (not JSON)."""
    if not body.strip():
        raise InvalidJson("the message body is empty")
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidJson(f"the body is not UTF-8 text (byte {exc.start} is invalid)") from None
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:
        raise InvalidJson(f"the body is not JSON: {_short(str(exc))}") from None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _looks_like_event(data: Any) -> bool:
    return isinstance(data, dict) and ("eventType" in data or "specversion" in data)


def parse_events(data: Any) -> list[BlobEvent]:
    """One event object, or an array of them, into ``BlobEvent`` (BlobCreated only)."""
    items = data if isinstance(data, list) else [data]
    if not items:
        raise InvalidEnvelope("the body is an empty JSON array: expected one or more events")
    if len(items) > 100:
        raise BudgetExceeded(f"the body holds {len(items)} events; at most 100 per message")
    return [_parse_event(item, i) for i, item in enumerate(items)]


def _parse_event(item: Any, index: int) -> BlobEvent:
    where = f"event {index}" if index else "the event"
    if not isinstance(item, dict):
        raise InvalidEnvelope(f"{where} is a JSON {_json_type(item)}, not an object")
    if "specversion" in item:
        schema, etype, source = "cloudevents", item.get("type"), item.get("source", "")
        etime = item.get("time")
    elif "eventType" in item:
        schema, etype, source = "eventgrid", item.get("eventType"), item.get("topic", "")
        etime = item.get("eventTime")
    else:
        raise InvalidEnvelope(f"{where} is neither an Event Grid nor a CloudEvents event")
    event_id = item.get("id")
    if not isinstance(event_id, str) or not event_id or len(event_id) > 256:
        raise InvalidEnvelope(f"{where} has no usable id")
    if not isinstance(etype, str):
        raise InvalidEnvelope(f"{where} has no event type")
    if etype != BLOB_CREATED:
        raise NoRoute(f"{where} is of type {_short(etype)}; fanout routes only {BLOB_CREATED}")
    data = item.get("data")
    if not isinstance(data, dict):
        raise InvalidEnvelope(f"{where} has no data object")
    url, api = data.get("url"), data.get("api", "")
    if not isinstance(url, str) or not url:
        raise InvalidEnvelope(f"{where} has no data.url")
    length = data.get("contentLength")
    return BlobEvent(
        id=event_id, type=etype, url=url, api=api if isinstance(api, str) else "",
        subject=str(item.get("subject", "")),
        content_type=data.get("contentType") if isinstance(data.get("contentType"), str)
        else None,
        content_length=length if isinstance(length, int) and not isinstance(length, bool)
        else None,
        source=str(source), time=etime if isinstance(etime, str) else None, schema=schema,
    )


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean",
            type(None): "null"}.get(type(value), "number")


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
