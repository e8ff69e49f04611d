"""Benchmark 5, soak: 10,000 one-task messages through a real ``fanout run`` process
(embedded queue, local executor running every task, 8 receive loops kept busy by a
queue filled ahead of them). Its resident memory after the last thousand messages is
compared with its memory after the first thousand: the target is within 10%.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from tempfile import TemporaryDirectory

from tests.bench.common import Figure, rss_mb
from tests.reliability.daemon import Daemon, wait_for

MESSAGES = 10_000
STEP = 1000


async def _send_all(d: Daemon, messages: int) -> None:
    queue = d.queue()
    try:
        for i in range(messages):
            await queue.send(json.dumps({"handler": "sweep", "id": f"soak-{i}", "params": {
                "program": "noop", "parameters": {"i": [i]}}}).encode())
    finally:
        await queue.close()


def run(messages: int = MESSAGES, concurrency: int = 8) -> list[Figure]:
    with TemporaryDirectory(dir=Path.cwd()) as tmp:
        d = Daemon(Path(tmp), {"consumer": {"concurrency": concurrency, "receive_wait": 1.0},
                               "local": {"slots": 2},
                               "programs": {"noop": {"command": "true {i}"}}})
        d.start().wait_started()
        try:
            started = time.perf_counter()
            asyncio.run(_send_all(d, messages))
            samples: dict[int, float] = {}
            mark = STEP

            def progress() -> bool:
                nonlocal mark
                done = d.metric("fanout_messages_total", {"handler": "sweep",
                                                          "outcome": "completed"})
                while done >= mark:
                    samples[mark] = rss_mb(d.pid)
                    mark += STEP
                return done >= messages

            wait_for(progress, 600, f"{messages} messages", interval=0.1)
            seconds = time.perf_counter() - started
            dead = d.depth()["dead_letter"]
        finally:
            d.stop(60)
            d.close()
    assert dead == 0, f"{dead} messages dead-lettered"
    first, last = samples[STEP], samples[max(samples)]
    return [Figure("soak", f"soak: RSS after {messages:,} vs after {STEP:,} messages", last,
                   f"RSS after {STEP:,} messages", first, "MB", target=1.10,
                   extra={"rss_mb_by_messages": {str(k): round(v, 1)
                                                 for k, v in sorted(samples.items())},
                          "messages_per_s": messages / seconds, "concurrency": concurrency},
                   note="a real fanout run process; every task runs on the local executor")]
