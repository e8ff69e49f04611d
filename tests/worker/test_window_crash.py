"""A windowed blob route under a real ``fanout run``, killed with SIGKILL mid-stream and
restarted: 1,000 blob-created events make one job of 1,000 tasks, sealed after its
window and reported once, with no task missing and none twice (the embedded queue and
executor; the handler is a test plug-in registered through an entry point)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from handlers.base import BlobRef
from tests.worker.test_window import blob_event
from tests.worker.window_handler import install_entry_point
from worker.backends.local import LocalBackend
from worker.config import RouteConfig
from worker.context import job_id_for
from worker.sinks.local import LocalEventSink
from worker.sources.local import LocalQueue
from worker.storage.local import LocalStorage
from worker.window import task_prefix, window_for

EVENTS = 1000
REPO = Path(__file__).resolve().parents[2]
ROUTE = {"handler": "blobtask", "container": "uploads", "job": "window",
         "window": "PT10S", "seal_after": "PT1S", "name": "crash"}


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    site = install_entry_point(tmp_path / "site")
    (tmp_path / "fanout.toml").write_text(
        'home = "home"\n'
        "[queue]\nlock_duration = 2.0\n"
        "[consumer]\nconcurrency = 8\nreceive_wait = 0.2\n"
        "[local]\nslots = 2\npoll_interval = 0.05\n"
        "[jobs]\npoll_interval = 1.0\n"
        "[metrics]\nport = 0\n"
        "[[routes]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in ROUTE.items()))
    env = {**os.environ, "FANOUT_CONFIG": str(tmp_path / "fanout.toml"),
           "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    yield tmp_path, env


def start(cwd: Path, env: dict[str, str], log: str) -> subprocess.Popen[bytes]:
    with open(cwd / log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "worker.cli", "run"], cwd=cwd,
                                env=env, stdout=subprocess.DEVNULL, stderr=out)


def tasks_of(home: Path) -> dict[str, int]:
    """Tasks per job, from the executor's durable state."""
    if not (home / "executor.db").exists():
        return {}
    backend = LocalBackend(home=home, slots=1)
    try:
        return {j.id: sum(j.counts.values()) for j in backend.list_jobs(100)}
    finally:
        backend.close()


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_window_of_1000_events_exactly_once_across_sigkill(
        daemon: tuple[Path, dict[str, str]]) -> None:
    cwd, env = daemon
    home = cwd / "home"
    home.mkdir()
    storage = LocalStorage(root=home / "blobs")
    # dated one window ahead: the job is sealed a window plus seal_after after it was
    # created (an event from the future cannot hold it open longer)
    when = (datetime.now(UTC) + timedelta(seconds=10)).isoformat()
    window = window_for(RouteConfig.model_validate(ROUTE), event_id="x",
                        event_time_text=when, ref=BlobRef("uploads", "x"))
    assert window is not None
    job_id = job_id_for("blobtask", window.key)

    async def enqueue() -> None:
        queue = LocalQueue(path=home / "queue.db")
        try:
            for i in range(EVENTS):
                body = json.dumps(blob_event(storage, f"in/{i}.bin", f"ev-{i}", when))
                await queue.send(body.encode(), message_id=f"m-{i}")
        finally:
            await queue.close()

    asyncio.run(enqueue())
    first = start(cwd, env, "first.log")
    try:
        wait_for(lambda: tasks_of(home).get(job_id, 0) >= EVENTS // 4, 20, "part of the tasks")
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        partial = tasks_of(home).get(job_id, 0)
        assert partial < EVENTS, "the crash came too late to test anything"
    finally:
        if first.poll() is None:
            first.kill()
    second = start(cwd, env, "second.log")
    try:
        wait_for(lambda: tasks_of(home).get(job_id, 0) >= EVENTS, 20, "every event's task")
        backend = LocalBackend(home=home, slots=1)
        try:
            wait_for(lambda: (r := backend.get_job(job_id)) is not None
                     and r.state == "completed", 20, "the window job sealed and completed")
            assert tasks_of(home) == {job_id: EVENTS}  # one job, no event on its own
            ids = {t.id for t in backend.tasks(job_id, limit=EVENTS + 10)}
            assert ids == {task_prefix(f"ev-{i}") + "0" for i in range(EVENTS)}
            status = backend.job_status(job_id)
            assert status is not None and status.succeeded == EVENTS
        finally:
            backend.close()

        async def events() -> list[dict[str, Any]]:
            sink = LocalEventSink(path=home / "events.db")
            try:
                return [json.loads(p.body) for p in await sink.peek(10)]
            finally:
                await sink.close()

        wait_for(lambda: bool(asyncio.run(events())), 10, "the completion event")
        (event,) = asyncio.run(events())
        assert event["subject"] == job_id
        assert event["data"]["tasks"]["total"] == EVENTS
        assert event["data"]["outcome"] == "succeeded"
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0
