"""Completion events: what a terminal job's CloudEvents 1.0 event says, and its outcome.

One event per job fanout created, ``type`` ``fanout.job.completed``, published by the
job monitor (``worker/monitor.py``) in structured JSON mode. Its ``id`` derives from
the job id alone, so every replica that reports the same job builds the same id; the
id is also the Service Bus message id, and duplicate detection drops repeats. The
schema ships as ``worker/schemas/job-completed.schema.json`` (documented in
docs/events.md).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import Any

from worker.backends.base import (
    META_HANDLER,
    META_KEY,
    META_MESSAGE_ID,
    META_OUTPUTS,
    REASON_BLOCKED,
    REASON_CANCELLED,
    REASON_SUBMIT_FAILED,
    REASON_TASK_FAILED,
    REASON_USER,
    REASON_WALL_CLOCK,
    FailedTask,
    JobOutcome,
    JobRecord,
    TaskCounts,
)
from worker.cost import JobCost, tags_of
from worker.window import PREFIX_DIGITS, parse_display_name, parse_window

EVENT_TYPE = "fanout.job.completed"
SPEC_VERSION = "1.0"
#: The namespace of event ids: ``uuid5(EVENT_NAMESPACE, job id)``.
EVENT_NAMESPACE = uuid.UUID("5d1f4a36-2d0e-4c1e-9f7a-6a3c2b8f0e51")
#: The longest stderr tail an event carries, whatever the configuration says.
MAX_STDERR_TAIL = 64 * 1024


def event_id(job_id: str) -> str:
    """The deterministic event id of a job's completion event (a UUID, 36 characters,
    well within Service Bus's 128-character message id limit)."""
    return str(uuid.uuid5(EVENT_NAMESPACE, job_id.lower()))


def outcome_of(job: JobRecord, counts: TaskCounts) -> JobOutcome:
    """``succeeded`` only when every task succeeded; a job ended by its max wall clock
    ``timed_out``; one ended by ``fanout cancel`` (or a user, in the portal)
    ``cancelled``; anything else ``failed`` -- so is a job whose submission stopped (its
    added tasks may all have succeeded, but not every task was added), one the monitor
    ended because its remaining tasks were blocked, and one a task's exit options
    terminated."""
    reason = job.terminate_reason or ""
    if reason == REASON_WALL_CLOCK:
        return "timed_out"
    if reason in (REASON_CANCELLED, REASON_USER):
        return "cancelled"
    if reason in (REASON_SUBMIT_FAILED, REASON_BLOCKED, REASON_TASK_FAILED):
        return "failed"
    if counts.failed == 0 and counts.succeeded == counts.total:
        return "succeeded"
    return "failed"


def outputs_of(metadata: Mapping[str, str]) -> list[dict[str, str]]:
    """The outputs a handler declared, from the job's metadata."""
    raw = metadata.get(META_OUTPUTS)
    if not raw:
        return []
    try:
        items = json.loads(raw)
    except ValueError:
        return []
    return [{"name": str(n), "location": str(loc)} for n, loc in items
            if isinstance(n, str) and isinstance(loc, str)]


@dataclass(slots=True)
class JobReport:
    """Everything an event says about one terminal job."""

    job: JobRecord
    counts: TaskCounts
    failed: Sequence[FailedTask]
    #: Its usage and estimated cost (worker/cost.py); None when not measured.
    usage: JobCost | None = None
    #: Spot preemptions of its tasks and the tasks moved to the dedicated pool
    #: (worker/preemption.py: ``data.preemptions``); None when none were seen.
    preemptions: Mapping[str, Any] | None = None

    @property
    def failed_omitted(self) -> int:
        """Failed tasks the counts show but the list leaves out (over its limit)."""
        listed = sum(1 for f in self.failed if f.category != "dependency_failed")
        return max(0, self.counts.failed - listed)


def build_event(report: JobReport, *, source: str,
                now: datetime | None = None) -> dict[str, Any]:
    """The CloudEvents 1.0 event (a JSON-ready dict) for one terminal job."""
    job, counts = report.job, report.counts
    end = job.end_time or job.state_changed or now or datetime.now(UTC)
    start = job.start_time or job.created
    meta = job.metadata
    data: dict[str, Any] = {
        "job_id": job.id,
        "message_id": meta.get(META_MESSAGE_ID),
        "idempotency_key": meta.get(META_KEY),
        "handler": meta.get(META_HANDLER),
        "outcome": outcome_of(job, counts),
        "terminate_reason": job.terminate_reason,
        "tasks": {"total": counts.total, "succeeded": counts.succeeded,
                  "failed": counts.failed,
                  "not_run": max(0, counts.total - counts.succeeded - counts.failed)},
        "failed_tasks": _named_events([failed_json(f) for f in report.failed]),
        "failed_tasks_omitted": report.failed_omitted,
        "outputs": outputs_of(meta),
        "pool": job.pool,
        "start_time": _iso(start),
        "end_time": _iso(end),
        "duration_seconds": (round((end - start).total_seconds(), 3)
                             if start is not None else None),
    }
    window = window_json(report)
    if window is not None:
        data["window"] = window
    tags = tags_of(meta)
    if tags:
        data["tags"] = tags
    if report.usage is not None:
        data["usage"] = report.usage.json()
    if report.preemptions is not None:
        data["preemptions"] = dict(report.preemptions)
    return {
        "specversion": SPEC_VERSION, "type": EVENT_TYPE, "source": source,
        "id": event_id(job.id), "subject": job.id, "time": _iso(end),
        "datacontenttype": "application/json", "data": data,
    }


def failed_json(task: FailedTask) -> dict[str, Any]:
    """One failed task as the event (and ``fanout status --json``) shows it; a window
    job's task also names the event it came from and its blob (``container/path``)."""
    tail = task.stderr_tail
    out: dict[str, Any] = {
        "task_id": task.id, "category": task.category, "exit_code": task.exit_code,
        "failure_code": task.failure_code, "failure_message": task.failure_message,
        "retry_count": task.retry_count, "start_time": _iso(task.start_time),
        "end_time": _iso(task.end_time), "logs": task.logs,
        "stderr_tail": tail[-MAX_STDERR_TAIL:] if tail is not None else None,
    }
    origin = parse_display_name(task.display_name)
    if origin is not None:
        out["event_id"], out["blob"] = origin
    return out


def _named_events(failed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A window job's blocked tasks (listed by id only) take the event and blob of a
    listed task with the same event prefix."""
    known = {f["task_id"][:PREFIX_DIGITS + 1]: (f["event_id"], f["blob"])
             for f in failed if "event_id" in f}
    for item in failed:
        origin = known.get(item["task_id"][:PREFIX_DIGITS + 1])
        if "event_id" not in item and origin is not None:
            item["event_id"], item["blob"] = origin
    return failed


def window_json(report: JobReport) -> dict[str, Any] | None:
    """A window job's ``window``: its start and end, and how many distinct events the
    listed failed tasks belong to (``failed_events_truncated`` when the counts show
    failed tasks beyond the list, so more events may have failed). Every event none of
    whose tasks is listed succeeded, unless the list is truncated or the job was
    cancelled or timed out (then ``tasks.not_run`` says how many never ran). None for
    any other job."""
    window = parse_window(report.job.metadata)
    if window is None:
        return None
    events = {origin[0] for task in report.failed
              if (origin := parse_display_name(task.display_name)) is not None}
    return {"start": _iso(window[0]), "end": _iso(window[1]),
            "failed_events": len(events),
            "failed_events_truncated": report.failed_omitted > 0}


def encode(event: Mapping[str, Any]) -> bytes:
    """The event as compact UTF-8 JSON (structured content mode)."""
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of ``fanout.job.completed`` events."""
    text = resources.files("worker").joinpath("schemas/job-completed.schema.json").read_text(
        encoding="utf-8")
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def _iso(when: datetime | None) -> str | None:
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")
