"""Run a whole worker (App) in-process on a private event loop thread, for tests."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from worker.app import App
from worker.backends.base import Backend
from worker.config import Settings
from worker.routing import HandlerRegistry
from worker.sources.base import DeadLettered, Source

T = TypeVar("T")


class RunningWorker:
    """An App running `run()` in a background thread; call `stop()` to drain it."""

    def __init__(self, settings: Settings, *, backend: Backend | None = None,
                 source: Source | None = None, handlers: HandlerRegistry | None = None) -> None:
        self.app = App.build(settings, backend=backend, source=source, handlers=handlers)
        self.loop = asyncio.new_event_loop()
        self._done = threading.Event()
        self._started = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)

        def started(_app: App) -> None:
            self._started.set()

        try:
            self.loop.run_until_complete(self.app.run(install_signals=False, started=started))
        except BaseException as exc:  # surfaced by stop()
            self.error = exc
        finally:
            self._done.set()

    def start(self) -> RunningWorker:
        self.thread.start()
        assert self._started.wait(10), "worker did not start"
        return self

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        """Run a coroutine on the worker's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def send(self, body: bytes | dict[str, Any], **kw: Any) -> str:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        return self.call(self.app.source.send(data, **kw))

    def depth(self) -> dict[str, int]:
        return self.call(self.app.source.depth())

    def dead_letters(self) -> list[DeadLettered]:
        return self.call(self.app.source.dead_letters(1000))

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 30,
                   what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}")

    def wait_idle(self, handled: int, timeout: float = 30) -> None:
        """Wait until `handled` messages have been settled."""
        self.wait_until(lambda: self.app.consumer.handled >= handled, timeout,
                        f"{handled} messages handled (have {self.app.consumer.handled})")

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.app.registry.get_sample_value(name, labels or {}) or 0.0

    def events(self) -> list[dict[str, Any]]:
        """The completion events on the worker's events queue, each validated against
        the shipped JSON Schema."""
        import jsonschema

        from worker.events import schema

        assert self.app.monitor is not None and self.app.monitor.sink is not None
        found = [json.loads(p.body) for p in self.call(self.app.monitor.sink.peek(10_000))]
        for event in found:
            jsonschema.validate(event, schema())
        return found

    def wait_event(self, job_id: str, timeout: float = 60) -> dict[str, Any]:
        """The completion event of ``job_id``, once the monitor has published it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events():
                if event["subject"] == job_id:
                    return event
            time.sleep(0.2)
        raise AssertionError(f"no completion event for {job_id} within {timeout} s")

    def stop(self, timeout: float = 60) -> None:
        self.loop.call_soon_threadsafe(self.app.consumer.stop)
        assert self._done.wait(timeout), "worker did not stop"
        self.thread.join(5)
        self.loop.close()
        if self.error is not None:
            raise self.error
