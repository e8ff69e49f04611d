"""Benchmark 2, sweep expansion: planning a 1,000,000-task sweep (100 x 100 x 100) with
the Planner and iterating every task, against a plain ``itertools.product`` with
``str.format`` of the same command lines (streamed, as fanout streams). Each runs in a
fresh process, which reports its wall and CPU time and its own peak RSS (VmHWM). The
arms alternate (fanout, baseline, fanout...), so a neighbour's load on a shared machine
falls on both alike.

Arms: ``python -m tests.bench.expansion fanout|baseline SIDE [digest]`` (SIDE**3
tasks); with ``digest`` an arm also reports a SHA-256 of every command line, which
:func:`run` compares on a small grid before timing anything (untimed: hashing would
add the same cost to both arms and flatter the ratio).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from tests.bench.common import Figure, arm, emit, median, peak_rss_mb, quiet_logs

SIDE = 100
TEMPLATE = "python3 sim.py --alpha {alpha} --beta {beta} --gamma {gamma}"
#: The command lines fanout builds from TEMPLATE (values are digits: no quoting needed).
LINE = "/bin/sh -c 'python3 sim.py --alpha {alpha} --beta {beta} --gamma {gamma}'"


class Lines:
    """A SHA-256 of the command lines an arm produces, in ``digest`` runs only."""

    def __init__(self, digest: bool) -> None:
        self.hash = hashlib.sha256() if digest else None

    def add(self, line: str) -> None:
        assert self.hash is not None
        self.hash.update(line.encode() + b"\n")

    def result(self) -> dict[str, str]:
        return {"digest": self.hash.hexdigest()} if self.hash is not None else {}


def arm_fanout(side: int, digest: bool = False) -> None:
    """Parse, validate, route and build the sweep, then stream every TaskSpec."""
    from worker.app import make_planner, make_storage
    from worker.config import load_settings
    from worker.routing import HandlerRegistry, Router

    quiet_logs()
    with TemporaryDirectory() as tmp:
        home = Path(tmp)
        (home / "empty.toml").write_text("")
        settings = load_settings(home / "empty.toml", overrides={
            "home": str(home), "limits": {"max_tasks_per_message": side ** 3},
            "programs": {"sim": {"command": TEMPLATE}}})
        storage = make_storage(settings)
        router = Router(registry=HandlerRegistry.from_entry_points(), routes=[],
                        storage=storage)
        planner = make_planner(settings, router, storage)
        body = json.dumps({"handler": "sweep", "params": {"program": "sim", "parameters": {
            name: {"start": 0, "stop": side} for name in ("alpha", "beta", "gamma")}}})
        lines = Lines(digest)
        before = peak_rss_mb()
        started, cpu = time.perf_counter(), time.process_time()
        (planned,) = planner.plan(body.encode(), message_id="bench").jobs
        count = 0
        chars = 0
        if digest:  # a loop of its own: the timed one stays as it was
            for task in planned.job.tasks:
                lines.add(task.command_line)
                count += 1
                chars += len(task.command_line)
        for task in planned.job.tasks:  # (empty after the digest loop)
            count += 1
            chars += len(task.command_line)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    assert count == side ** 3
    emit({"seconds": seconds, "cpu_seconds": cpu, "peak_rss_mb": peak_rss_mb(),
          "rss_before_mb": before, "tasks": count, "chars": chars, **lines.result()})


def arm_baseline(side: int, digest: bool = False) -> None:
    """The same command lines from itertools.product and str.format, streamed."""
    lines = Lines(digest)
    before = peak_rss_mb()
    started, cpu = time.perf_counter(), time.process_time()
    fmt = LINE.format
    count = 0
    chars = 0
    axis = [str(v) for v in range(side)]
    points = itertools.product(axis, axis, axis)
    if digest:  # a loop of its own: the timed one stays as it was
        for alpha, beta, gamma in points:
            line = fmt(alpha=alpha, beta=beta, gamma=gamma)
            lines.add(line)
            count += 1
            chars += len(line)
    for alpha, beta, gamma in points:  # (empty after the digest loop)
        line = fmt(alpha=alpha, beta=beta, gamma=gamma)
        count += 1
        chars += len(line)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    emit({"seconds": seconds, "cpu_seconds": cpu, "peak_rss_mb": peak_rss_mb(),
          "rss_before_mb": before, "tasks": count, "chars": chars, **lines.result()})


def run(runs: int = 5, side: int = SIDE) -> list[Figure]:
    """Median time of ``runs`` fresh processes per arm, run alternately; peak memory of
    the worst run of each arm, each its own process's VmHWM."""
    small = [arm("expansion", name, 10, "digest")["digest"] for name in ("fanout", "baseline")]
    assert small[0] == small[1], "not the same command lines"
    fanout: list[dict[str, Any]] = []
    base: list[dict[str, Any]] = []
    for _ in range(runs):
        fanout.append(arm("expansion", "fanout", side))
        base.append(arm("expansion", "baseline", side))
    assert {r["chars"] for r in fanout} == {r["chars"] for r in base}, "not the same lines"
    f_runs = [r["seconds"] for r in fanout]
    b_runs = [r["seconds"] for r in base]
    f_cpu = median([r["cpu_seconds"] for r in fanout])
    b_cpu = median([r["cpu_seconds"] for r in base])
    f_peaks = [r["peak_rss_mb"] for r in fanout]
    b_peaks = [r["peak_rss_mb"] for r in base]
    tasks = side ** 3
    label = f"{tasks:,} tasks"
    return [
        Figure("expansion", f"sweep expansion time ({label})", median(f_runs),
               "itertools.product + str.format", median(b_runs), "s", target=2.0,
               runs=f_runs, baseline_runs=b_runs,
               extra={"fanout_us_per_task": median(f_runs) / tasks * 1e6,
                      "baseline_us_per_task": median(b_runs) / tasks * 1e6,
                      "cpu_ratio": f_cpu / b_cpu if b_cpu else float("inf"),
                      "fanout_cpu_s": f_cpu, "baseline_cpu_s": b_cpu}),
        Figure("expansion", f"sweep expansion peak RSS ({label})", max(f_peaks),
               "100 MB budget", 100.0, "MB", target=1.0, runs=f_peaks,
               extra={"rss_after_imports_mb": max(r["rss_before_mb"] for r in fanout),
                      "baseline_peak_rss_mb": max(b_peaks), "baseline_peaks_mb": b_peaks},
               note="each arm's own process (VmHWM): interpreter, imports and the expansion"),
    ]


if __name__ == "__main__":
    {"fanout": arm_fanout, "baseline": arm_baseline}[sys.argv[1]](
        int(sys.argv[2]), sys.argv[3:] == ["digest"])
