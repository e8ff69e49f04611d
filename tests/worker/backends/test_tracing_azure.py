"""OpenTelemetry on Azure Batch: the whole worker against the Batch peer.

The task bodies the service receives carry the submit span's context as
``TRACEPARENT`` in ``environmentSettings``, and azure-core's OpenTelemetry plugin
turns the Batch calls into HTTP spans under fanout's own (the pollers' calls, outside
any fanout span, are not sampled).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from azure.core.credentials import AzureNamedKeyCredential
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from tests.fakes.batch_peer import BatchPeer, Runner
from worker.backends.azure import AzureBatchBackend
from worker.config import Settings
from worker.context import job_id_for
from worker.tracing import META_TRACEPARENT, TRACEPARENT, Tracing

from ..harness import RunningWorker
from ..tracing_support import one, parent_id, spans, traced, tree

__all__ = ["spans"]  # the fixture

MakePeer = Callable[..., BatchPeer]
StartWorker = Callable[..., RunningWorker]
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PRODUCER = f"00-{TRACE_ID}-b7ad6b7169203331-01"


def sweep(key: str, stop: int = 3) -> dict[str, Any]:
    return {"handler": "sweep", "id": key, "params": {
        "program": "pi", "parameters": {"samples": [10], "seed": {"start": 0, "stop": stop}}}}


@pytest.fixture
def start_worker(make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
                 ) -> Iterator[StartWorker]:
    started: list[RunningWorker] = []
    monkeypatch.setattr("worker.app.setup_tracing",
                        lambda config: traced() if config.enabled else Tracing.off())

    def start(peer: BatchPeer, *, tracing_on: bool = True) -> RunningWorker:
        settings = make_settings(
            backend={"kind": "azure"},
            batch={"account_url": peer.url, "account_name": peer.account, "pool": "fanout",
                   "poll_interval": 0.2},
            consumer={"receive_wait": 0.2, "unready_backoff": 0.1},
            submit={"backoff_base": 0.001, "backoff_max": 0.01},
            jobs={"poll_interval": 0.3},
            tracing={"enabled": tracing_on, "exporter": "none"})
        backend = AzureBatchBackend(
            endpoint=peer.url, credential=AzureNamedKeyCredential(peer.account, peer.key),
            default_pool="fanout", connections=10)
        running = RunningWorker(settings, backend=backend).start()
        started.append(running)
        return running

    yield start
    for running in started:
        if running.thread.is_alive():
            running.stop()


def environment(task: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in task.get("environmentSettings") or []}


def test_tasks_carry_traceparent_and_batch_calls_are_child_spans(
        make_peer: MakePeer, start_worker: StartWorker, spans: InMemorySpanExporter) -> None:
    peer = make_peer(runner=Runner(delay=0.02))
    w = start_worker(peer)
    w.send(sweep("az-traced"), properties={"traceparent": PRODUCER})
    job_id = job_id_for("sweep", "az-traced")
    w.wait_event(job_id)
    w.wait_until(lambda: any(s.name == "fanout.monitor.report"
                             for s in spans.get_finished_spans()), what="the report span")
    found = spans.get_finished_spans()
    submit = one(found, "fanout.submit")
    assert submit.context.trace_id == int(TRACE_ID, 16), tree(found)
    expected = f"00-{TRACE_ID}-{submit.context.span_id:016x}-01"

    tasks = peer.tasks(job_id)
    assert len(tasks) == 3 and all(environment(t)[TRACEPARENT] == expected for t in tasks)
    job = peer.job(job_id)
    assert job is not None
    assert {m["name"]: m["value"] for m in job.body["metadata"]}[META_TRACEPARENT] == expected

    # azure-core's spans of the submission: children of the submit span, one per call
    http = [s for s in found if s.kind == SpanKind.CLIENT
            and parent_id(s) == submit.context.span_id]
    methods = sorted(str((s.attributes or {}).get("http.request.method")) for s in http)
    assert "POST" in methods, tree(found)
    assert all(s.context.trace_id == int(TRACE_ID, 16) for s in http)
    # the monitor's calls for the report hang off the report span, in the same trace
    report = one(found, "fanout.monitor.report")
    assert parent_id(report) == submit.context.span_id
    assert any(parent_id(s) == report.context.span_id and s.kind == SpanKind.CLIENT
               for s in found), tree(found)
    # every span belongs to a message's trace: no poller or probe span was sampled
    assert {s.context.trace_id for s in found} == {int(TRACE_ID, 16)}, tree(found)


def test_tracing_off_sends_no_traceparent_and_makes_no_spans(
        make_peer: MakePeer, start_worker: StartWorker, spans: InMemorySpanExporter) -> None:
    peer = make_peer(runner=Runner(delay=0.02))
    w = start_worker(peer, tracing_on=False)
    w.send(sweep("az-untraced", stop=2), properties={"traceparent": PRODUCER})
    job_id = job_id_for("sweep", "az-untraced")
    w.wait_event(job_id)
    assert all(TRACEPARENT not in environment(t) for t in peer.tasks(job_id))
    job = peer.job(job_id)
    assert job is not None
    assert META_TRACEPARENT not in {m["name"] for m in job.body.get("metadata") or []}
    assert spans.get_finished_spans() == ()
