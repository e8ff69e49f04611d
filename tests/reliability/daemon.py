"""A real ``fanout run`` process for reliability tests: config, logs, queue and state.

The daemon runs as ``python -m worker.cli run`` with a config file written from a
dict, JSON logs going to a file (so tests can read every line it wrote), and a
metrics port the OS picks (read back from the ``fanout.started`` log line). The test
process reaches the same embedded queue and local executor state through their own
classes, as ``fanout send`` and ``fanout status`` do from another process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from worker.backends.local import LocalBackend
from worker.backends.local.store import TaskInfo
from worker.sources.base import DeadLettered
from worker.sources.local import LocalQueue

REPO = Path(__file__).resolve().parents[2]


def toml_dumps(data: Mapping[str, Any]) -> str:
    """A minimal TOML writer for config dicts (scalars, lists, nested tables)."""
    lines: list[str] = []
    tables: list[tuple[str, Mapping[str, Any]]] = []
    for key, value in data.items():
        if isinstance(value, Mapping):
            tables.append((key, value))
        else:
            lines.append(f"{_key(key)} = {_value(value)}")
    for name, table in tables:
        _table(name, table, lines)
    return "\n".join(lines) + "\n"


def _table(name: str, table: Mapping[str, Any], lines: list[str]) -> None:
    lines.append(f"[{name}]")
    nested = []
    for key, value in table.items():
        if isinstance(value, Mapping):
            nested.append((f"{name}.{_key(key)}", value))
        else:
            lines.append(f"{_key(key)} = {_value(value)}")
    for sub, value in nested:
        _table(sub, value, lines)


def _key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # TOML basic strings take JSON's escapes
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def wait_for(predicate: Callable[[], bool], timeout: float, what: str,
             interval: float = 0.05) -> None:
    """Poll ``predicate`` until it holds; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


class Daemon:
    """One home directory and config; start, signal and restart its daemon process."""

    def __init__(self, root: Path, config: Mapping[str, Any]) -> None:
        self.root = root
        self.home = root / "home"
        self.config_path = root / "fanout.toml"
        settings = {"home": str(self.home), **config}
        settings.setdefault("metrics", {"port": 0})
        settings["log"] = {"format": "json", "level": "info", **settings.get("log", {})}
        self.config_path.write_text(toml_dumps(settings), encoding="utf-8")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FANOUT_")}
        self.env["FANOUT_CONFIG"] = str(self.config_path)
        self.env["PYTHONPATH"] = str(REPO)
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0
        self.log_paths: list[Path] = []

    # -- the process ------------------------------------------------------------------

    def start(self) -> Daemon:
        """Start ``fanout run``; its stderr (JSON logs) goes to ``run-<n>.log``."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.runs += 1
        path = self.root / f"run-{self.runs}.log"
        self.log_paths.append(path)
        with path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "worker.cli", "run"], cwd=self.root, env=self.env,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        return self

    def wait_started(self, timeout: float = 30) -> None:
        """Wait for the ``fanout.started`` log line of the current run."""
        wait_for(lambda: self.started_event() is not None or not self.alive, timeout,
                 "the daemon to start")
        assert self.alive, f"the daemon exited at start:\n{self.log_text(self.runs)}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL and reap; the daemon gets no chance to clean up."""
        self.signal(signal.SIGKILL)
        self.wait(10)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM and wait for the exit status."""
        if not self.alive:
            return self.proc.returncode if self.proc is not None else 0
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def close(self) -> None:
        """Teardown: kill the daemon if it still runs, and the task processes it left."""
        if self.alive:
            self.kill()
        if self.proc is not None:
            # tasks run in sessions of their own; a SIGKILLed daemon leaves them behind
            _kill_tasks_under(self.home)

    # -- logs and metrics -------------------------------------------------------------

    def log_text(self, run: int | None = None) -> str:
        """The log file of one run (default: every run, concatenated)."""
        paths = self.log_paths if run is None else [self.log_paths[run - 1]]
        return "".join(p.read_text(encoding="utf-8", errors="replace")
                       for p in paths if p.exists())

    def events(self, run: int | None = None) -> list[dict[str, Any]]:
        """The JSON log lines as dicts (lines that are not JSON are skipped)."""
        out = []
        for line in self.log_text(run).splitlines():
            try:
                item = json.loads(line)
            except ValueError:
                continue
            if isinstance(item, dict):
                out.append(item)
        return out

    def started_event(self) -> dict[str, Any] | None:
        for event in self.events(self.runs):
            if event.get("event") == "fanout.started":
                return event
        return None

    def metrics_text(self) -> str:
        """The current run's ``/metrics`` page."""
        event = self.started_event()
        assert event is not None, "the daemon has not started"
        with urllib.request.urlopen(str(event["metrics"]), timeout=10) as answer:
            return str(answer.read().decode("utf-8"))

    def metric(self, name: str, labels: Mapping[str, str] | None = None) -> float:
        """One sample of the current run's metrics (0 when absent)."""
        return sample(self.metrics_text(), name, labels)

    # -- the queue ---------------------------------------------------------------------

    def queue(self) -> LocalQueue:
        return LocalQueue(path=self.home / "queue.db")

    def send(self, body: bytes | Mapping[str, Any], *, message_id: str | None = None,
             properties: Mapping[str, str] | None = None) -> str:
        """Enqueue a message on the daemon's embedded queue, as ``fanout send`` does."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()

        async def go() -> str:
            q = self.queue()
            try:
                return await q.send(data, message_id=message_id, properties=properties)
            finally:
                await q.close()

        return asyncio.run(go())

    def depth(self) -> dict[str, int]:
        async def go() -> dict[str, int]:
            q = self.queue()
            try:
                return await q.depth()
            finally:
                await q.close()

        return asyncio.run(go())

    def dead_letters(self) -> list[DeadLettered]:
        async def go() -> list[DeadLettered]:
            q = self.queue()
            try:
                return await q.dead_letters(10_000)
            finally:
                await q.close()

        return asyncio.run(go())

    # -- the local executor's state ---------------------------------------------------

    def local_counts(self) -> dict[str, int]:
        """Tasks per job as the local executor's durable state records them."""
        if not (self.home / "executor.db").exists():
            return {}
        with LocalBackend(home=self.home, slots=1) as backend:
            return {j.id: sum(j.counts.values()) for j in backend.list_jobs(1000)}

    def local_tasks(self, job_id: str) -> list[TaskInfo]:
        with LocalBackend(home=self.home, slots=1) as backend:
            return backend.tasks(job_id, limit=1_000_000)


def sample(text: str, name: str, labels: Mapping[str, str] | None = None) -> float:
    """The value of ``name{labels}`` in a Prometheus text page (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    want = dict(labels or {})
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and dict(s.labels) == want:
                return float(s.value)
    return 0.0


def _kill_tasks_under(home: Path) -> None:
    """SIGKILL the process groups of tasks whose working directory is under ``home``."""
    tasks = str(home / "tasks")
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            cwd = os.readlink(pid_dir / "cwd")
        except OSError:
            continue
        if cwd.startswith(tasks):
            with contextlib.suppress(OSError):
                os.killpg(int(pid_dir.name), signal.SIGKILL)
