"""fanout's error hierarchy: message faults, system faults and configuration faults.

- A *message fault* (:class:`MessageFault` and its subclasses, shared with
  ``handlers/``) can never succeed: the message is dead-lettered at once with the
  fault's reason code and description.
- A *system fault* (:class:`SystemFault`) may pass: the message is abandoned and
  delivered again, bounded by the queue's max delivery count.
- A *configuration fault* (:class:`ConfigFault`) will not pass by retrying this
  message and is not the message's fault either: the worker marks itself unready,
  backs off and leaves the messages on the queue.
"""

from __future__ import annotations

from handlers.errors import (
    BudgetExceeded,
    ForeignStorage,
    InvalidEnvelope,
    InvalidJson,
    InvalidParams,
    MessageFault,
    NoRoute,
    UnknownHandler,
    UnknownProgram,
)

__all__ = [
    "BatchRejected",
    "BudgetExceeded",
    "ConfigFault",
    "ContainerUnavailable",
    "FanoutError",
    "IdempotencyConflict",
    "UnknownJob",
    "ForeignStorage",
    "InvalidEnvelope",
    "InvalidJson",
    "InvalidParams",
    "LockLost",
    "MaxDeliveryExceeded",
    "MessageFault",
    "NoRoute",
    "SettingsError",
    "SystemFault",
    "UnknownHandler",
    "UnknownProgram",
]


class FanoutError(Exception):
    """Base of the worker's own (non-message) errors."""


class SystemFault(FanoutError):
    """Raised when a transient fault of the system (network, 5xx, 429) stops work."""

    def __init__(self, description: str, *, retry_after: float | None = None) -> None:
        super().__init__(description)
        self.description = description
        self.retry_after = retry_after


class ConfigFault(FanoutError):
    """Raised when the worker's configuration or rights are wrong (auth, quota, pool)."""

    def __init__(self, description: str, *, code: str = "ConfigFault") -> None:
        super().__init__(description)
        self.description = description
        self.code = code


class LockLost(FanoutError):
    """Raised when a message's lock expired or was lost before it could be settled."""


class SettingsError(FanoutError):
    """Raised at start-up when the configuration is invalid; names the key and value."""


class BatchRejected(MessageFault):
    """Raised when the batch service rejects a task or job as invalid."""

    reason = "BatchRejected"


class ContainerUnavailable(MessageFault):
    """Raised when a task runs in a container image and the local executor has no
    container engine (Docker or Podman) to run it; it never runs on the host."""

    reason = "ContainerUnavailable"


class MaxDeliveryExceeded(MessageFault):
    """Raised when a message has failed its maximum number of deliveries."""

    reason = "MaxDeliveryExceeded"


class IdempotencyConflict(MessageFault):
    """Raised when a message's idempotency key names an existing job that was built
    from a different request (handler, params or job options)."""

    reason = "IdempotencyConflict"


class UnknownJob(MessageFault):
    """Raised when a cancel message names a job that does not exist."""

    reason = "UnknownJob"
