"""The local blob-upload watcher: settled files become BlobCreated events, once."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from handlers.base import BlobRef
from worker.config import WatchConfig
from worker.envelope import BlobEvent, parse_body
from worker.errors import SettingsError
from worker.sources.local import LocalQueue
from worker.storage.local import LocalStorage
from worker.watch import FileVersion, Watcher, event_id

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one coroutine to completion on a fresh loop."""
    return asyncio.run(coro)


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Rig:
    """Local storage, the local queue and a watcher factory sharing one state file."""

    def __init__(self, root: Path) -> None:
        self.storage = LocalStorage(root=root / "blobs")
        self.queue = LocalQueue(path=root / "queue.db")
        self.state = root / "watch.db"
        self.clock = Clock()
        self.watchers: list[Watcher] = []

    def watcher(self, **config: Any) -> Watcher:
        settings = WatchConfig(**{"containers": ["videos"], "settle": 2.0, **config})
        watcher = Watcher(storage=self.storage, source=self.queue, config=settings,
                          state_path=self.state, clock=self.clock)
        self.watchers.append(watcher)
        return watcher

    def put(self, blob: str, data: bytes = b"frames", container: str = "videos") -> Path:
        """Write a file straight into a container directory, as a user would."""
        path = self.storage.container_dir(container) / blob
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def scan(self, watcher: Watcher, *, after: float = 0.0) -> int:
        self.clock.now += after
        return run(watcher.scan_once())

    def events(self) -> list[BlobEvent]:
        """Every event on the queue (each message completed)."""
        async def drain() -> list[BlobEvent]:
            found: list[BlobEvent] = []
            while batch := await self.queue.receive(10, 0.0):
                for msg in batch:
                    parsed = parse_body(msg.body)
                    assert isinstance(parsed, list)
                    assert msg.message_id == parsed[0].id
                    found.extend(parsed)
                    await self.queue.complete(msg)
            return found

        return run(drain())

    def close(self) -> None:
        for watcher in self.watchers:
            watcher.close()
        run(self.queue.close())


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    """A fresh Rig, closed after the test."""
    made = Rig(tmp_path)
    yield made
    made.close()


def test_settled_file_becomes_one_event_grid_event(rig: Rig) -> None:
    """A file unchanged for `settle` seconds is sent once, as Azure would describe it."""
    watcher = rig.watcher()
    rig.put("2026/my clip ü.mp4", b"x" * 1234)
    assert rig.scan(watcher) == 0
    assert rig.scan(watcher, after=2.0) == 1
    assert rig.scan(watcher, after=5.0) == 0
    [event] = rig.events()
    assert event.type == "Microsoft.Storage.BlobCreated" and event.api == "PutBlob"
    assert event.content_type == "video/mp4" and event.content_length == 1234
    assert event.subject.endswith("/containers/videos/blobs/2026/my clip ü.mp4")
    assert rig.storage.parse_url(event.url) == BlobRef("videos", "2026/my clip ü.mp4")
    assert event.complete


def test_growing_file_waits_until_stable(rig: Rig) -> None:
    """Each change of size or mtime restarts the settle time."""
    watcher = rig.watcher()
    path = rig.put("a.mp4", b"1")
    assert rig.scan(watcher) == 0
    with path.open("ab") as handle:
        handle.write(b"22")
    assert rig.scan(watcher, after=1.5) == 0
    assert rig.scan(watcher, after=1.5) == 0  # 1.5 s since the change: not yet
    assert rig.scan(watcher, after=0.5) == 1
    [event] = rig.events()
    assert event.content_length == 3


def test_temporary_and_hidden_names_are_ignored(rig: Rig) -> None:
    """*.tmp, dot files, files in dot folders and invalid blob names are never sent."""
    watcher = rig.watcher(settle=0)
    for name in ("a.mp4.tmp", ".b.mp4", ".upload/c.mp4", "d.mp4.part", "e.", "ok.mov"):
        rig.put(name)
    assert rig.scan(watcher) == 1
    assert [rig.storage.parse_url(e.url).blob for e in rig.events()] == ["ok.mov"]


def test_restart_does_not_resend_but_a_new_version_is_sent(rig: Rig) -> None:
    """The state file survives a restart; rewriting the file is a new event id."""
    first = rig.watcher(settle=0)
    path = rig.put("a.mp4", b"one")
    assert rig.scan(first) == 1
    first.close()
    second = rig.watcher(settle=0)
    assert rig.scan(second) == 0
    path.write_bytes(b"second version")
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert rig.scan(second) == 1
    ids = [e.id for e in rig.events()]
    assert len(ids) == 2 and ids[0] != ids[1]


def test_event_id_is_stable_for_one_version(rig: Rig) -> None:
    """Two watchers with no shared state give one file version the same id (idempotent)."""
    rig.put("a.mp4", b"same")
    rig.watcher(settle=0)
    assert rig.scan(rig.watchers[0]) == 1
    rig.state.unlink()
    for suffix in ("-wal", "-shm"):
        Path(f"{rig.state}{suffix}").unlink(missing_ok=True)
    rig.watchers[0].close()
    assert rig.scan(rig.watcher(settle=0)) == 1
    first, second = rig.events()
    assert first.id == second.id


def test_other_containers_are_not_watched(rig: Rig) -> None:
    """Only the configured containers are scanned."""
    watcher = rig.watcher(settle=0, containers=["videos", "scenes"])
    rig.put("x.blend", container="scenes")
    rig.put("y.mp4", container="renders")
    assert rig.scan(watcher) == 1
    [event] = rig.events()
    assert rig.storage.parse_url(event.url) == BlobRef("scenes", "x.blend")


def test_bad_container_name_is_a_settings_error(rig: Rig) -> None:
    """A container name Azure would refuse is a start-up error naming watch.containers."""
    with pytest.raises(SettingsError, match=r"watch\.containers"):
        rig.watcher(containers=["Bad_Name"])


def test_run_scans_until_cancelled(rig: Rig) -> None:
    """run() keeps scanning on its interval and closes its state file when cancelled."""
    watcher = rig.watcher(settle=0, interval=0.01)
    rig.put("a.mp4")

    async def go() -> None:
        task = asyncio.create_task(watcher.run())
        while watcher.sent_count == 0:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(go())
    [event] = rig.events()
    assert event.id == event_id(watcher_file(rig, "a.mp4"))


def watcher_file(rig: Rig, blob: str) -> FileVersion:
    """The FileVersion the watcher would see for ``videos/<blob>`` now."""
    stat = (rig.storage.container_dir("videos") / blob).stat()
    return FileVersion("videos", blob, stat.st_size, stat.st_mtime_ns)
