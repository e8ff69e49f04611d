"""Answering an event loop's awaiting coroutine from another thread.

The embedded queue's thread and the consumer's worker threads hand their results back
this way: ``loop.call_soon_threadsafe`` of a plain function that settles an asyncio
future, about half the cost of a thread pool's future chained to an asyncio future
(``asyncio.wrap_future``) for each hand-off.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def post(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> bool:
    """Have ``loop`` call ``callback`` soon (from another thread); False if it has
    closed."""
    try:
        loop.call_soon_threadsafe(callback)
    except RuntimeError:  # the event loop is closed
        return False
    return True


def answer(waiter: asyncio.Future[T], value: T,
           unclaimed: Callable[[T], None] | None = None) -> None:
    """On the event loop: the result to its awaiting coroutine, or, if that was
    cancelled meanwhile, to ``unclaimed``."""
    if not waiter.done():
        waiter.set_result(value)
    elif unclaimed is not None:
        unclaimed(value)


def fail(waiter: asyncio.Future[Any], exc: BaseException) -> None:
    """On the event loop: an exception to its awaiting coroutine, unless cancelled."""
    if not waiter.done():
        waiter.set_exception(exc)
