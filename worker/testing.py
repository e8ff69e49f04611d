"""A test kit for handler authors: run ``build()`` the way the worker does.

``handlers.testing`` gives a handler a stub context; this runs it through the worker's
own start-up and planning path instead, so a test sees exactly the jobs, and the
faults, a message would get: the handler's ``check_options`` and every route checked
at start-up (``worker.app.build_planner``), the message parsed as an envelope (its
params as JSON would carry them, its ``job`` options validated), the job options and
the operator's ``[limits]`` applied (``worker.context.apply_job_options``), the
default wall clock, fanout's metadata, and each task checked against the limits as
it streams (``worker.context.limit_tasks``)::

    from worker.testing import build_job

    job, tasks = build_job(MyHandler(), {"alpha": [1, 2]}, name="mine",
                           config={"limits": {"max_tasks_per_message": 10}},
                           job_options={"priority": 5})

Nothing is submitted. The configuration is a ``fanout.toml`` as a dict, validated by
the worker's ``Settings`` (errors are ``SettingsError``); the environment and any
``fanout.toml`` in the working directory are ignored. Storage is the local blob store
under ``home`` (a directory that planning never writes to; give your test's own to
put input blobs there).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from handlers.base import Handler, JobSpec, TaskSpec
from worker.app import build_planner, make_planner, make_storage
from worker.config import Settings, describe_settings_error
from worker.errors import SettingsError
from worker.plan import Plan, Planner
from worker.routing import HandlerRegistry, Router
from worker.storage.base import Storage

__all__ = ["Harness", "SettingsError", "build_job", "draw", "harness", "make_settings",
           "plan_message"]

#: The default ``home``: planning writes nothing under it.
DEFAULT_HOME = Path(tempfile.gettempdir()) / "fanout-testing"
#: The name a handler given to :func:`build_job` gets in its messages by default.
DEFAULT_NAME = "plugin"


class _KitSettings(Settings):
    """``Settings`` from the given values alone: no environment variables."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def make_settings(config: Mapping[str, Any] | None = None, *,
                  home: str | os.PathLike[str] | None = None) -> Settings:
    """``Settings`` for a ``fanout.toml`` given as a dict (``{"limits": {...},
    "programs": {...}}``), validated as the worker validates its file; ``SettingsError``
    names each bad key. ``home`` (default :data:`DEFAULT_HOME`) is ``config``'s own
    ``home`` when it has one."""
    data = dict(config or {})
    data.setdefault("home", str(home if home is not None else DEFAULT_HOME))
    try:
        return _KitSettings(**data)
    except ValidationError as exc:
        raise SettingsError(describe_settings_error(exc, "the test's configuration")) from None


@dataclass
class Harness:
    """A worker's planner, ready to plan messages (nothing is submitted)."""

    settings: Settings
    planner: Planner

    @property
    def storage(self) -> Storage:
        return self.planner.storage

    def plan(self, body: Any, message_id: str = "msg-1", *,
             properties: Mapping[str, str] | None = None,
             reply_to: str | None = None) -> Plan:
        """Plan one message body: bytes as they are, a str encoded, anything else sent
        as JSON. Each job's tasks are still the lazy, checked iterator."""
        return self.planner.plan(_body(body), properties or {}, message_id=message_id,
                                 reply_to=reply_to)

    def job(self, body: Any, message_id: str = "msg-1", *,
            properties: Mapping[str, str] | None = None) -> tuple[JobSpec, list[TaskSpec]]:
        """The one job a message plans, its tasks drawn (so a task over a limit raises
        here) and held to the job's ``task_count``, as the submitter holds them."""
        planned = self.plan(body, message_id, properties=properties)
        if len(planned.jobs) != 1:
            raise AssertionError(f"the message planned {len(planned.jobs)} jobs, not one "
                                 f"(ignored: {planned.ignored}, cancels: {planned.cancels})")
        job = planned.jobs[0].job
        return job, draw(job)

    def build(self, handler: str, params: Mapping[str, Any], *,
              job_options: Mapping[str, Any] | None = None, key: str = "test-key",
              properties: Mapping[str, str] | None = None) -> tuple[JobSpec, list[TaskSpec]]:
        """The job an envelope ``{"handler", "id": key, "params", "job"}`` plans."""
        body: dict[str, Any] = {"handler": handler, "id": key, "params": dict(params)}
        if job_options is not None:
            body["job"] = dict(job_options)
        return self.job(body, properties=properties)


def harness(handlers: Mapping[str, Handler] | None = None, *,
            config: Mapping[str, Any] | Settings | None = None,
            home: str | os.PathLike[str] | None = None,
            storage: Storage | None = None, start_up_checks: bool = True) -> Harness:
    """A :class:`Harness` over the worker's start-up path (``build_planner``):
    ``handlers`` by message name (default: the installed ``fanout.handlers``), each one
    that checks options given its ``[handlers.<name>]`` table, every ``[[routes]]``
    rule built once. A ``SettingsError`` is what ``fanout run`` would stop with.

    ``start_up_checks=False`` skips the option and route checks, to see what a
    handler does at build time with options its ``check_options`` would refuse."""
    settings = config if isinstance(config, Settings) else make_settings(config, home=home)
    registry = (HandlerRegistry(handlers) if handlers is not None
                else HandlerRegistry.from_entry_points())
    store = storage if storage is not None else make_storage(settings)
    if start_up_checks:
        planner = build_planner(settings, store, handlers=registry)
    else:
        router = Router(registry=registry, routes=settings.routes, storage=store,
                        drop_unrouted=settings.events.unrouted == "drop")
        planner = make_planner(settings, router, store)
    return Harness(settings=settings, planner=planner)


def build_job(handler: Handler, params: Mapping[str, Any], *, name: str = DEFAULT_NAME,
              config: Mapping[str, Any] | Settings | None = None,
              job_options: Mapping[str, Any] | None = None, key: str = "test-key",
              properties: Mapping[str, str] | None = None,
              home: str | os.PathLike[str] | None = None,
              storage: Storage | None = None) -> tuple[JobSpec, list[TaskSpec]]:
    """Run ``handler`` (installed as ``name``) on one message with these params and
    job options, through the worker's own path; return its job and drawn tasks.

    Raises what the worker would act on: ``SettingsError`` (the worker would not
    start), a ``MessageFault`` (the message would be dead-lettered with its reason),
    or the handler's own exception (abandoned and tried again)."""
    kit = harness({name: handler}, config=config, home=home, storage=storage)
    return kit.build(name, params, job_options=job_options, key=key, properties=properties)


def plan_message(body: Any, config: Mapping[str, Any] | Settings | None = None, *,
                 handlers: Mapping[str, Handler] | None = None,
                 message_id: str = "msg-1",
                 properties: Mapping[str, str] | None = None) -> Plan:
    """Plan one message (an envelope, a blob event, a cancel) as ``fanout plan`` would."""
    return harness(handlers, config=config).plan(body, message_id, properties=properties)


def draw(job: JobSpec) -> list[TaskSpec]:
    """Draw a planned job's tasks through the worker's streaming checks; hold the
    handler to its ``task_count`` as the submitter does. ``job.tasks`` becomes the list."""
    tasks = list(job.tasks)
    if len(tasks) != job.task_count:
        raise RuntimeError(f"the handler declared {job.task_count} tasks but yielded "
                           f"{len(tasks)}")
    job.tasks = tasks
    return tasks


def _body(body: Any) -> bytes:
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode("utf-8")
    return json.dumps(body).encode("utf-8")
