"""Benchmark 6, the job monitor: 1,000 fanout jobs of 100 tasks each, on the Batch
peer with 50 ms added per request, complete at one instant; the real ``JobMonitor``
with the real ``AzureBatchBackend`` (built from ``[batch]`` as the daemon builds it)
and the embedded events sink then reports them. Two figures: the seconds from the
completion until the 1,000th event is published, against ``batch.monitor_interval``
(the monitor must report a burst like this before its next poll is due), and the
Batch requests the peer answered for it, against the budget docs/azure-batch.md
documents for 1,000 completed jobs.

The peer runs in its own process, restarted for every measurement, and is seeded
through its test administration (``POST /_peer/seed``, outside the Batch API) with
the metadata fanout's planner writes. The arm runs one poll while the jobs are active
(the monitor was running before they ended: connections open, the full sweep done),
then finishes every job's tasks at once (``POST /_peer/finish``) and times the next
poll. Requests are counted on the peer (``GET /_peer/requests``).

Arm: ``python -m tests.bench.monitor arm URL ACCOUNT KEY PEER_PID JOBS``.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from tests.bench.common import Figure, PeerProcess, arm, emit, median, quiet_logs

JOBS = 1000
TASKS = 100
LATENCY = 0.05
HANDLER = "sweep"


def _admin(url: str, path: str, payload: Any = None) -> Any:
    """One request to the peer's test administration (``/_peer/...``)."""
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(f"{url}/_peer/{path}", data=data,
                                     method="GET" if data is None else "POST")
    with urllib.request.urlopen(request, timeout=60) as answer:
        return json.loads(answer.read())


def job_ids(jobs: int) -> list[str]:
    from worker.context import job_id_for

    return [job_id_for(HANDLER, f"monitor-bench-{i}") for i in range(jobs)]


def _metadata(i: int) -> dict[str, str]:
    """What the planner writes on a sweep's job (worker/plan.py), on Azure."""
    from worker.context import job_id_for

    key = f"monitor-bench-{i}"
    return {"fanout-handler": HANDLER, "fanout-key": key,
            "fanout-message-id": f"msg-{i:06d}", "fanout-request": f"{i:032x}",
            "fanout-tasks": str(TASKS),
            "fanout-logs": f"fanout-logs/{job_id_for(HANDLER, key)}/"}


def seed(url: str, jobs: int) -> None:
    """``jobs`` active jobs of ``TASKS`` running tasks, sealed (terminate when all
    tasks complete) as fanout's submitter leaves them."""
    specs = [{"id": job_id, "tasks": TASKS, "counts": {"running": TASKS},
              "metadata": _metadata(i), "on_all_tasks_complete": "terminatejob"}
             for i, job_id in enumerate(job_ids(jobs))]
    _admin(url, "seed", {"jobs": specs})


def peer_requests(url: str) -> Counter[str]:
    """The Batch requests the peer has answered, by operation (every outcome)."""
    made: Counter[str] = Counter()
    for operation, _outcome, count in _admin(url, "requests")["requests"]:
        made[operation] += count
    return made


def _cpu_of(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class TimedSink:
    """The embedded events sink (worker/sinks/local.py), noting when each publish
    returned: the event is on the events queue from then on."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.times: list[float] = []

    @property
    def destination(self) -> str:
        return str(self.inner.destination)

    async def publish(self, body: bytes, *, message_id: str, to: str | None = None,
                      properties: Any = None) -> None:
        await self.inner.publish(body, message_id=message_id, to=to, properties=properties)
        self.times.append(time.perf_counter())

    async def peek(self, limit: int = 100, *, from_sequence: int | None = None) -> Any:
        return await self.inner.peek(limit, from_sequence=from_sequence)

    async def close(self) -> None:
        await self.inner.close()


def _settings(home: Path, url: str, account: str, key: str) -> Any:
    from worker.config import load_settings

    empty = home / "empty.toml"
    empty.write_text("")
    return load_settings(empty, overrides={
        "home": str(home), "backend": {"kind": "azure"},
        "batch": {"account_url": url, "account_name": account, "account_key": key,
                  "pool": "fanout"}})


def _monitor(settings: Any, sink: TimedSink) -> Any:
    """The monitor as the daemon builds it (worker/app.py ``App._monitor``)."""
    from prometheus_client import CollectorRegistry

    from worker.backends.azure import AzureBatchBackend
    from worker.metrics import Metrics
    from worker.monitor import JobMonitor

    backend = AzureBatchBackend.from_config(settings.batch, settings.submit, jobs=settings.jobs)
    return JobMonitor(backend=backend, sink=sink, jobs=settings.jobs, events=settings.events,
                      metrics=Metrics(registry=CollectorRegistry()),
                      interval=settings.backend_config.monitor_interval, cost=settings.cost,
                      preemption=settings.preemption)


async def _measure(monitor: Any, sink: TimedSink, url: str, peer_pid: int,
                   jobs: int) -> dict[str, Any]:
    """One poll over the active jobs, then the completion and the poll that reports."""
    begun = time.perf_counter()
    active = await monitor.poll()
    active_s = time.perf_counter() - begun
    before = peer_requests(url)
    cpu, peer_cpu = time.process_time(), _cpu_of(peer_pid)
    started = time.perf_counter()
    _admin(url, "finish", {"jobs": job_ids(jobs)})
    result = await monitor.poll()
    seconds = time.perf_counter() - started
    cpu, peer_cpu = time.process_time() - cpu, _cpu_of(peer_pid) - peer_cpu
    made = peer_requests(url) - before
    assert len(result.reported) == jobs and result.errors == 0, result
    assert len(sink.times) == jobs, f"{len(sink.times)} events published"
    assert made["update_job"] == jobs, made
    return {"seconds": sink.times[-1] - started, "first_event_s": sink.times[0] - started,
            "poll_s": seconds, "cpu": cpu, "peer_cpu": peer_cpu, "requests": dict(made),
            "interval": monitor.interval, "active_poll_s": active_s,
            "active_poll_requests": sum(active.requests.values())}


def arm_monitor(url: str, account: str, key: str, peer_pid: int, jobs: int) -> None:
    from worker.sinks.local import LocalEventSink

    quiet_logs()
    with TemporaryDirectory() as tmp:
        settings = _settings(Path(tmp), url, account, key)
        sink = TimedSink(LocalEventSink.from_config(Path(tmp), settings.events))
        monitor = _monitor(settings, sink)
        try:
            result = asyncio.run(_measure(monitor, sink, url, peer_pid, jobs))
            result["queued"] = asyncio.run(_depth(sink))
        finally:
            monitor.backend.close()
    assert result["queued"] == jobs, result
    emit(result)


async def _depth(sink: TimedSink) -> int:
    """Events on the events queue (distinct message ids, duplicates dropped)."""
    try:
        return len(await sink.inner.peek(10 * JOBS))
    finally:
        await sink.close()


def budget(jobs: int, tasks: int) -> dict[str, int]:
    """docs/azure-batch.md's request budget for ``jobs`` completed jobs of ``tasks``
    succeeded tasks each, no job active: the listing's pages, a task-counts read and
    a metadata update per job, the usage listing's pages per job
    (``cost.node_seconds`` default), one get pool; no failed-task listing (no failures)
    and no node listing (no active job's pool)."""
    return {"list_jobs": math.ceil(jobs / 1000), "get_task_counts": jobs,
            "list_tasks": jobs * max(1, math.ceil(tasks / 1000)), "get_pool": 1,
            "update_job": jobs}


def run(runs: int = 5, jobs: int = JOBS, latency: float = LATENCY) -> list[Figure]:
    """Median of ``runs`` fresh-process measurements, a fresh peer for each."""
    results = []
    for _ in range(runs):
        with PeerProcess(latency=latency) as peer:
            seed(peer.url, jobs)
            assert peer.proc is not None
            results.append(arm("monitor", "arm", *peer.args(), peer.proc.pid, jobs,
                               timeout=1200))
    return figures(results, jobs, latency)


def figures(results: list[dict[str, Any]], jobs: int, latency: float) -> list[Figure]:
    allowed = budget(jobs, TASKS)
    seconds = [r["seconds"] for r in results]
    requests = [float(sum(r["requests"].values())) for r in results]
    extra = {"jobs": jobs, "tasks_per_job": TASKS, "latency_s": latency,
             "monitor_cpu_s": median([r["cpu"] for r in results]),
             "peer_cpu_s": median([r["peer_cpu"] for r in results]),
             "monitor_cpu_runs": [round(r["cpu"], 2) for r in results],
             "peer_cpu_runs": [round(r["peer_cpu"], 2) for r in results],
             "first_event_s": median([r["first_event_s"] for r in results]),
             "active_poll_s": median([r["active_poll_s"] for r in results]),
             "active_poll_requests": median([r["active_poll_requests"] for r in results]),
             "requests": results[0]["requests"], "budget": allowed}
    label = f"{jobs:,} jobs completed together, {latency * 1000:.0f} ms/request"
    interval = float(results[0]["interval"])
    return [
        Figure("monitor", f"monitor: completion to last event ({label})", median(seconds),
               "batch.monitor_interval", interval, "s", target=1.0, runs=seconds,
               extra=extra, note="the real JobMonitor and AzureBatchBackend against the "
               "Batch peer over HTTP; events on the embedded events queue"),
        Figure("monitor", f"monitor: Batch requests for the reports ({label})",
               median(requests), "docs/azure-batch.md budget", float(sum(allowed.values())),
               "requests", target=1.0, runs=requests,
               note="counted on the peer, from the completion to the end of the poll"),
    ]


if __name__ == "__main__":
    _which, _url, _account, _key, _pid, _jobs = sys.argv[1:7]
    arm_monitor(_url, _account, _key, int(_pid), int(_jobs))
