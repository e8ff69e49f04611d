"""Window jobs: a blob route that gathers its events into one job per window.

A ``[[routes]]`` rule with ``job = "window"`` and ``window = "PT1H"`` puts every event
it takes into the job of the window the event's own time falls in (Event Grid's
``eventTime``, CloudEvents' ``time``): window start = floor(time / window), counted from
the Unix epoch. The time is the event's, never the clock of the worker processing it,
so a redelivery lands in the same window; an event without a usable time gets a job of
its own (the default route behaviour), as deterministically.

The window job's id derives from the handler, the route (its ``name`` and a digest of
the whole rule) and the window start. Each event's handler build gives its own tasks;
in the window job their ids are prefixed with a digest of the event id
(``<16 hex>-<task id>``), their ``depends_on`` rewritten the same way and their id
ranges expanded into explicit ids, and their display name says which event and blob
they came from. A redelivered event adds the same ids again: they exist already.

The submitter creates the job when absent and never seals it; the job monitor seals it
once ``seal_after`` has passed after the window's end (or after the window's length
plus ``seal_after`` since the job was created, whichever is first, so an event dated
in the future cannot hold a job open). An event whose window job has completed before
its tasks were added runs in a job of its own, the one the route would have made
without a window.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from handlers.base import ID_PATTERN, BlobRef, ExitConditions, ExitOptions, JobSpec, TaskSpec
from handlers.errors import InvalidParams
from worker.backends.base import (
    META_KEY,
    META_MESSAGE_ID,
    META_OUTPUTS,
    META_REPLY_TO,
    META_REQUEST,
    META_SEAL_AT,
    META_TASKS,
    META_WINDOW,
)
from worker.config import RouteConfig
from worker.context import job_id_for
from worker.errors import SettingsError

#: Hex digits of the event-id digest that prefixes a window task's id.
PREFIX_DIGITS = 16
#: Batch's limit on a task's ``dependsOn.taskIds``: 64,000 characters in all ("The
#: taskIds collection is limited to 64000 characters total", TaskDependencies in the
#: REST spec; over it the add fails with ``TaskDependencyListTooLong``).
MAX_DEPENDENCY_CHARS = 64_000
#: Batch's limit on a display name.
MAX_DISPLAY_NAME = 1024
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Window:
    """The window one event falls in, and where it came from."""

    key: str
    start: datetime
    end: datetime
    seal_at: datetime
    event_id: str
    blob: str
    route: str

    @property
    def length(self) -> timedelta:
        return self.end - self.start


@dataclass(slots=True)
class WindowJob(JobSpec):
    """One event's tasks bound for its window's job (``id`` is the window job's).

    The submitter creates the job if absent and never seals it (``open_until`` is when
    the monitor will); when the job has already completed, ``fallback`` builds the job
    the event gets on its own."""

    window: Window | None = None
    open_until: datetime | None = None
    fallback: Callable[[], JobSpec] | None = field(default=None, repr=False)
    #: What prefixes the event's task ids in the window job (``<16 hex>-``).
    prefix: str = ""


def event_time(raw: str | None) -> datetime | None:
    """An event's time as an aware UTC datetime; None when absent or unparseable.

    Event Grid writes seven fractional digits (``...:00.1234567Z``); they are cut to
    six. A time without an offset is taken as UTC."""
    if not raw or not isinstance(raw, str):
        return None
    text = raw.strip()
    if "." in text:
        head, _, rest = text.partition(".")
        digits = len(rest) - len(rest.lstrip("0123456789"))
        text = head + "." + rest[:min(digits, 6)] + rest[digits:] if digits else head + rest
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC)


def route_digest(rule: RouteConfig) -> str:
    """A digest of the whole rule (what it sets): a changed rule gathers into new
    window jobs."""
    dumped = rule.model_dump(mode="json", exclude_defaults=True)
    text = json.dumps(dumped, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def window_for(rule: RouteConfig, *, event_id: str, event_time_text: str | None,
               ref: BlobRef) -> Window | None:
    """The window this event falls in; None (the event's own job) when the route is
    not windowed or the event carries no usable time."""
    if rule.mode != "window" or rule.window is None:
        return None
    when = event_time(event_time_text)
    if when is None:
        return None
    length = int(rule.window.total_seconds())
    offset = int((when - _EPOCH).total_seconds() // length) * length
    start = _EPOCH + timedelta(seconds=offset)
    end = start + rule.window
    digest = route_digest(rule)
    key = f"{rule.name or 'window'}-{start:%Y%m%dT%H%M%SZ}-{digest[:16]}"
    return Window(key=key, start=start, end=end, seal_at=end + rule.seal_after,
                  event_id=event_id, blob=str(ref), route=digest)


def task_prefix(event_id: str) -> str:
    """``<16 hex>-``: the prefix of an event's task ids in its window job."""
    return hashlib.sha256(event_id.encode("utf-8")).hexdigest()[:PREFIX_DIGITS] + "-"


def gather(job: JobSpec, window: Window, *, handler: str,
           fallback: Callable[[], JobSpec]) -> WindowJob:
    """The event's built job as its share of the window job (tasks still lazy)."""
    prefix = task_prefix(window.event_id)
    meta = {k: v for k, v in job.metadata.items()
            if k not in (META_TASKS, META_OUTPUTS, META_MESSAGE_ID, META_REPLY_TO)}
    meta[META_REQUEST] = window.route
    meta[META_KEY] = window.key
    meta[META_WINDOW] = f"{iso(window.start)}/{iso(window.end)}"
    meta[META_SEAL_AT] = iso(window.seal_at)
    return WindowJob(
        tasks=_prefixed(job.tasks, prefix, window), task_count=job.task_count,
        id=job_id_for(handler, window.key), pool=job.pool, priority=job.priority,
        max_task_retries=job.max_task_retries, max_wall_clock=job.max_wall_clock,
        display_name=f"{handler} window {iso(window.start)}/{iso(window.end)}",
        metadata=meta,
        # set at creation by whichever event comes first: every event may need them.
        # No exit-option job actions: one event's task must not end every event's.
        uses_task_dependencies=True, on_task_failure="noaction",
        outputs=[], window=window, open_until=window.seal_at, fallback=fallback,
        prefix=prefix)


def window_task_ids(tasks: Iterable[TaskSpec], prefix: str) -> list[str]:
    """The ids an event's tasks take in its window job."""
    return [prefix + task.id for task in tasks]


def _prefixed(tasks: Iterable[TaskSpec], prefix: str, window: Window) -> Iterator[TaskSpec]:
    for task in tasks:
        yield window_task(task, prefix, window)


def window_task(task: TaskSpec, prefix: str, window: Window) -> TaskSpec:
    """One of the event's tasks as the window job takes it: prefixed id, rewritten
    dependencies (ranges expanded), and a display name naming the event and blob."""
    new_id = prefix + task.id
    if not ID_PATTERN.match(new_id):
        raise InvalidParams(
            f"task id {task.id!r} is too long for a window job: with the event's prefix "
            f"({len(prefix)} characters) it is {len(new_id)}, over Batch's 64")
    depends = [prefix + d for d in task.depends_on]
    size = sum(len(d) for d in depends)
    for lo, hi in task.depends_on_ranges:
        for number in range(lo, hi + 1):
            dep = f"{prefix}{number}"
            size += len(dep)
            if size > MAX_DEPENDENCY_CHARS:
                break
            depends.append(dep)
        if size > MAX_DEPENDENCY_CHARS:
            break
    if size > MAX_DEPENDENCY_CHARS:
        raise InvalidParams(
            f"task {task.id!r} depends on more tasks than a window job can name: its "
            f"dependencies, prefixed with the event's digest and id ranges written out, "
            f"come to over {MAX_DEPENDENCY_CHARS} characters (Batch's limit on "
            "dependsOn.taskIds); route such blobs without a window")
    task.id = new_id
    task.depends_on = tuple(depends)
    task.depends_on_ranges = ()
    if task.exit_conditions is not None:
        task.exit_conditions = without_job_actions(task.exit_conditions)
    task.display_name = display_name(window.event_id, window.blob, task.display_name)
    return task


def without_job_actions(conditions: ExitConditions) -> ExitConditions:
    """The exit conditions with their job actions dropped (dependency actions kept): a
    window job's ``onTaskFailure`` is ``noaction``, where Batch refuses job actions,
    and one event's task must not terminate a job that holds every event's tasks."""
    def strip(options: ExitOptions | None) -> ExitOptions | None:
        if options is None or options.job_action is None:
            return options
        return ExitOptions(dependency_action=options.dependency_action)

    if not any(o is not None and o.job_action is not None for o in (
            *(o for _, o in conditions.exit_codes),
            *(o for _, _, o in conditions.exit_code_ranges), conditions.pre_processing_error,
            conditions.file_upload_error, conditions.default)):
        return conditions  # shared by a job's tasks: keep the one object
    return ExitConditions(
        exit_codes=tuple((code, strip(o) or o) for code, o in conditions.exit_codes),
        exit_code_ranges=tuple((lo, hi, strip(o) or o)
                               for lo, hi, o in conditions.exit_code_ranges),
        pre_processing_error=strip(conditions.pre_processing_error),
        file_upload_error=strip(conditions.file_upload_error),
        default=strip(conditions.default))


def display_name(event_id: str, blob: str, name: str | None = None) -> str:
    """``{"event": ..., "blob": ..., "task": ...}`` as compact JSON, within Batch's
    1,024 characters (the blob name is cut first, then the task's own name)."""
    body: dict[str, Any] = {"event": event_id, "blob": blob}
    if name:
        body["task"] = name
    text = _json(body)
    if len(text) > MAX_DISPLAY_NAME and name:
        body["task"] = name[:max(0, len(name) - (len(text) - MAX_DISPLAY_NAME))]
        text = _json(body)
    if len(text) > MAX_DISPLAY_NAME:
        over = len(text) - MAX_DISPLAY_NAME + 3
        body["blob"] = blob[:max(0, len(blob) - over)] + "..."
        text = _json(body)
    return text


def parse_display_name(name: str | None) -> tuple[str, str] | None:
    """(event id, blob) from a window task's display name; None for any other."""
    if not name or not name.startswith("{"):
        return None
    try:
        body = json.loads(name)
    except ValueError:
        return None
    if not isinstance(body, dict):
        return None
    event, blob = body.get("event"), body.get("blob")
    if not isinstance(event, str) or not isinstance(blob, str):
        return None
    return event, blob


def parse_window(metadata: dict[str, str]) -> tuple[datetime, datetime] | None:
    """A window job's (start, end) from its metadata; None for other jobs."""
    raw = metadata.get(META_WINDOW)
    if not raw or "/" not in raw:
        return None
    start, _, end = raw.partition("/")
    first, last = event_time(start), event_time(end)
    if first is None or last is None:
        return None
    return first, last


def seal_due(metadata: dict[str, str], created: datetime | None, now: datetime) -> bool:
    """Whether a window job's time to be sealed has come: ``fanout-seal-at`` has
    passed, or the window's length plus the seal delay since the job was created."""
    seal_at = event_time(metadata.get(META_SEAL_AT))
    if seal_at is None:
        return False
    if now >= seal_at:
        return True
    window = parse_window(metadata)
    if window is None or created is None:
        return False
    start, end = window
    return now >= created + (seal_at - start)


def check_routes(routes: Iterable[RouteConfig], default_wall_clock: timedelta) -> None:
    """``SettingsError`` for a window route whose jobs' max wall clock would end them
    before they are sealed (the window plus ``seal_after``)."""
    for index, rule in enumerate(routes):
        if rule.mode != "window" or rule.window is None:
            continue
        raw = rule.job_options.get("max_wall_clock")
        wall = default_wall_clock
        if raw is not None:
            parsed = _duration(raw)
            if parsed is not None:
                wall = parsed
        open_for = rule.window + rule.seal_after
        if wall <= open_for:
            raise SettingsError(
                f"routes[{index}] (handler {rule.handler!r}): a window job stays open "
                f"{open_for} (window {rule.window} + seal_after {rule.seal_after}), but its "
                f"max wall clock is {wall}: Batch would end it before it is sealed; raise "
                "jobs.max_wall_clock (or the route's job.max_wall_clock) or shorten the window")


def _duration(value: Any) -> timedelta | None:
    if isinstance(value, timedelta):
        return value
    from pydantic import TypeAdapter, ValidationError
    try:
        return TypeAdapter(timedelta).validate_python(value)
    except ValidationError:
        return None


def iso(when: datetime) -> str:
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _json(body: dict[str, Any]) -> str:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False)


