"""SIGKILL at seeded points while a real daemon submits a 10,000-task sweep, then restart:
exactly 10,000 tasks, none twice, the message completed once (local executor and Batch).

Each seed picks one or two kill points (a number of tasks already in the backend);
the test polls the backend's state and kills the daemon as soon as it passes the
point, restarts it, and repeats. The queue's short lock brings the message back fast.
"""

from __future__ import annotations

import random
import sqlite3
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.batch_peer import BatchPeer, FaultPlan
from worker.context import job_id_for

from .conftest import batch_config
from .daemon import Daemon, wait_for

TASKS = 10_000
SEEDS = (7, 19, 42)

pytestmark = pytest.mark.slow


def kill_points(seed: int) -> list[int]:
    """One or two increasing task counts at which to kill the daemon."""
    rng = random.Random(seed)
    points = sorted(rng.randint(TASKS // 20, TASKS * 9 // 10) for _ in range(rng.choice((1, 2))))
    return points


def sweep(key: str) -> dict[str, Any]:
    return {"handler": "sweep", "id": key, "params": {
        "program": "hold", "parameters": {"i": {"start": 0, "stop": TASKS}}}}


def base_config() -> dict[str, Any]:
    return {
        "queue": {"lock_duration": 1.0},
        "consumer": {"receive_wait": 0.2, "drain_grace": 5.0},
        "local": {"slots": 2, "poll_interval": 0.05},
        # tasks hold their slots without using CPU
        "programs": {"hold": {"command": "sleep 600 {i}"}},
    }


def local_task_count(home: Path) -> int:
    """Tasks in the local executor's store, read without the executor's classes
    (cheap enough to poll every few milliseconds)."""
    path = home / "executor.db"
    if not path.exists():
        return 0
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            return int(db.execute("SELECT count(*) FROM tasks").fetchone()[0])
        finally:
            db.close()
    except sqlite3.OperationalError:  # the schema is being created
        return 0


def crash_and_restart(d: Daemon, points: list[int], count: Callable[[], int]) -> list[int]:
    """Kill the daemon each time ``count()`` reaches a point; return what was in."""
    partials = []
    for point in points:
        def reached(p: int = point) -> bool:
            return count() >= p

        wait_for(reached, 60, f"{point} tasks", interval=0.002)
        d.kill()
        partials.append(count())
        d.start().wait_started()
    return partials


def finish(d: Daemon, done: Callable[[], bool]) -> None:
    """Wait for the message to settle, check the final run's metrics, stop cleanly."""
    wait_for(lambda: done() and d.depth() == {"active": 0, "dead_letter": 0,
                                              "scheduled": 0}, 120, "the message to settle")
    completed = [e for e in d.events() if e.get("event") == "message.completed"]
    assert len(completed) == 1, "the message was completed more (or less) than once"
    assert not [e for e in d.events() if e.get("event") == "message.dead_lettered"]
    assert d.metric("fanout_messages_total", {"handler": "sweep",
                                              "outcome": "dead_lettered"}) == 0
    assert d.stop(60) == 0


def assert_each_value_once(values: list[str]) -> None:
    counts = Counter(values)
    twice = [v for v, n in counts.items() if n > 1]
    assert not twice, f"tasks submitted twice: {twice[:10]}"
    assert set(counts) == {str(i) for i in range(TASKS)}


@pytest.mark.parametrize("seed", SEEDS)
def test_sigkill_local_executor(seed: int, daemon: Callable[..., Daemon]) -> None:
    """The local executor ends with one job of exactly 10,000 distinct tasks."""
    d = daemon(base_config(), name=f"local{seed}").start()
    d.wait_started()
    d.send(sweep(f"crash-{seed}"))
    partials = crash_and_restart(d, kill_points(seed), lambda: local_task_count(d.home))
    assert partials[0] < TASKS, "the first kill came after the submission ended"
    finish(d, lambda: sum(d.local_counts().values()) >= TASKS)

    counts = d.local_counts()
    assert counts == {job_id_for("sweep", f"crash-{seed}"): TASKS}
    (job_id,) = counts
    tasks = d.local_tasks(job_id)
    assert len(tasks) == TASKS
    assert_each_value_once([t.id for t in tasks])
    # each task runs its own point of the sweep: the id and the parameter agree
    assert all(t.command_line.endswith(f"sleep 600 {t.id}'") for t in tasks), \
        [t.command_line for t in tasks[:3]]


@pytest.mark.parametrize("seed", SEEDS)
def test_sigkill_batch_peer(seed: int, daemon: Callable[..., Daemon],
                            batch_peer: Callable[..., BatchPeer]) -> None:
    """Azure Batch (the peer over HTTP) ends with one sealed job of 10,000 distinct tasks."""
    # a little latency so the submission lasts long enough to be interrupted
    peer = batch_peer(FaultPlan(latency=0.01, seed=seed))
    d = daemon({**base_config(), "batch": batch_config(peer),
                "submit": {"concurrency": 4}}, name=f"batch{seed}").start()
    d.wait_started()
    d.send(sweep(f"crash-{seed}"))

    def count() -> int:
        return sum(len(j.tasks) for j in peer.jobs())

    partials = crash_and_restart(d, kill_points(seed), count)
    assert partials[0] < TASKS, "the first kill came after the submission ended"
    finish(d, lambda: count() >= TASKS)

    (job,) = peer.jobs()
    assert job.id == job_id_for("sweep", f"crash-{seed}")
    assert job.on_all_tasks_complete == "terminatejob", "the job was never sealed"
    bodies = peer.tasks(job.id)
    assert len(bodies) == TASKS
    assert_each_value_once([str(b["id"]) for b in bodies])
    env = [{e["name"]: e["value"] for e in b["environmentSettings"]} for b in bodies]
    assert_each_value_once([e["FANOUT_PARAM_I"] for e in env])
    assert all(e["FANOUT_PARAM_I"] == str(b["id"]) for e, b in zip(env, bodies, strict=True))
    # a redelivery re-sends tasks; the peer answered TaskExists, which counts as done
    assert peer.task_outcomes["added"] == TASKS
