"""Admission that respects capacity (worker/admission.py): the decision, the pause's
metrics, readiness and logs, and the whole embedded worker pausing and resuming."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from worker.admission import Admission, cause, fresh_resize_errors, slots, view
from worker.backends.base import BackendStats, PoolCapacity, ResizeError
from worker.cli import main
from worker.config import Settings
from worker.metrics import Health, Metrics, MetricsServer

from .harness import RunningWorker


def pool(**kw: Any) -> PoolCapacity:
    """A steady pool of 2 idle nodes (1 slot each) at its target, unless told otherwise."""
    base: dict[str, Any] = {"pool": "p", "nodes": {"idle": 2}, "current": 2, "target": 2,
                            "current_dedicated": 2, "target_dedicated": 2}
    return PoolCapacity(**{**base, **kw})


QUOTA = ResizeError("AccountCoreQuotaReached", "The Batch account core quota was reached.")


# -- the decision ------------------------------------------------------------------------

def test_slots_count_usable_and_coming_nodes_times_slots_per_node() -> None:
    assert slots(pool()) == 2
    assert slots(pool(slots_per_node=4)) == 8
    assert slots(pool(nodes={"idle": 1, "running": 1, "starting": 1, "unusable": 3})) == 3
    # a resize under way: the nodes it still has to add count
    assert slots(pool(nodes={}, current=0, target=5, allocation_state="resizing")) == 5
    assert slots(pool(nodes={}, current=0, target=0)) == 0


def test_backlog_over_the_limit_waits_and_under_it_does_not() -> None:
    assert view(pool(pending=4), 2).wait is None  # 4 <= 2 x 2 slots
    over = view(pool(pending=5), 2).wait
    assert over is not None and over.reason == "backlog"
    assert "5 pending tasks over 2 per slot x 2 slots" in over.detail
    assert view(pool(pending=500), None).wait is None  # admission off


@pytest.mark.parametrize(("cap", "reason"), [
    (pool(exists=False, nodes={}, current=0, target=0), "pool_missing"),
    (pool(nodes={"idle": 2}, target=4, target_dedicated=4, resize_errors=[QUOTA]),
     "core_quota"),
    (pool(nodes={}, current=0, current_dedicated=0, current_low_priority=0, target=3,
          target_dedicated=0, target_low_priority=3,
          resize_errors=[ResizeError("AccountLowPriorityCoreQuotaReached", "spot quota")]),
     "core_quota"),
    (pool(target=4, target_dedicated=4,
          resize_errors=[ResizeError("AllocationTimedOut", "no capacity")]), "resize_error"),
    (pool(nodes={"idle": 1, "startTaskFailed": 1}), "start_task_failed"),
    (pool(nodes={"idle": 1, "unusable": 1}), "unusable_nodes"),
    (pool(nodes={}, current=0, target=0, current_dedicated=0, target_dedicated=0),
     "no_nodes"),
    (pool(), "backlog"),
])
def test_each_cause_is_named(cap: PoolCapacity, reason: str) -> None:
    assert cause(cap)[0] == reason
    cap.pending = 100
    wait = view(cap, 1).wait
    assert wait is not None and wait.reason == reason


def test_a_pool_at_zero_nodes_with_autoscale_admits_until_tasks_wait() -> None:
    """Zero slots: nothing pending is admitted (so autoscale sees tasks); once tasks are
    pending it waits as ``backlog``, not ``no_nodes``, until the formula raises the
    target; then the resize's nodes count."""
    zero = pool(nodes={}, current=0, target=0, current_dedicated=0, target_dedicated=0,
                autoscale=True)
    assert view(zero, 2).wait is None
    zero.pending = 10
    wait = view(zero, 2).wait
    assert wait is not None and wait.reason == "backlog"
    zero.target = zero.target_dedicated = 5
    zero.allocation_state = "resizing"
    assert view(zero, 2).wait is None  # 10 <= 2 x 5 coming slots


def test_stale_resize_errors_are_ignored() -> None:
    short = pool(target=4, target_dedicated=4, resize_errors=[QUOTA])
    assert fresh_resize_errors(short) == [QUOTA]
    # the pool reached its target since (a later resize, or autoscale lowered it)
    assert fresh_resize_errors(pool(resize_errors=[QUOTA])) == []
    # a new resize is under way: the errors were the last one's
    assert fresh_resize_errors(pool(target=4, target_dedicated=4, resize_errors=[QUOTA],
                                    allocation_state="resizing")) == []
    stale = pool(resize_errors=[QUOTA], pending=100)
    wait = view(stale, 1).wait
    assert wait is not None and wait.reason == "backlog"
    assert view(stale, 1).resize_errors == []


# -- the pause: metrics, readiness, logs ----------------------------------------------------

def make_admission(limit: float | None = 1) -> tuple[Admission, Metrics, Health]:
    metrics = Metrics(registry=CollectorRegistry())
    health = Health(heartbeat_timeout=60, metrics=metrics)
    health.set_ready(True)
    health.beat("receive-0")
    return Admission(limit=limit, metrics=metrics, health=health), metrics, health


def sample(metrics: Metrics, name: str, labels: dict[str, str]) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def stats_of(*caps: PoolCapacity) -> BackendStats:
    return BackendStats(pools={c.pool: c for c in caps})


def test_pause_sets_the_metric_and_readiness_and_resumes() -> None:
    admission, metrics, health = make_admission(limit=1)
    admission.update(stats_of(pool(pending=1)))
    assert not admission.paused and health.ready
    stats = stats_of(pool(pending=3))
    admission.update(stats)
    metrics.backend_stats.update(stats)  # the stats poller stores the same snapshot
    assert admission.paused
    assert not health.ready and health.alive
    assert health.why_unready.startswith("waiting for capacity: pool p: backlog: 3 pending")
    assert sample(metrics, "fanout_admission_paused", {"pool": "p", "reason": "backlog"}) == 1
    assert sample(metrics, "fanout_pool_pending_tasks", {"pool": "p"}) == 3
    assert sample(metrics, "fanout_pool_slots", {"pool": "p"}) == 2
    assert sample(metrics, "fanout_ready", {}) == 0
    admission.update(stats_of(pool(pending=0)))
    assert not admission.paused and health.ready
    assert sample(metrics, "fanout_admission_paused", {"pool": "p", "reason": "backlog"}) == 0
    assert sample(metrics, "fanout_ready", {}) == 1


def test_a_passed_pause_reads_0_until_its_pool_goes() -> None:
    """A cause that has passed reads 0 (the alert's min_over_time sees it end) while its
    pool is reported, and leaves the scrape with the pool."""
    admission, metrics, _ = make_admission(limit=1)
    labels = {"pool": "p", "reason": "backlog"}
    admission.update(stats_of(pool(pending=3)))
    assert sample(metrics, "fanout_admission_paused", labels) == 1
    admission.update(stats_of(pool(pending=0)))
    assert sample(metrics, "fanout_admission_paused", labels) == 0
    admission.update(stats_of(pool(pool="q")))
    assert sample(metrics, "fanout_admission_paused", labels) is None


def test_a_config_fault_is_told_apart_from_a_capacity_wait() -> None:
    admission, _, health = make_admission(limit=1)
    admission.update(stats_of(pool(pending=9)))
    health.set_ready(False, "AuthenticationFailed: key refused")
    assert health.why_unready == "AuthenticationFailed: key refused"
    health.set_ready(True)
    assert health.why_unready.startswith("waiting for capacity:")


def test_readyz_says_waiting_for_capacity_while_healthz_stays_healthy() -> None:
    admission, metrics, health = make_admission(limit=0)
    server = MetricsServer(registry=metrics.registry, health=health, bind="127.0.0.1", port=0)
    server.start()
    try:
        admission.update(stats_of(pool(nodes={"idle": 1, "unusable": 1}, pending=1)))
        base = f"http://127.0.0.1:{server.port}"
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(f"{base}/readyz", timeout=5)
        assert caught.value.code == 503
        assert caught.value.read().decode() == (
            "not ready: waiting for capacity: pool p: unusable_nodes: 1 node(s) unusable "
            "(1 pending tasks over 0 per slot x 1 slots)\n")
        with urllib.request.urlopen(f"{base}/healthz", timeout=5) as answer:
            assert answer.status == 200
    finally:
        server.stop()


def test_resize_errors_are_counted_and_logged_once_per_change() -> None:
    admission, metrics, _ = make_admission(limit=None)
    short = pool(target=4, target_dedicated=4, resize_errors=[QUOTA],
                 allocation_changed=datetime(2026, 12, 1, 10, tzinfo=UTC))
    with capture_logs() as logs:
        admission.update(stats_of(short))
        admission.update(stats_of(short))
    metrics.backend_stats.update(stats_of(short))
    assert [e["event"] for e in logs] == ["pool.resize_errors"]
    assert logs[0]["errors"] == ["AccountCoreQuotaReached: The Batch account core quota "
                                 "was reached."]
    labels = {"pool": "p", "code": "AccountCoreQuotaReached"}
    assert sample(metrics, "fanout_pool_resize_errors", labels) == 1
    assert not admission.paused  # admission off: reported, never paused
    # the same error from a later resize (a new transition time) is a change
    later = pool(target=4, target_dedicated=4, resize_errors=[QUOTA],
                 allocation_changed=datetime(2026, 12, 1, 11, tzinfo=UTC))
    with capture_logs() as logs:
        admission.update(stats_of(later))
        admission.update(stats_of(pool(resize_errors=[QUOTA])))  # target reached: stale
    assert [e["event"] for e in logs] == ["pool.resize_errors", "pool.resize_errors_cleared"]
    metrics.backend_stats.update(stats_of(pool(resize_errors=[QUOTA])))
    assert sample(metrics, "fanout_pool_resize_errors", labels) is None  # gone, not 0


def test_job_quota_is_a_capacity_wait_on_the_account() -> None:
    admission, metrics, _ = make_admission()
    reason = admission.job_quota("create job j: ActiveJobAndScheduleQuotaReached: full")
    assert reason == ("waiting for capacity: account: job_quota: create job j: "
                      "ActiveJobAndScheduleQuotaReached: full")
    assert sample(metrics, "fanout_admission_paused", {"pool": "*", "reason": "job_quota"}) == 1
    admission.job_quota_cleared()
    assert sample(metrics, "fanout_admission_paused", {"pool": "*", "reason": "job_quota"}) == 0


def test_admission_config_is_checked(make_settings: Callable[..., Settings]) -> None:
    from worker.errors import SettingsError

    assert make_settings().admission.max_backlog_per_slot is None
    assert make_settings(admission={"max_backlog_per_slot": 1.5}).admission \
        .max_backlog_per_slot == 1.5
    with pytest.raises(SettingsError, match="admission.max_backlog_per_slot"):
        make_settings(admission={"max_backlog_per_slot": -1})
    with pytest.raises(SettingsError, match="admission.max_backlgo"):
        make_settings(admission={"max_backlgo": 1})


# -- the embedded worker ------------------------------------------------------------------

def wait_program(gate: Path) -> dict[str, Any]:
    """A program whose tasks wait until ``gate`` exists."""
    script = gate.with_suffix(".py")
    script.write_text("import os, sys, time\n"
                      "while not os.path.exists(sys.argv[1]):\n    time.sleep(0.02)\n")
    return {"command": f"{sys.executable} {script} {gate} {{seed}}"}


def sweep(stop: int, key: str) -> dict[str, Any]:
    return {"handler": "sweep", "id": key, "params": {
        "program": "gate", "parameters": {"seed": {"start": 0, "stop": stop}}}}


def test_local_worker_stops_receiving_over_the_limit_and_resumes(
        tmp_path: Path, make_settings: Callable[..., Settings]) -> None:
    """One slot, limit 1: a 4-task sweep leaves 3 pending, so the next message waits in
    the queue (/readyz says why, /healthz stays healthy); once the tasks complete the
    worker receives it."""
    gate = tmp_path / "gate"
    settings = make_settings(local={"slots": 1, "poll_interval": 0.05},
                             consumer={"receive_wait": 0.2, "concurrency": 1},
                             admission={"max_backlog_per_slot": 1},
                             programs={"gate": wait_program(gate)})
    w = RunningWorker(settings).start()
    try:
        w.send(sweep(4, "first"))
        w.wait_until(lambda: w.app.consumer.admission is not None
                     and w.app.consumer.admission.paused, what="admission paused")
        # a receive begun before the pause may still take a message: wait for it to end
        w.wait_until(lambda: w.app.consumer.receiving == 0, what="no receive in flight")
        w.send(sweep(1, "second"))
        assert not w.app.health.ready and w.app.health.alive
        assert w.app.health.why_unready.startswith(
            "waiting for capacity: pool local: backlog: 3 pending tasks over 1 per slot x "
            "1 slots")
        assert w.sample("fanout_admission_paused", {"pool": "local", "reason": "backlog"}) == 1
        assert w.depth()["active"] == 1  # the second message waits in the queue
        assert w.app.consumer.handled == 1
        gate.touch()
        w.wait_idle(2)
        assert w.app.health.ready, w.app.health.why_unready
        assert w.sample("fanout_admission_paused", {"pool": "local", "reason": "backlog"}) == 0
        assert w.sample("fanout_messages_total", {"handler": "sweep",
                                                  "outcome": "completed"}) == 2
    finally:
        gate.touch()
        w.stop()


def test_status_pools_shows_the_wait_and_why(tmp_path: Path) -> None:
    """``fanout status --pools`` on the local executor: slots, pending and the reason."""
    from handlers.base import JobSpec, TaskSpec
    from worker.backends.local import LocalBackend

    home = tmp_path / "home"
    config = tmp_path / "fanout.toml"
    config.write_text(f'home = "{home}"\n[local]\nslots = 2\n[admission]\n'
                      "max_backlog_per_slot = 1\n")
    with LocalBackend(home=home, slots=2) as backend:  # not started: tasks stay active
        backend.create_job(JobSpec(tasks=[], task_count=5, id="j1", pool="local",
                                   metadata={"fanout-handler": "x"}))
        backend.add_tasks("j1", [TaskSpec(id=str(i), command_line="true") for i in range(5)])
    runner = CliRunner()
    result = runner.invoke(main, ["--config", str(config), "status", "--pools"])
    assert result.exit_code == 0, result.output
    assert ("waiting for capacity: pool local: backlog: 5 pending tasks over 1 per slot x "
            "2 slots") in result.output
    result = runner.invoke(main, ["--config", str(config), "status", "--pools", "--json"])
    (entry,) = json.loads(result.output)
    assert entry["pool"] == "local" and entry["slots"] == 2 and entry["pending"] == 5
    assert entry["waiting"]["reason"] == "backlog"
