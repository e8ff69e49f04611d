"""Admission that respects capacity: stop receiving while the pools are backed up.

The stats poller reads each pool's nodes, slots and resize errors and fanout's pending
tasks on it (``Backend.stats()``: no request beyond what the metrics poll makes, see
docs/azure-batch.md) and hands them to :meth:`Admission.update`. With
``admission.max_backlog_per_slot`` set, the receive loops stop taking new messages while
any pool's pending tasks exceed that many per slot; messages already received finish
normally, and receiving resumes once a poll finds every pool under the limit again. The
work waits in the queue, where KEDA and the operator see it.

While paused the worker is alive (its loops keep beating, ``/healthz`` stays 200) but not
ready: ``/readyz`` answers 503 ``waiting for capacity: ...`` with the pool and why,
distinct from a configuration fault (which names the fault) and from a stuck loop
(``/healthz``). ``fanout_admission_paused{pool,reason}`` is 1 for each cause.

Slots: ``(usable + coming) x taskSlotsPerNode``, where usable nodes are ``idle`` or
``running``, coming ones are booting (``creating``, ``starting``,
``waitingForStartTask``, ``rebooting``, ``reimaging``) and, while the pool is
``resizing`` without a current resize error, the nodes it still has to add (target -
current). A pool at zero nodes has no slots: the first message is admitted (no task is
pending yet) and its tasks hold the next ones back until the pool grows, so an autoscale
formula sees them (``$PendingTasks``) and raises the target; a pool without autoscale
stays at zero and the reason says so (``no_nodes``).

Why a pool is short, in order (the ``reason`` label): ``pool_missing``; ``core_quota``
(a current resize error ``AccountCoreQuotaReached``, ``AccountLowPriorityCoreQuotaReached``
or another ``...CoreQuotaReached``); ``resize_error`` (any other current resize error);
``start_task_failed`` and ``unusable_nodes`` (nodes in those states); ``no_nodes`` (no slot
and no autoscale); else ``backlog`` (the pool is simply busy). ``job_quota`` is the
account's active-job quota (``ActiveJobAndScheduleQuotaReached`` when a job is created;
the data plane does not tell the quota itself), label ``pool="*"``.

Stale resize errors are ignored: Batch keeps ``resizeErrors`` for the last resize and sets
them only while the pool is ``steady`` (BatchPool.resizeErrors in the REST spec); fanout
counts them only while the pool is steady AND short of its target (dedicated or spot). A
pool resizing again, or one that reached its target since (an autoscale run lowered it,
or a later resize succeeded), has none current.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog

from worker.backends.base import (
    BackendStats,
    PoolCapacity,
    ResizeError,
)

# The capacity arithmetic, shared with the metrics' collector, is re-exported here.
from worker.backends.base import fresh_resize_errors as fresh_resize_errors
from worker.backends.base import slots as slots
from worker.metrics import Health, Metrics

log = structlog.get_logger(__name__)

#: The ``reason`` label values of ``fanout_admission_paused``, in order of precedence.
REASONS = ("job_quota", "pool_missing", "core_quota", "resize_error", "start_task_failed",
           "unusable_nodes", "no_nodes", "backlog")
#: Resize error codes of the account's core quotas (PoolResizeErrorCodes in the Batch
#: SDKs); any other code ending in ``CoreQuotaReached`` counts too.
CORE_QUOTA_CODES = frozenset({"AccountCoreQuotaReached", "AccountLowPriorityCoreQuotaReached",
                              "AccountSpotCoreQuotaReached"})
#: The service's code for a full active-job quota (Jobs_CreateJob).
JOB_QUOTA_CODE = "ActiveJobAndScheduleQuotaReached"
#: The ``pool`` label of an account-wide cause (the job quota).
ACCOUNT = "*"
#: The prefix of every /readyz reason of a capacity wait.
WAITING = "waiting for capacity"


def is_core_quota(code: str) -> bool:
    return code in CORE_QUOTA_CODES or code.endswith("CoreQuotaReached")


def cause(cap: PoolCapacity) -> tuple[str, str]:
    """Why the pool is short of slots: a ``REASONS`` value and a sentence."""
    if not cap.exists:
        return "pool_missing", "the pool does not exist"
    errors = fresh_resize_errors(cap)
    quota = [e for e in errors if is_core_quota(e.code)]
    if quota:
        return "core_quota", _errors_text(quota)
    if errors:
        return "resize_error", _errors_text(errors)
    failed = cap.count("startTaskFailed")
    if failed:
        return "start_task_failed", f"{failed} node(s) failed their start task"
    unusable = cap.count("unusable")
    if unusable:
        return "unusable_nodes", f"{unusable} node(s) unusable"
    if slots(cap) == 0 and not cap.autoscale:
        return "no_nodes", "the pool has no nodes and no autoscale formula"
    return "backlog", "the pool is busy"


def _errors_text(errors: Iterable[ResizeError]) -> str:
    return "; ".join(f"{e.code}: {e.message}" if e.message else e.code for e in errors)[:500]


@dataclass(frozen=True, slots=True)
class Wait:
    """One cause of a pause: the pool (``*`` for the account), why, and a sentence."""

    pool: str
    reason: str
    detail: str

    def text(self) -> str:
        where = "account" if self.pool == ACCOUNT else f"pool {self.pool}"
        return f"{where}: {self.reason}: {self.detail}"


@dataclass(slots=True)
class PoolView:
    """A pool's capacity as admission sees it (for metrics, logs and ``fanout status``)."""

    pool: str
    slots: int
    pending: int
    running: int
    limit: float | None
    capacity: PoolCapacity
    wait: Wait | None = None
    resize_errors: list[ResizeError] = field(default_factory=list)

    @property
    def per_slot(self) -> float | None:
        return None if self.slots == 0 else self.pending / self.slots

    def as_json(self) -> dict[str, Any]:
        cap = self.capacity
        return {"pool": self.pool, "slots": self.slots, "slots_per_node": cap.slots_per_node,
                "pending": self.pending, "running": self.running,
                "max_backlog_per_slot": self.limit, "nodes": dict(cap.nodes),
                "allocation_state": cap.allocation_state, "autoscale": cap.autoscale,
                "current_nodes": cap.current, "target_nodes": cap.target,
                "resize_errors": [{"code": e.code, "message": e.message}
                                  for e in self.resize_errors],
                "waiting": None if self.wait is None else
                {"reason": self.wait.reason, "detail": self.wait.detail}}


def view(cap: PoolCapacity, limit: float | None) -> PoolView:
    """The pool's slots and backlog, and the wait it causes under ``limit`` (None: off)."""
    have = slots(cap)
    out = PoolView(pool=cap.pool, slots=have, pending=cap.pending, running=cap.running,
                   limit=limit, capacity=cap, resize_errors=fresh_resize_errors(cap))
    if limit is not None and cap.pending > limit * have:
        reason, detail = cause(cap)
        over = (f"{cap.pending} pending tasks over {limit:g} per slot x {have} slots"
                if have else f"{cap.pending} pending tasks and no slots")
        out.wait = Wait(cap.pool, reason, over if reason == "backlog" else f"{detail} "
                        f"({over})")
    return out


def views(stats: BackendStats, limit: float | None) -> list[PoolView]:
    return [view(cap, limit) for _, cap in sorted(stats.pools.items())]


class Admission:
    """Decides whether the receive loops may take new messages (module doc).

    :meth:`update` runs on the event loop after each stats poll; the consumer awaits
    :meth:`wait_open` while :attr:`paused`. Metrics and logs change only when the state
    does (one log line per change)."""

    def __init__(self, *, limit: float | None, metrics: Metrics, health: Health,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.metrics = metrics
        self.health = health
        self._clock = clock
        self._waits: tuple[Wait, ...] = ()
        self._job_quota: Wait | None = None
        self._open = asyncio.Event()
        self._open.set()
        #: The (pool, reason) series of ``fanout_admission_paused`` exported now.
        self._exported: frozenset[tuple[str, str]] = frozenset()
        #: Per pool: the current resize errors (codes) and the transition they belong
        #: to, and the (unusable, startTaskFailed) counts, as last logged.
        self._logged_errors: dict[str, tuple[Any, ...]] = {}
        self._logged_nodes: dict[str, tuple[int, int]] = {}
        self.views: list[PoolView] = []

    @property
    def enabled(self) -> bool:
        return self.limit is not None

    @property
    def paused(self) -> bool:
        """True while pool backlogs keep new receives waiting (not the job quota: that
        holds a message already received, see :meth:`job_quota`)."""
        return bool(self._waits)

    @property
    def waits(self) -> tuple[Wait, ...]:
        return self._waits + ((self._job_quota,) if self._job_quota else ())

    def reason(self) -> str | None:
        """The /readyz reason while paused, else None."""
        if not self._waits:
            return None
        return f"{WAITING}: " + "; ".join(w.text() for w in self._waits)

    def update(self, stats: BackendStats) -> None:
        """Take a poll's pool capacities: log what changed, pause or resume the receive
        loops. (The per-pool gauges come from the same snapshot, by the metrics'
        ``BackendStatsCollector``.)"""
        self.views = views(stats, self.limit)
        for v in self.views:
            self._log_pool(v)
        self._set_waits(tuple(v.wait for v in self.views if v.wait is not None))
        self._export_paused()  # a pool gone without a change of waits takes its series

    def job_quota(self, detail: str) -> str:
        """The account's active-job quota is full (a create was refused): count it and
        return the /readyz reason. Cleared by :meth:`job_quota_cleared`."""
        wait = Wait(ACCOUNT, "job_quota", detail)
        if self._job_quota != wait:
            log.warning("admission.job_quota", detail=detail,
                        note="the message stays locked; retried after consumer.unready_backoff")
        self._job_quota = wait
        self._publish()
        return f"{WAITING}: {wait.text()}"

    def job_quota_cleared(self) -> None:
        if self._job_quota is not None:
            self._job_quota = None
            log.info("admission.job_quota_cleared")
            self._publish()

    async def wait_open(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for receiving to resume; True if it has."""
        if self._open.is_set():
            return True
        try:
            await asyncio.wait_for(self._open.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def _set_waits(self, waits: tuple[Wait, ...]) -> None:
        if waits == self._waits:
            return
        before = {(w.pool, w.reason) for w in self._waits}
        self._waits = waits
        if waits:
            self._open.clear()
            if {(w.pool, w.reason) for w in waits} != before:
                log.warning("admission.paused", waits=[w.text() for w in waits],
                            note="new messages wait in the queue; in-flight ones finish")
        else:
            self._open.set()
            log.info("admission.resumed")
        self._publish()

    def _publish(self) -> None:
        self._export_paused()
        self.health.set_capacity(self.reason())

    def _export_paused(self) -> None:
        """``fanout_admission_paused``: 1 per current cause; a cause that has passed reads
        0 while its pool is still reported (so ``min_over_time`` in
        ``FanoutWaitingForCapacity`` sees it end) and is dropped with its pool."""
        paused = {(w.pool, w.reason) for w in self.waits}
        pools = {v.pool for v in self.views} | {ACCOUNT}
        gauge = self.metrics.admission_paused
        for pool, reason in self._exported - paused:
            if pool in pools:
                gauge.labels(pool, reason).set(0)
            else:
                gauge.remove(pool, reason)
        for pool, reason in paused:
            gauge.labels(pool, reason).set(1)
        self._exported = frozenset(paused | {k for k in self._exported if k[0] in pools})

    def _log_pool(self, v: PoolView) -> None:
        cap = v.capacity
        errors = tuple(sorted((e.code, e.message) for e in v.resize_errors))
        key = (errors, cap.allocation_changed)
        if self._logged_errors.get(v.pool, ((), None))[0] != errors or (
                errors and self._logged_errors.get(v.pool) != key):
            if errors:
                log.warning("pool.resize_errors", pool=v.pool,
                            errors=[f"{c}: {msg}" for c, msg in errors],
                            current=cap.current, target=cap.target,
                            since=cap.allocation_changed.isoformat()
                            if cap.allocation_changed else None)
            elif v.pool in self._logged_errors:
                log.info("pool.resize_errors_cleared", pool=v.pool)
            self._logged_errors[v.pool] = key
        nodes = (cap.count("unusable"), cap.count("startTaskFailed"))
        if self._logged_nodes.get(v.pool, (0, 0)) != nodes:
            level = log.warning if any(nodes) else log.info
            level("pool.node_errors", pool=v.pool, unusable=nodes[0],
                  start_task_failed=nodes[1])
            self._logged_nodes[v.pool] = nodes
