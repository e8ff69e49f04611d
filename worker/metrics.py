"""Prometheus collectors, health state and the one HTTP port that serves them.

The registry is passed in (never the global one) so tests build their own and read
samples with ``registry.get_sample_value``. One port serves ``/metrics``,
``/healthz`` (200 while every receive loop has beaten within the heartbeat timeout,
503 when any one is stuck) and ``/readyz`` (200 only while the worker can take work).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from worker.backends.base import BackendStats, fresh_resize_errors, slots

#: Message outcomes, the ``outcome`` label of ``fanout_messages_total``.
OUTCOMES = ("completed", "dead_lettered", "abandoned")
_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_JOB_BUCKETS = (1, 5, 15, 60, 300, 900, 1800, 3600, 7200, 14400, 43200, 86400, 259200)


class Metrics:
    """fanout's own collectors, registered on the registry given."""

    def __init__(self, *, registry: CollectorRegistry, cost_tags: Sequence[str] = ()) -> None:
        """``cost_tags``: the operator's allowed tag keys (``cost.allowed_tags``), the
        extra labels of the cost metrics, fixed for the registry's life."""
        # no ``_created`` series (process-wide): no dashboard or alert reads them
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = registry
        self.cost_tags = tuple(cost_tags)
        self.job_node_seconds = Counter(
            "fanout_job_node_seconds", "Node-seconds of reported jobs' tasks (each "
            "completed task's last attempt x its required slots / the pool's task slots per "
            "node), by handler and cost tag (\"\" where a job has none).",
            ["handler", *self.cost_tags], registry=registry)
        self.job_cost = Counter(
            "fanout_job_cost", "Estimated cost of reported jobs (node-seconds / 3600 x "
            "cost.prices of the pool's VM size, in cost.currency), by handler and cost tag; "
            "jobs on unpriced VM sizes add nothing.",
            ["handler", *self.cost_tags], registry=registry)
        self.messages = Counter(
            "fanout_messages", "Messages settled, by handler and outcome.",
            ["handler", "outcome"], registry=registry)
        self.dead_letters = Counter(
            "fanout_dead_letters", "Messages dead-lettered, by reason code.",
            ["reason"], registry=registry)
        self.message_duration = Histogram(
            "fanout_message_duration_seconds",
            "Time from receiving a message to settling it, by handler.",
            ["handler"], buckets=_DURATION_BUCKETS, registry=registry)
        self.tasks_submitted = Counter(
            "fanout_tasks_submitted", "Tasks newly added to the batch backend, by handler.",
            ["handler"], registry=registry)
        self.tasks_existing = Counter(
            "fanout_tasks_existing",
            "Tasks found already added (a redelivered message), by handler.",
            ["handler"], registry=registry)
        self.submit_requests = Counter(
            "fanout_submit_requests", "Add-task requests to the backend, by outcome.",
            ["outcome"], registry=registry)
        self.submit_retries = Counter(
            "fanout_submit_retries", "Add-task requests retried after a transient fault.",
            registry=registry)
        self.submit_seconds = Histogram(
            "fanout_submit_duration_seconds",
            "Time to submit one job's tasks, by handler.",
            ["handler"], buckets=_DURATION_BUCKETS, registry=registry)
        self.inflight = Gauge(
            "fanout_inflight_messages", "Messages being processed now.", registry=registry)
        self.settle_failures = Counter(
            "fanout_settle_failures", "Settlements (complete, abandon, dead-letter) that "
            "failed: the message is delivered again; by action and why (lock_lost, error).",
            ["action", "why"], registry=registry)
        self.lock_lost = Counter(
            "fanout_lock_lost", "Messages whose lock was lost before settlement.",
            registry=registry)
        self.queue_messages = Gauge(
            "fanout_queue_messages", "Messages in the queue, by state.",
            ["queue", "state"], registry=registry)
        #: The pool, job and capacity gauges, from the last ``Backend.stats()`` read.
        self.backend_stats = BackendStatsCollector()
        registry.register(self.backend_stats)
        self.ready = Gauge(
            "fanout_ready", "1 while the worker can take work, 0 while it backs off.",
            registry=registry)
        self.heartbeat = Gauge(
            "fanout_heartbeat_timestamp_seconds",
            "Unix time of the receive loop's last beat.", registry=registry)
        self.events_ignored = Counter(
            "fanout_events_ignored", "Blob events completed without a job, by why "
            "(gen2-<api>: not a finished Data Lake write; unrouted: dropped by config).",
            ["why"], registry=registry)
        self.jobs_completed = Counter(
            "fanout_jobs_completed", "Jobs reported terminal by the monitor, by handler and "
            "outcome (succeeded, failed, cancelled, timed_out).",
            ["handler", "outcome"], registry=registry)
        self.job_duration = Histogram(
            "fanout_job_duration_seconds", "Time from a job's creation to its end, by handler.",
            ["handler"], buckets=_JOB_BUCKETS, registry=registry)
        self.tasks_failed = Counter(
            "fanout_tasks_failed", "Failed tasks of reported jobs, by handler and category.",
            ["handler", "category"], registry=registry)
        self.jobs_monitored = Gauge(
            "fanout_jobs_monitored", "fanout's jobs not yet reported, as of the last poll.",
            registry=registry)
        self.events_published = Counter(
            "fanout_events_published", "Completion events published, by destination kind "
            "(configured, reply_to).", ["to"], registry=registry)
        self.event_publish_errors = Counter(
            "fanout_event_publish_errors", "Completion events that failed to publish "
            "(retried on the next poll).", registry=registry)
        self.monitor_requests = Counter(
            "fanout_monitor_requests", "Backend requests the job monitor made, by operation.",
            ["operation"], registry=registry)
        self.monitor_errors = Counter(
            "fanout_monitor_errors", "Monitor polls or job reports that failed.",
            registry=registry)
        self.jobs_terminated = Counter(
            "fanout_jobs_terminated", "Jobs fanout terminated, by reason (FanoutBlocked, "
            "FanoutCancelled, FanoutSubmitFailed).", ["reason"], registry=registry)
        self.jobs_deleted = Counter(
            "fanout_jobs_deleted", "Terminal jobs deleted after the retention period.",
            registry=registry)
        self.tasks_preempted = Counter(
            "fanout_tasks_preempted", "Tasks of fanout's jobs found running on a Spot/"
            "low-priority node when it was preempted (Batch requeues them), by pool.",
            ["pool"], registry=registry)
        self.tasks_moved = Counter(
            "fanout_tasks_moved", "Tasks moved to the dedicated pool after "
            "preemption.max_per_task preemptions, by that pool.", ["pool"],
            registry=registry)
        self.poll_errors = Counter(
            "fanout_poll_errors", "Metric polls that failed, by poller.", ["poller"],
            registry=registry)
        # admission (worker/admission.py)
        self.admission_paused = Gauge(
            "fanout_admission_paused", "1 while receiving waits for capacity, by pool ('*': "
            "the account) and reason (backlog, job_quota, core_quota, resize_error, "
            "start_task_failed, unusable_nodes, no_nodes, pool_missing).",
            ["pool", "reason"], registry=registry)


@dataclass(frozen=True, slots=True)
class _Snapshot:
    stats: BackendStats
    taken: float  # Unix time of the read


class BackendStatsCollector(Collector):
    """The gauges derived from ``Backend.stats()``, built at each scrape from the last
    snapshot the stats poller stored with :meth:`update`.

    Only what the snapshot holds is exported: a pool deleted (or no longer reported), a
    state no active job's tasks are in any more, a resize error that has cleared, drop
    out of the scrape instead of reading 0 for ever. Before the first successful read
    the families are empty. A failed read stores nothing: the last snapshot stays
    (admission decides on it too), ``fanout_poll_errors_total{poller="backend"}``
    counts the failure and ``fanout_backend_stats_timestamp_seconds`` says how old it is.

    The snapshot is swapped in as one reference (atomic under the GIL) and never
    mutated, so the scrape thread reads one consistent poll without a lock.
    """

    def __init__(self) -> None:
        self._snapshot: _Snapshot | None = None

    def update(self, stats: BackendStats, taken: float | None = None) -> None:
        """Replace the snapshot with a fresh read (the caller no longer mutates it)."""
        self._snapshot = _Snapshot(stats, time.time() if taken is None else taken)

    def describe(self) -> Iterator[GaugeMetricFamily]:
        """The families without samples: registering never calls :meth:`collect`."""
        return iter(_families())

    def collect(self) -> Iterator[GaugeMetricFamily]:
        snapshot = self._snapshot  # one read: the poller may swap it meanwhile
        families = _families()
        if snapshot is None:
            return iter(families)
        nodes, size, jobs, tasks, slot_count, pending, errors, taken = families
        stats = snapshot.stats
        for (pool, state), n in sorted(stats.pool_nodes.items()):
            nodes.add_metric([pool, state], n)
        for (pool, which), n in sorted(stats.pool_size.items()):
            size.add_metric([pool, which], n)
        jobs.add_metric([], stats.active_jobs)
        for state, n in sorted(stats.job_tasks.items()):
            tasks.add_metric([state], n)
        for _, cap in sorted(stats.pools.items()):
            slot_count.add_metric([cap.pool], slots(cap))
            pending.add_metric([cap.pool], cap.pending)
            for code in sorted({e.code for e in fresh_resize_errors(cap)}):
                errors.add_metric([cap.pool, code], 1)
        taken.add_metric([], snapshot.taken)
        return iter(families)


def _families() -> list[GaugeMetricFamily]:
    """The backend stats gauges, empty, in the order :meth:`BackendStatsCollector.collect`
    fills them."""
    return [
        GaugeMetricFamily("fanout_pool_nodes", "Pool nodes (local executor: slots), by state.",
                          labels=["pool", "state"]),
        GaugeMetricFamily("fanout_pool_size", "Pool current and target sizes.",
                          labels=["pool", "which"]),
        GaugeMetricFamily("fanout_active_jobs",
                          "Jobs not yet completed (accounts have a quota)."),
        GaugeMetricFamily("fanout_job_tasks", "Tasks of active jobs, by state.",
                          labels=["state"]),
        GaugeMetricFamily(
            "fanout_pool_slots", "Task slots a pool has or is about to have (usable and "
            "booting nodes, nodes a resize is adding) x task slots per node.",
            labels=["pool"]),
        GaugeMetricFamily(
            "fanout_pool_pending_tasks", "Active (not yet running) tasks of fanout's active "
            "jobs on a pool.", labels=["pool"]),
        GaugeMetricFamily(
            "fanout_pool_resize_errors", "1 for each current resize error of a pool, by code "
            "(stale ones are not counted).", labels=["pool", "code"]),
        GaugeMetricFamily(
            "fanout_backend_stats_timestamp_seconds", "Unix time of the last successful "
            "backend stats read, which the pool, job and capacity gauges show."),
    ]


class Health:
    """Each receive loop's heartbeat and the worker's readiness, read by the HTTP port.

    Every loop beats under its own name; the worker is alive only while every loop
    that has beaten has done so within the heartbeat timeout, so one stuck loop fails
    ``/healthz`` even while the others keep beating. A loop that ends (shutdown)
    calls :meth:`forget`.
    """

    def __init__(self, *, heartbeat_timeout: float, metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.heartbeat_timeout = heartbeat_timeout
        self._metrics = metrics
        self._clock = clock
        self._started = clock()
        self._beats: dict[str, float] = {}
        self._lock = threading.Lock()
        self._ready = False
        self.reason = "starting"
        #: Why receiving waits for capacity (worker/admission.py), None while it does not.
        self.capacity: str | None = None

    def beat(self, loop: str = "receive") -> None:
        """Record that the receive loop called ``loop`` is alive."""
        with self._lock:
            self._beats[loop] = self._clock()
        if self._metrics is not None:
            self._metrics.heartbeat.set(time.time())

    def forget(self, loop: str) -> None:
        """Stop watching a loop that has ended."""
        with self._lock:
            self._beats.pop(loop, None)

    def _oldest(self) -> tuple[str, float]:
        with self._lock:
            if not self._beats:
                return "", self._started
            name = min(self._beats, key=self._beats.__getitem__)
            return name, self._beats[name]

    def set_ready(self, ready: bool, reason: str = "") -> None:
        """Mark the worker ready (or not, with a reason /readyz shows)."""
        self._ready = ready
        self.reason = "ok" if ready else reason
        self._publish_ready()

    def set_capacity(self, reason: str | None) -> None:
        """Receiving waits for capacity (``reason``: ``waiting for capacity: ...``), or
        not (None). Distinct from :meth:`set_ready`: a configuration fault and a stuck
        loop say so in their own words."""
        self.capacity = reason
        self._publish_ready()

    @property
    def why_unready(self) -> str:
        """What /readyz says while not ready: a fault first, else the capacity wait."""
        if not self._ready:
            return self.reason
        if self.capacity is not None:
            return self.capacity
        return "stuck" if not self.alive else "ok"

    def _publish_ready(self) -> None:
        if self._metrics is not None:
            self._metrics.ready.set(1 if self._ready and self.capacity is None else 0)

    @property
    def alive(self) -> bool:
        """True while every loop has beaten within the heartbeat timeout."""
        return self.since_beat() <= self.heartbeat_timeout

    @property
    def stalest(self) -> str:
        """The loop whose last beat is the oldest ("" before any beat)."""
        return self._oldest()[0]

    @property
    def ready(self) -> bool:
        return self._ready and self.capacity is None and self.alive

    def since_beat(self) -> float:
        """Seconds since the stalest loop's last beat."""
        return self._clock() - self._oldest()[1]


#: Seconds between the metrics server's looks for a stop request (a wake-up costs
#: a few microseconds; a stop waits at most this long).
SHUTDOWN_POLL = 0.05


class MetricsServer:
    """Serves /metrics, /healthz and /readyz on one port, in a daemon thread."""

    def __init__(self, *, registry: CollectorRegistry, health: Health,
                 bind: str, port: int) -> None:
        handler = _make_handler(registry, health)
        self._server = ThreadingHTTPServer((bind, port), handler)
        self._server.daemon_threads = True
        # serve_forever looks for shutdown() once per poll interval: the stdlib's 0.5 s
        # made every stop (SIGTERM, the end of a run) wait up to half a second for it
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": SHUTDOWN_POLL},
                                        name="fanout-metrics", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _make_handler(registry: CollectorRegistry,
                  health: Health) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                ok = health.alive
                loop = f" ({health.stalest})" if health.stalest else ""
                text = (f"{'ok' if ok else 'stuck'}: oldest beat{loop} "
                        f"{health.since_beat():.1f}s ago\n")
                self._send(200 if ok else 503, text.encode())
            elif path == "/readyz":
                text = ("ready\n" if health.ready else f"not ready: {health.why_unready}\n")
                self._send(200 if health.ready else 503, text.encode())
            else:
                self._send(404, b"not found: try /metrics, /healthz or /readyz\n")

        def _send(self, status: int, body: bytes,
                  content_type: str = "text/plain; charset=utf-8") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            return  # scrapes every few seconds would drown the logs

    return Handler
