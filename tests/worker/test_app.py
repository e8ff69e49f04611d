"""The App's wiring: settings reach the parts they govern; shutdown never waits for
ever on a poller that swallows its cancellation."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import pytest

from worker import app
from worker.backends.base import BackendStats
from worker.backends.local import LocalBackend
from worker.config import Settings
from worker.errors import SystemFault

from .doubles import MemoryBackend


def test_a_poller_that_swallows_cancellation_does_not_block_shutdown(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """One poller ignores its first cancel (as a library call mid-request can); the
    other stops at once. _cancel_all returns after the grace, leaving the stuck one."""
    monkeypatch.setattr(app, "POLLER_STOP_GRACE", 0.2)

    async def stubborn() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(60)
        await asyncio.sleep(60)  # the cancel was eaten: it goes on

    async def scenario() -> tuple[bool, bool]:
        polite = asyncio.create_task(asyncio.sleep(60), name="polite")
        stuck = asyncio.create_task(stubborn(), name="stuck")
        await asyncio.sleep(0)
        await asyncio.wait_for(app._cancel_all([polite, stuck]), timeout=5)
        done = (polite.cancelled(), stuck.done())
        stuck.cancel()
        return done

    assert asyncio.run(scenario()) == (True, False)


def test_the_local_executor_keeps_task_directories_for_jobs_retention(
        make_settings: Callable[..., Settings]) -> None:
    """jobs.retention reaches the local executor, so task directories and job records
    are kept for the same time; the monitor's poll interval is a tenth locally."""
    settings = make_settings(jobs={"retention": "P3D", "poll_interval": 30})
    backend = app.make_backend(settings, app.make_storage(settings))
    try:
        assert isinstance(backend, LocalBackend)
        assert backend.store._retention == 3 * 86400
    finally:
        backend.close()
    assert settings.backend_config.monitor_interval == 3.0


class _StatsBackend(MemoryBackend):
    """A backend whose stats reads return the snapshots given, then fail."""

    def __init__(self, *snapshots: BackendStats) -> None:
        super().__init__()
        self.snapshots = list(snapshots)
        self.reads = 0

    def stats(self) -> BackendStats:
        self.reads += 1
        if not self.snapshots:
            raise SystemFault("stats read refused")
        return self.snapshots.pop(0)


def test_the_stats_poller_swaps_snapshots_and_keeps_the_last_on_failure(
        make_settings: Callable[..., Settings]) -> None:
    """Each stats read replaces the backend gauges whole (the vanished pool goes); a
    failed read is counted and leaves the last snapshot in place."""
    settings = make_settings(local={"stats_interval": 0.01})
    backend = _StatsBackend(
        BackendStats(pool_nodes={("a", "idle"): 1, ("gone", "idle"): 2}, active_jobs=2),
        BackendStats(pool_nodes={("a", "idle"): 3}, active_jobs=1))
    built = app.App.build(settings, backend=backend)
    get = built.registry.get_sample_value

    async def scenario() -> None:
        poller = asyncio.create_task(built._poll_backend())
        try:
            for _ in range(500):
                if get("fanout_poll_errors_total", {"poller": "backend"}):
                    break
                await asyncio.sleep(0.01)
        finally:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller
            await built.source.close()

    asyncio.run(scenario())
    assert backend.reads >= 3
    assert (get("fanout_poll_errors_total", {"poller": "backend"}) or 0) >= 1
    assert get("fanout_pool_nodes", {"pool": "a", "state": "idle"}) == 3
    assert get("fanout_pool_nodes", {"pool": "gone", "state": "idle"}) is None
    assert get("fanout_active_jobs") == 1
    assert get("fanout_backend_stats_timestamp_seconds") is not None
