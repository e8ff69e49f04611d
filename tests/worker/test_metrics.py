"""Tests for the metrics collectors and the health state."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from worker.metrics import Health, Metrics


def test_registry_is_private() -> None:
    """Two Metrics on two registries do not share samples."""
    a, b = Metrics(registry=CollectorRegistry()), Metrics(registry=CollectorRegistry())
    a.messages.labels("sweep", "completed").inc()
    assert a.registry.get_sample_value(
        "fanout_messages_total", {"handler": "sweep", "outcome": "completed"}) == 1
    assert b.registry.get_sample_value(
        "fanout_messages_total", {"handler": "sweep", "outcome": "completed"}) is None


def test_set_labelled_zeroes_vanished_series() -> None:
    """A label set that disappears from a poll reads 0, not its stale value."""
    m = Metrics(registry=CollectorRegistry())
    seen: set[tuple[str, ...]] = set()
    m.set_labelled(m.pool_nodes, {("p", "idle"): 3, ("p", "running"): 1}, seen)
    m.set_labelled(m.pool_nodes, {("p", "running"): 4}, seen)
    get = m.registry.get_sample_value
    assert get("fanout_pool_nodes", {"pool": "p", "state": "idle"}) == 0
    assert get("fanout_pool_nodes", {"pool": "p", "state": "running"}) == 4


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
