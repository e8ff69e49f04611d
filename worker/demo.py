"""The built-in demo programs (used when no programs are configured).

``python -m worker.demo pi --samples N --seed S`` estimates pi by throwing N
random darts at the unit square, prints the estimate and writes it to the node's
shared directory; ``python -m worker.demo summary`` averages every estimate of
its job. Both read the Batch environment variables, so they behave the same
locally and on an Azure Batch node.
"""

from __future__ import annotations

import argparse
import os
import random
from pathlib import Path


def _results_dir() -> Path:
    shared = Path(os.environ.get("AZ_BATCH_NODE_SHARED_DIR", "."))
    job = os.environ.get("AZ_BATCH_JOB_ID", "demo")
    path = shared / "pi" / job
    path.mkdir(parents=True, exist_ok=True)
    return path


def estimate_pi(samples: int, seed: int) -> float:
    """Monte Carlo estimate of pi from ``samples`` darts."""
    rng = random.Random(seed)
    inside = sum(1 for _ in range(samples) if rng.random() ** 2 + rng.random() ** 2 <= 1.0)
    return 4.0 * inside / samples


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
        task = os.environ.get("AZ_BATCH_TASK_ID", "0")
        (_results_dir() / f"{task}.txt").write_text(f"{value}\n")
        print(f"pi ~ {value:.6f} from {args.samples} samples (seed {args.seed})")
        return 0
    values = [float(p.read_text()) for p in sorted(_results_dir().glob("*.txt"))]
    if not values:
        print("no estimates found")
        return 1
    print(f"pi ~ {sum(values) / len(values):.6f} averaged over {len(values)} tasks")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
