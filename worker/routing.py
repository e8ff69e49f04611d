"""Handler registry and router: a parsed message -> the work items it asks for.

Handlers register through the ``fanout.handlers`` entry-point group, so a
third-party package adds one by being installed. The registry is built once at
start-up; a name registered twice is a start-up error, and the set never changes
while the worker runs.

An envelope names its handler. A blob-created event is matched against the
``[[routes]]`` rules of the configuration, first match wins, and the blob
reference is put into the route's default params.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from importlib.metadata import entry_points
from typing import Any
from urllib.parse import unquote, urlsplit

import structlog
from pydantic import ValidationError

from handlers.base import BlobRef, ChecksOptions, Handler, JobSpec
from handlers.errors import (
    InvalidEnvelope,
    MessageFault,
    NoRoute,
    UnknownHandler,
    describe_validation,
)
from worker.config import RouteConfig
from worker.context import job_id_for
from worker.envelope import BlobEvent, Cancel, Envelope, JobOptions, Parsed
from worker.errors import SettingsError
from worker.storage.base import Storage
from worker.window import Window, task_prefix, window_for, window_task

ENTRY_POINT_GROUP = "fanout.handlers"
#: Application property that carries a message's idempotency key in place of its
#: message id: ``fanout dlq resubmit`` gives the copy a new message id (duplicate
#: detection would drop the original one) and puts the original id here.
IDEMPOTENCY_KEY_PROPERTY = "fanout-idempotency-key"
log = structlog.get_logger(__name__)


class HandlerRegistry:
    """A frozen name -> handler map."""

    def __init__(self, handlers: Mapping[str, Handler]) -> None:
        self._handlers = dict(handlers)

    @classmethod
    def from_entry_points(cls, group: str = ENTRY_POINT_GROUP) -> HandlerRegistry:
        """Load every handler installed under ``group``; refuse duplicate names."""
        origins: dict[str, str] = {}
        handlers: dict[str, Handler] = {}
        for ep in entry_points(group=group):
            dist = ep.dist.name if ep.dist is not None else "?"
            origin = f"{ep.value} (from {dist})"
            if ep.name in origins:
                if origins[ep.name].split(" ")[0] == ep.value:
                    continue  # the same entry point seen twice (editable installs)
                raise SettingsError(f"handler {ep.name!r} is registered twice: by "
                                    f"{origins[ep.name]} and by {origin}")
            origins[ep.name] = origin
            try:
                factory = ep.load()
                handlers[ep.name] = factory()
            except Exception as exc:
                raise SettingsError(f"handler {ep.name!r} ({origin}) failed to load: "
                                    f"{type(exc).__name__}: {exc}") from exc
        return cls(handlers)

    def check_options(self, options: Mapping[str, Mapping[str, Any]]) -> None:
        """Let each handler that is ``ChecksOptions`` refuse its ``[handlers.<name>]``
        table before any message."""
        for name in options:
            if name not in self._handlers:
                raise SettingsError(f"[handlers.{name}]: no handler {name!r} is installed "
                                    f"(installed: {', '.join(self.names)})")
        for name, handler in self._handlers.items():
            if not isinstance(handler, ChecksOptions):
                continue
            try:
                handler.check_options(options.get(name, {}))
            except ValueError as exc:
                raise SettingsError(str(exc)) from None

    @property
    def names(self) -> list[str]:
        return sorted(self._handlers)

    def __contains__(self, name: object) -> bool:
        return name in self._handlers

    def get(self, name: str) -> Handler:
        """The handler called ``name``; ``UnknownHandler`` otherwise."""
        try:
            return self._handlers[name]
        except KeyError:
            known = ", ".join(self.names) or "none"
            raise UnknownHandler(f"no handler named {name[:64]!r} (this worker has: "
                                 f"{known})") from None


@dataclass(frozen=True, slots=True)
class Work:
    """One job to build: a handler, its params and the idempotency key."""

    handler_name: str
    handler: Handler
    params: Mapping[str, Any]
    key: str
    job: JobOptions
    reply_to: str | None = None
    #: For a route with ``job = "window"``: the window the event falls in; its tasks
    #: go into that window's job (see worker/window.py).
    window: Window | None = None

    def without_window(self) -> Work:
        """The same work as a job of its own (a late event's, see worker/window.py)."""
        return replace(self, window=None)


@dataclass(slots=True)
class Routed:
    """What one message asks for; ``ignored`` lists events left alone, with why;
    ``cancels`` the ids of jobs a cancel message asks to terminate."""

    works: list[Work] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    cancels: list[str] = field(default_factory=list)


class Router:
    """Maps envelopes and blob events to work items."""

    def __init__(self, *, registry: HandlerRegistry, routes: Iterable[RouteConfig],
                 storage: Storage, drop_unrouted: bool = False) -> None:
        self.registry = registry
        self.routes = list(routes)
        self.storage = storage
        self.drop_unrouted = drop_unrouted
        self._jobs: dict[int, JobOptions] = {}
        for index, rule in enumerate(self.routes):
            if rule.handler not in registry:
                raise SettingsError(f"{_where(index, rule)}: handler {rule.handler!r} is not "
                                    f"installed (installed: {', '.join(registry.names)})")
            try:
                self._jobs[id(rule)] = JobOptions.model_validate(rule.job_options)
            except ValidationError as exc:
                raise SettingsError(f"{_where(index, rule)}: job: "
                                    f"{describe_validation(exc)}") from None

    def check_routes(self, build: Callable[[Work], JobSpec]) -> None:
        """Build, without submitting, the job each rule makes of a blob it matches.

        ``build`` is the planner's (handler build plus job options and limits) over
        storage that issues no SAS. A rule whose params or job options no blob can
        satisfy is a ``SettingsError`` naming the rule, at start-up, instead of every
        event it takes failing until its delivery count runs out.
        """
        for index, rule in enumerate(self.routes):
            ref = sample_blob(rule)
            params = {**rule.params,
                      rule.blob_param: {"container": ref.container, "blob": ref.blob}}
            work = Work(rule.handler, self.registry.get(rule.handler), params,
                        "fanout-route-check", self._jobs[id(rule)])
            try:
                job = build(work)
                first = next(iter(job.tasks), None)  # a handler may check lazily, per task
                window = window_for(rule, event_id="fanout-route-check",
                                    event_time_text="2026-01-01T00:00:00Z", ref=ref)
                if first is not None and window is not None:  # its id fits with a prefix
                    window_task(first, task_prefix(window.event_id), window)
            except MessageFault as fault:
                raise SettingsError(f"{_where(index, rule)}: every blob it takes would be "
                                    f"dead-lettered (tried {ref}): {fault.reason}: "
                                    f"{fault.description}") from None
            except (ValueError, SettingsError) as exc:  # the handler's options, say
                raise SettingsError(f"{_where(index, rule)}: {exc}") from None
            except Exception as exc:  # a handler's own bug still names the rule
                raise SettingsError(f"{_where(index, rule)}: building a job for {ref} "
                                    f"failed: {type(exc).__name__}: {exc}") from exc

    def route(self, parsed: Parsed, *, message_id: str | None) -> Routed:
        """The work a parsed message asks for; raises a ``MessageFault``."""
        if isinstance(parsed, Cancel):
            if parsed.job_id:
                return Routed(cancels=[parsed.job_id])
            assert parsed.key is not None and parsed.handler is not None
            self.registry.get(parsed.handler)  # UnknownHandler for a name not installed
            return Routed(cancels=[job_id_for(parsed.handler, parsed.key)])
        if isinstance(parsed, Envelope):
            key = parsed.id or message_id
            if not key:
                raise InvalidEnvelope("no idempotency key: give \"id\" in the body "
                                      "(the queue supplied no message id)")
            handler = self.registry.get(parsed.handler)
            return Routed(works=[Work(parsed.handler, handler, parsed.params, key, parsed.job,
                                      parsed.reply_to)])
        routed = Routed()
        for event in parsed:
            self._route_event(event, routed)
        return routed

    def _route_event(self, event: BlobEvent, routed: Routed) -> None:
        if not event.complete:
            routed.ignored.append(f"gen2-{event.api or 'unknown'}")
            return
        ref = self.storage.parse_url(event.url)
        account = account_of(event.url)
        rule = self.match(event, ref, account)
        if rule is None:
            if self.drop_unrouted:
                routed.ignored.append("unrouted")
                return
            raise NoRoute(f"no route takes blob {ref.container}/{ref.blob[:200]} of account "
                          f"{account} (content type {event.content_type or 'unknown'})")
        job = self._jobs[id(rule)]  # validated at start-up
        params = {**rule.params,
                  rule.blob_param: {"container": ref.container, "blob": ref.blob}}
        handler = self.registry.get(rule.handler)
        window = window_for(rule, event_id=event.id, event_time_text=event.time, ref=ref)
        if rule.mode == "window" and window is None:
            log.warning("window.no_event_time", event_id=event.id, time=event.time,
                        note="an event without a usable time gets a job of its own")
        routed.works.append(Work(rule.handler, handler, params, event.id, job,
                                 window=window))

    def match(self, event: BlobEvent, ref: BlobRef, account: str) -> RouteConfig | None:
        """The first rule whose every condition holds for this blob."""
        name = ref.blob.lower()
        for rule in self.routes:
            if rule.account and rule.account.lower() != account.lower():
                continue
            if rule.container and rule.container != ref.container:
                continue
            if rule.prefix and not ref.blob.startswith(rule.prefix):
                continue
            if rule.suffixes and not name.endswith(rule.suffixes):
                continue
            if rule.content_type and not _type_matches(rule.content_type, event.content_type):
                continue
            return rule
        return None


def _where(index: int, rule: RouteConfig) -> str:
    return f"routes[{index}] (handler {rule.handler!r})"


def sample_blob(rule: RouteConfig) -> BlobRef:
    """A blob the rule matches: in its container, under its prefix, with its suffix."""
    suffix = rule.suffixes[0] if rule.suffixes else ""
    return BlobRef(rule.container or "uploads", f"{rule.prefix or ''}example{suffix}")


def key_message_id(message_id: str | None,
                   properties: Mapping[str, str] | None) -> str | None:
    """The id an envelope without ``id`` takes its idempotency key from: the
    ``fanout-idempotency-key`` property when set (a resubmitted copy), else the
    message id."""
    key = (properties or {}).get(IDEMPOTENCY_KEY_PROPERTY)
    return key or message_id


def _type_matches(wanted: str, actual: str | None) -> bool:
    if actual is None:
        return False
    actual = actual.split(";", 1)[0].strip().lower()
    wanted = wanted.lower()
    return actual.startswith(wanted) if wanted.endswith("/") else actual == wanted


def account_of(url: str) -> str:
    """The storage account a blob URL belongs to (``local`` for the local store)."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if parts.scheme == "file":
        return "local"
    if host.endswith(".core.windows.net"):
        return host.split(".", 1)[0]
    segment = unquote(parts.path.lstrip("/").split("/", 1)[0])
    return segment or host  # path-style (Azurite): /<account>/<container>/<blob>
