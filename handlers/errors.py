"""Message faults: what a handler raises when a message can never become a job.

A message fault is dead-lettered at once with its ``reason`` code and a readable
``description``; retrying it can never help. These live in ``handlers/`` so that
third-party handlers can raise them without importing the worker.
"""

from __future__ import annotations

from pydantic import ValidationError


class MessageFault(Exception):
    """Raised when a message itself is at fault; carries a dead-letter reason code."""

    reason = "InvalidParams"

    def __init__(self, description: str, *, reason: str | None = None) -> None:
        super().__init__(description)
        self.description = description
        if reason is not None:
            self.reason = reason

    def __str__(self) -> str:
        return f"{self.reason}: {self.description}"


class InvalidJson(MessageFault):
    """Raised when a message body is not JSON (or not UTF-8 text)."""

    reason = "InvalidJson"


class InvalidEnvelope(MessageFault):
    """Raised when a body is JSON but not a valid envelope or event."""

    reason = "InvalidEnvelope"


class UnknownHandler(MessageFault):
    """Raised when a message names a handler that is not registered."""

    reason = "UnknownHandler"


class UnknownProgram(MessageFault):
    """Raised when a message names a program the operator did not configure."""

    reason = "UnknownProgram"


class InvalidParams(MessageFault):
    """Raised when a handler's params fail validation."""

    reason = "InvalidParams"


class BudgetExceeded(MessageFault):
    """Raised when a message would exceed an operator limit (tasks, sizes, priority...)."""

    reason = "BudgetExceeded"


class ForeignStorage(MessageFault):
    """Raised when a blob URL does not belong to a configured storage account."""

    reason = "ForeignStorage"


class NoRoute(MessageFault):
    """Raised when a blob event matches no route rule."""

    reason = "NoRoute"


def describe_validation(exc: ValidationError) -> str:
    """One line per problem: ``params.parameters.beta.step: ...``."""
    parts = []
    for err in exc.errors(include_url=False, include_input=False)[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "params"
        parts.append(f"{where}: {err['msg']}")
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")
