"""Benchmark 3, message throughput: 2,000 one-task messages sent to the embedded queue
and carried through the whole message path (receive, lock renewal, parse, route,
plan, submit to the local executor's store, seal, complete; info logs in JSON), against
a bare SQLite enqueue/dequeue loop on the same file system (each enqueue its own
fsynced transaction, as the queue's sends are; each dequeue one select and delete).
The executor's scheduler is not started: the tasks are submitted, not run.

Arms: ``python -m tests.bench.throughput fanout|sqlite MESSAGES``.
"""

from __future__ import annotations

import asyncio
import io
import json
import sqlite3
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from tests.bench.common import Figure, arm, emit, median

MESSAGES = 2000
#: The whole embedded path may take at most this many times the bare SQLite loop.
TARGET = 5.0


def _message(i: int) -> bytes:
    return json.dumps({"handler": "sweep", "id": f"m-{i}", "params": {
        "program": "noop", "parameters": {"i": [i]}}}).encode()


def arm_fanout(messages: int) -> None:
    """Send every message, then run the App until all are settled; time both."""
    from worker import logs
    from worker.app import App
    from worker.backends.local import LocalBackend
    from worker.config import load_settings
    from worker.sources.local import LocalQueue

    class SubmitOnly(LocalBackend):
        """The local executor without its scheduler: tasks are stored, not run."""

        def start(self) -> None:
            pass

    logs.configure(fmt="json", level="info", stream=io.StringIO())
    with TemporaryDirectory(dir=Path.cwd()) as tmp:
        home = Path(tmp)
        (home / "empty.toml").write_text("")
        settings = load_settings(home / "empty.toml", overrides={
            "home": str(home), "metrics": {"port": 0}, "consumer": {"receive_wait": 0.5},
            "programs": {"noop": {"command": "true {i}"}}})
        backend = SubmitOnly(home=home, slots=2)
        app = App.build(settings, backend=backend)
        queue = app.source
        assert isinstance(queue, LocalQueue)

        async def main() -> tuple[float, float]:
            started = time.perf_counter()
            for i in range(messages):
                await queue.send(_message(i))
            sent = time.perf_counter()

            async def watch(_app: App) -> None:
                async def until_done() -> None:
                    while app.consumer.handled < messages:
                        await asyncio.sleep(0.01)
                    app.consumer.stop()
                asyncio.get_running_loop().create_task(until_done())

            run_started = time.perf_counter()
            await app.run(install_signals=False, started=watch)
            return sent - started, time.perf_counter() - run_started

        cpu = time.process_time()
        send_s, drain_s = asyncio.run(main())
        cpu = time.process_time() - cpu
        completed = app.registry.get_sample_value(
            "fanout_messages_total", {"handler": "sweep", "outcome": "completed"})
        jobs = len(LocalBackend(home=home, slots=1).list_jobs(messages + 10))
    assert completed == messages and jobs == messages, (completed, jobs)
    emit({"seconds": send_s + drain_s, "send_s": send_s, "drain_s": drain_s, "cpu_s": cpu})


def arm_sqlite(messages: int) -> None:
    """Enqueue each message in its own fsynced transaction, then dequeue them one by one."""
    with TemporaryDirectory(dir=Path.cwd()) as tmp:
        db = sqlite3.connect(Path(tmp) / "bare.db", isolation_level=None)
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("CREATE TABLE q (seq INTEGER PRIMARY KEY, body BLOB NOT NULL)")
        cpu = time.process_time()
        started = time.perf_counter()
        db.execute("PRAGMA synchronous = FULL")
        for i in range(messages):
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO q (body) VALUES (?)", (_message(i),))
            db.execute("COMMIT")
        sent = time.perf_counter()
        db.execute("PRAGMA synchronous = NORMAL")
        got = 0
        while True:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT seq, body FROM q ORDER BY seq LIMIT 1").fetchone()
            if row is None:
                db.execute("COMMIT")
                break
            db.execute("DELETE FROM q WHERE seq = ?", (row[0],))
            db.execute("COMMIT")
            got += 1
        done = time.perf_counter()
        cpu = time.process_time() - cpu
        db.close()
    assert got == messages
    emit({"seconds": done - started, "send_s": sent - started, "drain_s": done - sent,
          "cpu_s": cpu})


def run(runs: int = 3, messages: int = MESSAGES) -> list[Figure]:
    fanout: list[dict[str, Any]] = []
    bare: list[dict[str, Any]] = []
    for _ in range(runs):
        fanout.append(arm("throughput", "fanout", messages))
        bare.append(arm("throughput", "sqlite", messages))
    f_rate = [messages / r["seconds"] for r in fanout]
    b_rate = [messages / r["seconds"] for r in bare]
    # a rate: higher is better, so the ratio is baseline rate / fanout rate (time ratio)
    return [Figure(
        "throughput", f"message throughput ({messages:,} one-task messages)",
        median([r["seconds"] for r in fanout]), "bare SQLite enqueue + dequeue",
        median([r["seconds"] for r in bare]), "s", runs=[r["seconds"] for r in fanout],
        baseline_runs=[r["seconds"] for r in bare],
        extra={"fanout_msgs_per_s": median(f_rate), "sqlite_msgs_per_s": median(b_rate),
               "fanout_send_s": median([r["send_s"] for r in fanout]),
               "fanout_drain_s": median([r["drain_s"] for r in fanout]),
               "fanout_cpu_s": median([r["cpu_s"] for r in fanout]),
               "sqlite_send_s": median([r["send_s"] for r in bare]),
               "sqlite_cpu_s": median([r["cpu_s"] for r in bare]),
               # each fanout arm over the baseline arm run right after it: steadier
               # than the ratio of medians while other I/O makes fsyncs slow and fast
               "paired_ratio": median([f["seconds"] / b["seconds"]
                                       for f, b in zip(fanout, bare, strict=True)])},
        target=TARGET,
        note=f"target: at most {TARGET:g}x the bare loop's time (its rate over fanout's)")]


if __name__ == "__main__":
    {"fanout": arm_fanout, "sqlite": arm_sqlite}[sys.argv[1]](int(sys.argv[2]))
