"""Benchmark 5, soak: 10,000 one-task messages through a real ``fanout run`` process
(embedded queue, local executor running every task, 8 receive loops kept busy by a
queue filled ahead of them), with the job monitor running (``jobs.monitor``, every
``local.monitor_interval``): each job's completion event is published to the embedded
events queue while the messages flow. Its resident memory after the last thousand
messages is compared with its memory after the first thousand: the target is within
10%. The run waits for the last events, so every job was reported.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from tests.bench.common import Figure, rss_mb
from tests.reliability.daemon import Daemon, sample, wait_for

MESSAGES = 10_000
STEP = 1000
PUBLISHED = ("fanout_events_published_total", {"to": "configured"})


async def _send_all(d: Daemon, messages: int) -> None:
    queue = d.queue()
    try:
        for i in range(messages):
            await queue.send(json.dumps({"handler": "sweep", "id": f"soak-{i}", "params": {
                "program": "noop", "parameters": {"i": [i]}}}).encode())
    finally:
        await queue.close()


def _flow(d: Daemon, messages: int) -> dict[str, Any]:
    """Send the messages; sample RSS and events published at every thousand done, then
    wait for every job's event."""
    started = time.perf_counter()
    asyncio.run(_send_all(d, messages))
    rss: dict[int, float] = {}
    events: dict[int, float] = {}
    mark = STEP

    def progress() -> bool:
        nonlocal mark
        page = d.metrics_text()
        done = sample(page, "fanout_messages_total", {"handler": "sweep",
                                                      "outcome": "completed"})
        while done >= mark:
            rss[mark] = rss_mb(d.pid)
            events[mark] = sample(page, *PUBLISHED)
            mark += STEP
        return done >= messages

    wait_for(progress, 600, f"{messages} messages", interval=0.1)
    seconds = time.perf_counter() - started
    wait_for(lambda: d.metric(*PUBLISHED) >= messages, 120, f"{messages} events",
             interval=0.5)
    return {"rss": rss, "events": events, "seconds": seconds,
            "published": d.metric(*PUBLISHED), "rss_reported": rss_mb(d.pid),
            "listings": d.metric("fanout_monitor_requests_total", {"operation": "list_jobs"}),
            "dead": d.depth()["dead_letter"]}


def run(messages: int = MESSAGES, concurrency: int = 8) -> list[Figure]:
    with TemporaryDirectory(dir=Path.cwd()) as tmp:
        d = Daemon(Path(tmp), {"consumer": {"concurrency": concurrency, "receive_wait": 1.0},
                               "local": {"slots": 2}, "jobs": {"monitor": True},
                               "programs": {"noop": {"command": "true {i}"}}})
        d.start().wait_started()
        try:
            flow = _flow(d, messages)
        finally:
            d.stop(60)
            d.close()
    assert flow["dead"] == 0, f"{flow['dead']} messages dead-lettered"
    assert flow["published"] == messages, f"{flow['published']:.0f} events published"
    rss = flow["rss"]
    first, last = rss[STEP], rss[max(rss)]
    return [Figure("soak", f"soak: RSS after {messages:,} vs after {STEP:,} messages, "
                   "monitor running", last, f"RSS after {STEP:,} messages", first, "MB",
                   target=1.10,
                   extra={"rss_mb_by_messages": {str(k): round(v, 1)
                                                 for k, v in sorted(rss.items())},
                          "events_by_messages": {str(k): int(v)
                                                 for k, v in sorted(flow["events"].items())},
                          "events_published": int(flow["published"]),
                          "rss_mb_all_reported": round(flow["rss_reported"], 1),
                          "monitor_listings": int(flow["listings"]),  # one per 1,000-job page
                          "messages_per_s": messages / flow["seconds"],
                          "concurrency": concurrency},
                   note="a real fanout run process; every task runs on the local executor; "
                   "the job monitor publishes every job's event to the embedded events queue")]
