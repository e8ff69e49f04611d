"""The receive loop: bounded concurrency, lock renewal, settlement, shutdown drain.

``concurrency`` receive loops each take one message at a time. A message is
parsed, routed, built and submitted in a worker thread, so the event loop stays
free to renew locks and answer health checks while a handler streams 100,000
tasks. Its lock is renewed until it is settled:

- success: complete;
- a message fault: dead-letter at once with the reason code and description;
- a system fault: abandon (delivered again), or dead-letter with
  ``MaxDeliveryExceeded`` once the queue's max delivery count is reached;
- a configuration fault: the worker marks itself unready, keeps the message
  locked, and probes the backend AND the source with backoff until both work again.
  The queue is not drained into the dead-letter queue.

A settlement that fails (the lock was lost, the link that locked the message was
detached, the call failed) is counted in ``fanout_settle_failures_total{action,why}``
and never as a settled outcome: the message is delivered again.

Readiness. ``/readyz`` is unready from the start until the backend and the source
have each been probed once; after a configuration fault it stays unready until both
probe well again (one probe task, so the loops do not probe in a crowd). Liveness: each
receive loop beats its own heartbeat, so ``/healthz`` fails when any loop is stuck.

Admission (worker/admission.py): while a pool's backlog is over
``admission.max_backlog_per_slot`` the loops take no new message (they keep beating;
``/readyz`` says ``waiting for capacity: ...``); a receive already under way and the
messages received finish normally. A create refused for the account's job quota holds
its message like a configuration fault, but reads as a capacity wait.

Shutdown: the first ``stop()`` stops receiving and drains in-flight messages
within ``drain_grace``; what is unfinished by then is interrupted and abandoned.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar, assert_never

import structlog
from opentelemetry.trace import Span, SpanKind

from worker.admission import JOB_QUOTA_CODE, Admission
from worker.backends.base import META_HANDLER, REASON_CANCELLED, Backend
from worker.config import ConsumerConfig, QueueConfig
from worker.errors import (
    ConfigFault,
    LockLost,
    MaxDeliveryExceeded,
    MessageFault,
    SystemFault,
    UnknownJob,
)
from worker.handoff import LoopThreads
from worker.logs import redact
from worker.metrics import Health, Metrics
from worker.plan import Planner
from worker.routing import key_message_id
from worker.sources.base import Received, SettleAction, Source
from worker.submit import Cancelled, SubmitResult, Submitter
from worker.tracing import Tracing, extract, mark_failed

log = structlog.get_logger(__name__)
T = TypeVar("T")

#: Pause after a receive fails, so a broken connection is not hammered.
RECEIVE_ERROR_BACKOFF = 2.0
#: Shortest pause between two lock renewals.
MIN_RENEW_INTERVAL = 0.5
#: After the drain grace, how long interrupted work gets to abandon its message.
ABANDON_GRACE = 5.0
#: Longest a settlement may take before the consumer gives up on it (the source bounds
#: its own calls too; this guards against one that does not).
SETTLE_TIMEOUT = 60.0
#: Longest the first probes may take before the worker reports why it is not ready.
PROBE_TIMEOUT = 60.0


@dataclass(slots=True)
class Outcome:
    """What processing decided for one message."""

    action: SettleAction
    handler: str = "none"
    reason: str = ""
    description: str = ""
    results: list[SubmitResult] = field(default_factory=list)


class Consumer:
    """Receives messages from a ``Source`` and turns each into submitted jobs."""

    def __init__(self, *, source: Source, planner: Planner, submitter: Submitter,
                 backend: Backend, config: ConsumerConfig, queue: QueueConfig,
                 metrics: Metrics, health: Health, queue_kind: str = "local",
                 clock: Callable[[], float] = time.monotonic,
                 tracing: Tracing | None = None,
                 admission: Admission | None = None) -> None:
        """``config`` is ``[consumer]``; ``queue`` is ``[queue]`` (its lock duration) and
        ``queue_kind`` the resolved kind (``servicebus`` or ``local``, for tracing)."""
        self.source = source
        #: Receiving waits while the pools are backed up (worker/admission.py).
        self.admission = admission
        self.tracing = tracing or Tracing.off()
        self.planner = planner
        self.submitter = submitter
        self.backend = backend
        self.config = config
        self.queue = queue
        self.queue_kind = queue_kind
        self.metrics = metrics
        self.health = health
        self._clock = clock
        self._stopping = asyncio.Event()
        #: Done once stopping: one future every receive races (not a task per receive).
        self._stopped: asyncio.Future[None] | None = None
        self._ready = asyncio.Event()
        self._unready = asyncio.Event()  # wakes the probe task
        self._probe_delay = 0.0  # the first probe runs at once
        self._cancel = threading.Event()  # tells submitter threads to give up
        #: The threads messages are processed in, one per receive loop.
        self._workers = LoopThreads(config.concurrency, "fanout-process")
        self._handled = 0
        #: Receive calls in flight (admission: a pause stops the next ones).
        self.receiving = 0

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    @property
    def handled(self) -> int:
        """Messages settled (or given up) since start."""
        return self._handled

    def stop(self) -> None:
        """Stop receiving; in-flight messages drain within the grace period."""
        if not self._stopping.is_set():
            log.info("consumer.stopping", grace=self.config.drain_grace)
        self._stopping.set()
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(None)

    def _stop_signal(self) -> asyncio.Future[None]:
        """A future of the running loop that is done once ``stop()`` has been called."""
        loop = asyncio.get_running_loop()
        if self._stopped is None or self._stopped.get_loop() is not loop:
            self._stopped = loop.create_future()
            if self.stopping:
                self._stopped.set_result(None)
        return self._stopped

    async def run(self) -> None:
        """Check the source's settings, run the receive loops (unready until the first
        probes pass) until ``stop()``; then drain and return."""
        await self.source.check_capacity(self.config.concurrency)
        self._set_ready(False, "starting: probing the backend and the queue")
        prober = asyncio.create_task(self._probe_loop(), name="fanout-probe")
        loops = [asyncio.create_task(self._receive_loop(i), name=f"fanout-receive-{i}")
                 for i in range(self.config.concurrency)]
        await self._stopping.wait()
        await cancel_and_wait([prober], ABANDON_GRACE)
        _, pending = await asyncio.wait(loops, timeout=self.config.drain_grace)
        if pending:
            log.warning("consumer.drain_timeout", unfinished=len(pending))
            self._cancel.set()
            _, pending = await asyncio.wait(pending, timeout=ABANDON_GRACE)
            await cancel_and_wait(list(pending), ABANDON_GRACE)
        self._workers.stop()
        self._set_ready(False, "stopped")
        log.info("consumer.stopped", handled=self._handled)

    async def _receive_loop(self, index: int) -> None:
        """One of ``concurrency`` loops: receive one message, handle it, repeat."""
        name = f"receive-{index}"
        self.health.beat(name)
        try:
            while not self.stopping:
                if not self._ready.is_set():
                    await self._wait_ready(name)
                    continue
                if self.admission is not None and self.admission.paused:
                    await self._wait_admitted(name)
                    continue
                self.receiving += 1  # a receive begun before a pause still takes its message
                try:
                    messages = await self._receive()
                finally:
                    self.receiving -= 1
                self.health.beat(name)
                for msg in messages:
                    if self.stopping:
                        await self._settle(msg, Outcome("abandon",
                                                        description="shutting down"))
                        continue
                    await self._handle_one(msg, name)
        finally:
            self.health.forget(name)

    async def _receive(self) -> list[Received]:
        """Receive up to one message, giving up at once when ``stop()`` is called.

        The receive is bounded: a source call that neither returns nor fails (a
        half-open connection) is cancelled, and the loop goes on; the source drops
        the receiver of a call that timed out and reconnects."""
        wait = self.config.receive_wait
        receiving = asyncio.ensure_future(self.source.receive(1, wait))
        racing: set[asyncio.Future[Any]] = {receiving, self._stop_signal()}
        timed_out = False
        try:
            done, _ = await asyncio.wait(racing,
                                         timeout=wait + SETTLE_TIMEOUT,
                                         return_when=asyncio.FIRST_COMPLETED)
            timed_out = not done
        finally:
            if not receiving.done():  # stopping, timed out, or this loop was cancelled
                receiving.cancel()
        try:
            try:
                return await receiving
            except asyncio.CancelledError:
                if self.stopping:
                    return []
                if not timed_out or _cancelling():
                    raise
                raise TimeoutError(f"no answer to a receive in {wait + SETTLE_TIMEOUT:g} s") \
                    from None
        except ConfigFault as fault:
            self._set_ready(False, f"{fault.code}: {fault.description}")
        except (SystemFault, OSError) as exc:
            log.warning("receive.failed", error=str(exc), retry_in=RECEIVE_ERROR_BACKOFF)
            await self._sleep(RECEIVE_ERROR_BACKOFF)
        return []

    async def _handle_one(self, msg: Received, loop: str = "receive") -> None:
        """Process one message to its settlement; never raises."""
        started = self._clock()
        structlog.contextvars.bind_contextvars(message_id=msg.message_id,
                                               delivery_count=msg.delivery_count)
        span, token = self._start_receive_span(msg)
        self.metrics.inflight.inc()
        renewal = _Renewal(lambda waited: self._keep_locked(msg, loop, waited),
                           self._renew_pause(msg.locked_until))
        try:
            outcome = await self._process_until_settled(msg, loop)
            _trace_outcome(span, outcome)
            await renewal.stop()
            if await self._settle(msg, outcome):
                self.metrics.messages.labels(outcome.handler,
                                             _OUTCOME_LABEL[outcome.action]).inc()
                self.metrics.message_duration.labels(outcome.handler).observe(
                    self._clock() - started)
        except Exception:
            log.exception("message.unexpected_error")  # a bug: keep serving
        finally:
            await renewal.stop()
            self.metrics.inflight.dec()
            self._handled += 1
            self.tracing.end(span, token)
            structlog.contextvars.clear_contextvars()

    def _start_receive_span(self, msg: Received) -> tuple[Span, object]:
        """``fanout.receive``: one delivery to its settlement, a child of the trace
        context the producer put on the message (worker/tracing.py); no-op when off."""
        if not self.tracing.enabled:
            return self.tracing.start("fanout.receive")
        return self.tracing.start(
            "fanout.receive", kind=SpanKind.CONSUMER, parent=extract(msg.properties),
            attributes={**self._messaging_attributes(msg), "messaging.operation.type": "receive",
                        "messaging.servicebus.message.delivery_count": msg.delivery_count,
                        "messaging.message.body.size": len(msg.body)})

    def _messaging_attributes(self, msg: Received) -> dict[str, Any]:
        system = "servicebus" if self.queue_kind == "servicebus" else "fanout.local"
        return {"messaging.system": system, "messaging.destination.name": self.source.name,
                "messaging.message.id": msg.message_id}

    async def _process_until_settled(self, msg: Received, loop: str = "receive") -> Outcome:
        """Process; on a configuration fault, hold the message until the worker heals."""
        while True:
            try:
                return await self._workers.run(self.process, msg)
            except ConfigFault as fault:
                if fault.code == JOB_QUOTA_CODE and self.admission is not None:
                    # the account's active-job quota: waiting for capacity, not a fault
                    self._set_ready(False, self.admission.job_quota(fault.description))
                else:
                    self._set_ready(False, f"{fault.code}: {fault.description}")
                    log.error("message.config_fault", code=fault.code,
                              error=fault.description)
                if not await self._wait_ready(loop):
                    return Outcome("abandon", description="shutting down while unready")

    def process(self, msg: Received) -> Outcome:
        """Plan and submit one message's jobs (runs in a worker thread), in the span
        ``fanout.process``."""
        with self.tracing.span("fanout.process", attributes={
                **self._messaging_attributes(msg), "messaging.operation.type": "process"}
                if self.tracing.enabled else None) as span:
            outcome = self._process(msg)
            _trace_outcome(span, outcome)
            return outcome

    def _process(self, msg: Received) -> Outcome:
        handler = "none"
        try:
            # A resubmitted copy carries its original message id as the key.
            plan = self.planner.plan(msg.body, msg.properties,
                                     message_id=key_message_id(msg.message_id, msg.properties),
                                     reply_to=msg.reply_to)
            for job_id in plan.cancels:
                handler = "cancel"
                self.cancel(job_id)
            results = []
            for planned in plan.jobs:
                handler = planned.handler
                results.append(self.submitter.submit(planned.job, handler=planned.handler,
                                                     cancel=self._cancel))
            for why in plan.ignored:
                self.metrics.events_ignored.labels(why).inc()
                log.info("event.ignored", why=why)
            return Outcome("complete", handler=handler, results=results)
        except MessageFault as fault:
            return Outcome("dead_letter", handler=handler, reason=fault.reason,
                           description=fault.description)
        except ConfigFault:
            raise
        except Cancelled:
            return Outcome("abandon", handler=handler, description="interrupted by shutdown")
        except Exception as exc:  # a system fault, or a bug in a handler
            description = _describe(exc)
            level = log.warning if isinstance(exc, SystemFault) else log.exception
            level("message.failed", error=description)
            if msg.delivery_count + 1 >= self.source.max_delivery_count:
                final = MaxDeliveryExceeded(
                    f"failed {msg.delivery_count + 1} deliveries; last error: {description}")
                return Outcome("dead_letter", handler=handler, reason=final.reason,
                               description=final.description)
            return Outcome("abandon", handler=handler, description=description)

    def cancel(self, job_id: str) -> None:
        """Terminate one of fanout's jobs (outcome ``cancelled``); ``UnknownJob`` when
        there is no such job or fanout did not create it."""
        job = self.backend.get_job(job_id)
        if job is None or META_HANDLER not in job.metadata:
            raise UnknownJob(f"no job {job_id!r} of fanout's exists to cancel"
                             + (" (that job was not created by fanout)" if job else ""))
        if job.state == "completed":
            log.info("job.cancel_too_late", job_id=job_id, note="the job had already ended")
            return
        self.backend.terminate_job(job_id, REASON_CANCELLED)
        self.metrics.jobs_terminated.labels(REASON_CANCELLED).inc()
        log.info("job.cancelled", job_id=job_id)

    async def _settle(self, msg: Received, outcome: Outcome) -> bool:
        """Apply the outcome to the queue; True if it was. A failure (a lost lock, a
        detached link, a call that failed or hung) is logged and counted in
        ``fanout_settle_failures_total``, not raised: the message comes back."""
        try:
            async with asyncio.timeout(SETTLE_TIMEOUT):  # no task per settlement
                await self._apply(msg, outcome)
        except LockLost as exc:
            self.metrics.lock_lost.inc()
            self.metrics.settle_failures.labels(outcome.action, "lock_lost").inc()
            log.warning("message.lock_lost", action=outcome.action, error=str(exc),
                        note="it will be delivered again; submission is idempotent")
            return False
        except (SystemFault, OSError) as exc:  # TimeoutError included
            self.metrics.settle_failures.labels(outcome.action, "error").inc()
            log.warning("message.settle_failed", action=outcome.action,
                        error=str(exc) or type(exc).__name__,
                        note="the lock will lapse and the message be delivered again")
            return False
        return True

    async def _apply(self, msg: Received, outcome: Outcome) -> None:
        if outcome.action == "complete":
            await self.source.complete(msg)
            log.info("message.completed", handler=outcome.handler,
                     jobs=[r.job_id for r in outcome.results])
        elif outcome.action == "dead_letter":
            await self.source.dead_letter(msg, outcome.reason,
                                          redact(outcome.description)[:4000])
            self.metrics.dead_letters.labels(outcome.reason).inc()
            log.warning("message.dead_lettered", reason=outcome.reason,
                        description=outcome.description)
        elif outcome.action == "abandon":
            await self.source.abandon(msg)
            log.warning("message.abandoned", error=outcome.description)
        else:
            assert_never(outcome.action)

    async def _keep_locked(self, msg: Received, loop: str = "receive",
                           waited: float | None = None) -> None:
        """Renew the message's lock until cancelled; beat the loop's heartbeat meanwhile.

        ``waited``: the first pause is already over (a timer started this task)."""
        locked_until = msg.locked_until
        while True:
            if waited is None:
                pause = self._renew_pause(locked_until)
                await asyncio.sleep(pause)
            else:
                pause, waited = waited, None
            self.health.beat(loop)
            if locked_until is not None and \
                    (locked_until - datetime.now(UTC)).total_seconds() > 2 * pause + 1:
                continue  # plenty of lock left: only the heartbeat was due
            try:
                locked_until = await asyncio.wait_for(self.source.renew_lock(msg),
                                                      SETTLE_TIMEOUT)
                msg.locked_until = locked_until
            except LockLost as exc:
                self.metrics.lock_lost.inc()
                log.warning("message.lock_lost", during="renewal", error=str(exc))
                return
            except (SystemFault, OSError) as exc:
                log.warning("message.renew_failed", error=str(exc))
                locked_until = None

    def _renew_pause(self, locked_until: datetime | None) -> float:
        """How long to wait before the next look at a lock: half of what is left of it
        (at least ``MIN_RENEW_INTERVAL``), and often enough for the heartbeat."""
        if locked_until is not None:
            left = (locked_until - datetime.now(UTC)).total_seconds()
            pause = max(MIN_RENEW_INTERVAL, left / 2)
        else:
            pause = self.queue.lock_duration / 3
        return min(pause, self.health.heartbeat_timeout / 3)

    async def _wait_ready(self, loop: str = "receive") -> bool:
        """Wait (beating the loop's heartbeat) until the probe task finds the worker
        ready; False if stopped meanwhile."""
        pause = max(0.05, min(self.config.unready_backoff,
                              self.health.heartbeat_timeout / 3))
        while not self.stopping:
            if self._ready.is_set():
                return True
            self.health.beat(loop)
            ready = asyncio.ensure_future(self._ready.wait())
            stopping = asyncio.ensure_future(self._stopping.wait())
            try:
                await asyncio.wait({ready, stopping}, timeout=pause,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                ready.cancel()
                stopping.cancel()
        return False

    async def _wait_admitted(self, loop: str = "receive") -> None:
        """Wait (beating the loop's heartbeat, so ``/healthz`` stays healthy) while
        admission keeps new receives waiting for capacity, or until stopped."""
        assert self.admission is not None
        pause = max(0.05, self.health.heartbeat_timeout / 3)
        while not self.stopping and self.admission.paused:
            self.health.beat(loop)
            opened = asyncio.ensure_future(self.admission.wait_open(pause))
            stopping = asyncio.ensure_future(self._stopping.wait())
            try:
                await asyncio.wait({opened, stopping}, timeout=pause,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                opened.cancel()
                stopping.cancel()
        self.health.beat(loop)

    async def _probe_loop(self) -> None:
        """While unready: probe the backend and the source (at once at start, then
        every ``unready_backoff``) until both pass, then mark the worker ready."""
        backoff = self.config.unready_backoff
        while not self.stopping:
            await self._unready.wait()
            if await self._sleep(self._probe_delay):
                return
            self._probe_delay = backoff
            reason = await self._probe()
            if self.stopping:
                return
            if reason is None:
                self._set_ready(True)
                if self.admission is not None:
                    self.admission.job_quota_cleared()
                log.info("worker.ready")
            else:
                self._set_ready(False, reason)
                log.warning("worker.still_unready", reason=reason, retry_in=backoff)

    async def _probe(self) -> str | None:
        """None if the backend and the source both probe well, else why not."""
        probes: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            ("backend", lambda: asyncio.to_thread(self.backend.probe)),
            ("queue", self.source.probe)]
        for what, call in probes:
            try:
                await asyncio.wait_for(call(), PROBE_TIMEOUT)
            except ConfigFault as fault:
                return f"{fault.code}: {fault.description}"
            except Exception as exc:
                return f"{what} probe failed: {_describe(exc)}"
        return None

    def _set_ready(self, ready: bool, reason: str = "") -> None:
        self.health.set_ready(ready, reason)
        if ready:
            self._ready.set()
            self._unready.clear()
        else:
            self._ready.clear()
            self._unready.set()

    async def _sleep(self, seconds: float) -> bool:
        """Sleep, waking early on ``stop()``; True if stopping."""
        try:
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
        except TimeoutError:
            return False
        return True


class _Renewal:
    """One message's lock renewal: a timer until its first pause is over, and only then
    a task running ``keep(pause)``. Most messages settle well before that, and a timer
    costs a fraction of creating, cancelling and gathering a task per message."""

    def __init__(self, keep: Callable[[float], Coroutine[Any, Any, None]],
                 pause: float) -> None:
        self._task: asyncio.Task[None] | None = None
        self._timer = asyncio.get_running_loop().call_later(pause, self._begin, keep, pause)

    def _begin(self, keep: Callable[[float], Coroutine[Any, Any, None]], pause: float) -> None:
        self._task = asyncio.get_running_loop().create_task(keep(pause))

    async def stop(self) -> None:
        """Stop renewing; returns once a renewal under way has ended."""
        self._timer.cancel()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


def _cancelling() -> bool:
    """Whether the current task has been asked to cancel (so must not go on)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def cancel_and_wait(tasks: list[asyncio.Task[Any]], timeout: float) -> None:
    """Cancel ``tasks`` and wait for them at most ``timeout`` seconds: a library call
    that swallows a cancellation mid-request must not keep the worker from exiting."""
    for task in tasks:
        task.cancel()
    if not tasks:
        return
    _, stuck = await asyncio.wait(tasks, timeout=timeout)
    if stuck:
        log.warning("worker.tasks_stuck", tasks=sorted(t.get_name() for t in stuck),
                    note="going on without them")


_OUTCOME_LABEL: dict[SettleAction, str] = {
    "complete": "completed", "dead_letter": "dead_lettered", "abandon": "abandoned"}


def _trace_outcome(span: Span, outcome: Outcome) -> None:
    """The outcome on a span: its handler, jobs and settlement (failed unless completed)."""
    if not span.is_recording():
        return
    span.set_attributes({"fanout.handler": outcome.handler,
                         "messaging.servicebus.disposition_status": outcome.action,
                         "fanout.jobs": [r.job_id for r in outcome.results]})
    if outcome.reason:
        span.set_attribute("fanout.dead_letter.reason", outcome.reason)
    if outcome.action != "complete":
        mark_failed(span, f"{outcome.action}: {outcome.reason or outcome.description}")


def _describe(exc: BaseException) -> str:
    text = getattr(exc, "description", None) or str(exc) or type(exc).__name__
    return redact(f"{type(exc).__name__}: {text}")[:1000]


def describe_outcome(outcome: Outcome) -> dict[str, Any]:
    """A JSON-friendly summary (for ``fanout plan`` and tests)."""
    return {"action": outcome.action, "handler": outcome.handler, "reason": outcome.reason,
            "description": outcome.description}
