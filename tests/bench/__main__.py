"""``python -m tests.bench`` (``make bench``): run the benchmarks, print a table of
ratios against baselines measured in the same run, and write ``bench-results.json``.

Not tests: nothing here fails the build. A figure whose ratio exceeds its target is
marked ``MISS`` in the table and ``"ok": false`` in the JSON. See docs/performance.md.

    python -m tests.bench                     # everything (a few minutes)
    python -m tests.bench --only expansion    # one benchmark
    python -m tests.bench --runs 1            # one measurement per arm (default 5)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tests.bench import execution, expansion, monitor, soak, submission, throughput
from tests.bench.common import REPO, Figure, machine

BENCHMARKS: dict[str, Callable[[int], list[Figure]]] = {
    "submission": lambda runs: submission.run(runs=runs),
    "expansion": lambda runs: expansion.run(runs=runs),
    "throughput": lambda runs: throughput.run(runs=runs),
    "execution": lambda runs: execution.run(runs=runs),
    "soak": lambda runs: soak.run(),
    "monitor": lambda runs: monitor.run(runs=runs),
}


def _fmt(value: float, unit: str) -> str:
    return f"{value:,.0f} {unit}" if value >= 100 else f"{value:.3g} {unit}"


def table(figures: list[Figure]) -> str:
    """The figures as a plain-text table (also valid Markdown)."""
    rows = [("benchmark", "fanout", "baseline", "ratio", "target", "")]
    for f in figures:
        verdict = "" if f.ok is None else ("ok" if f.ok else "MISS")
        rows.append((f.name, _fmt(f.value, f.unit), f"{_fmt(f.baseline, f.unit)} "
                     f"({f.baseline_name})", f"{f.ratio:.2f}x",
                     "-" if f.target is None else f"<= {f.target:g}x", verdict))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
             for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def details(figures: list[Figure]) -> str:
    """The extra numbers each figure carries (rates, CPU, memory samples)."""
    out = []
    for f in figures:
        if f.extra:
            extra = ", ".join(f"{k}={_short(v)}" for k, v in f.extra.items())
            out.append(f"- {f.name}: {extra}")
    return "\n".join(out)


def _short(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return json.dumps(value) if isinstance(value, dict) else str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__)
    parser.add_argument("--only", action="append", choices=sorted(BENCHMARKS),
                        help="run only this benchmark (repeatable)")
    parser.add_argument("--runs", type=int, default=5,
                        help="fresh-process measurements per arm; the median is reported")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results.json")
    args = parser.parse_args(argv)
    started = time.monotonic()
    figures: list[Figure] = []
    seconds: dict[str, float] = {}
    for name in args.only or list(BENCHMARKS):
        print(f"running {name} ...", file=sys.stderr, flush=True)
        begun = time.monotonic()
        figures.extend(BENCHMARKS[name](args.runs))
        seconds[name] = round(time.monotonic() - begun, 1)
    total = time.monotonic() - started
    about = machine()
    print(f"\nfanout benchmarks: {about['date']}, {about['nproc']} x {about['cpu']}, "
          f"Python {about['python']}; median of {args.runs} run(s); {total:.0f} s\n")
    print(table(figures))
    print("\n" + details(figures))
    args.out.write_text(json.dumps({
        "machine": about, "runs": args.runs, "seconds": round(total, 1),
        "benchmark_seconds": seconds, "figures": [f.as_dict() for f in figures],
    }, indent=2) + "\n", encoding="utf-8")
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
