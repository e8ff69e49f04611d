"""Fixtures for the reliability tests: real daemons, the Batch peer, hypothesis profiles."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from tests.fakes.batch_peer import BatchPeer, FaultPlan
from tests.worker.harness import RunningWorker
from worker.config import Settings

from .daemon import Daemon

#: A configured program that writes its one argument, and the same value as the task
#: sees it in its environment, to files in its working directory, byte for byte.
ECHO = 'printf %s {value} > value.txt && printf %s "$FANOUT_PARAM_VALUE" > env.txt'
#: Stands in for ffmpeg: writes its arguments, NUL-separated, to its last argument
#: (the output file), which the executor then uploads to the output container.
FAKE_FFMPEG = """\
import sys
from pathlib import Path

args = sys.argv[1:]
Path(args[-1]).write_bytes(b"\\0".join(a.encode("utf-8", "surrogateescape") for a in args))
"""

# Bounded and derandomized: the same examples on every run, so CI cannot flake on a
# newly found case. The fuzz tests use the profile named by HYPOTHESIS_PROFILE
# (default "fanout-ci"); "fanout-explore" searches further, by hand.
settings.register_profile(
    "fanout-ci", max_examples=200, derandomize=True, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("fanout-explore", max_examples=5000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Make daemons (not started) under tmp_path; kill what is left at teardown."""
    made: list[Daemon] = []

    def make(config: dict[str, Any], name: str = "d") -> Daemon:
        root = tmp_path / f"{name}{len(made)}"
        root.mkdir()
        d = Daemon(root, config)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


@pytest.fixture
def batch_peer() -> Iterator[Callable[..., BatchPeer]]:
    """Start Batch peers with a ``fanout`` pool; stop them at teardown."""
    started: list[BatchPeer] = []

    def start(faults: FaultPlan | None = None, **kw: Any) -> BatchPeer:
        peer = BatchPeer(faults=faults, **kw).start()
        peer.add_pool("fanout", dedicated={"idle": 2})
        started.append(peer)
        return peer

    yield start
    for peer in started:
        peer.stop()


def batch_config(peer: BatchPeer) -> dict[str, Any]:
    """``[batch]`` settings that point fanout at ``peer`` with its shared key."""
    return {"account_url": peer.url, "account_name": peer.account,
            "account_key": peer.key, "pool": "fanout", "poll_interval": 3600.0}


def hostile_config(tmp_path: Path) -> dict[str, Any]:
    """Settings overrides shared by the poison, injection and secrets tests: programs
    that echo their arguments, tight limits, transcode with a fake ffmpeg, one route."""
    ffmpeg = tmp_path / "fake_ffmpeg.py"
    ffmpeg.write_text(FAKE_FFMPEG)
    return {
        "programs": {"echo": {"command": ECHO},
                     "pair": {"command": "printf '%s|%s' {a} {b} > value.txt"}},
        "limits": {"max_tasks_per_message": 1000, "max_priority": 100, "min_priority": -100,
                   "max_task_retries": 3, "max_wall_clock": "P1D",
                   "allowed_pools": ["local"]},
        "queue": {"max_message_bytes": 65536},
        "consumer": {"concurrency": 4, "receive_wait": 0.2},
        "local": {"slots": 2, "poll_interval": 0.05},
        "handlers": {"transcode": {"output_container": "renditions",
                                   "ffmpeg": f"{sys.executable} {ffmpeg}"},
                     "render": {"output_container": "renders"}},
        "routes": [{"handler": "transcode", "container": "videos", "suffix": [".mp4"]}],
    }


@pytest.fixture
def hostile_worker(make_settings: Callable[..., Settings],
                   tmp_path: Path) -> Iterator[Callable[..., RunningWorker]]:
    """Start in-process workers on the local queue and executor with
    ``hostile_config``; stop them at teardown."""
    started: list[RunningWorker] = []

    def start(**overrides: Any) -> RunningWorker:
        config = hostile_config(tmp_path)
        for key, value in overrides.items():
            config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) \
                else value
        w = RunningWorker(make_settings(**config)).start()
        started.append(w)
        return w

    yield start
    for w in started:
        if w.thread.is_alive():
            w.stop()
