"""The operator's per-task limits, as plain checks both sides of the plug-in surface
share: the worker holds every handler's tasks to them (``worker/context.py``), and
``handlers.testing``'s stub context holds a plug-in to the same rules in its tests."""

from __future__ import annotations

from datetime import timedelta

from handlers.errors import BudgetExceeded


def check_retries(retries: int | None, limit: int) -> None:
    """``BudgetExceeded`` for a ``max_task_retries`` over ``limit``
    (``limits.max_task_retries``); -1 (unlimited, as in Batch) only when the limit is
    -1 too."""
    if retries is None or limit == -1:
        return
    if retries == -1 or retries > limit:
        raise BudgetExceeded(f"max_task_retries {retries} is over this worker's limit "
                             f"of {limit} (limits.max_task_retries)")


def check_wall_clock(wall: timedelta | None, limit: timedelta) -> None:
    """``BudgetExceeded`` for a ``max_wall_clock`` over ``limit``
    (``limits.max_wall_clock``), or one that is not positive."""
    if wall is not None and (wall > limit or wall.total_seconds() <= 0):
        raise BudgetExceeded(f"max_wall_clock {wall} is outside this worker's limit "
                             f"of {limit} (limits.max_wall_clock)")
