"""A producer's trace through Service Bus: the azure-servicebus SDK (traced through
azure-core's OpenTelemetry plugin) puts ``Diagnostic-Id`` and ``traceparent`` on the
message it sends; the worker, receiving through the same SDK from the AMQP test peer,
continues that trace, and its tasks get ``TRACEPARENT``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from tests.fakes.servicebus_peer import ServiceBusPeer
from tests.worker.doubles import MemoryBackend
from tests.worker.harness import RunningWorker
from tests.worker.sources.test_servicebus import CLIENT_OPTIONS, QUEUE
from tests.worker.tracing_support import one, parent_id, spans, traced, tree
from worker.config import Settings
from worker.sources.servicebus import ServiceBusSource
from worker.tracing import TRACEPARENT, Tracing

__all__ = ["spans"]  # the fixture

SWEEP = {"handler": "sweep", "params": {"program": "pi", "parameters": {
    "samples": [100], "seed": {"start": 0, "stop": 3}}}}


@pytest.fixture
def sb_worker(make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
              ) -> Iterator[RunningWorker]:
    monkeypatch.setattr("worker.app.setup_tracing",
                        lambda config: traced() if config.enabled else Tracing.off())
    peer = ServiceBusPeer(queues=[QUEUE], lock_duration=5.0).start()
    settings = make_settings(
        servicebus={"connection_string": peer.connection_string, "queue": QUEUE},
        queue={"lock_duration": 5.0, "poll_interval": 0.2},
        consumer={"receive_wait": 0.5, "drain_grace": 1.0},
        jobs={"monitor": False}, tracing={"enabled": True, "exporter": "none"})
    source = ServiceBusSource.from_config(
        settings.servicebus, settings.queue, client_options=CLIENT_OPTIONS,
        emulator_admin_port=peer.admin_port or 0, backoff_base=0.05, backoff_max=0.5)
    worker = RunningWorker(settings, backend=MemoryBackend(), source=source).start()
    yield worker
    if worker.thread.is_alive():
        worker.stop()
    peer.stop()


def test_the_sdks_diagnostic_id_carries_the_producers_trace_to_the_tasks(
        sb_worker: RunningWorker, spans: InMemorySpanExporter) -> None:
    import json

    w = sb_worker
    tracer = w.app.tracing.tracer

    async def produce() -> Any:
        with tracer.start_as_current_span("producer", kind=SpanKind.PRODUCER) as span:
            await w.app.source.send(json.dumps(SWEEP).encode(), message_id="traced-1")
            return span

    producer = w.call(produce())
    w.wait_idle(1)
    found = spans.get_finished_spans()
    trace_id = producer.get_span_context().trace_id
    receive = one(found, "fanout.receive")
    assert receive.context.trace_id == trace_id, tree(found)
    # the SDK's per-message span (ServiceBus.message) is what the properties name
    message = one(found, "ServiceBus.message")
    assert parent_id(message) == producer.get_span_context().span_id
    assert parent_id(receive) == message.context.span_id
    assert (receive.attributes or {})["messaging.system"] == "servicebus"
    assert (receive.attributes or {})["messaging.destination.name"] == QUEUE
    submit = one(found, "fanout.submit")
    backend = w.app.backend
    assert isinstance(backend, MemoryBackend)
    (job_id,) = backend.jobs
    flags = int(submit.context.trace_flags)  # sampled, and random (W3C level 2) here
    expected = f"00-{trace_id:032x}-{submit.context.span_id:016x}-{flags:02x}"
    assert {t.environment[TRACEPARENT] for t in backend.tasks[job_id].values()} == {expected}
    # the settlement is an SDK call inside the receive span
    assert any(s.name.startswith("ServiceBus.") and parent_id(s) == receive.context.span_id
               for s in found), tree(found)
