"""Benchmark 4, local execution: 1,000 trivial tasks (``true <i>``) on 2 slots through
the local executor (its store, scheduler, working directories, stdout/stderr files,
Batch environment, exit codes), against ``xargs -P 2`` running the same commands.

Arms: ``python -m tests.bench.execution fanout|xargs TASKS SLOTS [PARENT]``.

Each fanout arm gets a fresh executor home under one parent directory that is
removed only after every run of the benchmark. Deleting a run's 4,000 files and
directories just before the next run creates its own made that next run pay for the
deletions (on journal-less ext4, each new inode scans past recently freed ones:
61% of a follow-on run's CPU in perf), a cost of this harness, not of the executor,
which removes task directories only after their retention time (7 days by default).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory, mkdtemp

from tests.bench.common import Figure, arm, emit, median, quiet_logs

TASKS = 1000
SLOTS = 2


def arm_fanout(tasks: int, slots: int, parent: Path) -> None:
    """Add the tasks to a started executor; time until the job's last task completes.

    The executor's home is a fresh directory under ``parent``, left for ``run()``."""
    from handlers.base import JobSpec, TaskSpec
    from worker.backends.local import LocalBackend

    quiet_logs()
    backend = LocalBackend(home=Path(mkdtemp(dir=parent)), slots=slots)
    backend.start()
    specs = [TaskSpec(id=str(i), command_line=f"true {i}") for i in range(tasks)]
    started = time.perf_counter()
    backend.create_job(JobSpec(tasks=[], task_count=tasks, id="bench", pool="local"))
    for i in range(0, tasks, 100):
        backend.add_tasks("bench", specs[i:i + 100])
    backend.seal_job("bench")
    while True:
        status = backend.job_status("bench")
        assert status is not None
        if status.succeeded + status.failed == tasks:
            break
        time.sleep(0.02)
    seconds = time.perf_counter() - started
    backend.close()
    assert status.succeeded == tasks, status
    emit({"seconds": seconds})


def arm_xargs(tasks: int, slots: int, parent: Path) -> None:
    """``seq 0 N-1 | xargs -P SLOTS -n 1 true``: the same commands, nothing else."""
    numbers = "".join(f"{i}\n" for i in range(tasks)).encode()
    started = time.perf_counter()
    subprocess.run(["xargs", "-P", str(slots), "-n", "1", "true"], input=numbers, check=True)
    emit({"seconds": time.perf_counter() - started})


def run(runs: int = 3, tasks: int = TASKS, slots: int = SLOTS) -> list[Figure]:
    with TemporaryDirectory(dir=Path.cwd(), prefix=".bench-execution-") as parent:
        fanout = [arm("execution", "fanout", tasks, slots, parent)["seconds"]
                  for _ in range(runs)]
        base = [arm("execution", "xargs", tasks, slots, parent)["seconds"]
                for _ in range(runs)]
    return [Figure("execution", f"local execution ({tasks:,} trivial tasks, {slots} slots)",
                   median(fanout), f"xargs -P {slots}", median(base), "s", target=2.0,
                   runs=fanout, baseline_runs=base,
                   extra={"fanout_tasks_per_s": tasks / median(fanout),
                          "xargs_tasks_per_s": tasks / median(base)})]


if __name__ == "__main__":
    {"fanout": arm_fanout, "xargs": arm_xargs}[sys.argv[1]](
        int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
