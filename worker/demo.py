"""The built-in demo programs (used when no programs are configured).

``python -m worker.demo pi --samples N --seed S`` estimates pi by throwing N random
darts at the unit square, prints the estimate and writes it to ``estimate.json`` in
its working directory; the ``pi`` program declares that file as its output, so each
task's estimate is uploaded to ``results/<job>/<task>/estimate.json`` in the results
container. ``python -m worker.demo summary`` is the sweep's aggregate: it is staged
every task's results under ``$FANOUT_RESULTS_DIR`` (``results/<job>``, relative to its
working directory), averages the estimates, prints the result and writes it to
``summary.json`` (uploaded to ``results/<job>/aggregate/``). Nothing is shared
between tasks but blob storage, so the demo runs the same on one machine and on a pool
of many Batch nodes.

As a sweep's aggregate, ``summary`` also gets ``FANOUT_FAN_IN_RANGE`` (the task ids
it depends on, ``0-19``): it then reports which estimates are missing (tasks that
failed, so uploaded nothing) and exits 0 if at least one estimate exists::

    pi ~ 3.141200 averaged over 19 of 20 tasks; missing: 7
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
from collections.abc import Iterable
from pathlib import Path

#: Missing task ids listed in full up to this many ranges, then "and N more".
MAX_SHOWN = 20
#: What a pi task writes (its program's output) and the aggregate writes.
ESTIMATE = "estimate.json"
SUMMARY = "summary.json"


def _results_dir() -> Path:
    """Where the aggregate finds the tasks' results: ``$FANOUT_RESULTS_DIR``, one
    directory per task id (``<dir>/3/estimate.json``)."""
    return Path(os.environ.get("FANOUT_RESULTS_DIR", "results"))


def estimate_pi(samples: int, seed: int) -> float:
    """Monte Carlo estimate of pi from ``samples`` darts."""
    rng = random.Random(seed)
    inside = sum(1 for _ in range(samples) if rng.random() ** 2 + rng.random() ** 2 <= 1.0)
    return 4.0 * inside / samples


def parse_ranges(text: str) -> list[tuple[int, int]]:
    """``"0-19"`` or ``"0-4,7,9-10"`` as inclusive ranges; ValueError when malformed."""
    out: list[tuple[int, int]] = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:-(\d+))?\s*", part)
        if match is None:
            raise ValueError(f"FANOUT_FAN_IN_RANGE: {text!r} is not like 0-19")
        lo = int(match[1])
        hi = int(match[2]) if match[2] is not None else lo
        if hi < lo:
            raise ValueError(f"FANOUT_FAN_IN_RANGE: {part.strip()!r} ends before it starts")
        out.append((lo, hi))
    return out


def describe_ids(ids: Iterable[int]) -> str:
    """``[1, 2, 3, 7]`` as ``1-3, 7`` (at most MAX_SHOWN runs, then "and N more")."""
    runs: list[list[int]] = []
    for i in sorted(ids):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    shown = [str(a) if a == b else f"{a}-{b}" for a, b in runs[:MAX_SHOWN]]
    rest = sum(b - a + 1 for a, b in runs[MAX_SHOWN:])
    return ", ".join(shown) + (f" and {rest} more" if rest else "")


def _estimates(top: Path) -> dict[str, float]:
    """Each task id's estimate, from ``<top>/<task id>/estimate.json``."""
    found: dict[str, float] = {}
    for path in sorted(top.glob(f"*/{ESTIMATE}")):
        try:
            value = json.loads(path.read_text())["estimate"]
            if isinstance(value, int | float) and not isinstance(value, bool):
                found[path.parent.name] = float(value)
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a half-written or foreign file is not an estimate
    return found


def _report(line: str, code: int, **summary: object) -> int:
    print(line)
    Path(SUMMARY).write_text(json.dumps({"text": line, **summary}, indent=2) + "\n")
    return code


def summary() -> int:
    """Average the job's estimates; name the missing ones when the range is known."""
    found = _estimates(_results_dir())
    spec = os.environ.get("FANOUT_FAN_IN_RANGE", "").strip()
    if not spec:
        values = list(found.values())
        if not values:
            return _report("no estimates found", 1, tasks=0)
        mean = sum(values) / len(values)
        return _report(f"pi ~ {mean:.6f} averaged over {len(values)} tasks", 0,
                       pi=mean, tasks=len(values))
    try:
        ranges = parse_ranges(spec)
    except ValueError as exc:
        print(exc)
        return 2
    expected = sum(hi - lo + 1 for lo, hi in ranges)
    have = {int(k) for k in found if k.isdigit() and any(lo <= int(k) <= hi
                                                          for lo, hi in ranges)}
    values = [found[str(i)] for i in sorted(have)]
    missing = [i for lo, hi in ranges for i in range(lo, hi + 1) if i not in have]
    note = f"; missing: {describe_ids(missing)}" if missing else ""
    if not values:
        return _report(f"no estimates found of {expected} tasks{note}", 1, tasks=0,
                       expected=expected, missing=missing[:1000])
    mean = sum(values) / len(values)
    return _report(f"pi ~ {mean:.6f} averaged over {len(values)} of {expected} tasks{note}",
                   0, pi=mean, tasks=len(values), expected=expected, missing=missing[:1000])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.demo")
    sub = parser.add_subparsers(dest="cmd", required=True)
    pi = sub.add_parser("pi")
    pi.add_argument("--samples", type=int, required=True)
    pi.add_argument("--seed", type=int, required=True)
    sub.add_parser("summary")
    args = parser.parse_args(argv)
    if args.cmd == "pi":
        value = estimate_pi(args.samples, args.seed)
        Path(ESTIMATE).write_text(json.dumps(
            {"estimate": value, "samples": args.samples, "seed": args.seed}) + "\n")
        print(f"pi ~ {value:.6f} from {args.samples} samples (seed {args.seed})")
        return 0
    return summary()


if __name__ == "__main__":
    raise SystemExit(main())
