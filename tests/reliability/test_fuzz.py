"""Property-based fuzzing of everything a message passes through before submission:
``parse_body`` on arbitrary bytes and JSON, blob events, and the handlers' params via
the real ``Planner`` and handler registry. The property: a message either becomes a
valid plan (every task well formed, as many as declared) or raises a ``MessageFault``
with a documented reason code; never any other exception.

Examples are bounded and derandomized (the ``fanout-ci`` profile in conftest.py).
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from handlers.base import ID_PATTERN
from handlers.errors import MessageFault
from worker.app import make_planner, make_storage
from worker.config import Settings, load_settings
from worker.envelope import BlobEvent, Cancel, Envelope, parse_body
from worker.plan import Plan, Planner
from worker.routing import HandlerRegistry, Router
from worker.storage.local import LocalStorage

from .conftest import hostile_config
from .test_poison import REASONS

#: ``HYPOTHESIS_PROFILE=fanout-explore`` searches much further (by hand, not in CI).
CI = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "fanout-ci"))
MAX_TASKS = 300

# -- strategies ---------------------------------------------------------------------------

#: Any code point, lone surrogates and NUL included (st.text leaves surrogates out).
texts = st.one_of(
    st.text(st.characters(exclude_categories=()), max_size=12),
    st.sampled_from(["\x00", "a\x00b", "\ud800", "x\udfff", "'", "$(touch x)", "\n", ""]))
scalars = st.one_of(st.none(), st.booleans(), st.integers(),
                    st.floats(allow_nan=False, allow_infinity=False), texts)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
numbers = st.one_of(st.integers(-30, 30), st.floats(-30, 30, allow_nan=False),
                    st.sampled_from([0, -1, 0.0, 1e-9, 1e300, True]))
ranges = st.fixed_dictionaries({"start": numbers, "stop": numbers},
                               optional={"step": numbers, "extra": scalars})
axes = st.one_of(st.lists(scalars, max_size=5), ranges, json_values)
param_names = st.one_of(st.sampled_from(["value", "a", "b", "v", "task_index", "x-y", "é", ""]),
                        st.text(max_size=6))
sweep_params = st.fixed_dictionaries({}, optional={
    "program": st.one_of(st.sampled_from(["echo", "pair", "nope", ""]), json_values),
    "command": st.one_of(st.text(max_size=20), st.sampled_from(["echo {value}", "{0}"])),
    "parameters": st.one_of(st.dictionaries(param_names, axes, max_size=3), json_values),
    "mode": st.one_of(st.sampled_from(["product", "zip", "combinations", "random"]), scalars),
    "repeat": st.one_of(st.integers(-2, 4), scalars),
    "samples": st.one_of(st.integers(-2, 20), scalars),
    "seed": st.one_of(st.integers(), scalars),
    "length": st.one_of(st.integers(-1, 4), scalars),
    "replacement": st.one_of(st.booleans(), scalars),
    "aggregate": st.one_of(st.fixed_dictionaries({}, optional={
        "program": st.sampled_from(["echo", "pair", "nope"]),
        "command": st.text(max_size=10)}), json_values),
    "task": st.one_of(st.fixed_dictionaries({}, optional={
        "max_task_retries": st.integers(-3, 200), "max_wall_clock": st.text(max_size=8),
        "retention": st.sampled_from(["PT1H", "P1D", "-PT1H", "x"])}), json_values),
})
values_lists = st.lists(st.one_of(texts, st.integers(-5, 5), st.floats(-5, 5), st.booleans()),
                        min_size=1, max_size=4)
small_ranges = st.one_of(
    st.fixed_dictionaries({"start": st.integers(-5, 5), "stop": st.integers(-5, 15)},
                          optional={"step": st.integers(-1, 4)}),
    st.fixed_dictionaries({"start": st.floats(-1, 1), "stop": st.floats(-1, 2)},
                          optional={"step": st.sampled_from([0.1, 0.25, 1e-3, 0.0])}))
#: Mostly valid sweeps (so the fuzzing reaches whole plans), with values of every kind.
valid_sweeps = st.one_of(
    st.fixed_dictionaries({"program": st.just("echo"),
                           "parameters": st.fixed_dictionaries(
                               {"value": st.one_of(values_lists, small_ranges)})},
                          optional={"repeat": st.integers(1, 3),
                                    "aggregate": st.just({"program": "echo"}),
                                    "task": st.just({"max_task_retries": 1})}),
    st.fixed_dictionaries({"program": st.just("pair"),
                           "parameters": st.fixed_dictionaries(
                               {"a": st.one_of(values_lists, small_ranges),
                                "b": st.one_of(values_lists, small_ranges)}),
                           "mode": st.sampled_from(["product", "zip"])}),
    st.fixed_dictionaries({"program": st.just("pair"),
                           "parameters": st.fixed_dictionaries({"a": values_lists,
                                                                "b": values_lists}),
                           "mode": st.just("random"), "samples": st.integers(1, 4),
                           "seed": st.integers()}))
blob_names = st.one_of(st.text(min_size=1, max_size=20),
                       st.sampled_from(["a.mp4", "../a.mp4", "a/../b.mp4", "x//y.mp4",
                                        "d/clip one.MP4", "a\nb.mp4", "%2e%2e/x.mp4"]))
blob_refs = st.one_of(
    st.fixed_dictionaries({"container": st.sampled_from(["videos", "Videos", "..", "a"]),
                           "blob": blob_names}),
    st.builds(lambda n: f"file://{{root}}/videos/{n}", blob_names),
    st.sampled_from(["https://evil.blob.core.windows.net/videos/a.mp4", "file:///etc/passwd",
                     "file://{root}/videos/a.mp4?sig=x", "ftp://x/y"]),
    json_values)
media_params = st.fixed_dictionaries({}, optional={
    "input": blob_refs, "inputs": st.lists(blob_refs, max_size=3),
    "scene": blob_refs, "renditions": st.one_of(st.lists(st.sampled_from(
        ["360p", "720p", "4k"]), max_size=3), json_values),
    "output": st.one_of(st.fixed_dictionaries({}, optional={
        "container": st.sampled_from(["renditions", "renders", "Bad", "../x"]),
        "prefix": st.one_of(st.text(max_size=10), st.sampled_from(["..", "a/../b", "/x"]))}),
        json_values),
    "frames": st.one_of(st.fixed_dictionaries({"start": st.integers(-5, 50),
                                               "end": st.integers(-5, 50)},
                                              optional={"step": st.integers(-2, 5)}),
                        json_values),
    "frames_per_task": st.one_of(st.integers(-1, 10), scalars),
    "thumbnail": st.one_of(st.booleans(), json_values), "manifest": st.booleans(),
    "hls": st.booleans(), "profile": st.one_of(st.sampled_from(["blender", "x"]), scalars),
    "encode": st.one_of(st.fixed_dictionaries({}, optional={
        "fps": st.integers(-1, 120), "codec": st.text(max_size=8)}), json_values),
})
any_names = st.text(st.characters(exclude_categories=()), min_size=1, max_size=16)
#: Mostly valid transcode and render params, with blob names of any characters.
valid_media = st.one_of(
    st.tuples(st.just("transcode"), st.fixed_dictionaries(
        {"input": st.fixed_dictionaries({"container": st.just("videos"), "blob": any_names})},
        optional={"renditions": st.lists(st.sampled_from(["360p", "720p"]), min_size=1,
                                         max_size=2, unique=True),
                  "thumbnail": st.booleans(), "manifest": st.booleans(),
                  "hls": st.booleans(),
                  "output": st.fixed_dictionaries({"prefix": texts})})),
    st.tuples(st.just("render"), st.fixed_dictionaries(
        {"scene": st.fixed_dictionaries({"container": st.just("scenes"), "blob": any_names}),
         "frames": st.fixed_dictionaries({"start": st.integers(1, 5),
                                          "end": st.integers(5, 40)})},
        optional={"frames_per_task": st.integers(1, 6), "encode": st.just({"fps": 24}),
                  "output": st.fixed_dictionaries({"prefix": texts})})))
job_options = st.one_of(st.fixed_dictionaries({}, optional={
    "pool": st.one_of(st.sampled_from(["local", "gpu", "../x"]), scalars),
    "priority": st.one_of(st.integers(-2000, 2000), scalars),
    "max_task_retries": st.one_of(st.integers(-3, 20), scalars),
    "max_wall_clock": st.one_of(st.sampled_from(["PT1H", "P30D", "-PT1S", "PT0S"]), scalars),
    "display_name": st.one_of(st.text(max_size=20), scalars)}), json_values)
envelopes = st.fixed_dictionaries(
    {"handler": st.one_of(st.sampled_from(["sweep", "transcode", "render", "nope"]),
                          json_values)},
    optional={"id": st.one_of(st.text(max_size=20), scalars), "job": job_options,
              "params": st.one_of(sweep_params, media_params, json_values)})
event_types = st.one_of(st.sampled_from(["Microsoft.Storage.BlobCreated",
                                         "Microsoft.Storage.BlobDeleted"]), scalars)
event_data = st.one_of(st.fixed_dictionaries({"url": st.one_of(blob_refs, scalars)}, optional={
    "api": st.sampled_from(["PutBlob", "FlushWithClose", "CreateFile", ""]),
    "contentType": st.one_of(st.sampled_from(["video/mp4", ""]), scalars),
    "contentLength": st.one_of(st.integers(), scalars)}), json_values)
events = st.one_of(
    st.fixed_dictionaries({"eventType": event_types},
                          optional={"id": st.one_of(st.text(max_size=10), scalars),
                                    "data": event_data, "subject": scalars,
                                    "topic": scalars, "eventTime": scalars}),
    st.fixed_dictionaries({"specversion": st.sampled_from(["1.0", 1])},
                          optional={"id": st.one_of(st.text(max_size=10), scalars),
                                    "type": event_types, "data": event_data,
                                    "source": scalars, "time": scalars}))

def _url_name(name: str) -> str:
    """Percent-encode any name, lone surrogates too (as their UTF-8-ish bytes)."""
    return quote(name.encode("utf-8", "surrogatepass"), safe="/")


#: Mostly valid BlobCreated events for the local store, with blob names of any characters.
valid_events = st.fixed_dictionaries({
    "eventType": st.just("Microsoft.Storage.BlobCreated"),
    "id": st.text(min_size=1, max_size=10),
    "data": st.fixed_dictionaries({
        "url": st.builds(lambda n, ext: f"file://{{root}}/videos/{_url_name(n)}{ext}",
                         any_names, st.sampled_from([".mp4", ".MP4", ".mov"])),
        "api": st.sampled_from(["PutBlob", "FlushWithClose", "CreateFile"])})})


# -- the system under test ----------------------------------------------------------------


@pytest.fixture(scope="module")
def planner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Planner]:
    """The real Planner and handler registry with the hostile config, 300 tasks max."""
    root = tmp_path_factory.mktemp("fuzz")
    config = hostile_config(root)
    config["limits"]["max_tasks_per_message"] = MAX_TASKS
    config["home"] = str(root / "home")
    empty = root / "empty.toml"
    empty.write_text("")
    settings_: Settings = load_settings(empty, overrides=config)
    storage = make_storage(settings_)
    router = Router(registry=HandlerRegistry.from_entry_points(), routes=settings_.routes,
                    storage=storage)
    yield make_planner(settings_, router, storage)


def blob_root(planner: Planner) -> str:
    storage = planner.storage
    assert isinstance(storage, LocalStorage)
    return storage.account_url.removeprefix("file://")


def check_plan(plan: Plan) -> None:
    """Every job of a plan yields exactly its declared tasks, each well formed."""
    for planned in plan.jobs:
        job = planned.job
        assert ID_PATTERN.match(job.id)
        assert 0 < job.task_count <= MAX_TASKS
        tasks = list(job.tasks)
        assert len(tasks) == job.task_count
        assert len({t.id.lower() for t in tasks}) == len(tasks)
        for task in tasks:
            assert ID_PATTERN.match(task.id), task.id
            text = task.command_line + "".join(k + v for k, v in task.environment.items())
            assert "\x00" not in text
            text.encode("utf-8")  # no lone surrogate reaches a backend
            argv = shlex.split(task.command_line)  # what the local executor runs
            assert argv[:2] == ["/bin/sh", "-c"] and len(argv) == 3
            shlex.split(argv[2])  # the shell command itself is balanced


def outcome(planner: Planner, body: bytes, properties: dict[str, str] | None = None) -> str:
    """Plan ``body``: "ok" for a valid plan, else the fault's reason code."""
    try:
        plan = planner.plan(body, properties, message_id="fuzz-message")
    except MessageFault as fault:
        assert fault.reason in REASONS, fault
        assert isinstance(fault.description, str) and fault.description
        return fault.reason
    check_plan(plan)
    return "ok"


# -- properties ---------------------------------------------------------------------------


@CI
@given(st.binary(max_size=512))
def test_arbitrary_bytes_parse_or_fault(body: bytes) -> None:
    """Any bytes are an envelope, a cancel request, events, or a MessageFault with a
    known reason."""
    try:
        parsed = parse_body(body, max_bytes=256)
    except MessageFault as fault:
        assert fault.reason in REASONS
        return
    assert isinstance(parsed, Envelope | Cancel) or all(isinstance(e, BlobEvent) for e in parsed)


@CI
@given(json_values)
def test_arbitrary_json_parses_or_faults(value: Any) -> None:
    """Any JSON value is an envelope, events, or a MessageFault with a known reason."""
    try:
        parsed = parse_body(json.dumps(value).encode())
    except MessageFault as fault:
        assert fault.reason in REASONS
        return
    assert isinstance(parsed, (Envelope, list))


@CI
@given(envelopes, st.dictionaries(st.sampled_from(["handler", "x"]), st.text(max_size=8),
                                   max_size=2))
def test_envelopes_plan_or_fault(planner: Planner, envelope: dict[str, Any],
                                 properties: dict[str, str]) -> None:
    """Envelopes with fuzzed handlers, job options and params plan or fault cleanly."""
    body = json.dumps(envelope).replace("{root}", blob_root(planner)).encode()
    event(outcome(planner, body, properties))


@CI
@given(st.one_of(valid_sweeps, sweep_params))
def test_sweep_params_plan_or_fault(planner: Planner, params: dict[str, Any]) -> None:
    """The sweep handler's params, fuzzed around the valid shapes, plan or fault cleanly."""
    event(outcome(planner, json.dumps({"handler": "sweep", "params": params}).encode()))


@CI
@given(st.one_of(valid_media, st.tuples(st.sampled_from(["transcode", "render"]),
                                        media_params)))
def test_media_params_plan_or_fault(planner: Planner, case: tuple[str, dict[str, Any]]) -> None:
    """Transcode and render params with fuzzed blob references plan or fault cleanly."""
    handler, params = case
    body = json.dumps({"handler": handler, "params": params})
    event(outcome(planner, body.replace("{root}", blob_root(planner)).encode()))


@CI
@given(st.one_of(valid_events, events, st.lists(st.one_of(valid_events, events), min_size=1,
                                                max_size=3)))
def test_events_plan_or_fault(planner: Planner, payload: Any) -> None:
    """Event Grid and CloudEvents bodies, fuzzed, plan (via the route) or fault cleanly."""
    body = json.dumps(payload).replace("{root}", blob_root(planner)).encode()
    event(outcome(planner, body))


def test_fuzzing_reaches_valid_plans(planner: Planner) -> None:
    """The strategies are not all noise: hand-picked members of them do plan."""
    root = blob_root(planner)
    (root_path := Path(root) / "videos").mkdir(parents=True, exist_ok=True)
    (root_path / "a.mp4").write_bytes(b"x")
    bodies = [
        {"handler": "sweep", "params": {"program": "echo", "parameters": {"value": [1, "x"]}}},
        {"handler": "transcode", "params": {"input": {"container": "videos", "blob": "a.mp4"}}},
        {"eventType": "Microsoft.Storage.BlobCreated", "id": "e1",
         "data": {"url": f"file://{root}/videos/a.mp4", "api": "PutBlob"}},
    ]
    assert [outcome(planner, json.dumps(b).encode()) for b in bodies] == ["ok"] * 3


templates = st.lists(st.one_of(
    st.sampled_from(["{v}", "{w}", "{x}", "{task_index}", "{repeat_index}", "{{", "}}"]),
    st.text(st.characters(exclude_categories=["Cs"], exclude_characters="{}\x00"),
            max_size=6)), min_size=1, max_size=6).map("".join)


@CI
@given(templates, st.lists(texts, min_size=1, max_size=4, unique=True),
       st.lists(st.integers(-3, 3), min_size=1, max_size=3, unique=True),
       st.lists(st.sampled_from(["1", "a b", "'", "{x}", ""]), max_size=2, unique=True),
       st.permutations(["v", "w", "x"]), st.sampled_from(["product", "random"]),
       st.integers(1, 3), st.dictionaries(st.sampled_from(["X", "FANOUT_PARAM_V",
                                                           "FANOUT_TASK_INDEX"]),
                                          st.text(max_size=3), max_size=2),
       st.booleans())
def test_fast_command_lines_equal_the_generic_quoting(
        template: str, vs: list[str], ws: list[int], xs: list[str], order: list[str],
        mode: str, repeat: int, environment: dict[str, str], options: bool) -> None:
    """The sweep's pieced-together command lines (``sh_parts``; mode ``product`` nested
    by its last parameter, the others a row at a time) are exactly what quoting each
    value and then the whole line (``sh``) gives, environments included, with two or
    three parameters in any order (so any of them is the one that varies fastest)."""
    from handlers.base import Program
    from handlers.commands import CommandTemplate, sh_parts
    from handlers.sweep import (
        BUILTIN_FIELDS,
        Grid,
        _tasks,
        _tasks_generic,
        expand_axis,
        parse_params,
    )

    values: dict[str, list[Any]] = {"v": list(vs), "w": list(ws), "x": list(xs)}
    try:
        parsed = CommandTemplate(template)
        raw: dict[str, Any] = {"program": "p", "repeat": repeat, "mode": mode,
                               "parameters": {n: values[n] for n in order if values[n]}}
        if mode == "random":
            raw |= {"samples": 2 if len(vs) * len(ws) > 1 else 1, "seed": 7}
        if options:
            raw["task"] = {"max_task_retries": 2, "max_wall_clock": "PT1H"}
        params = parse_params(raw)
        axes = {n: expand_axis(n, s, 1000) for n, s in params.parameters.items()}
    except (ValueError, MessageFault):
        return  # a template or values the handler refuses anyway
    fields = [*axes, *BUILTIN_FIELDS]
    if parsed.missing(fields):
        return  # the handler refuses a template naming a parameter the sweep lacks
    program = Program(name="p", command=template, environment=environment,
                      required_slots=2 if options else 1)
    from handlers.base import SATISFY_DEPENDENTS

    conditions = SATISFY_DEPENDENTS if options else None  # the aggregate's "run" policy
    fast = list(_tasks(params, Grid(params, axes), program, parsed, conditions))
    generic = list(_tasks_generic(params, Grid(params, axes), program, parsed, conditions))
    assert fast == generic
    assert all(t.exit_conditions is conditions for t in fast)
    assert [list(t.environment.items()) for t in fast] == \
        [list(t.environment.items()) for t in generic]
    event("fast path" if sh_parts(parsed, fields) else "generic fallback")
    event(f"{mode}, {len(axes)} parameters")
