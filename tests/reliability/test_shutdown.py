"""SIGTERM on a real daemon: during a long submission it drains (or, past the grace
period, abandons) and exits; when idle it exits at once; a second signal exits at
once. Nothing is lost either way: the message is completed, or still on the queue and
completed exactly once after a restart.

Exit times are checked only against generous upper bounds (the grace period plus ten
seconds, or well under the grace), never against expected durations.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.fakes.batch_peer import BatchPeer, FaultPlan

from .conftest import batch_config
from .daemon import Daemon, wait_for

#: Slack on top of the grace period for interrupting, abandoning and closing.
MARGIN = 10.0


def sweep(key: str, n: int) -> dict[str, Any]:
    return {"handler": "sweep", "id": key, "params": {
        "program": "echo", "parameters": {"i": {"start": 0, "stop": n}}}}


def config(peer: BatchPeer, grace: float) -> dict[str, Any]:
    return {"queue": {"lock_duration": 2.0},
            "consumer": {"receive_wait": 0.2, "drain_grace": grace},
            "submit": {"concurrency": 1},
            "batch": batch_config(peer),
            "programs": {"echo": {"command": "echo {i}"}}}


def tasks_in(peer: BatchPeer) -> int:
    return sum(len(j.tasks) for j in peer.jobs())


def terminate(d: Daemon, sig: signal.Signals = signal.SIGTERM) -> float:
    """Send ``sig``; return the seconds until the process has exited."""
    sent = time.monotonic()
    d.signal(sig)
    d.wait(120)
    return time.monotonic() - sent


def events(d: Daemon, name: str) -> list[dict[str, Any]]:
    return [e for e in d.events() if e.get("event") == name]


@pytest.mark.slow
def test_sigterm_mid_submission_drains_within_the_grace(
        daemon: Callable[..., Daemon], batch_peer: Callable[..., BatchPeer]) -> None:
    """A submission that can finish within the grace period does: the message is
    completed and the daemon exits 0."""
    grace = 20.0
    peer = batch_peer(FaultPlan(latency=0.05))
    d = daemon(config(peer, grace)).start()
    d.wait_started()
    d.send(sweep("drains", 2000))
    wait_for(lambda: tasks_in(peer) > 0, 30, "the submission to start")
    took = terminate(d)
    assert d.proc is not None and d.proc.returncode == 0
    assert took < grace + MARGIN
    assert tasks_in(peer) == 2000
    assert len(events(d, "message.completed")) == 1
    assert d.depth() == {"active": 0, "dead_letter": 0, "scheduled": 0}


@pytest.mark.slow
def test_sigterm_mid_submission_abandons_past_the_grace(
        daemon: Callable[..., Daemon], batch_peer: Callable[..., BatchPeer]) -> None:
    """A submission longer than the grace period is interrupted and its message
    abandoned; the daemon exits 0, and a restart completes it with no task twice."""
    grace = 2.0
    peer = batch_peer(FaultPlan(latency=0.2))
    d = daemon(config(peer, grace)).start()
    d.wait_started()
    d.send(sweep("abandons", 10_000))
    wait_for(lambda: tasks_in(peer) > 0, 30, "the submission to start")
    took = terminate(d)
    assert d.proc is not None and d.proc.returncode == 0
    assert took < grace + MARGIN
    partial = tasks_in(peer)
    assert 0 < partial < 10_000, "the submission was not interrupted"
    assert len(events(d, "message.abandoned")) == 1
    assert d.depth()["active"] == 1, "the message was lost"

    peer.set_faults(FaultPlan())
    d.start().wait_started()
    wait_for(lambda: d.depth()["active"] == 0, 60, "the message to complete")
    assert d.stop() == 0
    (job,) = peer.jobs()
    assert sorted(int(t["id"]) for t in peer.tasks(job.id)) == list(range(10_000))
    assert job.on_all_tasks_complete == "terminatejob"
    assert len(events(d, "message.completed")) == 1
    assert d.dead_letters() == []


def test_sigterm_when_idle_exits_at_once(daemon: Callable[..., Daemon]) -> None:
    """An idle daemon (local queue and executor) exits 0 well within the grace period,
    leaving a message sent before the start behind it completed."""
    grace = 30.0
    d = daemon({"consumer": {"receive_wait": 5.0, "drain_grace": grace},
                "programs": {"echo": {"command": "echo {i}"}}}).start()
    d.send(sweep("before", 3))
    d.wait_started()
    wait_for(lambda: len(events(d, "message.completed")) == 1, 30, "the message")
    took = terminate(d)
    assert d.proc is not None and d.proc.returncode == 0
    assert took < grace / 3
    assert d.depth() == {"active": 0, "dead_letter": 0, "scheduled": 0}


@pytest.mark.slow
def test_second_sigterm_exits_at_once_and_loses_nothing(
        daemon: Callable[..., Daemon], batch_peer: Callable[..., BatchPeer]) -> None:
    """A second signal during the drain exits at once (status 128 + SIGTERM); the
    message's lock lapses and a restart completes it exactly."""
    grace = 60.0
    peer = batch_peer(FaultPlan(latency=0.2))
    d = daemon(config(peer, grace)).start()
    d.wait_started()
    d.send(sweep("twice", 5000))
    wait_for(lambda: tasks_in(peer) > 0, 30, "the submission to start")
    d.signal(signal.SIGTERM)
    wait_for(lambda: bool(events(d, "consumer.stopping")), 30, "the drain to start")
    took = terminate(d)
    assert d.proc is not None and d.proc.returncode == 128 + signal.SIGTERM
    assert took < grace / 3
    assert tasks_in(peer) < 5000, "the submission finished before the second signal"
    assert d.depth()["active"] == 1, "the message was lost"

    peer.set_faults(FaultPlan())
    d.start().wait_started()
    wait_for(lambda: d.depth()["active"] == 0, 60, "the message to complete")
    assert d.stop() == 0
    (job,) = peer.jobs()
    assert sorted(int(t["id"]) for t in peer.tasks(job.id)) == list(range(5000))
    assert d.dead_letters() == []
