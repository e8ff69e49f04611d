"""What the benchmarks share: figures, fresh-process arms, the machine, the Batch peer.

Every benchmark compares fanout with a baseline measured in the same run on the same
machine, so the figure that matters is the ratio. Each measurement ("arm") runs in a
fresh Python process (``python -m tests.bench.<module> <arm> ...``) that prints one
JSON line, so peak memory is its own and one arm's garbage does not slow the next.
"""

from __future__ import annotations

import base64
import json
import os
import platform
import re
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Figure:
    """One benchmark figure: fanout's value, the baseline's, and their ratio."""

    bench: str
    name: str
    value: float
    baseline_name: str
    baseline: float
    unit: str
    target: float | None = None  # the ratio must not exceed it
    note: str = ""
    runs: list[float] = field(default_factory=list)
    baseline_runs: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.value / self.baseline if self.baseline else float("inf")

    @property
    def ok(self) -> bool | None:
        return None if self.target is None else self.ratio <= self.target

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": round(self.ratio, 3), "ok": self.ok}


def arm(module: str, *args: object, timeout: float = 300,
        env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``tests.bench.<module>``'s arm in a fresh process; return its JSON result."""
    cmd = [sys.executable, "-m", f"tests.bench.{module}", *map(str, args)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[2:])} failed ({proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"{' '.join(cmd[2:])} printed no result:\n{proc.stdout[-2000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def quiet_logs() -> None:
    """Configure logging as ``fanout run`` does by default (JSON, info), to stderr, so an
    arm pays for the log lines a daemon would write and no more."""
    from worker import logs

    logs.configure(fmt="json", level="info", stream=sys.stderr)


def emit(result: dict[str, Any]) -> None:
    """An arm's last act: print its result as one JSON line."""
    print(json.dumps(result), flush=True)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def peak_rss_mb(pid: int | str = "self") -> float:
    """A process's own peak resident set size so far, in MB: ``VmHWM`` of
    /proc/<pid>/status, the high-water mark of this process image's memory.

    Not ``ru_maxrss``: Linux carries that across ``execve`` from the process that
    forked, so a fresh arm's figure could be its driver's peak rather than its own."""
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmHWM:\s+(\d+) kB", text, re.MULTILINE)
    assert match, "no VmHWM"
    return int(match.group(1)) / 1024


def rss_mb(pid: int) -> float:
    """A process's current resident set size in MB, from /proc."""
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.MULTILINE)
    assert match, "no VmRSS"
    return int(match.group(1)) / 1024


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


def machine() -> dict[str, Any]:
    """The machine the figures were measured on."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": model, "python": platform.python_version(),
            "platform": platform.platform(),
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")}


class PeerProcess:
    """The Batch peer (tests/fakes/batch_peer.py) in a process of its own, so its CPU
    is not the client's; restarted for each measurement so its memory stays small."""

    def __init__(self, *, latency: float, pool: str = "fanout") -> None:
        self.latency = latency
        self.pool = pool
        self.account = "fanoutbench"
        self.key = base64.b64encode(secrets.token_bytes(64)).decode()
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""

    def __enter__(self) -> PeerProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.fakes.batch_peer", "--port", "0", "--pool",
             self.pool, "--latency", str(self.latency), "--account", self.account,
             "--key", self.key], cwd=REPO, stdout=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)})
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        match = re.search(r"on (http://\S+)", line)
        if not match:
            self.proc.kill()
            raise RuntimeError(f"the Batch peer did not start: {line!r}")
        self.url = match.group(1)
        return self

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the peer has used so far."""
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def args(self) -> list[str]:
        return [self.url, self.account, self.key]
