"""Benchmark 2, sweep expansion: planning a 1,000,000-task sweep (100 x 100 x 100) with
the Planner and iterating every task, against a plain ``itertools.product`` with
``str.format`` of the same command lines (streamed, as fanout streams). Each runs in a
fresh process, which reports its time and peak RSS.

Arms: ``python -m tests.bench.expansion fanout|baseline SIDE`` (SIDE**3 tasks).
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

from tests.bench.common import Figure, arm, emit, median, peak_rss_mb, quiet_logs

SIDE = 100
TEMPLATE = "python3 sim.py --alpha {alpha} --beta {beta} --gamma {gamma}"
#: The command lines fanout builds from TEMPLATE (values are digits: no quoting needed).
LINE = "/bin/sh -c 'python3 sim.py --alpha {alpha} --beta {beta} --gamma {gamma}'"


def arm_fanout(side: int) -> None:
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
        before = peak_rss_mb()
        started = time.perf_counter()
        (planned,) = planner.plan(body.encode(), message_id="bench").jobs
        count = 0
        chars = 0
        for task in planned.job.tasks:
            count += 1
            chars += len(task.command_line)
        seconds = time.perf_counter() - started
    assert count == side ** 3
    emit({"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "rss_before_mb": before,
          "tasks": count, "chars": chars})


def arm_baseline(side: int) -> None:
    """The same command lines from itertools.product and str.format, streamed."""
    before = peak_rss_mb()
    started = time.perf_counter()
    fmt = LINE.format
    count = 0
    chars = 0
    axis = [str(v) for v in range(side)]
    for alpha, beta, gamma in itertools.product(axis, axis, axis):
        line = fmt(alpha=alpha, beta=beta, gamma=gamma)
        count += 1
        chars += len(line)
    seconds = time.perf_counter() - started
    emit({"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "rss_before_mb": before,
          "tasks": count, "chars": chars})


def run(runs: int = 3, side: int = SIDE) -> list[Figure]:
    """Median time of ``runs`` fresh processes per arm; peak memory of the worst run."""
    fanout = [arm("expansion", "fanout", side) for _ in range(runs)]
    base = [arm("expansion", "baseline", side) for _ in range(runs)]
    assert {r["chars"] for r in fanout} == {r["chars"] for r in base}, "not the same lines"
    f_runs = [r["seconds"] for r in fanout]
    b_runs = [r["seconds"] for r in base]
    peak = max(r["peak_rss_mb"] for r in fanout)
    base_peak = max(r["peak_rss_mb"] for r in base)
    tasks = side ** 3
    label = f"{tasks:,} tasks"
    return [
        Figure("expansion", f"sweep expansion time ({label})", median(f_runs),
               "itertools.product + str.format", median(b_runs), "s", target=3.0,
               runs=f_runs, baseline_runs=b_runs,
               extra={"fanout_us_per_task": median(f_runs) / tasks * 1e6,
                      "baseline_us_per_task": median(b_runs) / tasks * 1e6}),
        Figure("expansion", f"sweep expansion peak RSS ({label})", peak,
               "150 MB budget", 150.0, "MB", target=1.0,
               extra={"rss_after_imports_mb": max(r["rss_before_mb"] for r in fanout),
                      "baseline_peak_rss_mb": base_peak},
               note="whole process: interpreter, imports and the expansion"),
    ]


if __name__ == "__main__":
    {"fanout": arm_fanout, "baseline": arm_baseline}[sys.argv[1]](int(sys.argv[2]))
