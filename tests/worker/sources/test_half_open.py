"""Silent half-open connections: the Service Bus source and the whole worker survive them.

The real ``azure-servicebus`` aio SDK talks to the AMQP test peer through
tests/fakes/blackhole.py, a TCP proxy whose ``swallow()`` keeps a connection open on
both sides while dropping every byte (no reset, no FIN, no answer). Timeouts are
scaled down (``operation_timeout`` and ``open_timeout`` of 1 s) so every bound is
reached within seconds; the assertions poll with generous limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from pydantic import SecretStr

from tests.fakes.blackhole import BlackHole
from tests.fakes.servicebus_peer import ServiceBusPeer
from tests.worker.doubles import MemoryBackend
from tests.worker.harness import RunningWorker
from tests.worker.sources.test_servicebus import CLIENT_OPTIONS, QUEUE, run
from worker.config import QueueConfig, ServiceBusConfig, Settings
from worker.errors import SystemFault
from worker.sources.base import Received
from worker.sources.servicebus import ServiceBusSource

#: The source's scaled-down bounds (seconds).
OPERATION_TIMEOUT = 1.0
OPEN_TIMEOUT = 1.0
WAIT = 0.5
LOCK = 2.0  # the peer's lock duration in the source tests
#: The most one receive may take: its wait, the operation bound, a reconnect (open),
#: closing the dropped receiver (another operation bound), and generous slack.
RECEIVE_BOUND = WAIT + 2 * OPERATION_TIMEOUT + OPEN_TIMEOUT + 3.0
SWEEP = {"handler": "sweep", "params": {"program": "pi", "parameters": {
    "samples": [100], "seed": {"start": 0, "stop": 4}}}}
EMPTY = {"active": 0, "locked": 0, "deferred": 0, "dead_letter": 0}


def via(hole: BlackHole, peer: ServiceBusPeer) -> str:
    """The peer's connection string, pointed at the proxy."""
    cs = peer.connection_string.replace(f"127.0.0.1:{peer.port};", f"127.0.0.1:{hole.port};")
    assert f":{hole.port};" in cs
    return cs


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


@pytest.fixture
def peer_and_hole() -> Iterator[tuple[ServiceBusPeer, BlackHole]]:
    # Short locks: the old link still has credit, so the peer may lock a message
    # onto it (into the void); that lock lapses and the message comes back.
    peer = ServiceBusPeer(queues=[QUEUE], lock_duration=LOCK).start()
    hole = BlackHole(peer.port, lifetime=60).start()
    yield peer, hole
    hole.stop()
    peer.stop()
    assert not hole.running


@contextlib.asynccontextmanager
async def proxied_source(peer: ServiceBusPeer, hole: BlackHole
                         ) -> AsyncIterator[ServiceBusSource]:
    config = ServiceBusConfig(connection_string=SecretStr(via(hole, peer)), queue=QUEUE)
    source = ServiceBusSource.from_config(
        config, QueueConfig(name=QUEUE, lock_duration=LOCK), client_options=CLIENT_OPTIONS,
        emulator_admin_port=peer.admin_port or 0, backoff_base=0.05, backoff_max=0.2,
        operation_timeout=OPERATION_TIMEOUT, open_timeout=OPEN_TIMEOUT)
    try:
        yield source
    finally:
        await source.close()


async def timed_receive(source: ServiceBusSource) -> tuple[list[Received] | None, float]:
    """One receive: (messages, or None when it raised SystemFault; seconds taken)."""
    started = time.monotonic()
    try:
        got: list[Received] | None = await source.receive(1, WAIT)
    except SystemFault:
        got = None
    return got, time.monotonic() - started


# --------------------------------------------------------------------------- the source


def test_receive_on_a_swallowed_connection_reconnects_and_gets_the_message(
        peer_and_hole: tuple[ServiceBusPeer, BlackHole]) -> None:
    """The old connection goes silent, new ones work: no receive outlasts its bound,
    the silent link is detected (a SystemFault) and dropped, and the message sent
    meanwhile arrives on a new connection. (The SDK itself returns an empty receive
    on the dead link for ever, so without the source's check this never arrives.)"""
    peer, hole = peer_and_hole

    async def scenario() -> tuple[list[tuple[list[Received] | None, float]], Received]:
        async with proxied_source(peer, hole) as source:
            assert await source.receive(1, WAIT) == []  # the link is open
            (old,) = hole.connections()
            hole.swallow()
            peer.put(QUEUE, b"sent meanwhile", message_id="m-1")
            calls: list[tuple[list[Received] | None, float]] = []
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                got, took = await timed_receive(source)
                calls.append((got, took))
                if got:
                    for _ in range(40):  # the proxy sees the close within a tick
                        if old not in hole.connections():
                            break
                        await asyncio.sleep(0.05)
                    assert old not in hole.connections(), "the silent link was kept"
                    (msg,) = got
                    await source.complete(msg)
                    return calls, msg
            raise AssertionError(f"no message within 20 s; receives: {calls}")

    calls, msg = run(scenario())
    assert msg.message_id == "m-1" and msg.body == b"sent meanwhile"
    assert all(took < RECEIVE_BOUND for _, took in calls), calls
    assert any(got is None for got, _ in calls), f"the silent link was never failed: {calls}"
    assert hole.accepted >= 2 and hole.swallowed_bytes > 0
    assert peer.counts(QUEUE) == EMPTY


def test_receive_while_every_connection_is_swallowed_then_restored(
        peer_and_hole: tuple[ServiceBusPeer, BlackHole]) -> None:
    """While new connections are black-holed too, every receive fails within its bound
    (the reconnect's open times out) and nothing is received; after restore() the
    source reconnects and receives the message."""
    peer, hole = peer_and_hole

    async def scenario() -> tuple[list[tuple[list[Received] | None, float]], Received]:
        async with proxied_source(peer, hole) as source:
            assert await source.receive(1, WAIT) == []
            hole.swallow(new=True)
            peer.put(QUEUE, b"x", message_id="m-2")
            dark = [await timed_receive(source) for _ in range(3)]
            assert all(got is None or got == [] for got, _ in dark), dark
            assert sum(got is None for got, _ in dark) >= 2, dark
            assert hole.accepted >= 2  # it did try new connections
            hole.restore()
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                got, took = await timed_receive(source)
                dark.append((got, took))
                if got:
                    await source.complete(got[0])
                    return dark, got[0]
            raise AssertionError(f"no message after restore(): {dark}")

    calls, msg = run(scenario())
    assert msg.message_id == "m-2"
    assert all(took < RECEIVE_BOUND for _, took in calls), calls
    assert peer.counts(QUEUE) == EMPTY


# --------------------------------------------------------------------------- the worker


@pytest.fixture
def proxied_worker(make_settings: Callable[..., Settings]
                   ) -> Iterator[Callable[..., tuple[RunningWorker, ServiceBusPeer, BlackHole]]]:
    """A peer, a proxy to it and a worker reading ``jobs`` through the proxy."""
    running: list[tuple[RunningWorker, ServiceBusPeer, BlackHole]] = []

    def start(*, lock: float, backend: MemoryBackend, consumer: dict[str, Any]
              ) -> tuple[RunningWorker, ServiceBusPeer, BlackHole]:
        peer = ServiceBusPeer(queues=[QUEUE], lock_duration=lock).start()
        hole = BlackHole(peer.port, lifetime=60).start()
        settings = make_settings(
            servicebus={"connection_string": via(hole, peer), "queue": QUEUE},
            queue={"lock_duration": lock, "poll_interval": 0.5},
            consumer={"receive_wait": WAIT, "drain_grace": 1.0, **consumer},
            submit={"backoff_base": 0.001, "backoff_max": 0.01})
        source = ServiceBusSource.from_config(
            settings.servicebus, settings.queue, client_options=CLIENT_OPTIONS,
            emulator_admin_port=peer.admin_port or 0, backoff_base=0.05, backoff_max=0.2,
            operation_timeout=OPERATION_TIMEOUT, open_timeout=OPEN_TIMEOUT)
        worker = RunningWorker(settings, backend=backend, source=source)
        running.append((worker.start(), peer, hole))
        return worker, peer, hole

    yield start
    for worker, peer, hole in running:
        if worker.thread.is_alive():
            worker.stop()
        hole.stop()
        peer.stop()
        assert not hole.running


def test_a_complete_on_a_swallowed_connection_is_a_settle_failure_then_redelivered(
        proxied_worker: Callable[..., tuple[RunningWorker, ServiceBusPeer, BlackHole]]
) -> None:
    """The connection goes silent while the message is being processed: the complete
    fails within its bound, is counted in fanout_settle_failures_total (never as
    completed), the lock lapses, and the redelivery completes on a new connection
    without a second job."""
    backend = MemoryBackend(create_delay=1.5)  # processing outlasts the swallow()
    worker, peer, hole = proxied_worker(lock=5.0, backend=backend,
                                        consumer={"concurrency": 1})
    completed = {"handler": "sweep", "outcome": "completed"}
    failed = {"action": "complete", "why": "error"}
    wait_until(lambda: worker.app.health.ready, 15, "the worker ready")
    peer.put(QUEUE, json.dumps(SWEEP).encode(), message_id="job-1")
    wait_until(lambda: peer.counts(QUEUE)["locked"] == 1, 10, "the message locked")
    # locked on the peer is not yet received: the transfer may still be on its way
    # through the proxy, and swallowed with it; wait until the worker processes it
    wait_until(lambda: worker.sample("fanout_inflight_messages") == 1, 10,
               "the message in processing")
    accepted = hole.accepted
    hole.swallow()  # every connection open now; new ones get through
    swallowed_at = time.monotonic()
    # create_delay + the operation bound + closing the receiver, and slack; an
    # unbounded complete would only end at the consumer's 60 s SETTLE_TIMEOUT.
    wait_until(lambda: worker.sample("fanout_settle_failures_total", failed) >= 1,
               1.5 + 2 * OPERATION_TIMEOUT + 6, "the complete to fail")
    assert time.monotonic() - swallowed_at < 1.5 + 2 * OPERATION_TIMEOUT + 6
    assert worker.sample("fanout_messages_total", completed) == 0
    assert peer.counts(QUEUE)["locked"] + peer.counts(QUEUE)["active"] == 1
    [message] = peer.messages(QUEUE)
    assert message.delivery_count == 0  # not redelivered yet: the lock still holds
    wait_until(lambda: peer.counts(QUEUE) == EMPTY, 20, "the redelivery completed")
    assert worker.sample("fanout_messages_total", completed) == 1
    assert worker.sample("fanout_settle_failures_total", failed) == 1
    assert worker.sample("fanout_settle_failures_total",
                         {"action": "complete", "why": "lock_lost"}) == 0
    assert hole.accepted > accepted  # the redelivery came over a new connection
    assert len(backend.jobs) == 1 and backend.add_calls == 1  # the redelivery added nothing


def _healthz(worker: RunningWorker) -> tuple[int, str]:
    url = f"http://127.0.0.1:{worker.app.metrics_port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_healthz_reports_the_loop_on_a_silent_connection_until_it_reconnects(
        proxied_worker: Callable[..., tuple[RunningWorker, ServiceBusPeer, BlackHole]]
) -> None:
    """Two receive loops; one loop's connection goes silent. That loop's receive hangs
    up to its bound (longer than the 1 s heartbeat timeout), so /healthz answers 503
    naming it while the other loop keeps consuming; the loop then reconnects within
    the bound and /healthz is 200 again, with both loops receiving."""
    backend = MemoryBackend()
    worker, peer, hole = proxied_worker(lock=5.0, backend=backend, consumer={
        "concurrency": 2, "heartbeat_timeout": 1.0})
    health = worker.app.health
    # Steady: both loops' receivers open and receiving (the same two connections
    # for 1.5 s, three receive waits), so the swallow() hits an open link, not an open.
    steady: list[tuple[float, list[int]]] = []

    def settled() -> bool:
        now, conns = time.monotonic(), hole.connections()
        if not (health.ready and len(conns) == 2) or (steady and steady[0][1] != conns):
            steady.clear()
        if health.ready and len(conns) == 2 and not steady:
            steady.append((now, conns))
        return bool(steady) and now - steady[0][0] >= 1.5

    wait_until(settled, 15, "the worker ready with one connection per loop")
    assert _healthz(worker)[0] == 200
    stuck_seen: list[str] = []

    def stuck() -> bool:
        status, text = _healthz(worker)
        if status == 503:
            stuck_seen.append(text)
        return status == 503

    first, _ = hole.connections()
    hole.swallow([first])
    assert hole.live() and first not in hole.live()
    wait_until(stuck, 10, "/healthz to report a stuck loop")
    assert stuck_seen[0].startswith("stuck: oldest beat (receive-"), stuck_seen
    # The other loop still works meanwhile.
    peer.put(QUEUE, json.dumps(SWEEP).encode(), message_id="during")
    wait_until(lambda: worker.sample("fanout_messages_total",
                                     {"handler": "sweep", "outcome": "completed"}) == 1,
               10, "the healthy loop to handle a message")
    # The stuck loop's receive is bounded: it reconnects and health recovers.
    wait_until(lambda: first not in hole.connections(), RECEIVE_BOUND + 5,
               "the silent connection to be dropped")
    wait_until(lambda: _healthz(worker)[0] == 200 and health.alive, 15,
               "/healthz to recover")
    wait_until(lambda: len(hole.live()) >= 2, 10, "a new connection for the stuck loop")
    for i in range(4):
        peer.put(QUEUE, json.dumps(SWEEP).encode(), message_id=f"after-{i}")
    wait_until(lambda: peer.counts(QUEUE) == EMPTY and len(backend.jobs) == 5, 20,
               "the messages after recovery")
    assert _healthz(worker)[0] == 200
