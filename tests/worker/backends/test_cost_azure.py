"""Cost on Azure Batch: usage in the completion event from the tasks' execution info,
priced by the pool's VM size and task slots, and the monitor's request budget for it,
against the Batch peer."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from azure.core.credentials import AzureNamedKeyCredential
from prometheus_client import CollectorRegistry

from tests.fakes.batch_peer import BatchPeer, Runner
from worker.backends.azure import AzureBatchBackend
from worker.config import CostConfig, EventsConfig, JobsConfig, Settings
from worker.context import job_id_for
from worker.metrics import Metrics
from worker.monitor import JobMonitor

from ..harness import RunningWorker

MakePeer = Callable[..., BatchPeer]
StartWorker = Callable[..., RunningWorker]
#: The price of the peer pool's VM size, per node-hour.
PRICE = 0.096


def backend_for(peer: BatchPeer) -> AzureBatchBackend:
    return AzureBatchBackend(endpoint=peer.url,
                             credential=AzureNamedKeyCredential(peer.account, peer.key),
                             default_pool="fanout", connections=10)


@pytest.fixture
def start_worker(make_settings: Callable[..., Settings]) -> Iterator[StartWorker]:
    started: list[RunningWorker] = []

    def start(peer: BatchPeer, **overrides: Any) -> RunningWorker:
        settings = make_settings(
            backend={"kind": "azure"},
            batch={"account_url": peer.url, "account_name": peer.account, "pool": "fanout",
                   "poll_interval": 0.5},
            programs={"sim": {"command": "sim {seed}", "required_slots": 2},
                      "summary": {"command": "summary"}},
            consumer={"receive_wait": 0.2, "unready_backoff": 0.1},
            submit={"backoff_base": 0.001, "backoff_max": 0.01},
            jobs={"poll_interval": 0.3}, **overrides)
        running = RunningWorker(settings, backend=backend_for(peer)).start()
        started.append(running)
        return running

    yield start
    for running in started:
        if running.thread.is_alive():
            running.stop()


def test_usage_and_cost_from_the_tasks_execution_info(make_peer: MakePeer,
                                                      start_worker: StartWorker) -> None:
    """Four 2-slot sweep tasks and a 1-slot aggregate, each attempt 0.05 s of the peer's
    clock (its executionInfo startTime to endTime); task 1 exits 3 once and is retried,
    and only its last attempt counts (startTime is the most recent attempt's). On a pool
    of standard_d2s_v3 nodes with 2 slots each: 0.45 slot-seconds, 0.225 node-seconds,
    priced per node-hour; the tag is in the job's metadata, the event and the metrics."""
    peer = make_peer(runner=Runner(delay=0.05, exit_codes={"1": 3}))
    peer.add_pool("fanout", dedicated={"idle": 2}, vm_size="Standard_D2s_v3",
                  task_slots_per_node=2)
    w = start_worker(peer, cost={"allowed_tags": ["team"],
                                 "prices": {"standard_d2s_v3": PRICE}})
    w.send({"handler": "sweep", "id": "az-cost",
            "job": {"tags": {"team": "vision"}, "max_task_retries": 1},
            "params": {"program": "sim", "parameters": {"seed": {"start": 0, "stop": 4}},
                       "aggregate": {"program": "summary"}}})
    job_id = job_id_for("sweep", "az-cost")
    data = w.wait_event(job_id)["data"]
    assert data["tasks"] == {"total": 5, "succeeded": 4, "failed": 1, "not_run": 0}
    assert peer.task(job_id, "1").retry_count == 1
    assert data["tags"] == {"team": "vision"}
    usage = data["usage"]
    assert usage["tasks_measured"] == 5
    assert usage["slot_seconds"] == pytest.approx(4 * 0.05 * 2 + 0.05)
    assert usage["node_seconds"] == pytest.approx(0.225)
    assert (usage["vm_size"], usage["task_slots_per_node"]) == ("standard_d2s_v3", 2)
    assert usage["price_per_node_hour"] == PRICE
    assert usage["estimated_cost"] == pytest.approx(0.225 / 3600 * PRICE, abs=1e-9)
    job = peer.job(job_id)
    assert job is not None
    meta = {m["name"]: m["value"] for m in job.body["metadata"]}
    assert meta["fanout-tag-team"] == "vision"
    labels = {"handler": "sweep", "team": "vision"}
    assert w.sample("fanout_job_node_seconds_total", labels) == pytest.approx(0.225)
    assert w.sample("fanout_job_cost_total", labels) == pytest.approx(0.225 / 3600 * PRICE)
    assert peer.undocumented == []


def monitor_for(backend: AzureBatchBackend, cost: CostConfig) -> JobMonitor:
    return JobMonitor(backend=backend, sink=None, jobs=JobsConfig(lookback=timedelta(0)),
                      events=EventsConfig(enabled=False),
                      metrics=Metrics(registry=CollectorRegistry()), cost=cost)


def seed_completed(peer: BatchPeer, job_id: str, tasks: int) -> None:
    peer.seed_job(job_id, tasks=tasks, state="completed",
                  on_all_tasks_complete="terminatejob",
                  metadata={"fanout-handler": "sweep", "fanout-tasks": str(tasks)})


def poll(peer: BatchPeer, monitor: JobMonitor) -> tuple[Counter[str], list[str]]:
    before = Counter(op for op, _ in peer.log)
    result = asyncio.run(monitor.poll())
    return Counter(op for op, _ in peer.log) - before, result.reported


@pytest.mark.parametrize(("cost", "listings", "pool_reads"), [
    (CostConfig(), 3 + 1, 1),
    (CostConfig(node_seconds="off"), 0, 0),
    (CostConfig(max_tasks_listed=2000), 1, 1),
])
def test_usage_costs_one_page_per_1000_completed_tasks_once_per_job(
        make_peer: MakePeer, cost: CostConfig, listings: int, pool_reads: int) -> None:
    """Two completed jobs (2,500 and 10 tasks) reported in one poll: the usage listing is
    ceil(completed / 1000) pages per job (3 + 1), and one read of their pool, cached;
    none with node_seconds = "off"; a job over max_tasks_listed is not listed."""
    peer = make_peer()
    seed_completed(peer, "sweep-big", 2500)
    seed_completed(peer, "sweep-small", 10)
    backend = backend_for(peer)
    try:
        made, reported = poll(peer, monitor_for(backend, cost))
    finally:
        backend.close()
    assert sorted(reported) == ["sweep-big", "sweep-small"]
    assert made == Counter({"list_jobs": 1, "get_task_counts": 2, "update_job": 2,
                            **({"list_tasks": listings} if listings else {}),
                            **({"get_pool": pool_reads} if pool_reads else {})})


def test_a_deleted_pool_leaves_node_seconds_and_cost_empty(make_peer: MakePeer) -> None:
    """The job's pool is gone: slot-seconds are still measured; node-seconds (which need
    the pool's slots per node) and cost are null."""
    peer = make_peer()
    seed_completed(peer, "sweep-orphan", 3)
    peer.remove_pool("fanout")
    backend = backend_for(peer)
    try:
        usage = backend.job_usage("sweep-orphan", "fanout")
        assert usage is not None and usage.tasks == 3 and usage.vm_size is None
        assert backend.job_usage("sweep-gone", "fanout") is None
    finally:
        backend.close()
