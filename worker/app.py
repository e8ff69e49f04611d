"""Wiring: build the source, backend, storage, router and consumer from Settings,
and run the daemon with signal handling and the metrics port.

The Azure adapters are imported only when configured, so the embedded default
starts without touching the Azure SDKs.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client import CollectorRegistry

from handlers.base import BlobRef
from worker.admission import Admission
from worker.backends.base import Backend
from worker.config import Settings
from worker.consumer import Consumer, cancel_and_wait
from worker.errors import SettingsError
from worker.metrics import Health, Metrics, MetricsServer
from worker.plan import Planner
from worker.routing import HandlerRegistry, Router
from worker.sources.base import Source
from worker.storage.base import Storage
from worker.storage.refs import check_container, check_prefix, make_ref
from worker.submit import Submitter
from worker.tracing import Tracing
from worker.tracing import setup as setup_tracing

if TYPE_CHECKING:
    from worker.monitor import JobMonitor
    from worker.sinks.base import EventSink
    from worker.watch import Watcher

log = structlog.get_logger(__name__)


def make_storage(settings: Settings) -> Storage:
    """The configured blob store (a local directory by default). Refuses, with a
    ``SettingsError``, limits that no SAS could cover (:func:`check_limits`)."""
    check_limits(settings)
    if settings.storage_kind == "azure":
        from worker.storage.azure import AzureBlobStorage

        return AzureBlobStorage(config=settings.blob, max_lifetime=longest_sas_lifetime(settings))
    from worker.storage.local import LocalStorage

    return LocalStorage(root=settings.home / "blobs")


def longest_sas_lifetime(settings: Settings) -> timedelta:
    """The longest any job's SAS must live: ``limits.max_wall_clock`` (no job may ask
    for more) plus ``blob.sas_wait_allowance``."""
    return settings.limits.max_wall_clock + settings.blob.sas_wait_allowance


def check_limits(settings: Settings) -> None:
    """Start-up: the wall clock limits and the SAS lifetimes must agree.

    Every job's SAS lives its max wall clock plus ``blob.sas_wait_allowance``
    (``worker.context.sas_lifetime``), so a SAS never expires while its task waits or
    runs, provided that (1) the default ``jobs.max_wall_clock`` is within
    ``limits.max_wall_clock`` (a default over the limit would run jobs longer than any
    SAS), and (2) on Azure with user delegation signing, the longest lifetime fits the
    seven days a user delegation key may live. Otherwise ``SettingsError``, showing the
    arithmetic (durations only: never a key or a signature).
    """
    limits, jobs, blob = settings.limits, settings.jobs, settings.blob
    if jobs.max_wall_clock > limits.max_wall_clock:
        raise SettingsError(
            f"jobs.max_wall_clock {_iso(jobs.max_wall_clock)} is over "
            f"limits.max_wall_clock {_iso(limits.max_wall_clock)}: every job whose message "
            "sets no wall clock would run longer than the limit (and than its SAS); lower "
            "jobs.max_wall_clock or raise limits.max_wall_clock")
    if settings.storage_kind != "azure":
        return  # file URLs never expire
    from worker.storage.azure import longest_sas, sas_kind_of

    cap = longest_sas(sas_kind_of(blob))
    longest = longest_sas_lifetime(settings)
    if cap is not None and longest > cap:
        raise SettingsError(
            f"limits.max_wall_clock {_iso(limits.max_wall_clock)} + blob.sas_wait_allowance "
            f"{_iso(blob.sas_wait_allowance)} = {_iso(longest)}: the SAS of the longest job "
            f"would outlive what a user delegation SAS may ({_iso(cap)}: a user delegation "
            "key is valid at most 7 days, less a 10-minute margin); lower "
            "limits.max_wall_clock or blob.sas_wait_allowance, or sign with an account key "
            "(blob.account_key)")


def _iso(value: timedelta) -> str:
    """An ISO 8601 duration, as the settings take them (``P6DT1H``)."""
    seconds = int(value.total_seconds())
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = "".join(f"{n}{unit}" for n, unit in ((hours, "H"), (minutes, "M"), (secs, "S"))
                    if n)
    text = "P" + (f"{days}D" if days else "") + (f"T{clock}" if clock else "")
    return text if text != "P" else "PT0S"


def make_source(settings: Settings) -> Source:
    """The configured queue (the embedded SQLite queue by default)."""
    if settings.queue_kind == "servicebus":
        from worker.sources.servicebus import ServiceBusSource

        return ServiceBusSource.from_config(settings.servicebus, settings.queue)
    from worker.sources.local import LocalQueue

    settings.home.mkdir(parents=True, exist_ok=True)
    return LocalQueue(path=settings.home / "queue.db", name=settings.queue.name,
                      lock_duration=settings.queue.lock_duration,
                      max_delivery_count=settings.queue.max_delivery_count)


def make_backend(settings: Settings, storage: Storage) -> Backend:
    """The configured batch engine (the local executor by default)."""
    if settings.backend_kind == "azure":
        from worker.backends.azure import AzureBatchBackend

        return AzureBatchBackend.from_config(settings.batch, settings.submit, storage=storage,
                                             jobs=settings.jobs)
    from worker.backends.local import LocalBackend

    settings.home.mkdir(parents=True, exist_ok=True)
    return LocalBackend(home=settings.home, slots=settings.local.slot_count,
                        pool=settings.local.pool, poll_interval=settings.local.poll_interval,
                        storage=storage, retention=settings.jobs.retention.total_seconds(),
                        container_engine=settings.local.container_engine)


def make_sink(settings: Settings) -> EventSink | None:
    """Where completion events go: the configured Service Bus queue or topic, or the
    embedded events queue (``<home>/events.db``); None when events are disabled."""
    events = settings.events
    if not events.enabled or not (events.queue or events.topic):
        return None
    if settings.queue_kind == "servicebus":
        from worker.sinks.servicebus import ServiceBusEventSink

        return ServiceBusEventSink.from_config(settings.servicebus, events)
    from worker.sinks.local import LocalEventSink

    settings.home.mkdir(parents=True, exist_ok=True)
    return LocalEventSink(path=settings.home / "events.db", name=events.queue or "fanout.events",
                          duplicate_window=events.duplicate_window)


def build_planner(settings: Settings, storage: Storage, *,
                  handlers: HandlerRegistry | None = None,
                  tracing: Tracing | None = None) -> Planner:
    """The router and planner ``fanout run``, ``plan`` and ``send`` all use.

    Loads the installed handlers (unless given), lets each refuse its
    ``[handlers.<name>]`` table, builds the router over ``[[routes]]`` and checks every
    route by building the job it makes of a blob it matches (no SAS issued, nothing
    submitted). Raises ``SettingsError`` naming what is wrong.
    """
    check_limits(settings)
    registry = handlers or HandlerRegistry.from_entry_points()
    registry.check_options(settings.handlers)
    router = Router(registry=registry, routes=settings.routes, storage=storage,
                    drop_unrouted=settings.events.unrouted == "drop")
    planner = make_planner(settings, router, storage, tracing=tracing)
    checking = _RouteCheckStorage(storage)
    router.check_routes(lambda work: planner.spec(work, {}, checking))
    return planner


def make_planner(settings: Settings, router: Router, storage: Storage, *,
                 tracing: Tracing | None = None) -> Planner:
    """A planner over ``router`` given the sections of ``settings`` it reads, without
    the start-up checks of :func:`build_planner`."""
    return Planner(router=router, storage=storage, programs=settings.program_specs(),
                   limits=settings.limits, jobs=settings.jobs, blob=settings.blob,
                   queue=settings.queue, cost=settings.cost,
                   handler_options=settings.handlers, default_pool=settings.default_pool,
                   allow_message_commands=settings.allow_message_commands,
                   log_uploads=settings.backend_config.uploads_logs, tracing=tracing)


class _RouteCheckStorage:
    """Storage for the start-up route check: the real store's URL parsing and name
    checks, but placeholder URLs, so no SAS is issued and nothing is touched."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage

    def parse_url(self, url: str) -> BlobRef:
        return self._storage.parse_url(url)

    def input_url(self, ref: BlobRef, *, lifetime: timedelta | None = None) -> str:
        ref = make_ref(ref.container, ref.blob)
        return f"https://route-check.invalid/{ref.container}/{ref.blob}"

    def output_container_url(self, container: str, prefix: str, *,
                             lifetime: timedelta | None = None) -> str:
        check_prefix(prefix)
        return f"https://route-check.invalid/{check_container(container)}"

    def input_container_url(self, container: str, prefix: str, *,
                            lifetime: timedelta | None = None) -> str:
        return self.output_container_url(container, prefix)

    def upload(self, ref: BlobRef, data: bytes) -> None:
        raise NotImplementedError("the route check writes nothing")

    def download(self, ref: BlobRef) -> bytes:
        raise NotImplementedError("the route check reads nothing")

    def read_tail(self, ref: BlobRef, max_bytes: int) -> bytes | None:
        raise NotImplementedError("the route check reads nothing")


@dataclass
class App:
    """Every long-lived part of a running worker."""

    settings: Settings
    registry: CollectorRegistry
    metrics: Metrics
    health: Health
    storage: Storage
    source: Source
    backend: Backend
    router: Router
    planner: Planner
    submitter: Submitter
    consumer: Consumer
    monitor: JobMonitor | None = None
    #: OpenTelemetry (``[tracing]``; off: a no-op tracer).
    tracing: Tracing = field(default_factory=Tracing.off)

    @classmethod
    def build(cls, settings: Settings, *, handlers: HandlerRegistry | None = None,
              source: Source | None = None, backend: Backend | None = None,
              storage: Storage | None = None, tracing: Tracing | None = None) -> App:
        """Build the parts; tests pass their own source, backend, storage or tracing
        (else ``[tracing]`` decides: worker/tracing.py)."""
        registry = CollectorRegistry()
        metrics = Metrics(registry=registry, cost_tags=settings.cost.allowed_tags)
        health = Health(heartbeat_timeout=settings.consumer.heartbeat_timeout, metrics=metrics)
        storage = storage or make_storage(settings)
        tracing = tracing or setup_tracing(settings.tracing)
        planner = build_planner(settings, storage, handlers=handlers,  # before any state
                                tracing=tracing)
        router = planner.router
        source = source or make_source(settings)
        backend = backend or make_backend(settings, storage)
        submitter = Submitter(backend=backend, config=settings.submit, metrics=metrics,
                              tracing=tracing)
        consumer = Consumer(source=source, planner=planner, submitter=submitter,
                            backend=backend, config=settings.consumer, queue=settings.queue,
                            queue_kind=settings.queue_kind, metrics=metrics, health=health,
                            tracing=tracing,
                            admission=Admission(
                                limit=settings.admission.max_backlog_per_slot,
                                metrics=metrics, health=health))
        return cls(settings=settings, registry=registry, metrics=metrics, health=health,
                   storage=storage, source=source, backend=backend, router=router,
                   planner=planner,
                   submitter=submitter, consumer=consumer, tracing=tracing)

    async def run(self, *, install_signals: bool = True,
                  started: Callable[[App], Awaitable[None] | None] | None = None) -> None:
        """Serve until stopped: metrics port, executor, pollers, consumer, drain."""
        watcher = self._watcher()
        server = MetricsServer(registry=self.registry, health=self.health,
                               bind=self.settings.metrics.bind, port=self.settings.metrics.port)
        server.start()
        self.metrics_port = server.port
        self.backend.start()
        if install_signals:
            self._install_signals()
        pollers = [asyncio.create_task(self._poll_queue(), name="queue-poller"),
                   asyncio.create_task(self._poll_backend(), name="backend-poller")]
        if watcher is not None:
            pollers.append(asyncio.create_task(watcher.run(), name="watcher"))
        monitor = self._monitor()
        if monitor is not None:
            pollers.append(asyncio.create_task(monitor.run(), name="job-monitor"))
        log.info("fanout.started", queue=self.source.name, queue_kind=self.settings.queue_kind,
                 backend=self.settings.backend_kind, storage=self.settings.storage_kind,
                 metrics=f"http://{self.settings.metrics.bind}:{server.port}/metrics",
                 config=self.settings.source, home=str(self.settings.home))
        try:
            if started is not None:
                maybe = started(self)
                if maybe is not None:
                    await maybe
            await self.consumer.run()
        finally:
            await _cancel_all(pollers)
            if monitor is not None and monitor.sink is not None:
                await monitor.sink.close()
            await self.source.close()
            self.submitter.close()
            self.backend.close()
            self.tracing.close()  # flushes the exporter
            server.stop()
            log.info("fanout.stopped")

    def _monitor(self) -> JobMonitor | None:
        """The job monitor (``jobs.monitor``), publishing to the configured sink."""
        if not self.settings.jobs.monitor:
            return None
        from worker.monitor import JobMonitor

        self.monitor = JobMonitor(backend=self.backend, sink=make_sink(self.settings),
                                  jobs=self.settings.jobs, events=self.settings.events,
                                  metrics=self.metrics, tracing=self.tracing,
                                  interval=self.settings.backend_config.monitor_interval,
                                  cost=self.settings.cost,
                                  preemption=self.settings.preemption)
        return self.monitor

    def _watcher(self) -> Watcher | None:
        """The local blob-upload trigger, when ``[watch]`` names containers."""
        from worker.storage.local import LocalStorage

        if not self.settings.watch.containers or not isinstance(self.storage, LocalStorage):
            return None
        from worker.watch import Watcher

        return Watcher(storage=self.storage, source=self.source, config=self.settings.watch,
                       state_path=self.settings.home / "watch.db")

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        seen: list[int] = []

        def on_signal(signum: int) -> None:
            seen.append(signum)
            if len(seen) > 1:
                log.warning("fanout.exit_now", signal=signal.Signals(signum).name)
                os._exit(128 + signum)  # a second signal: exit at once, locks lapse
            log.info("fanout.signal", signal=signal.Signals(signum).name,
                     note="draining; send again to exit at once")
            self.consumer.stop()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)

    async def _poll_queue(self) -> None:
        name = self.source.name

        async def once() -> None:  # a source reports the same states every time
            for state, n in (await self.source.depth()).items():
                self.metrics.queue_messages.labels(name, state).set(n)

        await _poll_forever("queue", self.settings.queue.poll_interval, once, self.metrics)

    async def _poll_backend(self) -> None:
        interval = self.settings.backend_config.stats_interval

        async def once() -> None:
            stats = await asyncio.to_thread(self.backend.stats)
            self.metrics.backend_stats.update(stats)  # a failed read keeps the last one
            if self.consumer.admission is not None:  # pools' capacity: pause or resume
                self.consumer.admission.update(stats)

        await _poll_forever("backend", interval, once, self.metrics)


#: How long stopping pollers may take before shutdown goes on without them.
POLLER_STOP_GRACE = 5.0


async def _cancel_all(tasks: list[asyncio.Task[Any]]) -> None:
    """Cancel the pollers, waiting a bounded time (see ``cancel_and_wait``)."""
    await cancel_and_wait(tasks, POLLER_STOP_GRACE)


async def _poll_forever(name: str, interval: float, once: Callable[[], Awaitable[Any]],
                        metrics: Metrics) -> None:
    """Run ``once`` every ``interval`` seconds; a failure is logged and counted."""
    while True:
        try:
            await once()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            metrics.poll_errors.labels(name).inc()
            log.warning("poll.failed", poller=name, error=f"{type(exc).__name__}: {exc}")
        await asyncio.sleep(interval)
