"""The whole worker (App + Consumer) on the Service Bus source, against the AMQP test peer.

The real consumer receives through the real ``azure-servicebus`` aio SDK from
tests/fakes/servicebus_peer.py; tasks go to an in-memory backend.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from handlers.base import BlobRef
from tests.fakes.servicebus_peer import ServiceBusPeer
from tests.worker.doubles import MemoryBackend
from tests.worker.harness import RunningWorker
from tests.worker.sources.test_servicebus import CLIENT_OPTIONS, QUEUE, sdk_dead_letters
from worker.config import Settings
from worker.sources.servicebus import ServiceBusSource
from worker.storage.local import LocalStorage

SAMPLES = Path(__file__).resolve().parents[2] / "handlers" / "samples"
SWEEP = {"handler": "sweep", "params": {"program": "pi", "parameters": {
    "samples": [100], "seed": {"start": 0, "stop": 20}}}}
EVENT_GRID_PROPERTIES = {"aeg-event-type": "Notification", "aeg-subscription-name": "BLOBS",
                         "aeg-delivery-count": "0", "aeg-data-version": "",
                         "aeg-metadata-version": "1"}

@pytest.fixture
def sb_worker(make_settings: Callable[..., Settings]
              ) -> Iterator[Callable[..., tuple[RunningWorker, ServiceBusPeer]]]:
    """Start a peer and a worker reading its queue ``jobs``; stop both after the test."""
    running: list[tuple[RunningWorker, ServiceBusPeer]] = []

    def start(*, lock: float = 1.0, backend: MemoryBackend | None = None,
              peer_options: dict[str, Any] | None = None,
              **overrides: Any) -> tuple[RunningWorker, ServiceBusPeer]:
        peer = ServiceBusPeer(queues=[QUEUE], lock_duration=lock,
                              **(peer_options or {})).start()
        settings = make_settings(
            servicebus={"connection_string": peer.connection_string, "queue": QUEUE},
            queue={"lock_duration": lock, "poll_interval": 0.2},
            consumer={"receive_wait": 0.5, "drain_grace": 1.0, **overrides.pop("consumer", {})},
            submit={"backoff_base": 0.001, "backoff_max": 0.01, **overrides.pop("submit", {})},
            **overrides)
        source = ServiceBusSource.from_config(
            settings.servicebus, settings.queue, client_options=CLIENT_OPTIONS,
            emulator_admin_port=peer.admin_port or 0, backoff_base=0.05, backoff_max=0.5)
        worker = RunningWorker(settings, backend=backend or MemoryBackend(), source=source)
        running.append((worker.start(), peer))
        return worker, peer

    yield start
    for worker, peer in running:
        if worker.thread.is_alive():
            worker.stop()
        peer.stop()


def memory(worker: RunningWorker) -> MemoryBackend:
    backend = worker.app.backend
    assert isinstance(backend, MemoryBackend)
    return backend


def event_grid_body(url: str) -> bytes:
    """The Event Grid sample blob-created event, pointing at ``url``."""
    event = json.loads((SAMPLES / "eventgrid-blobcreated.json").read_text())
    event = copy.deepcopy(event)
    event["data"]["url"] = url
    return json.dumps(event).encode()


def test_sweep_completes_bad_message_is_dead_lettered_and_depth_is_exported(
        sb_worker: Callable[..., tuple[RunningWorker, ServiceBusPeer]]) -> None:
    """A sweep becomes one job; a body that is not JSON lands in the DLQ with its reason;
    /metrics' queue depth shows the dead letter."""
    worker, peer = sb_worker()
    worker.send(SWEEP, message_id="sweep-1")
    worker.send(b"not json", message_id="bad-1")
    worker.wait_idle(2)
    (job_id,) = memory(worker).jobs
    assert len(memory(worker).tasks[job_id]) == 20
    worker.wait_until(lambda: worker.sample(
        "fanout_queue_messages", {"queue": QUEUE, "state": "dead_letter"}) == 1,
        what="dead-letter depth exported")
    assert worker.sample("fanout_queue_messages", {"queue": QUEUE, "state": "active"}) == 0
    worker.stop()
    [(message_id, reason, description, body)] = sdk_dead_letters(peer)
    assert (message_id, reason, body) == ("bad-1", "InvalidJson", b"not json")
    assert description


def test_event_grid_blob_created_is_routed_once_across_redeliveries(
        sb_worker: Callable[..., tuple[RunningWorker, ServiceBusPeer]]) -> None:
    """An Event Grid blob-created message (aeg-* properties, stable message id) becomes a
    transcode job; Event Grid delivering it again makes no second job; an event for a
    foreign storage account is dead-lettered as ForeignStorage."""
    worker, peer = sb_worker(routes=[{"handler": "transcode", "container": "videos",
                                      "suffix": ".mp4",
                                      "params": {"output": {"container": "renditions"}}}])
    storage = worker.app.storage
    assert isinstance(storage, LocalStorage)
    url = storage.input_url(BlobRef("videos", "2026/11/launch-keynote.mp4"))
    event_id = "7d1c8a2e-301e-0062-1e2b-4c1f2d06f3a1"
    for attempt in range(2):
        peer.put(QUEUE, event_grid_body(url), message_id=event_id,
                 properties={**EVENT_GRID_PROPERTIES, "aeg-delivery-count": str(attempt)})
    foreign = "https://stmedia01.blob.core.windows.net/videos/2026/11/launch-keynote.mp4"
    peer.put(QUEUE, event_grid_body(foreign), message_id="foreign-1",
             properties=EVENT_GRID_PROPERTIES)
    worker.wait_idle(3)
    worker.stop()
    assert len(memory(worker).jobs) == 1
    assert [(d[0], d[1]) for d in sdk_dead_letters(peer)] == [("foreign-1", "ForeignStorage")]
    assert peer.counts(QUEUE)["active"] == 0


def test_lock_is_renewed_through_three_lock_durations(
        sb_worker: Callable[..., tuple[RunningWorker, ServiceBusPeer]]) -> None:
    """Work lasting over 3x the service's lock duration completes once, never redelivered."""
    backend = MemoryBackend(create_delay=3.5)
    worker, peer = sb_worker(backend=backend, consumer={"concurrency": 2})
    worker.send(SWEEP, message_id="slow-1")
    worker.wait_idle(1, timeout=30)
    assert worker.sample("fanout_messages_total",
                         {"handler": "sweep", "outcome": "completed"}) == 1
    assert worker.sample("fanout_lock_lost_total") == 0
    assert peer.counts(QUEUE) == {"active": 0, "locked": 0, "deferred": 0, "dead_letter": 0}


def test_worker_survives_the_service_dropping_connections(
        sb_worker: Callable[..., tuple[RunningWorker, ServiceBusPeer]]) -> None:
    """After the peer drops every connection the worker reconnects and keeps consuming."""
    worker, peer = sb_worker()
    worker.send(SWEEP, message_id="before")
    worker.wait_idle(1)
    opened = peer.connections_opened
    peer.drop_connections()
    peer.put(QUEUE, json.dumps(SWEEP).encode(), message_id="after")
    worker.wait_until(lambda: peer.counts(QUEUE)["active"] == 0 and len(
        memory(worker).jobs) == 2, timeout=30, what="the message after the drop")
    assert peer.connections_opened > opened
    assert worker.app.health.ready


def test_graceful_shutdown_abandons_in_flight_messages(
        sb_worker: Callable[..., tuple[RunningWorker, ServiceBusPeer]]) -> None:
    """Stopping mid-submission abandons the message: back on the queue at once, delivery
    count + 1, long before its (30 s) lock would have expired."""
    backend = MemoryBackend(add_delay=0.3)
    big = {"handler": "sweep", "params": {"program": "pi", "parameters": {
        "samples": [1], "seed": {"start": 0, "stop": 5000}}}}
    worker, peer = sb_worker(lock=30.0, backend=backend, submit={"concurrency": 1})
    worker.send(big, message_id="big-1")
    worker.wait_until(lambda: backend.add_calls > 0, what="submission started")
    worker.stop()
    [message] = peer.messages(QUEUE)
    assert (message.message_id, message.state, message.delivery_count) == ("big-1", "active", 1)


def test_a_message_held_past_the_link_idle_timeout_is_not_counted_completed(
        sb_worker: Callable[..., tuple[RunningWorker, ServiceBusPeer]]) -> None:
    """Submission outlasts the link idle timeout (scaled down to 1 s): the service
    detaches the link, the complete fails and is counted as a settle failure (never as
    completed); the redelivery finds the job sealed and completes once."""
    backend = MemoryBackend(add_delay=2.5)  # one add-tasks call; none on the redelivery
    worker, peer = sb_worker(backend=backend, lock=2.0, consumer={"concurrency": 1},
                             peer_options={"link_idle_timeout": 1.0})
    worker.send(SWEEP, message_id="slow-1")
    worker.wait_until(lambda: peer.counts(QUEUE) == {
        "active": 0, "locked": 0, "deferred": 0, "dead_letter": 0}, timeout=60,
        what="the message settled")
    assert peer.idle_detaches >= 1
    assert worker.sample("fanout_settle_failures_total",
                         {"action": "complete", "why": "lock_lost"}) >= 1
    assert worker.sample("fanout_messages_total",
                         {"handler": "sweep", "outcome": "completed"}) == 1
    assert len(memory(worker).jobs) == 1 and backend.add_calls == 1
