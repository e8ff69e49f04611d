"""Tests of the checksum handler, with fanout's plug-in test kit."""

from __future__ import annotations

import pytest

from handlers.errors import BudgetExceeded, InvalidParams
from handlers.testing import make_context, request, tasks_of
from worker.testing import SettingsError, build_job, harness

from .checksum import ChecksumHandler

INPUTS = [{"container": "data", "blob": "a.csv"}, {"container": "data", "blob": "b.csv"}]


def test_build_with_a_stub_context() -> None:
    ctx = make_context(options={"checksum": {"algorithm": "md5"}}, max_tasks=2)
    job = ChecksumHandler().build(request("checksum", {"inputs": INPUTS}), ctx)
    tasks = tasks_of(job)  # draws the lazy tasks, holds them to task_count
    assert tasks[1].command_line == "/bin/sh -c 'md5sum input > sum.txt'"
    assert tasks[1].output_files[0].path == "b.csv.md5"
    with pytest.raises(InvalidParams, match="inputs"):
        ChecksumHandler().build(request("checksum", {"inputs": []}), ctx)


def test_build_as_the_worker_would() -> None:
    limits = {"limits": {"max_priority": 10}}
    job, tasks = build_job(ChecksumHandler(), {"inputs": INPUTS}, name="checksum",
                           config=limits, job_options={"priority": 5})
    assert (job.priority, job.pool, len(tasks)) == (5, "local", 2)
    with pytest.raises(BudgetExceeded, match="limits"):
        build_job(ChecksumHandler(), {"inputs": INPUTS}, name="checksum",
                  config=limits, job_options={"priority": 50})
    with pytest.raises(SettingsError, match="algorithm"):  # `fanout run` would not start
        harness({"checksum": ChecksumHandler()},
                config={"handlers": {"checksum": {"algorithm": "crc32"}}})
