"""Nothing a long-running worker holds grows with the work it has done: file
descriptors and threads stay flat across hundreds of tasks and messages (the memory
side of this is the soak benchmark's, in ``make bench``)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

from handlers.base import JobSpec, TaskSpec
from tests.worker.harness import RunningWorker
from worker.backends.local import LocalBackend
from worker.config import Settings

from .daemon import wait_for


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def run_tasks(backend: LocalBackend, job_id: str, n: int) -> None:
    backend.create_job(JobSpec(tasks=[], task_count=n, id=job_id, pool="local"))
    backend.add_tasks(job_id, [TaskSpec(id=str(i), command_line=f"true {i}")
                               for i in range(n)])
    backend.seal_job(job_id)
    wait_for(lambda: (s := backend.job_status(job_id)) is not None and s.succeeded == n,
             120, f"{n} tasks")


def test_executor_holds_no_descriptor_per_task(tmp_path: Path) -> None:
    """Running 300 tasks after a first 100 leaves descriptors and threads where the
    first 100 left them (each runner thread's SQLite connection is closed with it)."""
    with LocalBackend(home=tmp_path / "home", slots=2, poll_interval=0.02) as backend:
        backend.start()
        run_tasks(backend, "warm", 100)
        fds, threads = open_fds(), threading.active_count()
        run_tasks(backend, "more", 300)
        wait_for(lambda: threading.active_count() <= threads, 10, "runner threads to end")
        assert open_fds() <= fds + 4, f"{open_fds() - fds} descriptors more after 300 tasks"


def test_worker_holds_no_descriptor_per_message(
        make_settings: Callable[..., Settings]) -> None:
    """A whole worker handling 300 one-task messages (run to completion) ends with the
    descriptors and threads it had after the first 50."""
    w = RunningWorker(make_settings(
        consumer={"receive_wait": 0.2, "concurrency": 4}, local={"slots": 2},
        programs={"noop": {"command": "true {i}"}})).start()
    try:
        def send(first: int, n: int) -> None:
            for i in range(first, first + n):
                w.send({"handler": "sweep", "id": f"m{i}", "params": {
                    "program": "noop", "parameters": {"i": [i]}}})

        backend = w.app.backend
        assert isinstance(backend, LocalBackend)

        def all_run(n: int) -> bool:
            jobs = backend.list_jobs(1000)
            return len(jobs) == n and all(j.succeeded == 1 for j in jobs)

        send(0, 50)
        w.wait_until(lambda: all_run(50), 60, "50 messages run")
        fds = open_fds()
        send(50, 300)
        w.wait_until(lambda: all_run(350), 120, "350 messages run")
        assert open_fds() <= fds + 8, f"{open_fds() - fds} descriptors more"
    finally:
        w.stop()
