"""Window jobs: a blob route that gathers its events into one job per window.

Unit tests of the window arithmetic and task rewriting, then the planner, the
submitter and the monitor against the real local executor, and a whole worker."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from prometheus_client import CollectorRegistry

from handlers.base import BlobRef, TaskSpec
from handlers.errors import InvalidParams
from tests.worker.harness import RunningWorker
from tests.worker.window_handler import BlobTask
from worker.app import build_planner
from worker.backends.base import META_SEAL_AT, META_TASKS, META_WINDOW
from worker.backends.local import LocalBackend
from worker.config import EventsConfig, JobsConfig, RouteConfig, Settings, SubmitConfig
from worker.context import job_id_for
from worker.errors import SettingsError
from worker.events import schema
from worker.metrics import Metrics
from worker.monitor import JobMonitor
from worker.plan import Planner
from worker.routing import HandlerRegistry
from worker.sinks.base import Published
from worker.storage.local import LocalStorage, file_url
from worker.submit import Submitter
from worker.window import (
    MAX_DEPENDENCY_CHARS,
    Window,
    WindowJob,
    display_name,
    event_time,
    parse_display_name,
    seal_due,
    task_prefix,
    window_for,
    window_task,
)

REGISTRY = HandlerRegistry({"blobtask": BlobTask()})


def rule(**kw: Any) -> RouteConfig:
    base: dict[str, Any] = {"handler": "blobtask", "container": "uploads",
                            "job": "window", "window": "PT1H", "seal_after": "PT1S"}
    base.update(kw)
    return RouteConfig.model_validate(base)


# -- the window arithmetic ---------------------------------------------------------------


@pytest.mark.parametrize(("raw", "expected"), [
    ("2026-12-01T12:34:56.1234567Z", datetime(2026, 12, 1, 12, 34, 56, 123456, tzinfo=UTC)),
    ("2026-12-01T12:34:56Z", datetime(2026, 12, 1, 12, 34, 56, tzinfo=UTC)),
    ("2026-12-01T13:34:56+01:00", datetime(2026, 12, 1, 12, 34, 56, tzinfo=UTC)),
    ("2026-12-01T12:34:56", datetime(2026, 12, 1, 12, 34, 56, tzinfo=UTC)),
    ("2026-12-01T12:34:56.5+02:00", datetime(2026, 12, 1, 10, 34, 56, 500000, tzinfo=UTC)),
    ("yesterday", None), ("", None), (None, None),
])
def test_event_time(raw: str | None, expected: datetime | None) -> None:
    """Event Grid's seven fractional digits parse; a time without offset is UTC."""
    assert event_time(raw) == expected


def test_window_is_the_floor_of_the_event_time_and_deterministic() -> None:
    """Window start = floor(time / window); the key names the route and the start."""
    ref = BlobRef("uploads", "a.bin")
    r = rule(name="thumbs")
    first = window_for(r, event_id="e1", event_time_text="2026-12-01T12:59:59.9Z", ref=ref)
    again = window_for(r, event_id="e2", event_time_text="2026-12-01T12:00:00Z", ref=ref)
    assert first is not None and again is not None
    assert first.start == datetime(2026, 12, 1, 12, tzinfo=UTC)
    assert first.end == datetime(2026, 12, 1, 13, tzinfo=UTC)
    assert first.seal_at == first.end + timedelta(seconds=1)
    assert first.key == again.key and first.key.startswith("thumbs-20261201T120000Z-")
    nxt = window_for(r, event_id="e3", event_time_text="2026-12-01T13:00:00Z", ref=ref)
    assert nxt is not None and nxt.key != first.key
    # a changed rule gathers into other jobs; an unwindowed rule has no window
    other = window_for(rule(name="thumbs", params={"x": 1}), event_id="e1",
                       event_time_text="2026-12-01T12:30:00Z", ref=ref)
    assert other is not None and other.key != first.key
    assert window_for(RouteConfig(handler="blobtask"), event_id="e1",
                      event_time_text="2026-12-01T12:30:00Z", ref=ref) is None
    assert window_for(r, event_id="e1", event_time_text=None, ref=ref) is None
    job_id = job_id_for("blobtask", first.key)
    assert job_id.startswith("blobta-thumbs-20261201T120000Z-") and len(job_id) <= 64


def test_route_config_shapes() -> None:
    """``job = "window"`` needs ``window``; a table may carry ``mode`` and options."""
    assert rule().mode == "window" and rule().job_options == {}
    table = rule(job={"mode": "window", "pool": "media", "priority": 5})
    assert table.mode == "window" and table.job_options == {"pool": "media", "priority": 5}
    assert RouteConfig(handler="x").mode == "event"
    with pytest.raises(ValueError, match="needs window"):
        RouteConfig.model_validate({"handler": "x", "job": "window"})
    with pytest.raises(ValueError, match="only with"):
        RouteConfig.model_validate({"handler": "x", "window": "PT1H"})
    with pytest.raises(ValueError, match="whole seconds"):
        RouteConfig.model_validate({"handler": "x", "job": "window", "window": "PT0.5S"})
    with pytest.raises(ValueError):
        RouteConfig.model_validate({"handler": "x", "job": "hourly"})


def test_a_window_longer_than_the_wall_clock_is_refused_at_startup(
        make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    """A window job Batch would end before it is sealed stops the worker at start-up."""
    settings = make_settings(routes=[{"handler": "blobtask", "job": "window",
                                      "window": "P1D", "seal_after": "PT5M"}])
    with pytest.raises(SettingsError, match="max wall clock"):
        build_planner(settings, LocalStorage(root=tmp_path / "blobs"), handlers=REGISTRY)


def win(event_id: str = "ev-1", blob: str = "uploads/a.bin") -> Window:
    start = datetime(2026, 12, 1, 12, tzinfo=UTC)
    return Window(key="k", start=start, end=start + timedelta(hours=1),
                  seal_at=start + timedelta(hours=1, minutes=5), event_id=event_id,
                  blob=blob, route="r")


def test_window_task_prefixes_ids_and_rewrites_dependencies() -> None:
    """Ids get the event's digest; depends_on follows; ranges become explicit ids; the
    display name names the event and the blob."""
    prefix = task_prefix("ev-1")
    assert len(prefix) == 17 and prefix == task_prefix("ev-1") != task_prefix("ev-2")
    task = window_task(TaskSpec(id="fanin", command_line="x", depends_on=("probe",),
                                depends_on_ranges=((0, 2),), display_name="manifest"),
                       prefix, win())
    assert task.id == prefix + "fanin"
    assert task.depends_on == (prefix + "probe", prefix + "0", prefix + "1", prefix + "2")
    assert task.depends_on_ranges == ()
    assert parse_display_name(task.display_name) == ("ev-1", "uploads/a.bin")
    assert json.loads(task.display_name or "")["task"] == "manifest"


def test_window_task_faults_name_the_limits() -> None:
    """An id over 64 characters with the prefix, or dependencies over Batch's 64,000
    characters once written out, are InvalidParams saying so."""
    prefix = task_prefix("ev-1")
    with pytest.raises(InvalidParams, match="over Batch's 64"):
        window_task(TaskSpec(id="t" * 48, command_line="x"), prefix, win())
    window_task(TaskSpec(id="t" * 47, command_line="x"), prefix, win())
    with pytest.raises(InvalidParams, match=str(MAX_DEPENDENCY_CHARS)):
        window_task(TaskSpec(id="agg", command_line="x", depends_on_ranges=((0, 9999),)),
                    prefix, win())


def test_display_name_fits_batch_limit() -> None:
    """A long blob name is cut so the display name stays within 1,024 characters."""
    name = display_name("e" * 256, "uploads/" + "b" * 1024, "n" * 300)
    assert len(name) <= 1024
    event, blob = parse_display_name(name) or ("", "")
    assert event == "e" * 256 and blob.endswith("...")
    assert parse_display_name("frames 1-10") is None and parse_display_name(None) is None


def test_seal_due() -> None:
    """Due at ``fanout-seal-at``, or a window plus the seal delay after creation (an
    event dated in the future cannot hold its job open)."""
    meta = {META_WINDOW: "2026-12-01T12:00:00Z/2026-12-01T13:00:00Z",
            META_SEAL_AT: "2026-12-01T13:05:00Z"}
    created = datetime(2026, 12, 1, 12, 10, tzinfo=UTC)
    assert not seal_due(meta, created, datetime(2026, 12, 1, 13, 4, tzinfo=UTC))
    assert seal_due(meta, created, datetime(2026, 12, 1, 13, 5, tzinfo=UTC))
    early = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)  # created 2 h before its window
    assert seal_due(meta, early, datetime(2026, 12, 1, 11, 5, tzinfo=UTC))
    assert not seal_due({}, created, datetime(2030, 1, 1, tzinfo=UTC))


# -- planner, submitter and monitor on the local executor --------------------------------


def blob_event(storage: LocalStorage, blob: str, event_id: str, when: str | None,
               schema_: str = "eventgrid") -> dict[str, Any]:
    url = file_url(storage.path(BlobRef("uploads", blob)))
    data = {"api": "PutBlob", "url": url, "contentType": "application/octet-stream"}
    if schema_ == "cloudevents":
        event: dict[str, Any] = {"specversion": "1.0", "type": "Microsoft.Storage.BlobCreated",
                                 "source": "/local", "id": event_id, "data": data}
        if when:
            event["time"] = when
        return event
    event = {"eventType": "Microsoft.Storage.BlobCreated", "topic": "/local", "id": event_id,
             "subject": f"/blobServices/default/containers/uploads/blobs/{blob}", "data": data,
             "dataVersion": "", "metadataVersion": "1"}
    if when:
        event["eventTime"] = when
    return event


class Sink:
    destination = "fanout.events"

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    async def publish(self, body: bytes, *, message_id: str, to: str | None = None,
                      properties: Any = None) -> None:
        self.sent.append(json.loads(body))

    async def peek(self, limit: int = 100, *, from_sequence: int | None = None
                   ) -> list[Published]:
        return []

    async def close(self) -> None:
        pass


@pytest.fixture
def local(make_settings: Callable[..., Settings], tmp_path: Path
          ) -> Iterator[Callable[..., tuple[Planner, Submitter, LocalBackend]]]:
    made: list[tuple[Submitter, LocalBackend]] = []

    def make(*, start: bool = True, **route: Any) -> tuple[Planner, Submitter, LocalBackend]:
        settings = make_settings(routes=[{"handler": "blobtask", "container": "uploads",
                                          "job": "window", "window": "PT1H",
                                          "seal_after": "PT1S", **route}])
        storage = LocalStorage(root=tmp_path / "blobs")
        planner = build_planner(settings, storage, handlers=REGISTRY)
        backend = LocalBackend(home=tmp_path / "home", slots=2, poll_interval=0.02)
        if start:
            backend.start()
        submitter = Submitter(backend=backend, config=SubmitConfig(backoff_base=0.001),
                              metrics=Metrics(registry=CollectorRegistry()))
        made.append((submitter, backend))
        return planner, submitter, backend

    yield make
    for submitter, backend in made:
        submitter.close()
        backend.close()


def submit(planner: Planner, submitter: Submitter, event: dict[str, Any]) -> list[Any]:
    plan = planner.plan(json.dumps(event).encode(), message_id="m")
    return [submitter.submit(p.job, handler=p.handler) for p in plan.jobs]


def test_events_of_one_window_share_one_open_job(
        local: Callable[..., tuple[Planner, Submitter, LocalBackend]], tmp_path: Path) -> None:
    """Two events of one window: one job, both events' tasks (with their dependencies),
    not sealed; a redelivery adds nothing; another window is another job; an event
    without a time gets its own job."""
    planner, submitter, backend = local(start=False, params={"tasks": 2, "fanin": True})
    storage = LocalStorage(root=tmp_path / "blobs")
    t = "2026-12-01T12:10:00.1234567Z"
    (first,) = submit(planner, submitter, blob_event(storage, "a.bin", "ev-a", t))
    (second,) = submit(planner, submitter, blob_event(storage, "b.bin", "ev-b",
                                                      "2026-12-01T12:50:00Z", "cloudevents"))
    assert first.job_id == second.job_id == first.window_job
    assert (first.added, second.added) == (3, 3)
    (again,) = submit(planner, submitter, blob_event(storage, "a.bin", "ev-a", t))
    assert (again.added, again.existed) == (0, 3)
    record = backend.get_job(first.job_id)
    assert record is not None and not record.sealed and record.state == "active"
    assert record.metadata[META_WINDOW] == "2026-12-01T12:00:00Z/2026-12-01T13:00:00Z"
    assert META_TASKS not in record.metadata
    prefix = task_prefix("ev-a")
    fanin = backend.task(first.job_id, prefix + "fanin")
    assert fanin is not None and parse_display_name(fanin.display_name) == (
        "ev-a", "uploads/a.bin")
    (other,) = submit(planner, submitter, blob_event(storage, "c.bin", "ev-c",
                                                     "2026-12-01T13:00:00Z"))
    assert other.job_id != first.job_id
    (own,) = submit(planner, submitter, blob_event(storage, "d.bin", "ev-d", None,
                                                   "cloudevents"))
    assert own.job_id == job_id_for("blobtask", "ev-d") and own.window_job is None
    assert backend.task(own.job_id, "fanin") is not None  # its own ids, unprefixed
    own_record = backend.get_job(own.job_id)
    assert own_record is not None and own_record.sealed


def test_a_sealed_window_job_takes_tasks_until_it_completes(
        local: Callable[..., tuple[Planner, Submitter, LocalBackend]], tmp_path: Path) -> None:
    """Sealed (and still running): a late event's tasks join it."""
    planner, submitter, backend = local(start=False)
    storage = LocalStorage(root=tmp_path / "blobs")
    t = "2026-12-01T12:10:00Z"
    (first,) = submit(planner, submitter, blob_event(storage, "a.bin", "ev-a", t))
    backend.seal_job(first.job_id)
    (late,) = submit(planner, submitter, blob_event(storage, "b.bin", "ev-b", t))
    assert late.job_id == first.job_id and late.added == 1 and not late.late


def test_a_late_event_of_a_completed_window_runs_on_its_own_exactly_once(
        local: Callable[..., tuple[Planner, Submitter, LocalBackend]], tmp_path: Path) -> None:
    """The window job completed: a new event gets its own job (the route's default),
    redelivered it adds nothing; an event whose tasks ran in the window job is done."""
    planner, submitter, backend = local(params={"tasks": 2})
    storage = LocalStorage(root=tmp_path / "blobs")
    t = "2026-12-01T12:10:00Z"
    (first,) = submit(planner, submitter, blob_event(storage, "a.bin", "ev-a", t))
    backend.seal_job(first.job_id)
    wait(lambda: (r := backend.get_job(first.job_id)) is not None and r.state == "completed")
    (late,) = submit(planner, submitter, blob_event(storage, "b.bin", "ev-b", t))
    assert late.late and late.window_job == first.job_id
    assert late.job_id == job_id_for("blobtask", "ev-b") and late.added == 2
    (again,) = submit(planner, submitter, blob_event(storage, "b.bin", "ev-b", t))
    assert again.late and again.job_id == late.job_id and again.added == 0
    (redelivered,) = submit(planner, submitter, blob_event(storage, "a.bin", "ev-a", t))
    assert redelivered.job_id == first.job_id and not redelivered.late
    assert (redelivered.added, redelivered.existed) == (0, 2)
    assert backend.get_job(job_id_for("blobtask", "ev-a")) is None


def test_a_rejected_event_leaves_the_window_job_running(
        local: Callable[..., tuple[Planner, Submitter, LocalBackend]], tmp_path: Path) -> None:
    """An event whose tasks cannot be windowed is dead-lettered (InvalidParams); the
    window job holding other events' tasks is not terminated."""
    planner, submitter, backend = local(start=False, params={"tasks": 4000, "fanin": True})
    storage = LocalStorage(root=tmp_path / "blobs")
    t = "2026-12-01T12:10:00Z"
    with pytest.raises(InvalidParams, match="64000"):
        submit(planner, submitter, blob_event(storage, "a.bin", "ev-a", t))
    record = backend.list_fanout_jobs()[0]
    assert record.state == "active" and record.terminate_reason is None


def wait(predicate: Callable[[], bool], timeout: float = 15) -> None:
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError("timed out")


def test_monitor_seals_reports_and_names_failed_events(
        local: Callable[..., tuple[Planner, Submitter, LocalBackend]], tmp_path: Path) -> None:
    """Not before its seal time; then sealed with its count; its event lists the failed
    event with its blob, and validates against the schema."""
    planner, submitter, backend = local()
    storage = LocalStorage(root=tmp_path / "blobs")
    t = "2026-11-01T12:10:00Z"
    for i, blob in enumerate(["a.bin", "b.bin", "c-fail", "d.bin"]):
        (res,) = submit(planner, submitter, blob_event(storage, blob, f"ev-{i}", t))
    job_id = res.job_id
    clock = [datetime(2026, 11, 1, 13, 0, 0, 500000, tzinfo=UTC)]
    sink = Sink()
    monitor = JobMonitor(backend=backend, sink=sink, jobs=JobsConfig(), events=EventsConfig(),
                         metrics=Metrics(registry=CollectorRegistry()), clock=lambda: clock[0])
    assert asyncio.run(monitor.poll()).sealed == []
    record = backend.get_job(job_id)
    assert record is not None and not record.sealed
    clock[0] = datetime(2026, 11, 1, 13, 0, 1, tzinfo=UTC)
    assert asyncio.run(monitor.poll()).sealed == [job_id]
    record = backend.get_job(job_id)
    assert record is not None and record.sealed and record.metadata[META_TASKS] == "4"
    wait(lambda: (r := backend.get_job(job_id)) is not None and r.state == "completed")
    clock[0] = datetime.now(UTC) + timedelta(minutes=1)
    assert asyncio.run(monitor.poll()).reported == [job_id]
    (event,) = sink.sent
    jsonschema.validate(event, schema())
    data = event["data"]
    assert data["outcome"] == "failed" and data["tasks"]["total"] == 4
    assert data["window"] == {"start": "2026-11-01T12:00:00Z", "end": "2026-11-01T13:00:00Z",
                              "failed_events": 1, "failed_events_truncated": False}
    (failed,) = data["failed_tasks"]
    assert failed["event_id"] == "ev-2" and failed["blob"] == "uploads/c-fail"
    assert failed["task_id"] == task_prefix("ev-2") + "0" and failed["exit_code"] == 1


def test_whole_worker_gathers_a_window_and_reports_it(
        make_settings: Callable[..., Settings]) -> None:
    """A running worker: 30 events of one short window make one job of 30 tasks, sealed
    by the monitor after the window, reported once; later events get their own jobs."""
    now = datetime.now(UTC)
    # dated one window ahead: the job is sealed a window plus seal_after after it is
    # created (an event from the future cannot hold it open longer), whatever the clock
    start = now + timedelta(seconds=4)
    settings = make_settings(
        local={"slots": 2, "poll_interval": 0.02}, consumer={"receive_wait": 0.2},
        jobs={"poll_interval": 1.0},
        routes=[{"handler": "blobtask", "container": "uploads", "job": "window",
                 "window": "PT4S", "seal_after": "PT1S", "name": "e2e"}])
    worker = RunningWorker(settings, handlers=REGISTRY).start()
    try:
        storage = worker.app.storage
        assert isinstance(storage, LocalStorage)
        r = rule(window="PT4S", name="e2e")
        when = start.isoformat()
        w = window_for(r, event_id="x", event_time_text=when, ref=BlobRef("uploads", "x"))
        assert w is not None
        for i in range(30):
            worker.send(blob_event(storage, f"f{i}.bin", f"ev-{i}", when))
        worker.wait_idle(30)
        backend = worker.app.backend
        assert isinstance(backend, LocalBackend)
        job_id = job_id_for("blobtask", w.key)
        monitor = worker.app.monitor
        assert monitor is not None and monitor.sink is not None
        sink = monitor.sink
        worker.wait_until(lambda: bool(worker.call(sink.peek(10))),
                          timeout=20, what="the window job's event")
        (published,) = worker.call(sink.peek(10))
        event = json.loads(published.body)
        assert event["subject"] == job_id and event["data"]["tasks"]["total"] == 30
        assert event["data"]["outcome"] == "succeeded"
        worker.send(blob_event(storage, "late.bin", "ev-late", when))
        worker.wait_idle(31)
        late = backend.get_job(job_id_for("blobtask", "ev-late"))
        assert late is not None
        assert [j.id for j in backend.list_fanout_jobs() if j.id != late.id] == [job_id]
    finally:
        worker.stop()


def test_plan_of_a_window_event(
        local: Callable[..., tuple[Planner, Submitter, LocalBackend]], tmp_path: Path) -> None:
    """The planner builds the event's share of the window job: the window job's id and
    metadata (the rule's digest as the request, no per-event task count), prefixed
    tasks, and a fallback that builds the job the route makes without a window."""
    planner, _, _ = local(start=False, params={"tasks": 2})
    storage = LocalStorage(root=tmp_path / "blobs")
    body = json.dumps(blob_event(storage, "a.bin", "ev-a", "2026-12-01T12:10:00Z"))
    (planned,) = planner.plan(body.encode(), message_id="m").jobs
    job = planned.job
    assert isinstance(job, WindowJob) and job.window is not None
    assert job.open_until == job.window.seal_at
    assert job.metadata[META_SEAL_AT] == "2026-12-01T13:00:01Z"
    assert META_TASKS not in job.metadata and "fanout-message-id" not in job.metadata
    assert [t.id for t in job.tasks] == [task_prefix("ev-a") + "0", task_prefix("ev-a") + "1"]
    assert job.fallback is not None
    own = job.fallback()
    assert not isinstance(own, WindowJob) and own.id == job_id_for("blobtask", "ev-a")
    assert own.metadata[META_TASKS] == "2" and own.metadata["fanout-message-id"] == "m"
    assert [t.id for t in own.tasks] == ["0", "1"]


def test_window_tasks_carry_no_job_actions() -> None:
    """One event's task must not end the job every event shares: exit-option job
    actions are dropped (dependency actions kept), and the job's onTaskFailure is
    noaction, whatever the handler chose."""
    from handlers.base import ExitConditions, ExitOptions, JobSpec
    from worker.window import gather, without_job_actions

    ends = ExitOptions(job_action="terminate", dependency_action="satisfy")
    conditions = ExitConditions(exit_codes=((3, ends),), default=ends,
                                pre_processing_error=ExitOptions(dependency_action="block"))
    stripped = without_job_actions(conditions)
    assert stripped.exit_codes == ((3, ExitOptions(dependency_action="satisfy")),)
    assert stripped.default == ExitOptions(dependency_action="satisfy")
    assert stripped.pre_processing_error == ExitOptions(dependency_action="block")
    plain = ExitConditions(default=ExitOptions(dependency_action="satisfy"))
    assert without_job_actions(plain) is plain
    job = JobSpec(tasks=iter([TaskSpec(id="0", command_line="x", exit_conditions=conditions)]),
                  task_count=1, on_task_failure="performexitoptionsjobaction",
                  display_name="transcode of uploads/a.bin")
    windowed = gather(job, win(), handler="h", fallback=lambda: job)
    assert windowed.on_task_failure == "noaction"
    assert windowed.display_name == "h window 2026-12-01T12:00:00Z/2026-12-01T13:00:00Z"
    (task,) = list(windowed.tasks)
    assert task.exit_conditions == stripped


def test_a_day_of_uploads_makes_one_job_per_hour(
        local: Callable[..., tuple[Planner, Submitter, LocalBackend]], tmp_path: Path) -> None:
    """240 uploads spread over a day (PT1H windows) make 24 jobs of 10 tasks, not 240."""
    planner, submitter, backend = local(start=False)
    storage = LocalStorage(root=tmp_path / "blobs")
    day = datetime(2026, 11, 30, tzinfo=UTC)
    for i in range(240):
        when = (day + timedelta(minutes=6 * i, seconds=i % 7)).isoformat()
        submit(planner, submitter, blob_event(storage, f"u/{i}.bin", f"ev-{i}", when))
    jobs = backend.list_jobs(100)
    assert len(jobs) == 24
    assert sorted(sum(j.counts.values()) for j in jobs) == [10] * 24


def test_window_counts_settle_at_or_above_the_count_at_seal() -> None:
    """A window job's fanout-tasks is its count when sealed: final counts must reach it
    (a late event may have added more), never report fewer."""
    from worker.backends.base import JobRecord, TaskCounts
    from worker.monitor import settled

    meta = {META_WINDOW: "2026-12-01T12:00:00Z/2026-12-01T13:00:00Z", META_TASKS: "10"}
    job = JobRecord(id="w", state="completed", metadata=meta,
                    terminate_reason="AllTasksComplete")
    assert not settled(job, TaskCounts(completed=9, succeeded=9))
    assert settled(job, TaskCounts(completed=10, succeeded=10))
    assert settled(job, TaskCounts(completed=12, succeeded=12))
    assert not settled(job, TaskCounts(completed=12, running=1))
    blocked = JobRecord(id="w", state="completed", metadata=meta,
                        terminate_reason="FanoutBlocked")
    assert settled(blocked, TaskCounts(completed=10, active=2))
    assert not settled(blocked, TaskCounts(completed=8))
    plain = JobRecord(id="p", state="completed", metadata={META_TASKS: "10"},
                      terminate_reason="AllTasksComplete")
    assert not settled(plain, TaskCounts(completed=12, succeeded=12))
