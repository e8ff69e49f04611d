"""The Batch peer failing a fifth of requests (429, 503, dropped before and after taking
effect): every task lands exactly once, retries are bounded, and they back off.

Backoff is checked as lower bounds on the pause between a failed attempt and the next
attempt of the same chunk (a pause can only be longer than asked, never shorter, so a
slow machine cannot make these fail); everything else is counts, compared between
fanout's metrics and the peer's own record of the requests it answered.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import pytest
from azure.core.credentials import AzureNamedKeyCredential
from prometheus_client import CollectorRegistry

from handlers.base import JobSpec, TaskSpec
from handlers.commands import sh
from tests.fakes.batch_peer import BatchPeer, FaultPlan
from tests.worker.harness import RunningWorker
from worker.backends.azure import AzureBatchBackend
from worker.backends.base import AddResult, JobState
from worker.config import Settings, SubmitConfig
from worker.errors import SystemFault
from worker.metrics import Metrics
from worker.submit import Submitter

from .conftest import batch_config

#: A fifth of requests fail: 429 and 503 (both with Retry-After), and connections
#: dropped before and after the request took effect.
STORM = FaultPlan(throttle=0.05, unavailable=0.05, drop=0.05, drop_after=0.05)
FAILED = ("throttled", "unavailable", "dropped", "dropped_after")


@dataclass(frozen=True)
class Attempt:
    """One add-task call as the submitter made it."""

    chunk: str
    started: float
    ended: float
    error: SystemFault | None


class Recording:
    """Wraps a backend and records every ``add_tasks`` attempt with its times."""

    def __init__(self, inner: AzureBatchBackend) -> None:
        self.inner = inner
        self.attempts: list[Attempt] = []
        self._lock = threading.Lock()

    @property
    def max_tasks_per_request(self) -> int:
        return self.inner.max_tasks_per_request

    def create_job(self, job: JobSpec) -> JobState:
        return self.inner.create_job(job)

    def seal_job(self, job_id: str) -> None:
        self.inner.seal_job(job_id)

    def add_tasks(self, job_id: str, tasks: Sequence[TaskSpec]) -> AddResult:
        started = time.monotonic()
        error: SystemFault | None = None
        try:
            return self.inner.add_tasks(job_id, tasks)
        except SystemFault as exc:
            error = exc
            raise
        finally:
            with self._lock:
                self.attempts.append(Attempt(tasks[0].id, started, time.monotonic(), error))

    def by_chunk(self) -> dict[str, list[Attempt]]:
        chunks: dict[str, list[Attempt]] = defaultdict(list)
        for attempt in sorted(self.attempts, key=lambda a: a.started):
            chunks[attempt.chunk].append(attempt)
        return chunks


def job(n: int, job_id: str = "faults") -> JobSpec:
    tasks = (TaskSpec(id=str(i), command_line=sh(f"echo {i}")) for i in range(n))
    return JobSpec(tasks=tasks, task_count=n, id=job_id, pool="fanout")


@pytest.fixture
def submitter(batch_peer: Callable[..., BatchPeer]) -> Iterator[Callable[..., Any]]:
    """Build (peer, recording backend, submitter, metrics registry) with backoff at its
    upper envelope (jitter 1.0), so each pause has a known lower bound."""
    made: list[tuple[Submitter, AzureBatchBackend]] = []

    def make(faults: FaultPlan, **config: Any) -> tuple[BatchPeer, Recording, Submitter,
                                                         CollectorRegistry]:
        peer = batch_peer(faults)
        backend = AzureBatchBackend(
            endpoint=peer.url, credential=AzureNamedKeyCredential(peer.account, peer.key),
            default_pool="fanout", connections=12)
        registry = CollectorRegistry()
        recording = Recording(backend)
        sub = Submitter(backend=recording, config=SubmitConfig(**config),  # type: ignore[arg-type]
                        metrics=Metrics(registry=registry), rng=lambda: 1.0)
        made.append((sub, backend))
        return peer, recording, sub, registry

    yield make
    for sub, backend in made:
        sub.close()
        backend.close()


def test_storm_lands_every_task_once_with_bounded_backed_off_retries(
        submitter: Callable[..., Any]) -> None:
    """Under a 20% fault storm 5,000 tasks land once; each chunk retries at most
    max_retries times, after pauses of at least base x 2^attempt and Retry-After."""
    base, retry_after, max_retries = 0.02, 1, 8
    peer, rec, sub, registry = submitter(
        replace(STORM, retry_after=retry_after, seed=3),
        chunk_size=100, concurrency=8, max_retries=max_retries, backoff_base=base,
        backoff_max=5.0)
    result = sub.submit(job(5000), handler="sweep")

    # every task landed, none twice
    assert sorted(int(t["id"]) for t in peer.tasks("faults")) == list(range(5000))
    assert peer.task_outcomes["added"] == 5000
    assert result.added + result.existed == 5000
    # dropped-after-effect requests come back on retry as TaskExists, counted as existing
    assert result.existed == peer.task_outcomes["TaskExists"]
    assert peer.job("faults") is not None and \
        peer.job("faults").on_all_tasks_complete == "terminatejob"

    # the storm really happened, with every kind of fault
    adds = {outcome: peer.requests["add_task_collection", outcome] for outcome in FAILED}
    assert all(adds.values()), adds

    # bounded: one retry per failed attempt and never more than max_retries per chunk
    chunks = rec.by_chunk()
    assert len(chunks) == 50
    assert all(len(a) <= max_retries + 1 for a in chunks.values())
    failed_attempts = sum(1 for a in rec.attempts if a.error is not None)
    assert len(rec.attempts) == 50 + failed_attempts
    assert failed_attempts >= sum(adds.values())  # the peer saw no request we did not make
    retries = registry.get_sample_value("fanout_submit_retries_total")
    assert retries == result.retries >= failed_attempts

    # backed off: each retry waited at least the backoff of its attempt, and at least
    # the Retry-After the service sent with a 429 or 503
    for attempts in chunks.values():
        for n, (failed, retry) in enumerate(zip(attempts, attempts[1:], strict=False)):
            assert failed.error is not None
            floor = base * 2 ** n * 0.99
            if failed.error.retry_after:
                floor = max(floor, failed.error.retry_after * 0.99)
            assert retry.started - failed.ended >= floor, (n, failed.error)
    assert any(a.error is not None and a.error.retry_after == retry_after
               for a in rec.attempts), "no 429/503 carried Retry-After"


def test_a_chunk_that_keeps_failing_gives_up_after_max_retries(
        submitter: Callable[..., Any]) -> None:
    """With every add refused, each chunk is tried max_retries + 1 times with doubling
    pauses, then the submission fails with a SystemFault (the message is abandoned)."""
    base, max_retries, concurrency = 0.01, 3, 2
    peer, rec, sub, _ = submitter(
        FaultPlan(unavailable=1.0, operations=frozenset({"add_task_collection"})),
        chunk_size=100, concurrency=concurrency, max_retries=max_retries, backoff_base=base)
    with pytest.raises(SystemFault):
        sub.submit(job(1000), handler="sweep")
    chunks = rec.by_chunk()
    assert 1 <= len(chunks) <= concurrency  # no chunk beyond those in flight was started
    assert max(len(a) for a in chunks.values()) == max_retries + 1
    assert all(len(a) <= max_retries + 1 for a in chunks.values())
    assert peer.requests["add_task_collection", "unavailable"] == len(rec.attempts)
    for attempts in chunks.values():
        for n, (failed, retry) in enumerate(zip(attempts, attempts[1:], strict=False)):
            assert retry.started - failed.ended >= base * 2 ** n * 0.99
    assert peer.jobs()[0].on_all_tasks_complete == "noaction", "sealed a job missing tasks"


def test_daemon_under_storm_completes_every_message_once(
        make_settings: Callable[..., Settings], batch_peer: Callable[..., BatchPeer]) -> None:
    """A whole worker under the storm: three 2,000-task sweeps each end as one sealed
    job of distinct tasks, the queue ends empty, and fanout's retry count matches the
    failures the peer handed out."""
    peer = batch_peer()
    max_retries = 8
    settings = make_settings(
        batch=batch_config(peer),
        consumer={"receive_wait": 0.2, "concurrency": 3},
        submit={"concurrency": 4, "max_retries": max_retries, "backoff_base": 0.005,
                "backoff_max": 0.05},
        queue={"max_delivery_count": 10})
    w = RunningWorker(settings).start()
    try:
        # the metrics poller reads the peer once at start: let it finish before the storm
        w.wait_until(lambda: peer.requests["list_jobs", "ok"] >= 1, what="the first poll")
        peer.set_faults(replace(STORM, seed=11))
        keys = [f"storm-{i}" for i in range(3)]
        for key in keys:
            w.send({"handler": "sweep", "id": key, "params": {
                "program": "pi", "parameters": {"samples": [10],
                                                "seed": {"start": 0, "stop": 2000}}}})
        w.wait_until(lambda: w.sample("fanout_messages_total", {
            "handler": "sweep", "outcome": "completed"}) == 3, 120, "three completed")
        assert w.depth() == {"active": 0, "dead_letter": 0, "scheduled": 0}
        retries = w.sample("fanout_submit_retries_total")
        add_requests = sum(w.sample("fanout_submit_requests_total", {"outcome": o})
                           for o in ("ok", "partial", "transient_error", "rejected"))
    finally:
        w.stop()
    jobs = peer.jobs()
    assert len(jobs) == 3
    for j in jobs:
        assert j.on_all_tasks_complete == "terminatejob"
        assert sorted(int(t["id"]) for t in peer.tasks(j.id)) == list(range(2000))
    assert peer.task_outcomes["added"] == 6000
    # the submitter's requests, as the peer counted them
    peer_adds = sum(n for (op, _), n in peer.requests.items() if op == "add_task_collection")
    assert peer_adds <= add_requests <= 60 * (max_retries + 1)
    failures = sum(n for (op, outcome), n in peer.requests.items()
                   if outcome in FAILED and op in ("add_task_collection", "create_job",
                                                   "update_job"))
    assert failures > 0
    # at most one retry per failure the client saw; no hidden retry loop underneath
    assert retries >= failures
    assert add_requests - 60 <= retries
