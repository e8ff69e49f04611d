"""Shutdown never waits for ever on a poller that swallows its cancellation."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from worker import app


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
