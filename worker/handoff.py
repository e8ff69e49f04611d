"""Running blocking calls for an event loop, and answering its awaiting coroutines from
other threads.

The embedded queue's thread and the consumer's worker threads hand their results back
this way: ``loop.call_soon_threadsafe`` of a plain function that settles an asyncio
future, about half the cost of a thread pool's future chained to an asyncio future
(``asyncio.wrap_future``) for each hand-off.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import queue
import threading
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


class LoopThreads:
    """Threads that run blocking calls for the event loop (as ``asyncio.to_thread``
    does, in a copy of the caller's context), fed from a plain queue and answering
    through ``call_soon_threadsafe``: a hand-off costs about half of a thread pool's
    future chained to an asyncio future. The consumer processes messages on them, the
    job monitor makes its backend calls on them.

    Up to ``size`` threads, started as calls come. Daemon threads: a call stuck past
    a shutdown (a message abandoned, a request hung) does not hold the exit up."""

    def __init__(self, size: int, name: str) -> None:
        self._size = max(1, size)
        self._name = name
        self._calls: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` on one of the threads; a call cancelled before it
        starts is skipped, one already running finishes and its result is dropped."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[T] = loop.create_future()
        context = contextvars.copy_context()

        def call() -> None:
            if waiter.cancelled():  # a read of the future's state, safe from here
                return
            try:
                value = context.run(fn, *args, **kwargs)
            except BaseException as exc:  # handed to the awaiting coroutine
                reply = functools.partial(fail, waiter, exc)
            else:
                reply = functools.partial(answer, waiter, value)
            post(loop, reply)  # False once the loop has closed: nobody awaits it then

        if len(self._threads) < self._size:
            self._grow()
        self._calls.put(call)
        return await waiter

    def _grow(self) -> None:
        with self._lock:
            if len(self._threads) < self._size:
                thread = threading.Thread(target=self._serve, daemon=True,
                                          name=f"{self._name}-{len(self._threads)}")
                thread.start()
                self._threads.append(thread)

    def stop(self) -> None:
        """End every thread once the calls queued so far have run (without waiting)."""
        with self._lock:
            for _ in self._threads:
                self._calls.put(None)
            self._threads = []

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            call()
