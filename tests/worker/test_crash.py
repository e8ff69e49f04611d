"""The daemon killed with SIGKILL mid-submit and restarted ends with exactly one job and
one copy of each task (a real `fanout run` process, the embedded queue and executor)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from worker.backends.local import LocalBackend

TASKS = 50_000


@pytest.fixture
def daemon_env(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    """A config whose program only sleeps (so tasks hold slots without using CPU)."""
    config = tmp_path / "fanout.toml"
    config.write_text(
        'home = "home"\n'
        "[queue]\nlock_duration = 2.0\n"
        "[local]\nslots = 2\n"
        "[metrics]\nport = 0\n"
        '[programs.hold]\ncommand = "sleep 600 {i}"\n')
    env = {**os.environ, "FANOUT_CONFIG": str(config)}
    yield tmp_path, env


def start(cwd: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "worker.cli", "run"], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def task_total(home: Path) -> tuple[int, int]:
    """(jobs, tasks in all jobs) as the executor's durable state records them."""
    if not (home / "executor.db").exists():
        return 0, 0
    backend = LocalBackend(home=home, slots=1)
    try:
        jobs = backend.list_jobs(100)
        return len(jobs), sum(sum(j.counts.values()) for j in jobs)
    finally:
        backend.close()


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_sigkill_mid_submit_then_restart(daemon_env: tuple[Path, dict[str, str]]) -> None:
    """Kill -9 after part of a 50,000-task sweep is in; the restart completes it exactly."""
    cwd, env = daemon_env
    home = cwd / "home"
    body = json.dumps({"handler": "sweep", "params": {
        "program": "hold", "parameters": {"i": {"start": 0, "stop": TASKS}}}})
    first = start(cwd, env)
    try:
        sent = subprocess.run([sys.executable, "-m", "worker.cli", "send", "-"], cwd=cwd,
                              env=env, input=body.encode(), capture_output=True, check=True)
        assert sent.stdout.strip()
        wait_for(lambda: task_total(home)[1] >= TASKS // 5, 60, "part of the tasks")
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        _, partial = task_total(home)
        assert partial < TASKS, "the crash came too late to test anything"
    finally:
        if first.poll() is None:
            first.kill()
    second = start(cwd, env)
    try:
        wait_for(lambda: task_total(home) == (1, TASKS), 120, "all tasks after restart")
        backend = LocalBackend(home=home, slots=1)
        try:
            (job,) = backend.list_jobs(10)
            status = backend.job_status(job.id)
        finally:
            backend.close()
        assert status is not None and sum(status.counts.values()) == TASKS
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0
