"""Benchmark 4, local execution: 1,000 trivial tasks (``true <i>``) on 2 slots through
the local executor (its store, scheduler, working directories, stdout/stderr files,
Batch environment, exit codes), against ``xargs -P 2`` running the same commands.

Two figures: on the file system as it is, and right after a large deletion (before
each arm of either kind, ``CHURN`` files are created and deleted next to the arms'
directories). On a journal-less ext4 every new inode is allocated past the recently
deleted ones of its block group, so the executor's four new inodes per task (its
directory, ``wd/``, ``stdout.txt``, ``stderr.txt``) can cost more than the rest of
its work; ``xargs`` creates none. ``extra`` carries what explains the ratios: the
executor's own CPU and its children's per task, the inodes each arm created per task,
and the system calls per task of both (``strace -f -c``, when strace is installed).

Arms: ``python -m tests.bench.execution fanout|xargs TASKS SLOTS PARENT CHURN``.

Each fanout arm gets a fresh executor home under one parent directory that is
removed only after every run of the benchmark, so no arm pays for an earlier arm's
deletion except where the second figure deletes files on purpose, for both arms alike.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from tempfile import TemporaryDirectory, mkdtemp
from typing import Any

from tests.bench.common import REPO, Figure, arm, emit, median, quiet_logs

TASKS = 1000
SLOTS = 2
#: Files created and deleted before each arm of the second figure.
CHURN = 20_000
TARGET = 1.5
TARGET_AFTER_DELETION = 2.0


def churn(parent: Path, files: int) -> None:
    """Create ``files`` empty files under ``parent`` and delete them again: their
    inodes are then "recently deleted", which journal-less ext4 skips when it
    allocates new ones in their block group."""
    if files <= 0:
        return
    where = mkdtemp(dir=parent, prefix="churn-")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    for i in range(files):
        os.close(os.open(f"{where}/{i}", flags, 0o600))
    shutil.rmtree(where)
    os.sync()  # the deletion reaches the disk's bitmaps before the arm starts


def entries(root: Path) -> int:
    """Files and directories under ``root``: the inodes an arm's tasks left there
    (fanout's ``<home>/tasks``; the directory xargs ran in)."""
    return sum(len(dirs) + len(files) for _, dirs, files in os.walk(root))


def cpu() -> tuple[float, float]:
    """CPU seconds so far (user + system) of this process and of its reaped children."""
    t = os.times()
    return t.user + t.system, t.children_user + t.children_system


def arm_fanout(tasks: int, slots: int, parent: Path, files: int) -> None:
    """Add the tasks to a started executor; time until the job's last task completes.

    The executor's home is a fresh directory under ``parent``, left for ``run()``."""
    from handlers.base import JobSpec, TaskSpec
    from worker.backends.local import LocalBackend

    quiet_logs()
    home = Path(mkdtemp(dir=parent))
    backend = LocalBackend(home=home, slots=slots)
    backend.start()
    specs = [TaskSpec(id=str(i), command_line=f"true {i}") for i in range(tasks)]
    churn(parent, files)
    own, children = cpu()
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
    own_after, children_after = cpu()
    backend.close()
    assert status.succeeded == tasks, status
    emit({"seconds": seconds, "cpu": own_after - own, "children_cpu": children_after - children,
          "home": str(home / "tasks")})


def arm_xargs(tasks: int, slots: int, parent: Path, files: int) -> None:
    """``seq 0 N-1 | xargs -P SLOTS -n 1 true``: the same commands, nothing else (run
    in an empty directory, to count what it creates)."""
    numbers = "".join(f"{i}\n" for i in range(tasks)).encode()
    where = Path(mkdtemp(dir=parent))
    churn(parent, files)
    own, children = cpu()
    started = time.perf_counter()
    subprocess.run(["xargs", "-P", str(slots), "-n", "1", "true"], input=numbers, check=True,
                   cwd=where)
    seconds = time.perf_counter() - started
    own_after, children_after = cpu()
    emit({"seconds": seconds, "cpu": own_after - own, "children_cpu": children_after - children,
          "home": str(where)})


def syscalls(cmd: list[str], stdin: bytes = b"") -> dict[str, int] | None:
    """System calls by name of ``cmd`` and everything it starts (``strace -f -c``);
    None where strace is missing or not allowed."""
    strace = shutil.which("strace")
    if strace is None:
        return None
    with TemporaryDirectory() as tmp:
        out = Path(tmp) / "strace.txt"
        proc = subprocess.run([strace, "-f", "-c", "-o", str(out), *cmd], input=stdin,
                              capture_output=True, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
        if proc.returncode != 0 or not out.exists():
            return None
        return dict(_strace_rows(out.read_text()))


def _strace_rows(text: str) -> Iterator[tuple[str, int]]:
    """(name, calls) from ``strace -c``'s table."""
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 5 and re.fullmatch(r"[\d.]+", fields[0]) and fields[-1] != "total":
            yield fields[-1], int(fields[3])


def syscall_extra(tasks: int, slots: int, parent: Path) -> dict[str, Any]:
    """System calls per task of both arms: fanout's minus those of a run of no tasks
    (the interpreter's start and the executor's), xargs' whole run over its tasks."""
    def fanout(n: int) -> dict[str, int] | None:
        return syscalls([sys.executable, "-m", "tests.bench.execution", "fanout", str(n),
                         str(slots), str(parent), "0"])

    full, empty = fanout(tasks), fanout(0)
    base = syscalls(["xargs", "-P", str(slots), "-n", "1", "true"],
                    "".join(f"{i}\n" for i in range(tasks)).encode())
    if full is None or empty is None or base is None:
        return {"syscalls": "not measured: strace is missing or not permitted"}
    per_task = {k: (full.get(k, 0) - empty.get(k, 0)) / tasks for k in full}
    per_base = {k: v / tasks for k, v in base.items()}
    extra_calls = sorted(per_task, key=lambda k: per_base.get(k, 0) - per_task[k])[:8]
    return {"fanout_syscalls_per_task": round(sum(per_task.values()), 1),
            "xargs_syscalls_per_task": round(sum(per_base.values()), 1),
            "fanout_syscalls_beyond_xargs": {
                k: round(per_task[k] - per_base.get(k, 0), 1) for k in extra_calls}}


def _runs(runs: int, tasks: int, slots: int, parent: str, files: int
          ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``runs`` fanout and xargs arms, alternating."""
    fanout: list[dict[str, Any]] = []
    base: list[dict[str, Any]] = []
    for _ in range(runs):
        for kind, results in (("fanout", fanout), ("xargs", base)):
            result = arm("execution", kind, tasks, slots, parent, files)
            # counted here, not in the arm, so the arm traced for its system calls
            # does not walk its directories
            result["inodes"] = entries(Path(result["home"]))
            results.append(result)
    return fanout, base


def _figure(name: str, target: float, tasks: int, slots: int, fanout: list[dict[str, Any]],
            base: list[dict[str, Any]], extra: dict[str, Any]) -> Figure:
    def per_task(results: list[dict[str, Any]], key: str, scale: float = 1.0) -> float:
        return round(median([r[key] for r in results]) * scale / tasks, 3)

    def seconds(results: list[dict[str, Any]]) -> list[float]:
        return [r["seconds"] for r in results]

    value, baseline = median(seconds(fanout)), median(seconds(base))
    return Figure("execution", name, value, f"xargs -P {slots}", baseline, "s", target=target,
                  runs=seconds(fanout), baseline_runs=seconds(base), extra={
                      "fanout_tasks_per_s": tasks / value, "xargs_tasks_per_s": tasks / baseline,
                      "fanout_cpu_ms_per_task": per_task(fanout, "cpu", 1000),
                      "fanout_children_cpu_ms_per_task": per_task(fanout, "children_cpu", 1000),
                      "xargs_cpu_ms_per_task": per_task(base, "cpu", 1000),
                      "xargs_children_cpu_ms_per_task": per_task(base, "children_cpu", 1000),
                      "fanout_inodes_per_task": per_task(fanout, "inodes"),
                      "xargs_inodes_per_task": per_task(base, "inodes"), **extra})


def run(runs: int = 3, tasks: int = TASKS, slots: int = SLOTS,
        files: int = CHURN) -> list[Figure]:
    with TemporaryDirectory(dir=Path.cwd(), prefix=".bench-execution-") as parent:
        quiet = _runs(runs, tasks, slots, parent, 0)
        deleted = _runs(runs, tasks, slots, parent, files)
        calls = syscall_extra(tasks, slots, Path(parent))
    return [
        _figure(f"local execution ({tasks:,} trivial tasks, {slots} slots)", TARGET, tasks,
                slots, *quiet, calls),
        _figure(f"local execution right after deleting {files:,} files", TARGET_AFTER_DELETION,
                tasks, slots, *deleted, {"deleted_files": files}),
    ]


if __name__ == "__main__":
    {"fanout": arm_fanout, "xargs": arm_xargs}[sys.argv[1]](
        int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]),
        int(sys.argv[5]) if len(sys.argv) > 5 else 0)
