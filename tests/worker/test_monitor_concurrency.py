"""The job monitor follows ``jobs.monitor_concurrency`` jobs at once: bounded, each job's
steps in order (its event before its marker), the deletion bound kept, and the
documented request budget unchanged against the Batch peer over HTTP."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.request
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from azure.core.credentials import AzureNamedKeyCredential
from prometheus_client import CollectorRegistry

from tests.fakes.batch_peer import BatchPeer
from worker.backends.azure import AzureBatchBackend
from worker.backends.base import TaskCounts
from worker.config import EventsConfig, JobsConfig
from worker.errors import SystemFault
from worker.metrics import Metrics
from worker.monitor import JobMonitor

from .test_monitor import NOW, RecordingSink, ScriptedBackend


class GatedBackend(ScriptedBackend):
    """Task-counts reads wait at a barrier of ``parties``: a monitor that had fewer in
    flight would break it (the wait's timeout) and fail the job; the most in flight
    at once is kept."""

    def __init__(self, parties: int) -> None:
        super().__init__()
        self.barrier = threading.Barrier(parties, timeout=10)
        self.lock = threading.Lock()
        self.in_flight = self.peak = 0
        self.order: list[tuple[str, str]] = []

    def task_counts(self, job_id: str) -> TaskCounts | None:
        with self.lock:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        try:
            self.barrier.wait()
        except threading.BrokenBarrierError:
            raise SystemFault("fewer reads in flight than the barrier's parties") from None
        finally:
            with self.lock:
                self.in_flight -= 1
        return super().task_counts(job_id)

    def update_job_metadata(self, job_id: str, metadata: dict[str, str]) -> None:
        with self.lock:
            self.order.append(("marker", job_id))
        super().update_job_metadata(job_id, metadata)


class OrderedSink(RecordingSink):
    def __init__(self, backend: GatedBackend) -> None:
        super().__init__()
        self.backend = backend

    async def publish(self, body: bytes, *, message_id: str, to: str | None = None,
                      properties: Any = None) -> None:
        await super().publish(body, message_id=message_id, to=to, properties=properties)
        with self.backend.lock:
            self.backend.order.append(("event", json.loads(body)["data"]["job_id"]))


def _monitor(backend: ScriptedBackend, sink: RecordingSink, **jobs: Any) -> JobMonitor:
    return JobMonitor(backend=backend, sink=sink,  # type: ignore[arg-type]
                      jobs=JobsConfig(**jobs), events=EventsConfig(),
                      metrics=Metrics(registry=CollectorRegistry()), clock=lambda: NOW)


def test_reports_run_concurrently_within_the_bound_each_event_before_its_marker() -> None:
    backend = GatedBackend(parties=4)
    for i in range(40):
        backend.add(f"j{i}", counts=TaskCounts(completed=2, succeeded=2))
    sink = OrderedSink(backend)
    result = asyncio.run(_monitor(backend, sink, monitor_concurrency=4).poll())
    assert result.errors == 0 and sorted(result.reported) == sorted(backend.jobs)
    assert backend.peak == 4
    assert len(sink.sent) == 40 and result.requests == {
        "list_jobs": 1, "task_counts": 40, "update_metadata": 40}
    for job_id in backend.jobs:
        assert backend.order.index(("event", job_id)) < backend.order.index(("marker", job_id))
        assert "fanout-reported" in backend.jobs[job_id].metadata


def test_one_job_at_a_time_still_reports_every_job() -> None:
    backend = GatedBackend(parties=1)
    for i in range(5):
        backend.add(f"j{i}", counts=TaskCounts(completed=1, succeeded=1))
    result = asyncio.run(_monitor(backend, OrderedSink(backend), monitor_concurrency=1).poll())
    assert backend.peak == 1 and sorted(result.reported) == sorted(backend.jobs)
    assert [op for op, _ in backend.order] == ["event", "marker"] * 5


def test_deletions_in_flight_together_keep_to_the_bound() -> None:
    backend = ScriptedBackend()
    for i in range(20):
        backend.add(f"old{i}", counts=TaskCounts(completed=1, succeeded=1),
                    ended=NOW - timedelta(days=8), meta={"fanout-reported": "x"})
    result = asyncio.run(_monitor(backend, RecordingSink(), delete_batch=3,
                                  monitor_concurrency=8).poll())
    assert len(result.deleted) == 3 and len(backend.jobs) == 17
    assert [c for c, _ in backend.calls].count("delete") == 3


class FailingDelete(ScriptedBackend):
    def delete_job(self, job_id: str) -> None:
        if job_id == "old0":
            raise SystemFault("ServerBusy")
        super().delete_job(job_id)


def test_a_failed_deletion_gives_its_place_back() -> None:
    backend = FailingDelete()
    for i in range(4):
        backend.add(f"old{i}", counts=TaskCounts(completed=1, succeeded=1),
                    ended=NOW - timedelta(days=8), meta={"fanout-reported": "x"})
    result = asyncio.run(_monitor(backend, RecordingSink(), delete_batch=3,
                                  monitor_concurrency=1).poll())
    assert result.errors == 1 and result.deleted == ["old1", "old2", "old3"]


def test_an_unexpected_error_ends_the_poll_with_that_error() -> None:
    class Broken(ScriptedBackend):
        def task_counts(self, job_id: str) -> TaskCounts | None:
            raise RuntimeError(f"bug reading {job_id}")

    backend = Broken()
    for i in range(3):
        backend.add(f"j{i}", counts=TaskCounts(completed=1, succeeded=1))
    with pytest.raises(RuntimeError, match="bug reading"):
        asyncio.run(_monitor(backend, RecordingSink(), monitor_concurrency=2).poll())


@pytest.fixture
def peer() -> Iterator[BatchPeer]:
    with BatchPeer() as running:
        running.add_pool("fanout", dedicated={"idle": 2})
        yield running


def _admin(peer: BatchPeer, path: str, payload: Any = None) -> Any:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(f"{peer.url}/_peer/{path}", data=data,
                                     method="GET" if data is None else "POST")
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())


def test_a_burst_of_completions_keeps_the_documented_request_budget(peer: BatchPeer) -> None:
    """50 jobs of 10 tasks, seeded and finished through the peer's test administration,
    reported 8 at a time: one listing, then per job one task-counts read, one usage
    page and one marker, plus one get pool (docs/azure-batch.md); nothing else."""
    ids = [f"sweep-burst-{i}" for i in range(50)]
    _admin(peer, "seed", {"jobs": [
        {"id": job_id, "tasks": 10, "counts": {"running": 10},
         "metadata": {"fanout-handler": "sweep", "fanout-tasks": "10"},
         "on_all_tasks_complete": "terminatejob"} for job_id in ids]})
    backend = AzureBatchBackend(endpoint=peer.url, default_pool="fanout", connections=10,
                                credential=AzureNamedKeyCredential(peer.account, peer.key))
    sink = RecordingSink()
    monitor = JobMonitor(backend=backend, sink=sink, jobs=JobsConfig(monitor_concurrency=8),
                         events=EventsConfig(), metrics=Metrics(registry=CollectorRegistry()))
    try:
        asyncio.run(monitor.poll())  # active: warm, the full sweep done
        assert _admin(peer, "finish", {"jobs": ids})["finished"] == 50
        before = Counter(op for op, _ in peer.log)
        result = asyncio.run(monitor.poll())
        made = Counter(op for op, _ in peer.log) - before
    finally:
        backend.close()
    assert sorted(result.reported) == sorted(ids) and len(sink.sent) == 50
    assert made == Counter({"list_jobs": 1, "get_task_counts": 50, "list_tasks": 50,
                            "get_pool": 1, "update_job": 50})
    served = {op: n for op, outcome, n in _admin(peer, "requests")["requests"]
              if outcome == "ok"}
    assert served["update_job"] == 50 and all(
        "fanout-reported" in {m["name"] for m in j.body["metadata"]} for j in peer.jobs())


def test_the_test_administration_is_outside_the_batch_api(peer: BatchPeer) -> None:
    """Unknown administration paths and seed properties are refused; none of it is
    counted as a Batch request."""
    with pytest.raises(urllib.error.HTTPError) as missing:
        _admin(peer, "nothing")
    assert missing.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as bad:
        _admin(peer, "seed", {"jobs": [{"id": "x", "shell": "rm -rf"}]})
    assert bad.value.code == 400
    with pytest.raises(urllib.error.HTTPError) as unseeded:
        _admin(peer, "finish", {"jobs": ["no-such-job"]})
    assert unseeded.value.code == 400
    assert peer.requests == Counter() and peer.jobs() == []


def test_the_default_concurrency_follows_the_backend(tmp_path: Any) -> None:
    """16 on Azure Batch (round trips), 1 on the local executor (SQLite in-process);
    a value given is kept on either."""
    from worker.config import load_settings

    empty = tmp_path / "empty.toml"
    empty.write_text("")
    azure = {"backend": {"kind": "azure"},
             "batch": {"account_url": "https://a.batch.example", "pool": "p"}}

    def concurrency(**overrides: Any) -> int:
        settings = load_settings(empty, overrides={"home": str(tmp_path), **overrides})
        return settings.jobs.monitor_concurrency

    assert concurrency() == 1
    assert concurrency(**azure) == 16
    assert concurrency(jobs={"monitor_concurrency": 4}) == 4
    assert concurrency(**azure, jobs={"monitor_concurrency": 4}) == 4
