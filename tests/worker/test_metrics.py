"""Tests for the metrics collectors and the health state."""

from __future__ import annotations

import urllib.request

from prometheus_client import CollectorRegistry, generate_latest

from worker.backends.base import BackendStats, PoolCapacity, ResizeError
from worker.metrics import Health, Metrics, MetricsServer


def test_registry_is_private() -> None:
    """Two Metrics on two registries do not share samples."""
    a, b = Metrics(registry=CollectorRegistry()), Metrics(registry=CollectorRegistry())
    a.messages.labels("sweep", "completed").inc()
    assert a.registry.get_sample_value(
        "fanout_messages_total", {"handler": "sweep", "outcome": "completed"}) == 1
    assert b.registry.get_sample_value(
        "fanout_messages_total", {"handler": "sweep", "outcome": "completed"}) is None


def _stats(*pools: str, **jobs: int) -> BackendStats:
    """Stats of two idle nodes per pool (each short of its target, with a resize error),
    and ``jobs``' task counts by state (any: one active job)."""
    return BackendStats(
        pool_nodes={(p, "idle"): 2 for p in pools},
        pool_size={(p, "target_dedicated"): 2 for p in pools},
        active_jobs=1 if jobs else 0, job_tasks=dict(jobs),
        pools={p: PoolCapacity(pool=p, nodes={"idle": 2}, pending=3, current_dedicated=1,
                               target_dedicated=2,
                               resize_errors=[ResizeError("AllocationTimedOut")])
               for p in pools})


def _scrape(m: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the registry, as (name, labels) -> value."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in m.registry.collect() for s in family.samples}


def test_backend_gauges_are_the_last_snapshot() -> None:
    """The pool, job and capacity gauges show exactly the last stats snapshot."""
    m = Metrics(registry=CollectorRegistry())
    m.backend_stats.update(_stats("a", "b", running=4, active=2), taken=1.7e9)
    get = m.registry.get_sample_value
    assert get("fanout_pool_nodes", {"pool": "a", "state": "idle"}) == 2
    assert get("fanout_pool_size", {"pool": "b", "which": "target_dedicated"}) == 2
    assert get("fanout_active_jobs") == 1
    assert get("fanout_job_tasks", {"state": "running"}) == 4
    assert get("fanout_job_tasks", {"state": "active"}) == 2
    assert get("fanout_pool_slots", {"pool": "a"}) == 2
    assert get("fanout_pool_pending_tasks", {"pool": "b"}) == 3
    assert get("fanout_pool_resize_errors", {"pool": "a", "code": "AllocationTimedOut"}) == 1
    assert get("fanout_backend_stats_timestamp_seconds") == 1.7e9


def test_a_pool_that_vanishes_drops_out_of_the_scrape() -> None:
    """A deleted pool's series go with it, instead of reading 0 for ever."""
    m = Metrics(registry=CollectorRegistry())
    m.backend_stats.update(_stats("a", "gone"))
    assert any(("pool", "gone") in labels for _, labels in _scrape(m))
    m.backend_stats.update(_stats("a"))
    scraped = _scrape(m)
    assert not any(("pool", "gone") in labels for _, labels in scraped)
    assert scraped["fanout_pool_slots", frozenset({("pool", "a")})] == 2


def test_a_finished_job_drops_out_of_the_scrape() -> None:
    """Once the last active job finishes, its task states leave the scrape."""
    m = Metrics(registry=CollectorRegistry())
    m.backend_stats.update(_stats("a", running=4))
    m.backend_stats.update(_stats("a"))
    get = m.registry.get_sample_value
    assert get("fanout_job_tasks", {"state": "running"}) is None
    assert get("fanout_active_jobs") == 0
    assert not [name for name, _ in _scrape(m) if name == "fanout_job_tasks"]


def test_no_backend_gauges_before_the_first_read() -> None:
    """Nothing is made up before the first snapshot; the families are still declared."""
    m = Metrics(registry=CollectorRegistry())
    assert m.registry.get_sample_value("fanout_active_jobs") is None
    assert b"# TYPE fanout_pool_nodes gauge" in generate_latest(m.registry)


def test_no_created_series() -> None:
    """prometheus-client's ``_created`` series are off: /metrics serves none."""
    m = Metrics(registry=CollectorRegistry())
    m.messages.labels("sweep", "completed").inc()
    m.message_duration.labels("sweep").observe(1)
    server = MetricsServer(registry=m.registry, health=Health(heartbeat_timeout=60),
                           bind="127.0.0.1", port=0)
    server.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics",
                                    timeout=5) as answer:
            body = answer.read().decode()
    finally:
        server.stop()
    assert "fanout_messages_total{" in body
    assert "_created" not in body


def test_health_goes_stale_without_beats() -> None:
    """Liveness fails once the loop has not beaten within the timeout."""
    now = [100.0]
    health = Health(heartbeat_timeout=10, clock=lambda: now[0])
    health.set_ready(True)
    assert health.alive and health.ready
    now[0] += 11
    assert not health.alive and not health.ready
    health.beat()
    assert health.alive
    health.set_ready(False, "AuthFailed: 403")
    assert not health.ready and health.reason == "AuthFailed: 403"


def test_one_stuck_loop_fails_liveness_while_another_beats() -> None:
    """Heartbeats are per loop: a loop that stops beating fails /healthz even while
    another keeps beating; a loop that ends is forgotten."""
    now = [100.0]
    health = Health(heartbeat_timeout=10, clock=lambda: now[0])
    health.beat("receive-0")
    health.beat("receive-1")
    for _ in range(3):
        now[0] += 5
        health.beat("receive-1")
    assert not health.alive and health.stalest == "receive-0"
    assert health.since_beat() == 15
    health.forget("receive-0")
    assert health.alive


def test_settle_failures_have_their_own_counter() -> None:
    """fanout_settle_failures_total is labelled by action and why."""
    m = Metrics(registry=CollectorRegistry())
    m.settle_failures.labels("complete", "lock_lost").inc()
    assert m.registry.get_sample_value("fanout_settle_failures_total", {
        "action": "complete", "why": "lock_lost"}) == 1
    assert m.registry.get_sample_value("fanout_messages_total", {
        "handler": "none", "outcome": "completed"}) is None
