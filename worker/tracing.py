"""OpenTelemetry tracing: one trace from a producer's message to the tasks it becomes.

Off by default (``[tracing] enabled = false``): every hook then holds a no-op tracer,
no context is read from messages, no ``TRACEPARENT`` is added to tasks and the Azure
SDKs trace nothing, so a worker without tracing pays nothing for it.

With tracing on, a message's trace context (the W3C ``traceparent`` application
property, else ``Diagnostic-Id``, which the azure-servicebus SDK sets to the same
value; and ``tracestate``), is the parent of the spans fanout makes of it::

    fanout.receive            CONSUMER  one delivery, to its settlement
      fanout.process          INTERNAL  plan and submit (the worker thread)
        fanout.plan           INTERNAL  parse, route, build the jobs
        fanout.submit         PRODUCER  one job: create, add tasks, seal
          POST, PATCH         CLIENT    azure-core's spans of the Batch calls
          fanout.monitor.report  INTERNAL  the job's completion event (later, on any
            GET, PATCH ...                 replica), and the monitor's calls for it

The submit span's context goes into the job's metadata (``fanout-traceparent``) and
into every task's environment as ``TRACEPARENT``, so a task's own spans join the
trace. The monitor reads it back from the job and makes its report span a child of
the submit span: the report is the end of the same story (and the completion event
it publishes carries the context on), whichever replica reports it, however long
the job ran.

Client spans that the Azure SDKs start with no span around them (the pollers, the
readiness probe, Service Bus receive calls) are not sampled: tracing follows work,
not the idle loops.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Mapping, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagators.textmap import DefaultGetter
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from worker.errors import SettingsError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.sdk.trace.sampling import Sampler

    from handlers.base import JobSpec, TaskSpec
    from worker.config import TracingConfig

log = logging.getLogger(__name__)

#: The environment variable every task gets: its job's W3C trace context.
TRACEPARENT = "TRACEPARENT"
#: Job metadata holding the submit span's W3C trace context, for the monitor.
META_TRACEPARENT = "fanout-traceparent"
#: Message application properties that may carry a producer's trace context, in the
#: order the azure-servicebus SDK reads them.
TRACE_PROPERTIES = ("traceparent", "Diagnostic-Id")

_PROPAGATOR = TraceContextTextMapPropagator()
_GETTER: DefaultGetter = DefaultGetter()
_OFF_TOKEN: object = object()


def format_traceparent(span: Span) -> str | None:
    """``00-<trace id>-<span id>-<flags>`` of ``span``; None for an invalid span."""
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def extract(properties: Mapping[str, str] | None) -> otel_context.Context | None:
    """The trace context a producer put on a message, or None (then a new trace).

    ``traceparent`` wins over ``Diagnostic-Id`` (a legacy, non-W3C ``Diagnostic-Id``
    is ignored); ``tracestate`` goes with either."""
    if not properties:
        return None
    for name in TRACE_PROPERTIES:
        value = properties.get(name)
        if not value:
            continue
        carrier = {"traceparent": str(value)}
        state = properties.get("tracestate")
        if state:
            carrier["tracestate"] = str(state)
        ctx = _PROPAGATOR.extract(carrier, getter=_GETTER)
        if trace.get_current_span(ctx).get_span_context().is_valid:
            return ctx
    return None


def context_of(traceparent: str | None) -> otel_context.Context | None:
    """The context a ``fanout-traceparent`` value names, or None."""
    return extract({"traceparent": traceparent}) if traceparent else None


class Tracing:
    """The tracer every part of one worker uses, and whether tracing is on at all.

    ``Tracing.off()`` (the default everywhere) is a no-op: its spans are the invalid
    span, and :meth:`stamp` leaves jobs alone."""

    def __init__(self, tracer: Tracer | None = None, *,
                 provider: TracerProvider | None = None, owned: bool = False) -> None:
        self.enabled = tracer is not None
        self.tracer: Tracer = tracer if tracer is not None else trace.NoOpTracer()
        self.provider = provider
        self._owned = owned
        self._azure_enabled = False

    @classmethod
    def off(cls) -> Tracing:
        return cls()

    @classmethod
    def with_provider(cls, provider: TracerProvider, *, owned: bool = False,
                      azure_sdk: bool = True) -> Tracing:
        """Tracing onto ``provider`` (tests pass one with an in-memory exporter); with
        ``azure_sdk`` the Azure SDKs' own spans are turned on too (they go to the
        global provider: see :func:`setup`)."""
        tracing = cls(provider.get_tracer("fanout"), provider=provider, owned=owned)
        if azure_sdk:
            tracing._azure_enabled = enable_azure_sdk_tracing()
        return tracing

    @contextlib.contextmanager
    def span(self, name: str, *, kind: SpanKind = SpanKind.INTERNAL,
             parent: otel_context.Context | None = None,
             attributes: Mapping[str, Any] | None = None) -> Iterator[Span]:
        """A current span (the invalid span when off); an exception escaping it is
        recorded and sets the span's status to error."""
        if not self.enabled:
            yield INVALID_SPAN
            return
        with self.tracer.start_as_current_span(name, context=parent, kind=kind,
                                               attributes=_clean(attributes)) as span:
            yield span

    def start(self, name: str, *, kind: SpanKind = SpanKind.INTERNAL,
              parent: otel_context.Context | None = None,
              attributes: Mapping[str, Any] | None = None) -> tuple[Span, object]:
        """Start a span and make it current until :meth:`end` (for code that cannot
        wrap itself in a ``with``); returns the span and the token ``end`` needs."""
        if not self.enabled:
            return INVALID_SPAN, _OFF_TOKEN
        span = self.tracer.start_span(name, context=parent, kind=kind,
                                      attributes=_clean(attributes))
        return span, otel_context.attach(trace.set_span_in_context(span))

    def end(self, span: Span, token: object) -> None:
        if token is _OFF_TOKEN:
            return
        otel_context.detach(token)  # type: ignore[arg-type]
        span.end()

    def stamp(self, job: JobSpec) -> str | None:
        """Put the current span's context into ``job``'s metadata and, as each task
        streams past, into its environment (``TRACEPARENT``); None when off."""
        if not self.enabled:
            return None
        value = format_traceparent(trace.get_current_span())
        if value is None:
            return None
        job.metadata[META_TRACEPARENT] = value
        job.tasks = with_traceparent(job.tasks, value)
        return value

    def close(self) -> None:
        """Flush and stop what this worker set up (nothing for a borrowed provider)."""
        if self._azure_enabled:
            disable_azure_sdk_tracing()
            self._azure_enabled = False
        if self._owned and self.provider is not None:
            self.provider.shutdown()


def with_traceparent(tasks: Iterable[TaskSpec], value: str) -> Iterator[TaskSpec]:
    """Each task with ``TRACEPARENT`` in its environment, as it streams past. The
    environment is copied (one small dict per task): a handler may share one dict
    between tasks, or with its program's configuration."""
    for task in tasks:
        task.environment = {**task.environment, TRACEPARENT: value}
        yield task


def mark_failed(span: Span, description: str) -> None:
    """Mark ``span`` failed (a message dead-lettered or abandoned)."""
    span.set_status(Status(StatusCode.ERROR, description[:300]))


def current_span() -> Span:
    return trace.get_current_span()


def _clean(attributes: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Attributes without the None values OpenTelemetry refuses."""
    if not attributes:
        return None
    return {k: v for k, v in attributes.items() if v is not None}


# -- set-up ------------------------------------------------------------------------


def setup(config: TracingConfig) -> Tracing:
    """The worker's tracing from ``[tracing]``: off, or an SDK tracer provider with the
    configured exporter, installed as the process's global provider (the Azure SDKs'
    plugin traces onto the global one) unless one is installed already."""
    if not config.enabled:
        return Tracing.off()
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": config.service_name}),
                              sampler=work_sampler(config.sample_ratio))
    exporter = make_exporter(config)
    if exporter is not None:
        processor = (SimpleSpanProcessor(exporter) if config.exporter == "console"
                     else BatchSpanProcessor(exporter))
        provider.add_span_processor(processor)
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        trace.set_tracer_provider(provider)
    else:
        log.warning("a global OpenTelemetry tracer provider is installed already: the "
                    "Azure SDKs' spans go to it, fanout's own to [tracing]'s exporter")
    return Tracing.with_provider(provider, owned=True)


def make_exporter(config: TracingConfig) -> SpanExporter | None:
    """The configured span exporter (None for ``none``); ``SettingsError`` when its
    package is missing. Never logs the connection string."""
    if config.exporter == "none":
        return None
    if config.exporter == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter(service_name=config.service_name)
    if config.exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=otlp_endpoint(config.endpoint))
    try:
        from azure.monitor.opentelemetry.exporter import AzureMonitorTraceExporter
    except ImportError:
        raise SettingsError("tracing.exporter = \"azure_monitor\" needs the Azure Monitor "
                            "exporter: pip install 'fanout[azure-monitor]'") from None
    secret = config.azure_monitor_connection_string
    try:
        # Typed here: without the optional extra installed, mypy sees the class as Any.
        exporter: SpanExporter = (
            AzureMonitorTraceExporter(connection_string=secret.get_secret_value())
            if secret is not None
            else AzureMonitorTraceExporter())  # APPLICATIONINSIGHTS_CONNECTION_STRING
        return exporter
    except ValueError as exc:  # the message names what is missing, not the secret
        raise SettingsError(f"tracing.exporter = \"azure_monitor\": {type(exc).__name__}: "
                            "the connection string is missing or malformed (set "
                            "tracing.azure_monitor_connection_string or "
                            "APPLICATIONINSIGHTS_CONNECTION_STRING)") from None


def otlp_endpoint(endpoint: str | None) -> str | None:
    """The OTLP/HTTP traces URL: a base URL gets ``/v1/traces``; None lets the exporter
    read ``OTEL_EXPORTER_OTLP_*`` or use ``http://localhost:4318/v1/traces``."""
    if not endpoint:
        return None
    if urlsplit(endpoint).path in ("", "/"):
        return endpoint.rstrip("/") + "/v1/traces"
    return endpoint


def work_sampler(ratio: float) -> Sampler:
    """Parent based with ``ratio`` for new traces, dropping client spans that start a
    trace: an Azure SDK call (every one is a ``CLIENT`` span) outside any other span is
    a poll, a probe or an empty receive, not work."""
    from opentelemetry.sdk.trace.sampling import (
        Decision,
        ParentBased,
        Sampler,
        SamplingResult,
        TraceIdRatioBased,
    )

    inner = ParentBased(TraceIdRatioBased(ratio))

    class WorkSampler(Sampler):
        def should_sample(self, parent_context: otel_context.Context | None, trace_id: int,
                          name: str, kind: SpanKind | None = None,
                          attributes: Any = None, links: Sequence[Any] | None = None,
                          trace_state: Any = None) -> SamplingResult:
            parent = trace.get_current_span(parent_context).get_span_context()
            if not parent.is_valid and kind == SpanKind.CLIENT:
                return SamplingResult(Decision.DROP)
            return inner.should_sample(parent_context, trace_id, name, kind, attributes,
                                       links, trace_state)

        def get_description(self) -> str:
            return f"FanoutWork{{ParentBased{{TraceIdRatioBased{{{ratio}}}}}}}"

    return WorkSampler()


def enable_azure_sdk_tracing() -> bool:
    """Turn on azure-core's OpenTelemetry plugin (azure-core-tracing-opentelemetry) for
    every Azure SDK client in the process: the Batch, Blob and Service Bus calls become
    spans, children of the current one. True if this call turned it on."""
    from azure.core.settings import settings

    if settings.tracing_implementation() is not None:
        return False
    settings.tracing_implementation = "opentelemetry"
    return True


def disable_azure_sdk_tracing() -> None:
    from azure.core.settings import settings

    settings.tracing_implementation.unset_value()


# -- logs ----------------------------------------------------------------------------


def add_trace_ids(_logger: Any, _name: str,
                  event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: ``trace_id`` and ``span_id`` of the current span, if any."""
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        event.setdefault("trace_id", f"{ctx.trace_id:032x}")
        event.setdefault("span_id", f"{ctx.span_id:016x}")
    return event
