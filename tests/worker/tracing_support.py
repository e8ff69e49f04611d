"""Tracing in tests: one in-memory span exporter for the whole session.

OpenTelemetry lets a process set its global tracer provider once, and azure-core's
plugin traces onto the global one; so the first test that needs spans installs one
provider with an in-memory exporter, every later test reuses it, and the ``spans``
fixture clears the exporter around each test. Workers get a :class:`Tracing` on that
provider (``traced``) instead of building their own.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from worker.tracing import Tracing, disable_azure_sdk_tracing, work_sampler

_EXPORTER = InMemorySpanExporter()
_PROVIDER: TracerProvider | None = None


def session_provider() -> TracerProvider:
    """The process's global SDK provider, exporting to the in-memory exporter."""
    global _PROVIDER
    if _PROVIDER is None:
        current = trace.get_tracer_provider()
        if isinstance(current, TracerProvider):  # someone installed one: export from it
            _PROVIDER = current
        else:
            _PROVIDER = TracerProvider(sampler=work_sampler(1.0))
            trace.set_tracer_provider(_PROVIDER)
        _PROVIDER.add_span_processor(SimpleSpanProcessor(_EXPORTER))
    return _PROVIDER


def traced() -> Tracing:
    """Tracing for one worker, on the session's provider (the Azure SDKs' too)."""
    return Tracing.with_provider(session_provider())


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """The session's in-memory exporter, empty at the start of the test."""
    session_provider()
    _EXPORTER.clear()
    yield _EXPORTER
    _EXPORTER.clear()
    disable_azure_sdk_tracing()


def named(found: Sequence[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in found if s.name == name]


def one(found: Sequence[ReadableSpan], name: str) -> ReadableSpan:
    matches = named(found, name)
    assert len(matches) == 1, f"{len(matches)} spans named {name}: {[s.name for s in found]}"
    return matches[0]


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def tree(found: Sequence[ReadableSpan]) -> str:
    """The spans as an indented tree (name, kind, a few attributes), for docs and
    failure messages."""
    by_id = {s.context.span_id: s for s in found if s.context is not None}
    children: dict[int | None, list[ReadableSpan]] = {}
    for s in found:
        parent = parent_id(s)
        children.setdefault(parent if parent in by_id else None, []).append(s)
    lines: list[str] = []

    def walk(parent: int | None, depth: int) -> None:
        for s in sorted(children.get(parent, []), key=lambda s: s.start_time or 0):
            assert s.context is not None
            lines.append(f"{'  ' * depth}{s.name}  {s.kind.name}  "
                         f"trace={s.context.trace_id:032x} span={s.context.span_id:016x}")
            walk(s.context.span_id, depth + 1)

    walk(None, 0)
    return "\n".join(lines)
