"""LoopThreads: blocking calls off the event loop, answered through call_soon_threadsafe."""

from __future__ import annotations

import asyncio
import contextvars
import threading

import pytest

from worker.errors import SystemFault
from worker.handoff import LoopThreads


def test_workers_run_calls_off_the_loop_in_the_callers_context() -> None:
    """A call runs on one of the workers' threads with the caller's context variables,
    its exception reaches the caller, and stop ends the threads."""
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    workers = LoopThreads(2, "test-process")

    def seen(_arg: object) -> tuple[int, str]:
        return threading.get_ident(), var.get()

    def fail(_arg: object) -> None:
        raise SystemFault("boom")

    async def scenario() -> None:
        var.set("bound")
        ident, value = await workers.run(seen, None)
        assert ident != threading.get_ident() and value == "bound"
        with pytest.raises(SystemFault, match="boom"):
            await workers.run(fail, None)

    asyncio.run(scenario())
    threads = list(workers._threads)
    assert 1 <= len(threads) <= 2
    workers.stop()
    for thread in threads:
        thread.join(10)
        assert not thread.is_alive()


def test_workers_skip_a_call_cancelled_before_it_starts() -> None:
    """A call whose caller was cancelled while it waited for a thread never runs."""
    workers = LoopThreads(1, "test-process")
    gate = threading.Event()
    ran: list[str] = []

    async def scenario() -> None:
        blocker = asyncio.ensure_future(workers.run(lambda _a: gate.wait(10), None))
        waiting = asyncio.ensure_future(workers.run(ran.append, "ran"))
        await asyncio.sleep(0.05)
        waiting.cancel()
        await asyncio.sleep(0)
        gate.set()
        assert await blocker is True
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await workers.run(ran.append, "after")

    asyncio.run(scenario())
    workers.stop()
    assert ran == ["after"]
