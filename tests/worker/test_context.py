"""Tests for job ids and job options under operator limits."""

from __future__ import annotations

from datetime import timedelta

import pytest

from handlers.base import JobSpec
from handlers.errors import BudgetExceeded
from worker.config import LimitsConfig
from worker.context import apply_job_options, job_id_for
from worker.envelope import JobOptions


def test_job_id_is_stable_valid_and_distinct() -> None:
    """The same key gives the same id; keys differing only in case do not collide."""
    a = job_id_for("sweep", "Run-1")
    assert a == job_id_for("sweep", "Run-1")
    assert a.lower() != job_id_for("sweep", "run-1").lower()
    assert a != job_id_for("render", "Run-1")
    for key in ["x" * 500, "日本語 / ; rm", "", "a" * 64]:
        job_id = job_id_for("transcode", key)
        assert len(job_id) <= 64
        assert all(c.isascii() and (c.isalnum() or c in "-_") for c in job_id)


def job(**kw: object) -> JobSpec:
    return JobSpec(tasks=[], task_count=kw.pop("task_count", 1), **kw)  # type: ignore[arg-type]


def test_options_fill_the_job() -> None:
    """Message options win over the handler's defaults and the configured pool."""
    spec = apply_job_options(job(pool="handler-pool"), JobOptions(priority=5, pool="gpu"),
                             job_id="j", default_pool="cpu", limits=LimitsConfig(),
                             handler="sweep")
    assert (spec.id, spec.pool, spec.priority) == ("j", "gpu", 5)
    assert spec.metadata["fanout-handler"] == "sweep"
    spec = apply_job_options(job(), JobOptions(), job_id="j", default_pool="cpu",
                             limits=LimitsConfig(), handler="sweep")
    assert spec.pool == "cpu"


@pytest.mark.parametrize("options, limits", [
    (JobOptions(priority=900), LimitsConfig(max_priority=100)),
    (JobOptions(pool="gpu"), LimitsConfig(allowed_pools=["cpu"])),
    (JobOptions(max_task_retries=50), LimitsConfig(max_task_retries=3)),
    (JobOptions(max_task_retries=-1), LimitsConfig(max_task_retries=3)),
    (JobOptions(max_wall_clock=timedelta(days=30)), LimitsConfig()),
])
def test_options_over_limits_are_refused(options: JobOptions, limits: LimitsConfig) -> None:
    """Each option beyond the operator's limit is BudgetExceeded."""
    with pytest.raises(BudgetExceeded):
        apply_job_options(job(), options, job_id="j", default_pool="cpu", limits=limits,
                          handler="sweep")


def test_task_budget_is_enforced_for_any_handler() -> None:
    """A job declaring more tasks than the limit is refused before submission."""
    with pytest.raises(BudgetExceeded, match="max_tasks_per_message"):
        apply_job_options(job(task_count=11), JobOptions(), job_id="j", default_pool="p",
                          limits=LimitsConfig(max_tasks_per_message=10), handler="x")
