"""The App's wiring: settings reach the parts they govern; shutdown never waits for
ever on a poller that swallows its cancellation."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import pytest

from worker import app
from worker.config import Settings


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
        assert backend.store._retention == 3 * 86400  # type: ignore[attr-defined]
    finally:
        backend.close()
    assert settings.backend_config.monitor_interval == 3.0
