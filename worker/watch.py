"""The embedded blob-upload trigger: watch local storage containers for new files.

Azure delivers a ``Microsoft.Storage.BlobCreated`` event to the queue when a blob is
written; on the embedded default the :class:`Watcher` does the same. Every
``interval`` seconds it lists the watched container directories, and each file
whose size and mtime have not changed for ``settle`` seconds (so a file still being
copied in is left alone) becomes one event in the Event Grid schema, sent to the
queue through ``Source.send``. Names matching an ``ignore`` pattern in any path
segment (``.*``, ``*.tmp``...) and names that are not valid blob names are skipped.

The event id is a UUID 5 of the container, blob name, size and mtime: the same file
always makes the same id, so the job it starts is the same job however often the
event is sent (the consumer derives job ids from it). What was sent is remembered
in ``<FANOUT_HOME>/watch.db`` (SQLite), so a restart does not send it again; a file
rewritten with a new size or mtime is a new blob version and is sent again, as
Azure sends a new event when a blob is overwritten. The record is written after the
send, so a crash in between sends the event once more, with the same id.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import mimetypes
import os
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from handlers.base import BlobRef
from handlers.errors import ForeignStorage, InvalidParams
from worker.config import WatchConfig
from worker.envelope import BLOB_CREATED
from worker.errors import SettingsError
from worker.sources.base import Source
from worker.storage.local import LocalStorage, file_url
from worker.storage.refs import check_container

__all__ = ["FileVersion", "SentLog", "Watcher", "blob_created_event", "event_id"]

log = structlog.get_logger(__name__)

#: The namespace of watcher event ids (a fixed, random UUID).
EVENT_NAMESPACE = uuid.UUID("6f1d8a47-3c1e-4f5b-9a0e-2b7c5d8e9f10")
TOPIC = "/fanout/storage/local"


@dataclass(frozen=True, slots=True)
class FileVersion:
    """One file as seen by a scan: its blob and the version that size and mtime name."""

    container: str
    blob: str
    size: int
    mtime_ns: int

    @property
    def key(self) -> tuple[str, str]:
        return (self.container, self.blob)

    @property
    def version(self) -> tuple[int, int]:
        return (self.size, self.mtime_ns)


def event_id(file: FileVersion) -> str:
    """The stable event id of one file version."""
    name = f"{file.container}/{file.blob}\0{file.size}\0{file.mtime_ns}"
    return str(uuid.uuid5(EVENT_NAMESPACE, name))


def blob_created_event(file: FileVersion, *, url: str,
                       now: datetime | None = None) -> dict[str, Any]:
    """The Event Grid schema BlobCreated event Azure would send for this file."""
    content_type = mimetypes.guess_type(file.blob)[0] or "application/octet-stream"
    when = (now or datetime.now(UTC)).isoformat().replace("+00:00", "Z")
    return {
        "topic": TOPIC,
        "subject": f"/blobServices/default/containers/{file.container}/blobs/{file.blob}",
        "eventType": BLOB_CREATED,
        "id": event_id(file),
        "data": {
            "api": "PutBlob",
            "eTag": f"0x{file.mtime_ns:X}",
            "contentType": content_type,
            "contentLength": file.size,
            "blobType": "BlockBlob",
            "url": url,
            "sequencer": f"{file.mtime_ns:032x}",
        },
        "dataVersion": "",
        "metadataVersion": "1",
        "eventTime": when,
    }


class SentLog:
    """The versions already sent, in a small SQLite file (one row per blob)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS sent (container TEXT NOT NULL, blob TEXT NOT NULL,"
            " size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, event_id TEXT NOT NULL,"
            " sent_at REAL NOT NULL, PRIMARY KEY (container, blob))")

    def load(self) -> dict[tuple[str, str], tuple[int, int]]:
        """Every blob's last sent version."""
        rows = self._conn.execute("SELECT container, blob, size, mtime_ns FROM sent")
        return {(c, b): (s, m) for c, b, s, m in rows}

    def record(self, file: FileVersion) -> None:
        """Remember that ``file`` was sent."""
        self._conn.execute(
            "INSERT OR REPLACE INTO sent VALUES (?, ?, ?, ?, ?, ?)",
            (file.container, file.blob, file.size, file.mtime_ns, event_id(file), time.time()))

    def close(self) -> None:
        self._conn.close()


class Watcher:
    """Sends a BlobCreated event for each new, fully written file (module docstring)."""

    def __init__(self, *, storage: LocalStorage, source: Source, config: WatchConfig,
                 state_path: Path, clock: Callable[[], float] = time.monotonic) -> None:
        try:
            self.containers = [check_container(c) for c in config.containers]
        except InvalidParams as exc:
            raise SettingsError(f"watch.containers: {exc.description}") from None
        self.storage = storage
        self.source = source
        self.config = config
        self.state_path = state_path
        self.clock = clock
        self.sent_count = 0
        self._log: SentLog | None = None
        self._sent: dict[tuple[str, str], tuple[int, int]] = {}
        #: Versions seen but not yet sent, with when each was first seen (monotonic).
        self._pending: dict[tuple[str, str], tuple[tuple[int, int], float]] = {}
        self._skipped: set[tuple[str, str]] = set()

    async def run(self) -> None:
        """Scan every ``interval`` seconds until cancelled; a failed scan is logged."""
        await asyncio.to_thread(self._open)
        log.info("watch.started", containers=self.containers, interval=self.config.interval,
                 settle=self.config.settle)
        try:
            while True:
                try:
                    await self.scan_once()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("watch.scan_failed", error=f"{type(exc).__name__}: {exc}",
                                note="retrying at the next interval")
                await asyncio.sleep(self.config.interval)
        finally:
            self.close()

    def _open(self) -> None:
        if self._log is None:
            self._log = SentLog(self.state_path)
            self._sent = self._log.load()
            for container in self.containers:
                self.storage.ensure_container(container)

    def close(self) -> None:
        """Close the state file."""
        if self._log is not None:
            self._log.close()
            self._log = None

    async def scan_once(self) -> int:
        """One pass: send every file that has settled; return how many were sent."""
        await asyncio.to_thread(self._open)
        files = await asyncio.to_thread(self._list)
        ready = self._settled(files, self.clock())
        for file in ready:
            await self._send(file)
        return len(ready)

    def _list(self) -> list[FileVersion]:
        found: list[FileVersion] = []
        for container in self.containers:
            found.extend(self._list_container(container))
        return found

    def _list_container(self, container: str) -> Iterator[FileVersion]:
        base = self.storage.container_dir(container)
        for dirpath, dirs, files in os.walk(base):
            dirs[:] = sorted(d for d in dirs if not self._ignored(d))
            for filename in sorted(files):
                path = Path(dirpath, filename)
                blob = path.relative_to(base).as_posix()
                if self._ignored(filename) or not self._valid(container, blob):
                    continue
                try:
                    stat = path.stat()
                except FileNotFoundError:  # gone since the listing
                    continue
                yield FileVersion(container, blob, stat.st_size, stat.st_mtime_ns)

    def _ignored(self, segment: str) -> bool:
        return any(fnmatch.fnmatchcase(segment, pattern) for pattern in self.config.ignore)

    def _valid(self, container: str, blob: str) -> bool:
        try:
            return self.storage.path(BlobRef(container=container, blob=blob)).is_file()
        except (InvalidParams, ForeignStorage) as exc:
            if (container, blob) not in self._skipped:
                self._skipped.add((container, blob))
                log.warning("watch.skipped", container=container, name=blob,
                            why=exc.description)
            return False

    def _settled(self, files: Sequence[FileVersion], now: float) -> list[FileVersion]:
        """The files whose version has held for ``settle`` seconds and was not sent."""
        ready: list[FileVersion] = []
        present = set()
        for file in files:
            present.add(file.key)
            if self._sent.get(file.key) == file.version:
                self._pending.pop(file.key, None)
                continue
            seen = self._pending.get(file.key)
            if seen is None or seen[0] != file.version:
                self._pending[file.key] = (file.version, now)
                if self.config.settle > 0:
                    continue
            elif now - seen[1] < self.config.settle:
                continue
            ready.append(file)
        for key in list(self._pending):
            if key not in present:
                del self._pending[key]
        return ready

    async def _send(self, file: FileVersion) -> None:
        url = file_url(self.storage.container_dir(file.container) / file.blob)
        event = blob_created_event(file, url=url)
        body = json.dumps(event).encode()
        await self.source.send(body, message_id=event["id"],
                               properties={"aeg-event-type": "Notification"})
        assert self._log is not None
        await asyncio.to_thread(self._log.record, file)
        self._sent[file.key] = file.version
        self._pending.pop(file.key, None)
        self.sent_count += 1
        log.info("watch.sent", container=file.container, blob=file.blob, bytes=file.size,
                 event_id=event["id"])
