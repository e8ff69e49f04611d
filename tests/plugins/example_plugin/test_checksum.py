"""The example plug-in's own tests: the plug-in test kit alone, no fanout internals."""

from __future__ import annotations

from pathlib import Path

import pytest

from handlers.errors import BudgetExceeded, ForeignStorage, InvalidEnvelope, InvalidParams
from handlers.testing import TaskLimits, make_context, request, tasks_of
from worker.testing import SettingsError, build_job, harness

from .checksum import ChecksumHandler

INPUTS = [{"container": "data", "blob": "a.csv"}, {"container": "data", "blob": "b.csv"}]


# Unit tests: build() against a stub context (handlers.testing).

def test_one_task_per_input() -> None:
    ctx = make_context(options={"checksum": {"algorithm": "md5"}})
    job = ChecksumHandler().build(request("checksum", {"inputs": INPUTS}), ctx)
    tasks = tasks_of(job)
    assert [t.id for t in tasks] == ["0", "1"]
    assert tasks[0].command_line == "/bin/sh -c 'md5sum input > sum.txt'"
    assert tasks[1].resource_files[0].http_url == "file:///blobs/data/b.csv"
    assert tasks[1].output_files[0].container_url == "file:///blobs/checksums"
    assert tasks[1].output_files[0].path == "b.csv.md5"


def test_bad_params_and_the_budget() -> None:
    ctx = make_context(max_tasks=1)
    with pytest.raises(InvalidParams, match="inputs"):
        ChecksumHandler().build(request("checksum", {"inputs": "a.csv"}), ctx)
    with pytest.raises(BudgetExceeded, match="the limit is 1"):
        ChecksumHandler().build(request("checksum", {"inputs": INPUTS}), ctx)


def test_retries_are_held_to_the_operators_limit() -> None:
    ctx = make_context(limits=TaskLimits(max_task_retries=3))
    job = ChecksumHandler().build(request("checksum", {"inputs": INPUTS, "retries": 3}), ctx)
    assert {t.max_task_retries for t in tasks_of(job)} == {3}
    with pytest.raises(BudgetExceeded, match="limits.max_task_retries"):
        ChecksumHandler().build(request("checksum", {"inputs": INPUTS, "retries": 4}), ctx)


def test_check_options() -> None:
    ChecksumHandler().check_options({"algorithm": "sha1", "container": "sums"})
    with pytest.raises(ValueError, match="algorithm"):
        ChecksumHandler().check_options({"algorithm": "crc32"})
    with pytest.raises(ValueError, match="unknown option colour"):
        ChecksumHandler().check_options({"colour": "red"})


# The worker's path: the same build with job options, [limits] and storage (worker.testing).

def test_through_the_worker(tmp_path: Path) -> None:
    job, tasks = build_job(ChecksumHandler(), {"inputs": INPUTS}, name="checksum",
                           config={"handlers": {"checksum": {"algorithm": "sha1"}}},
                           job_options={"priority": 5}, key="order-7", home=tmp_path)
    assert job.id.startswith("checks-order-7-") and job.priority == 5
    assert (job.pool, job.metadata["fanout-handler"]) == ("local", "checksum")
    blobs = (tmp_path / "blobs").resolve()
    assert tasks[0].resource_files[0].http_url == f"file://{blobs}/data/a.csv"
    assert tasks[0].output_files[0].path == "a.csv.sha1"


def test_the_workers_limits_and_checks() -> None:
    checksum = ChecksumHandler()
    with pytest.raises(BudgetExceeded, match="the limit is 1"):  # ctx.max_tasks
        build_job(checksum, {"inputs": INPUTS}, name="checksum",
                  config={"limits": {"max_tasks_per_message": 1}})
    with pytest.raises(BudgetExceeded, match="priority 50 is outside"):
        build_job(checksum, {"inputs": INPUTS}, name="checksum",
                  config={"limits": {"max_priority": 10}}, job_options={"priority": 50})
    with pytest.raises(InvalidEnvelope, match="job.priority"):  # no worker takes it
        build_job(checksum, {"inputs": INPUTS}, name="checksum",
                  job_options={"priority": 5000})
    with pytest.raises(BudgetExceeded, match="max_task_retries 50"):
        build_job(checksum, {"inputs": INPUTS}, name="checksum",
                  job_options={"task": {"max_task_retries": 50}})
    with pytest.raises(ForeignStorage):  # the stub would have taken this one
        build_job(checksum, {"inputs": ["https://elsewhere.blob.core.windows.net/c/a"]},
                  name="checksum")
    with pytest.raises(InvalidParams, match="container"):  # so would it this
        build_job(checksum, {"inputs": [{"container": "Bad_Name", "blob": "a"}]},
                  name="checksum")


def test_options_it_refuses_stop_the_worker() -> None:
    with pytest.raises(SettingsError, match="algorithm"):
        harness({"checksum": ChecksumHandler()},
                config={"handlers": {"checksum": {"algorithm": "crc32"}}})


def test_a_route_it_cannot_serve_stops_the_worker() -> None:
    """A [[routes]] rule puts the uploaded blob under "input"; this handler wants
    "inputs", so the start-up route check refuses the rule."""
    with pytest.raises(SettingsError, match="would be dead-lettered.*inputs"):
        harness({"checksum": ChecksumHandler()},
                config={"routes": [{"handler": "checksum", "container": "data"}]})
