"""OpenTelemetry end to end on the embedded default: one message's whole trace.

A message with a producer's ``traceparent`` goes through the real worker (SQLite queue,
local executor, job monitor); its spans (receive, process, plan, submit, the monitor's
report) all belong to the producer's trace, the job's metadata carries the submit
span's context, and the task itself sees it as ``TRACEPARENT``.
"""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from worker import tracing as tracing_mod
from worker.config import Settings
from worker.context import job_id_for
from worker.tracing import META_TRACEPARENT, TRACEPARENT, Tracing, extract

from .harness import RunningWorker
from .tracing_support import one, parent_id, spans, traced, tree

__all__ = ["spans"]  # the fixture

PY = sys.executable
#: Prints the TRACEPARENT the task sees (braces would be template fields: none here).
PRINT_TP = (f"{PY} -c \"import os, sys; print('tp=' + os.environ.get('TRACEPARENT', '-'), "
            "sys.argv[1])\" {seed}")
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PRODUCER_SPAN = "00f067aa0ba902b7"
PRODUCER = f"00-{TRACE_ID}-{PRODUCER_SPAN}-01"


def sweep(key: str, stop: int = 2) -> dict[str, Any]:
    return {"handler": "sweep", "id": key, "params": {
        "program": "tp", "parameters": {"seed": {"start": 0, "stop": stop}}}}


@pytest.fixture
def worker(make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
           ) -> Iterator[Callable[..., RunningWorker]]:
    """Start embedded workers; ``tracing_on`` (the default) gives them the session's tracing (as
    ``[tracing] enabled = true`` would, onto the in-memory exporter)."""
    started: list[RunningWorker] = []
    monkeypatch.setattr("worker.app.setup_tracing",
                        lambda config: traced() if config.enabled else Tracing.off())

    def start(*, tracing_on: bool = True) -> RunningWorker:
        settings = make_settings(
            programs={"tp": {"command": PRINT_TP}},
            consumer={"receive_wait": 0.2}, local={"slots": 2, "poll_interval": 0.05},
            jobs={"poll_interval": 1.0},
            tracing={"enabled": tracing_on, "exporter": "none"})
        running = RunningWorker(settings).start()
        started.append(running)
        return running

    yield start
    for running in started:
        if running.thread.is_alive():
            running.stop()


def task_stdout(w: RunningWorker, job_id: str, task: str) -> str:
    return (w.app.settings.home / "tasks" / job_id / task / "stdout.txt").read_text()


def test_one_trace_from_the_producer_to_the_task_and_the_report(
        worker: Callable[..., RunningWorker], spans: InMemorySpanExporter) -> None:
    w = worker()
    w.send(sweep("traced"), properties={"traceparent": PRODUCER})
    job_id = job_id_for("sweep", "traced")
    event = w.wait_event(job_id)
    assert event["data"]["outcome"] == "succeeded"
    w.wait_until(lambda: any(s.name == "fanout.monitor.report"
                             for s in spans.get_finished_spans()), what="the report span")
    found = spans.get_finished_spans()
    ours = [s for s in found if s.name.startswith("fanout.")]
    assert ours and all(s.context.trace_id == int(TRACE_ID, 16) for s in ours), tree(found)

    receive, process = one(found, "fanout.receive"), one(found, "fanout.process")
    plan, submit = one(found, "fanout.plan"), one(found, "fanout.submit")
    report = one(found, "fanout.monitor.report")
    assert parent_id(receive) == int(PRODUCER_SPAN, 16)
    assert receive.parent is not None and receive.parent.is_remote
    assert receive.kind == SpanKind.CONSUMER
    assert parent_id(process) == receive.context.span_id
    assert parent_id(plan) == process.context.span_id
    assert parent_id(submit) == process.context.span_id
    assert parent_id(report) == submit.context.span_id  # a child of the job's submit span

    attrs = receive.attributes or {}
    assert attrs["messaging.system"] == "fanout.local"
    assert attrs["messaging.destination.name"] == w.app.source.name
    assert attrs["messaging.message.id"]
    assert attrs["messaging.servicebus.disposition_status"] == "complete"
    assert (process.attributes or {})["fanout.handler"] == "sweep"
    assert (submit.attributes or {})["fanout.job.id"] == job_id
    assert (submit.attributes or {})["fanout.job.task_count"] == 2
    requests = (submit.attributes or {})["fanout.submit.requests"]
    assert isinstance(requests, int) and requests >= 1
    assert (report.attributes or {})["fanout.job.outcome"] == "succeeded"

    submit_tp = f"00-{TRACE_ID}-{submit.context.span_id:016x}-01"
    job = w.app.backend.get_job(job_id)
    assert job is not None and job.metadata[META_TRACEPARENT] == submit_tp
    # the task itself saw it: its own spans would join the trace
    assert task_stdout(w, job_id, "0").split() == [f"tp={submit_tp}", "0"]
    assert task_stdout(w, job_id, "1").split() == [f"tp={submit_tp}", "1"]


def test_diagnostic_id_is_read_when_there_is_no_traceparent(
        worker: Callable[..., RunningWorker], spans: InMemorySpanExporter) -> None:
    w = worker()
    w.send(sweep("diag", stop=1), properties={"Diagnostic-Id": PRODUCER})
    w.wait_idle(1)
    receive = one(spans.get_finished_spans(), "fanout.receive")
    assert receive.context.trace_id == int(TRACE_ID, 16)
    assert parent_id(receive) == int(PRODUCER_SPAN, 16)


def test_a_message_without_context_starts_a_trace_and_a_bad_one_is_dead_lettered(
        worker: Callable[..., RunningWorker], spans: InMemorySpanExporter) -> None:
    w = worker()
    w.send(sweep("fresh", stop=1))
    w.send(b"not json", properties={"traceparent": PRODUCER})
    w.wait_idle(2)
    found = spans.get_finished_spans()
    receives = [s for s in found if s.name == "fanout.receive"]
    assert len(receives) == 2
    fresh = next(s for s in receives if s.context.trace_id != int(TRACE_ID, 16))
    assert fresh.parent is None
    bad = next(s for s in receives if s.context.trace_id == int(TRACE_ID, 16))
    assert bad.status.status_code == StatusCode.ERROR
    assert (bad.attributes or {})["messaging.servicebus.disposition_status"] == "dead_letter"
    plan = next(s for s in found if s.name == "fanout.plan"
                and s.context.trace_id == int(TRACE_ID, 16))
    assert plan.status.status_code == StatusCode.ERROR and plan.events  # the exception


def test_tracing_off_makes_no_spans_and_no_traceparent(
        worker: Callable[..., RunningWorker], spans: InMemorySpanExporter) -> None:
    w = worker(tracing_on=False)
    assert not w.app.tracing.enabled
    w.send(sweep("untraced", stop=1), properties={"traceparent": PRODUCER})
    job_id = job_id_for("sweep", "untraced")
    w.wait_event(job_id)
    assert spans.get_finished_spans() == ()
    job = w.app.backend.get_job(job_id)
    assert job is not None and META_TRACEPARENT not in job.metadata
    assert task_stdout(w, job_id, "0").split() == ["tp=-", "0"]


# -- units ---------------------------------------------------------------------------


def test_extract_prefers_traceparent_and_ignores_a_legacy_diagnostic_id() -> None:
    other = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    ctx = extract({"traceparent": other, "Diagnostic-Id": PRODUCER})
    from opentelemetry import trace

    assert ctx is not None
    assert trace.get_current_span(ctx).get_span_context().trace_id == int(other[3:35], 16)
    assert extract({"Diagnostic-Id": "|abc.1."}) is None  # the pre-W3C format
    assert extract({}) is None and extract(None) is None
    assert extract({"traceparent": "garbage"}) is None


def test_the_sampler_drops_sdk_spans_outside_fanout_work(spans: InMemorySpanExporter) -> None:
    tracer = traced().tracer
    with tracer.start_as_current_span("GET", kind=SpanKind.CLIENT):
        pass  # an azure-core span of a poller: no span around it
    with tracer.start_as_current_span("fanout.process"), \
            tracer.start_as_current_span("POST", kind=SpanKind.CLIENT):
        pass
    with tracer.start_as_current_span("a producer's own span", kind=SpanKind.PRODUCER):
        pass
    assert sorted(s.name for s in spans.get_finished_spans()) == [
        "POST", "a producer's own span", "fanout.process"]


def test_logs_carry_the_trace_and_span_ids(spans: InMemorySpanExporter) -> None:
    from worker.logs import configure

    out = io.StringIO()
    configure(fmt="json", stream=out)
    try:
        log = structlog.get_logger("t")
        log.info("outside")
        with traced().tracer.start_as_current_span("fanout.process") as span:
            log.info("inside")
        first, second = (json.loads(line) for line in out.getvalue().splitlines())
        assert "trace_id" not in first
        assert second["trace_id"] == f"{span.get_span_context().trace_id:032x}"
        assert second["span_id"] == f"{span.get_span_context().span_id:016x}"
    finally:
        structlog.reset_defaults()


def test_settings_default_off_and_the_connection_string_is_secret(
        make_settings: Callable[..., Settings]) -> None:
    assert make_settings().tracing.enabled is False
    conn = "InstrumentationKey=00000000-0000-0000-0000-000000000000;IngestionEndpoint=https://x/"
    settings = make_settings(tracing={"enabled": True, "exporter": "azure_monitor",
                                      "azure_monitor_connection_string": conn})
    assert conn not in repr(settings) and conn not in str(settings.model_dump())
    assert tracing_mod.setup(make_settings().tracing).enabled is False


def test_exporters_are_built_from_settings(make_settings: Callable[..., Settings]) -> None:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    otlp = tracing_mod.make_exporter(make_settings(tracing={
        "enabled": True, "endpoint": "http://collector:4318"}).tracing)
    assert isinstance(otlp, OTLPSpanExporter)
    assert tracing_mod.otlp_endpoint("http://collector:4318") == \
        "http://collector:4318/v1/traces"
    assert tracing_mod.otlp_endpoint("http://c:4318/custom") == "http://c:4318/custom"
    assert tracing_mod.make_exporter(make_settings(tracing={
        "enabled": True, "exporter": "none"}).tracing) is None


AZURE_MONITOR = {"enabled": True, "exporter": "azure_monitor",
                 "azure_monitor_connection_string":
                     "InstrumentationKey=00000000-0000-0000-0000-000000000000;"
                     "IngestionEndpoint=https://x/"}


def test_the_azure_monitor_exporter_is_built_from_settings(
        make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    """The dev install has the [azure-monitor] extra, so this runs everywhere. (The
    exporter keeps its retry files under the temporary directory: the test's own.)"""
    import tempfile

    from azure.monitor.opentelemetry.exporter import AzureMonitorTraceExporter

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    monitor = tracing_mod.make_exporter(make_settings(tracing=AZURE_MONITOR).tracing)
    assert isinstance(monitor, AzureMonitorTraceExporter)


def test_without_the_extra_the_azure_monitor_exporter_is_a_settings_error(
        make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from worker.errors import SettingsError

    monkeypatch.setitem(sys.modules, "azure.monitor.opentelemetry.exporter", None)
    with pytest.raises(SettingsError, match=r"pip install 'fanout\[azure-monitor\]'") as caught:
        tracing_mod.make_exporter(make_settings(tracing=AZURE_MONITOR).tracing)
    assert "InstrumentationKey" not in str(caught.value)


def test_stamp_wraps_the_lazy_task_stream_without_touching_shared_dicts() -> None:
    from handlers.base import JobSpec, TaskSpec

    shared = {"A": "1"}
    job = JobSpec(tasks=iter([TaskSpec("0", "x", shared), TaskSpec("1", "y", shared)]),
                  task_count=2, id="j")
    assert Tracing.off().stamp(job) is None and META_TRACEPARENT not in job.metadata
    tracing = traced()
    with tracing.span("fanout.submit"):
        value = tracing.stamp(job)
    assert value is not None and job.metadata[META_TRACEPARENT] == value
    tasks = list(job.tasks)
    assert [t.environment for t in tasks] == [{"A": "1", TRACEPARENT: value}] * 2
    assert shared == {"A": "1"}
    tracing.close()


def test_an_application_insights_key_is_redacted_from_logs() -> None:
    from worker.logs import redact

    conn = "InstrumentationKey=0f1e2d3c-aaaa-bbbb-cccc-000000000000;IngestionEndpoint=https://x/"
    assert "0f1e2d3c" not in redact(f"exporter failed for {conn}")


def test_setup_builds_a_sampled_provider_and_close_undoes_the_sdk_plugin(
        make_settings: Callable[..., Settings]) -> None:
    from azure.core.settings import settings as azure_settings

    from .tracing_support import session_provider

    session_provider()  # installed first: setup() must not make its own provider global
    tracing = tracing_mod.setup(make_settings(tracing={
        "enabled": True, "exporter": "none", "sample_ratio": 0.0}).tracing)
    try:
        assert tracing.enabled and tracing.provider is not None
        assert azure_settings.tracing_implementation() is not None
        with tracing.span("fanout.process") as span:
            assert not span.is_recording()  # ratio 0: new traces are not recorded
        with tracing.span("fanout.process", parent=extract({"traceparent": PRODUCER})) as span:
            assert span.is_recording()  # the producer sampled it: parent based
    finally:
        tracing.close()
    assert azure_settings.tracing_implementation() is None
