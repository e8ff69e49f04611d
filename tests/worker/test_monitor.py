"""Tests for the job monitor's decisions, against a scripted backend and sink.

End-to-end runs on the local executor and the Batch peer are in
tests/worker/test_outcomes_e2e.py; these pin down each rule on its own.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import jsonschema
import pytest
from prometheus_client import CollectorRegistry

from worker.backends.base import FailedTask, JobRecord, TaskCounts
from worker.config import EventsConfig, JobsConfig
from worker.errors import SystemFault
from worker.events import event_id, schema
from worker.metrics import Metrics
from worker.monitor import JobMonitor
from worker.sinks.base import Published

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


class ScriptedBackend:
    """The monitor's part of the Backend protocol over a dict of jobs."""

    def __init__(self) -> None:
        self.jobs: dict[str, JobRecord] = {}
        self.counts: dict[str, TaskCounts] = {}
        self.failed: dict[str, list[FailedTask]] = {}
        self.blocked: dict[str, list[str]] = {}
        self.calls: list[tuple[str, str]] = []

    def add(self, job_id: str, *, state: str = "completed", counts: TaskCounts,
            reason: str | None = "AllTasksComplete", sealed: bool = True,
            ended: datetime = NOW - timedelta(minutes=5),
            meta: Mapping[str, str] | None = None) -> JobRecord:
        record = JobRecord(id=job_id, state=state, sealed=sealed, pool="p",
                           metadata={"fanout-handler": "sweep", "fanout-key": "k-" + job_id,
                                     "fanout-message-id": "m-" + job_id, **(meta or {})},
                           created=ended - timedelta(minutes=10),
                           start_time=ended - timedelta(minutes=10),
                           end_time=ended if state == "completed" else None,
                           state_changed=ended,
                           terminate_reason=reason if state == "completed" else None)
        self.jobs[job_id] = record
        self.counts[job_id] = counts
        return record

    def list_fanout_jobs(self, *, completed_since: datetime | None = None) -> list[JobRecord]:
        self.calls.append(("list", str(completed_since)))
        return [j for j in self.jobs.values() if j.state != "completed" or completed_since is None
                or (j.state_changed or NOW) >= completed_since]

    def task_counts(self, job_id: str) -> TaskCounts | None:
        self.calls.append(("counts", job_id))
        return self.counts.get(job_id)

    def failed_tasks(self, job_id: str, limit: int) -> list[FailedTask]:
        self.calls.append(("failed", job_id))
        return [replace(f) for f in self.failed.get(job_id, [])][:limit]

    def blocked_tasks(self, job_id: str, limit: int) -> list[str] | None:
        self.calls.append(("blocked", job_id))
        return self.blocked.get(job_id, [])[:limit]

    def terminate_job(self, job_id: str, reason: str) -> None:
        self.calls.append(("terminate", job_id))
        job = self.jobs[job_id]
        self.jobs[job_id] = replace(job, state="completed", terminate_reason=reason,
                                    end_time=NOW, state_changed=NOW)

    def delete_job(self, job_id: str) -> None:
        self.calls.append(("delete", job_id))
        self.jobs.pop(job_id, None)

    def update_job_metadata(self, job_id: str, metadata: dict[str, str]) -> None:
        self.calls.append(("metadata", job_id))
        self.jobs[job_id] = replace(self.jobs[job_id], metadata=dict(metadata))

    def task_log_tail(self, job_id: str, task_id: str, name: str = "stderr.txt",
                      max_bytes: int = 4096) -> str | None:
        self.calls.append(("tail", task_id))
        return ("x" * 10_000 + "Traceback: boom\n")[-max_bytes:]


class RecordingSink:
    """An EventSink that keeps what it was given; can fail on demand."""

    destination = "fanout.events"

    def __init__(self) -> None:
        self.sent: list[tuple[dict[str, Any], str, str | None]] = []
        self.fail = False

    async def publish(self, body: bytes, *, message_id: str, to: str | None = None,
                      properties: Mapping[str, str] | None = None) -> None:
        if self.fail:
            raise SystemFault("ServerBusy")
        self.sent.append((json.loads(body), message_id, to))

    async def peek(self, limit: int = 100, *,
                   from_sequence: int | None = None) -> list[Published]:
        return []

    async def close(self) -> None:
        pass


def monitor(backend: ScriptedBackend, sink: RecordingSink, **events: Any) -> JobMonitor:
    return JobMonitor(backend=backend, sink=sink,  # type: ignore[arg-type]
                      jobs=JobsConfig(retention=timedelta(days=7)),
                      events=EventsConfig(**events), metrics=Metrics(registry=CollectorRegistry()),
                      clock=lambda: NOW)


def poll(m: JobMonitor) -> Any:
    return asyncio.run(m.poll())


def test_a_failed_job_is_reported_once_with_its_failed_task() -> None:
    """One event per job, valid against the schema, naming the failed task with its
    category, exit code and stderr tail; the marker makes the next poll skip it."""
    backend, sink = ScriptedBackend(), RecordingSink()
    backend.add("j1", counts=TaskCounts(completed=7, succeeded=6, failed=1))
    backend.failed["j1"] = [FailedTask(id="3", category="exit_code", exit_code=1,
                                       failure_code="FailureExitCode")]
    m = monitor(backend, sink, stderr_tail_bytes=100)
    assert poll(m).reported == ["j1"]
    assert poll(m).reported == []
    ((event, message_id, to),) = sink.sent
    jsonschema.validate(event, schema())
    assert message_id == event["id"] == event_id("j1")
    data = event["data"]
    assert data["outcome"] == "failed" and data["tasks"] == {
        "total": 7, "succeeded": 6, "failed": 1, "not_run": 0}
    (failed,) = data["failed_tasks"]
    assert failed["task_id"] == "3" and failed["exit_code"] == 1
    assert failed["stderr_tail"].endswith("Traceback: boom\n") and len(failed["stderr_tail"]) == 100
    assert backend.jobs["j1"].metadata["fanout-reported"] == event["id"]
    assert m.metrics.registry.get_sample_value(
        "fanout_jobs_completed_total", {"handler": "sweep", "outcome": "failed"}) == 1


@pytest.mark.parametrize(("reason", "counts", "outcome"), [
    ("AllTasksComplete", TaskCounts(completed=3, succeeded=3), "succeeded"),
    ("MaxWallClockTimeExpiry", TaskCounts(completed=3, succeeded=3), "timed_out"),
    ("FanoutCancelled", TaskCounts(active=2, completed=1, succeeded=1), "cancelled"),
    ("FanoutBlocked", TaskCounts(active=1, completed=3, succeeded=2, failed=1), "failed"),
    ("FanoutSubmitFailed", TaskCounts(completed=2, succeeded=2), "failed"),
])
def test_outcome_follows_the_terminate_reason_and_counts(
        reason: str, counts: TaskCounts, outcome: str) -> None:
    """succeeded only when every task succeeded; timed_out and cancelled by reason."""
    backend, sink = ScriptedBackend(), RecordingSink()
    backend.add("j", counts=counts, reason=reason)
    poll(monitor(backend, sink))
    assert sink.sent[0][0]["data"]["outcome"] == outcome


def test_completed_job_whose_counts_lag_is_read_again() -> None:
    """A job completed by AllTasksComplete whose counts still show running tasks
    waits for the next poll instead of reporting stale totals."""
    backend, sink = ScriptedBackend(), RecordingSink()
    backend.add("j", counts=TaskCounts(running=1, completed=2, succeeded=2),
                ended=NOW - timedelta(seconds=5))
    m = monitor(backend, sink)
    assert poll(m).reported == [] and sink.sent == []
    backend.counts["j"] = TaskCounts(completed=3, succeeded=3)
    assert poll(m).reported == ["j"]
    assert sink.sent[0][0]["data"]["tasks"]["succeeded"] == 3


def test_counts_from_before_the_tasks_existed_are_not_final() -> None:
    """Lagging counts may show no task at all: with fanout-tasks = 3 the monitor waits
    until they add up; past the settle time it reports what it has."""
    backend, sink = ScriptedBackend(), RecordingSink()
    backend.add("j", counts=TaskCounts(), ended=NOW - timedelta(seconds=5),
                meta={"fanout-tasks": "3"})
    m = monitor(backend, sink)
    assert poll(m).reported == []
    backend.counts["j"] = TaskCounts(completed=3, succeeded=2, failed=1)
    assert poll(m).reported == ["j"]
    assert sink.sent[0][0]["data"]["tasks"]["total"] == 3
    backend.add("old", counts=TaskCounts(), ended=NOW - timedelta(minutes=10),
                meta={"fanout-tasks": "3"})
    assert poll(m).reported == ["old"]


def test_blocked_job_is_terminated_only_once_sealed() -> None:
    """Every active task blocked, nothing running: terminated as FanoutBlocked -- but
    never while the submitter may still be adding tasks (not sealed)."""
    backend, sink = ScriptedBackend(), RecordingSink()
    counts = TaskCounts(active=1, completed=6, succeeded=5, failed=1)
    backend.add("open", state="active", counts=counts, sealed=False)
    backend.add("sealed", state="active", counts=counts)
    backend.blocked = {"open": ["aggregate"], "sealed": ["aggregate"]}
    m = monitor(backend, sink)
    assert poll(m).terminated == ["sealed"]
    assert backend.jobs["open"].state == "active"
    poll(m)
    event = sink.sent[0][0]
    assert event["subject"] == "sealed" and event["data"]["outcome"] == "failed"
    assert {f["category"] for f in event["data"]["failed_tasks"]} == {"dependency_failed"}


def test_job_with_a_running_or_unblocked_task_is_left_alone() -> None:
    """A running task, or an active one not blocked, means the job may still end."""
    backend, sink = ScriptedBackend(), RecordingSink()
    backend.add("running", state="active",
                counts=TaskCounts(active=1, running=1, completed=2, succeeded=1, failed=1))
    backend.add("waiting", state="active",
                counts=TaskCounts(active=2, completed=2, succeeded=1, failed=1))
    backend.blocked = {"waiting": ["aggregate"]}  # one of its two active tasks
    assert poll(monitor(backend, sink)).terminated == []
    assert ("blocked", "running") not in backend.calls


def test_a_failed_publish_leaves_the_job_unreported_for_the_next_poll() -> None:
    """No marker without a published event: the next poll publishes it."""
    backend, sink = ScriptedBackend(), RecordingSink()
    backend.add("j", counts=TaskCounts(completed=1, succeeded=1))
    m = monitor(backend, sink)
    sink.fail = True
    assert poll(m).reported == []
    assert "fanout-reported" not in backend.jobs["j"].metadata
    sink.fail = False
    assert poll(m).reported == ["j"] and len(sink.sent) == 1
    assert m.metrics.registry.get_sample_value("fanout_event_publish_errors_total") == 1


def test_reply_to_only_when_the_operator_allows_it() -> None:
    """The event also goes to the message's reply-to when it is an allowed entity."""
    backend, sink = ScriptedBackend(), RecordingSink()
    backend.add("ok", counts=TaskCounts(completed=1, succeeded=1),
                meta={"fanout-reply-to": "team-a"})
    backend.add("no", counts=TaskCounts(completed=1, succeeded=1),
                meta={"fanout-reply-to": "somewhere-else"})
    poll(monitor(backend, sink, allowed_reply_to=["team-a"]))
    assert sorted((e["subject"], to or "") for e, _, to in sink.sent) == [
        ("no", ""), ("ok", ""), ("ok", "team-a")]


def test_reported_jobs_past_retention_are_deleted_in_bounded_batches() -> None:
    """Only reported jobs ended more than the retention ago; at most delete_batch."""
    backend, sink = ScriptedBackend(), RecordingSink()
    old = NOW - timedelta(days=8)
    for i in range(5):
        backend.add(f"old{i}", counts=TaskCounts(completed=1, succeeded=1), ended=old,
                    meta={"fanout-reported": "x"})
    backend.add("unreported", counts=TaskCounts(completed=1, succeeded=1), ended=old)
    backend.add("recent", counts=TaskCounts(completed=1, succeeded=1),
                meta={"fanout-reported": "x"})
    m = JobMonitor(backend=backend, sink=sink,  # type: ignore[arg-type]
                   jobs=JobsConfig(delete_batch=3), events=EventsConfig(),
                   metrics=Metrics(registry=CollectorRegistry()), clock=lambda: NOW)
    result = poll(m)
    assert len(result.deleted) == 3 and "recent" not in result.deleted
    assert "unreported" in result.reported  # reported first, deleted on a later sweep
    assert "recent" in backend.jobs
    second = poll(m)  # the bound was reached: the next poll sweeps again at once
    assert ("list", "None") in backend.calls[-4:]
    assert sorted(second.deleted) == ["old3", "old4", "unreported"]  # reported by now
    assert set(backend.jobs) == {"recent"}


def test_requests_per_poll_grow_with_active_jobs_not_tasks() -> None:
    """200 active jobs cost one listing and 200 count reads, whatever their size."""
    backend, sink = ScriptedBackend(), RecordingSink()
    for i in range(200):
        backend.add(f"a{i}", state="active", counts=TaskCounts(active=5000, running=5000))
    result = poll(monitor(backend, sink))
    assert result.requests == {"list_jobs": 1, "task_counts": 200}


class PagedBackend(ScriptedBackend):
    """Lists in pages (``list_fanout_jobs_page``), as the local executor does."""

    def __init__(self) -> None:
        super().__init__()
        self.pages: list[int] = []

    def list_fanout_jobs_page(self, *, completed_since: datetime | None = None,
                              after: int = 0, limit: int = 1000
                              ) -> tuple[list[JobRecord], int | None]:
        listed = self.list_fanout_jobs(completed_since=completed_since)[after:after + limit]
        self.pages.append(len(listed))
        return listed, (after + limit if len(listed) == limit else None)


def test_a_paged_listing_is_followed_a_page_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """With pages of 3, 10 completed jobs are listed in 4 pages and each page's jobs are
    reported (event, then marker) before the next page is read."""
    monkeypatch.setattr("worker.monitor.PAGE", 3)
    backend = PagedBackend()
    for i in range(10):
        backend.add(f"j{i}", counts=TaskCounts(completed=1, succeeded=1))
    sink = RecordingSink()
    result = asyncio.run(monitor(backend, sink).poll())
    assert backend.pages == [3, 3, 3, 1] and result.listed == 10
    assert sorted(result.reported) == sorted(backend.jobs) and len(sink.sent) == 10
    lists = [n for n, (call, _) in enumerate(backend.calls) if call == "list"]
    markers = [n for n, (call, _) in enumerate(backend.calls) if call == "metadata"]
    for page, at in enumerate(lists[1:]):  # page k's three markers come before listing k+1
        assert sum(m < at for m in markers) == 3 * (page + 1)
    assert result.requests["list_jobs"] == 4
