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
    """A whole worker handling 300 one-task messages (run to completion and reported)
    and then 300 more holds no more descriptors after the second 300 than after the
    first. The first batch is the warm-up: thread pools grow to their size and each
    thread opens its SQLite connection once (two descriptors: the database and its
    WAL), and the event sink opens its database on the first report; none of that
    grows with the work done, which is what the second batch checks (a leak of one
    descriptor in fifty messages shows as 6 beyond what new pool threads explain)."""
    w = RunningWorker(make_settings(
        consumer={"receive_wait": 0.2, "concurrency": 4}, local={"slots": 2},
        programs={"noop": {"command": "true {i}"}})).start()
    try:
        backend = w.app.backend
        assert isinstance(backend, LocalBackend)
        assert w.app.monitor is not None and w.app.monitor.sink is not None
        sink = w.app.monitor.sink

        def run(first: int, n: int) -> tuple[int, int]:
            for i in range(first, first + n):
                w.send({"handler": "sweep", "id": f"m{i}", "params": {
                    "program": "noop", "parameters": {"i": [i]}}})
            total = first + n

            def all_run() -> bool:
                jobs = backend.list_jobs(1000)
                return (len(jobs) == total and all(j.succeeded == 1 for j in jobs)
                        and len(w.call(sink.peek(10_000))) == total)
            w.wait_until(all_run, 120, f"{total} messages run and reported")
            return open_fds(), threading.active_count()

        run(0, 50)
        fds, threads = run(50, 300)
        more_fds, more_threads = run(350, 300)
        # Thread pools (asyncio's default executor, the submitter's) start threads
        # only when none is idle, so a pool may still reach its size in the second
        # batch; a thread leak would add hundreds.
        new_threads = more_threads - threads
        assert new_threads <= 4, f"{new_threads} threads more after 300 messages"
        # Each new pool thread may open its own connection to the executor's and the
        # event sink's databases (two descriptors each: the file and its WAL).
        allowed = 4 + 4 * max(new_threads, 0)
        assert more_fds <= fds + allowed, (
            f"{more_fds - fds} descriptors more after 300 messages "
            f"({new_threads} new threads allow {allowed})")
    finally:
        w.stop()
