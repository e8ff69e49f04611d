"""Tests for job ids and job options under operator limits."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from handlers.base import JobSpec
from handlers.errors import BudgetExceeded
from worker.config import LimitsConfig
from worker.context import WorkerContext, apply_job_options, job_id_for, sas_lifetime
from worker.envelope import JobOptions, TaskDefaults
from worker.storage.local import LocalStorage


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


def test_sas_lifetime_is_the_wall_clock_capped_plus_the_allowance() -> None:
    """A job's SAS lives its own wall clock (capped by the limit) plus the allowance."""
    limits, hour = LimitsConfig(max_wall_clock=timedelta(days=2)), timedelta(hours=1)
    assert sas_lifetime(timedelta(days=1), limits, hour) == timedelta(days=1, hours=1)
    assert sas_lifetime(timedelta(hours=6), limits, hour) == timedelta(hours=7)
    assert sas_lifetime(timedelta(days=30), limits, hour) == timedelta(days=2, hours=1)
    assert sas_lifetime(-hour, limits, hour) == hour


@pytest.mark.parametrize("task", [
    TaskDefaults(max_task_retries=-1), TaskDefaults(max_task_retries=11),
    TaskDefaults(max_wall_clock=timedelta(days=7)), TaskDefaults(max_wall_clock=timedelta(0)),
])
def test_job_task_options_over_limits_are_refused_before_any_task(task: TaskDefaults) -> None:
    """`job.task` is checked with the other job options, before a task streams."""
    with pytest.raises(BudgetExceeded, match=r"\(limits\.max_"):
        apply_job_options(job(), JobOptions(task=task), job_id="j", default_pool="p",
                          limits=LimitsConfig(), handler="x")


def test_context_checks_task_settings_with_the_job_options_messages() -> None:
    """`check_task_limits` raises what a job option over the same limit raises."""
    ctx = WorkerContext(job_id="j", max_tasks=10, allow_message_commands=False, programs={},
                        handler_options={}, storage=LocalStorage(root=Path("/nonexistent")),
                        limits=LimitsConfig(max_task_retries=3))
    ctx.check_task_limits(max_task_retries=3, max_wall_clock=timedelta(days=6))
    ctx.check_task_limits()
    for kwargs, option in (({"max_task_retries": -1}, JobOptions(max_task_retries=-1)),
                           ({"max_wall_clock": timedelta(days=8)},
                            JobOptions(max_wall_clock=timedelta(days=8)))):
        with pytest.raises(BudgetExceeded) as from_ctx:
            ctx.check_task_limits(**kwargs)
        with pytest.raises(BudgetExceeded) as from_job:
            apply_job_options(job(), option, job_id="j", default_pool="p",
                              limits=ctx.limits, handler="x")
        assert from_ctx.value.description == from_job.value.description
