"""Tests for the parametric sweep handler."""

from __future__ import annotations

import itertools
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from handlers.base import (
    SATISFY_DEPENDENTS,
    BlobRef,
    BuildRequest,
    JobSpec,
    Program,
    TaskSpec,
)
from handlers.errors import BudgetExceeded, InvalidParams, MessageFault, UnknownProgram
from handlers.sweep import AGGREGATE_ID, SweepHandler
from worker.backends.local import LocalBackend
from worker.config import SubmitConfig
from worker.metrics import Metrics
from worker.submit import Submitter

from .conftest import StubContext

REPO = Path(__file__).resolve().parents[2]


def build(ctx: StubContext, **params: Any) -> tuple[JobSpec, list[TaskSpec]]:
    job = SweepHandler().build(BuildRequest("sweep", params, "key"), ctx)
    tasks = list(job.tasks)
    return job, tasks


def argv(task: TaskSpec) -> list[str]:
    """The argv the inner shell would see: unwrap `/bin/sh -c '<cmd>'`."""
    outer = shlex.split(task.command_line)
    assert outer[:2] == ["/bin/sh", "-c"] and len(outer) == 3
    return shlex.split(outer[2])


def test_product_of_list_and_range(stub_ctx: StubContext) -> None:
    """A list times an integer range gives every combination, in product order."""
    job, tasks = build(stub_ctx, program="simulate",
                       parameters={"alpha": [0.1, 0.5], "beta": {"start": 0, "stop": 10,
                                                                 "step": 2}})
    assert job.task_count == len(tasks) == 10
    seen = [(argv(t)[3], argv(t)[5]) for t in tasks]
    expected = [(a, str(b)) for a, b in itertools.product(["0.1", "0.5"], range(0, 10, 2))]
    assert seen == expected
    assert [t.id for t in tasks] == [str(i) for i in range(10)]
    assert tasks[3].environment["FANOUT_PARAM_ALPHA"] == "0.1"
    assert tasks[3].environment["FANOUT_PARAM_BETA"] == "6"
    assert tasks[3].environment["FANOUT_TASK_INDEX"] == "3"


def test_float_range_is_exact_in_decimal(stub_ctx: StubContext) -> None:
    """0.1 steps read 0.1, 0.2, 0.3 (not 0.30000000000000004), stop excluded."""
    _, tasks = build(stub_ctx, program="simulate", mode="zip",
                     parameters={"alpha": {"start": 0.1, "stop": 0.4, "step": 0.1},
                                 "beta": [1, 2, 3]})
    assert [argv(t)[3] for t in tasks] == ["0.1", "0.2", "0.3"]


def test_zip_pairs_values(stub_ctx: StubContext) -> None:
    """zip pairs the i-th values of each parameter."""
    _, tasks = build(stub_ctx, program="simulate", mode="zip",
                     parameters={"alpha": [1, 2, 3], "beta": ["a", "b", "c"]})
    assert [(argv(t)[3], argv(t)[5]) for t in tasks] == [("1", "a"), ("2", "b"), ("3", "c")]


def test_zip_of_unequal_lengths_is_refused(stub_ctx: StubContext) -> None:
    """zip with lists of different lengths is InvalidParams, naming the sizes."""
    with pytest.raises(InvalidParams, match="alpha=2, beta=3"):
        build(stub_ctx, program="simulate", mode="zip",
              parameters={"alpha": [1, 2], "beta": [1, 2, 3]})


def test_repeat_and_aggregate(stub_ctx: StubContext) -> None:
    """repeat runs each point N times; the aggregate depends on the whole id range."""
    job, tasks = build(stub_ctx, program="simulate", repeat=3,
                       parameters={"alpha": [1, 2], "beta": [0]},
                       aggregate={"program": "reduce"})
    assert job.task_count == len(tasks) == 7
    assert job.uses_task_dependencies
    assert [t.environment["FANOUT_REPEAT_INDEX"] for t in tasks[:6]] == ["0", "1", "2"] * 2
    agg = tasks[-1]
    assert agg.id == "aggregate"
    assert agg.depends_on_ranges == ((0, 5),)
    assert argv(agg) == ["python3", "reduce.py", "--n", "6"]


def test_random_sampling_is_seeded_and_distinct(stub_ctx: StubContext) -> None:
    """random mode draws distinct grid points, the same ones for the same seed."""
    params = {"program": "simulate", "mode": "random", "samples": 20, "seed": 7,
              "parameters": {"alpha": {"start": 0, "stop": 100}, "beta": [1, 2, 3]}}
    _, first = build(stub_ctx, **params)
    _, again = build(stub_ctx, **params)
    points = [tuple(argv(t)[3::2]) for t in first]
    assert points == [tuple(argv(t)[3::2]) for t in again]
    assert len(set(points)) == 20
    _, other = build(stub_ctx, **{**params, "seed": 8})
    assert [tuple(argv(t)[3::2]) for t in other] != points


def test_combinations_of_one_list(stub_ctx: StubContext) -> None:
    """combinations picks every `length`-subset of one list into name_1..name_k."""
    stub_ctx.programs["pair"] = type(stub_ctx.programs["simulate"])(
        name="pair", command="cmp {x_1} {x_2}")
    _, tasks = build(stub_ctx, program="pair", mode="combinations", length=2,
                     parameters={"x": ["a", "b", "c", "d"]})
    assert [argv(t)[1:] for t in tasks] == [list(c) for c in
                                            itertools.combinations("abcd", 2)]


def test_hostile_values_stay_one_literal_argument(stub_ctx: StubContext) -> None:
    """Shell metacharacters, quotes and newlines arrive as one literal argument."""
    nasty = ["; rm -rf ~", "$(touch /tmp/x)", "a'b\"c", "line1\nline2", "`id`", "ünï cødé"]
    _, tasks = build(stub_ctx, program="simulate", parameters={"alpha": nasty, "beta": [0]})
    assert [argv(t)[3] for t in tasks] == nasty
    assert all(len(argv(t)) == 6 for t in tasks)


@pytest.mark.parametrize("params, reason", [
    ({"program": "nope", "parameters": {"alpha": [1], "beta": [1]}}, "UnknownProgram"),
    ({"program": "simulate", "parameters": {"alpha": [1]}}, "InvalidParams"),
    ({"program": "simulate", "parameters": {"alpha": {"start": 0, "stop": 5, "step": 0},
                                            "beta": [1]}}, "InvalidParams"),
    ({"program": "simulate", "parameters": {"alpha": {"start": 0, "stop": 5, "step": -1},
                                            "beta": [1]}}, "InvalidParams"),
    ({"program": "simulate", "parameters": {"alpha": {"start": 5, "stop": 0},
                                            "beta": [1]}}, "InvalidParams"),
    ({"program": "simulate", "parameters": {"alpha": [], "beta": [1]}}, "InvalidParams"),
    ({"program": "simulate", "parameters": {"alpha": [1], "beta": [1]}, "mode": "spiral"},
     "InvalidParams"),
    ({"program": "simulate", "parameters": {"alpha": [1], "beta": [1]}, "bogus": 1},
     "InvalidParams"),
    ({"program": "simulate", "parameters": {"alpha": [{"x": 1}], "beta": [1]}},
     "InvalidParams"),
    ({"program": "simulate", "parameters": {"alpha": [1], "beta": [1]}, "repeat": 0},
     "InvalidParams"),
    ({"command": "echo {alpha}", "parameters": {"alpha": [1]}}, "InvalidParams"),
    ({"parameters": {"alpha": [1]}}, "InvalidParams"),
    ({"program": "simulate", "parameters": {"1bad": [1]}}, "InvalidParams"),
    ({"program": "simulate", "parameters": {"alpha": {"start": 0, "stop": 10 ** 9},
                                            "beta": [1]}}, "BudgetExceeded"),
    ({"program": "simulate", "parameters": {"alpha": {"start": 0, "stop": 1000},
                                            "beta": {"start": 0, "stop": 1000}}},
     "BudgetExceeded"),
])
def test_bad_params_have_reason_codes(stub_ctx: StubContext, params: dict[str, Any],
                                      reason: str) -> None:
    """Each bad params shape fails with its documented reason code."""
    with pytest.raises(MessageFault) as info:
        build(stub_ctx, **params)
    assert info.value.reason == reason
    assert info.value.description


def test_budget_counts_repeat_and_aggregate(stub_ctx: StubContext) -> None:
    """The budget applies to the total, including repeats and the aggregate task."""
    stub_ctx.max_tasks = 10
    build(stub_ctx, program="simulate", repeat=5, parameters={"alpha": [1, 2], "beta": [0]})
    with pytest.raises(BudgetExceeded):
        build(stub_ctx, program="simulate", repeat=5, parameters={"alpha": [1, 2],
                                                                  "beta": [0]},
              aggregate={"program": "reduce"})


def test_message_command_needs_opt_in(stub_ctx: StubContext) -> None:
    """A command line in a message runs only when the operator opted in."""
    params = {"command": "echo {alpha}", "parameters": {"alpha": ["x y"]}}
    with pytest.raises(InvalidParams, match="allow_message_commands"):
        build(stub_ctx, **params)
    stub_ctx.allow_message_commands = True
    _, tasks = build(stub_ctx, **params)
    assert argv(tasks[0]) == ["echo", "x y"]


def test_unknown_program_is_its_own_reason(stub_ctx: StubContext) -> None:
    """A program missing from config is UnknownProgram, not InvalidParams."""
    with pytest.raises(UnknownProgram):
        build(stub_ctx, program="rm", parameters={"alpha": [1], "beta": [1]})


def test_tasks_stream_lazily(stub_ctx: StubContext) -> None:
    """build() returns at once for a 100,000-point grid; tasks come one at a time."""
    job = SweepHandler().build(BuildRequest("sweep", {
        "program": "simulate", "parameters": {"alpha": {"start": 0, "stop": 1000},
                                              "beta": {"start": 0, "stop": 100}}}, "k"),
        stub_ctx)
    assert job.task_count == 100_000
    it = iter(job.tasks)
    first = next(it)
    assert first.id == "0" and not isinstance(job.tasks, list)


def test_aggregate_runs_after_failures_by_default(stub_ctx: StubContext) -> None:
    """Default ``run``: every sweep task carries the one shared SATISFY_DEPENDENTS, so a
    failed task satisfies the aggregate; the aggregate itself carries none."""
    job, tasks = build(stub_ctx, program="simulate", repeat=2,
                       parameters={"alpha": [1, 2, 3], "beta": [0]},
                       aggregate={"program": "reduce"})
    *sweep, agg = tasks
    assert len(sweep) == 6
    assert all(t.exit_conditions is SATISFY_DEPENDENTS for t in sweep)
    assert agg.exit_conditions is None
    assert SATISFY_DEPENDENTS.options_for("exit", 1) == ("none", "satisfy")
    assert SATISFY_DEPENDENTS.options_for("pre_processing_error", None) == ("none", "satisfy")
    assert agg.environment["FANOUT_FAN_IN_RANGE"] == "0-5"
    assert agg.environment["FANOUT_ON_DEPENDENCY_FAILURE"] == "run"
    assert agg.environment["FANOUT_TASK_COUNT"] == "6"
    assert job.uses_task_dependencies and job.outputs == []


def test_aggregate_skip_leaves_batch_default(stub_ctx: StubContext) -> None:
    """``skip``: no task carries exit conditions, so Batch blocks the aggregate on a failure."""
    _, tasks = build(stub_ctx, program="simulate", parameters={"alpha": [1, 2], "beta": [0]},
                     aggregate={"program": "reduce", "on_dependency_failure": "skip"})
    assert [t.exit_conditions for t in tasks] == [None, None, None]
    assert tasks[-1].environment["FANOUT_ON_DEPENDENCY_FAILURE"] == "skip"
    assert tasks[-1].environment["FANOUT_FAN_IN_RANGE"] == "0-1"


def test_no_aggregate_no_exit_conditions(stub_ctx: StubContext) -> None:
    """Without an aggregate the job uses no dependencies, so no task has exit conditions
    (Batch refuses a dependency action on such a job)."""
    job, tasks = build(stub_ctx, program="simulate", parameters={"alpha": [1, 2], "beta": [0]})
    assert not job.uses_task_dependencies
    assert [t.exit_conditions for t in tasks] == [None, None]


def test_generic_path_carries_exit_conditions_too(stub_ctx: StubContext) -> None:
    """A template whose literal text needs no quoting takes the generic path; it too
    gives every task the shared exit conditions."""
    stub_ctx.programs["bare"] = Program(name="bare", command="{alpha}")
    _, tasks = build(stub_ctx, program="bare", parameters={"alpha": ["true", "false"]},
                     aggregate={"program": "reduce"})
    assert argv(tasks[0]) == ["true"]
    assert [t.exit_conditions for t in tasks] == [SATISFY_DEPENDENTS, SATISFY_DEPENDENTS, None]
    assert tasks[0].exit_conditions is tasks[1].exit_conditions


@pytest.mark.parametrize("value", ["maybe", "", None, True, "RUN"])
def test_on_dependency_failure_is_run_or_skip(stub_ctx: StubContext, value: Any) -> None:
    """Any other value is InvalidParams naming the field and the two choices."""
    with pytest.raises(InvalidParams, match=r"aggregate\.on_dependency_failure.*'run' or 'skip'"):
        build(stub_ctx, program="simulate", parameters={"alpha": [1], "beta": [0]},
              aggregate={"program": "reduce", "on_dependency_failure": value})


def run_summary(cwd: Path, results: str | None,
                fan_in: str | None) -> subprocess.CompletedProcess[str]:
    """``python -m worker.demo summary`` as the sweep's aggregate runs it: in its working
    directory ``cwd``, told where the staged results are."""
    env = {"PATH": os.defpath, "AZ_BATCH_JOB_ID": "job-x", "AZ_BATCH_TASK_ID": "aggregate",
           "PYTHONPATH": str(REPO)}
    if results is not None:
        env["FANOUT_RESULTS_DIR"] = results
    if fan_in is not None:
        env["FANOUT_FAN_IN_RANGE"] = fan_in
    return subprocess.run([sys.executable, "-m", "worker.demo", "summary"], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=60, check=False)


def test_demo_pi_writes_its_estimate_as_its_output(tmp_path: Path) -> None:
    """A pi task writes estimate.json in its working directory (its program's output)."""
    done = subprocess.run([sys.executable, "-m", "worker.demo", "pi", "--samples", "1000",
                           "--seed", "4"], env={"PATH": os.defpath, "PYTHONPATH": str(REPO)},
                          cwd=tmp_path, capture_output=True, text=True, timeout=60, check=True)
    data = json.loads((tmp_path / "estimate.json").read_text())
    assert data == {"estimate": data["estimate"], "samples": 1000, "seed": 4}
    assert 2.9 < data["estimate"] < 3.4
    assert done.stdout == f"pi ~ {data['estimate']:.6f} from 1000 samples (seed 4)\n"


def test_demo_summary_reports_missing_estimates(tmp_path: Path) -> None:
    """The pi summary averages the staged estimates (results/<job>/<task>/estimate.json),
    names the missing ids, writes summary.json, and exits 0 if any estimate exists (1 if
    none); without FANOUT_FAN_IN_RANGE it averages what it finds."""
    results = tmp_path / "results" / "job-x"
    for i in range(20):
        if i not in (7, 11, 12, 13):
            (results / str(i)).mkdir(parents=True)
            (results / str(i) / "estimate.json").write_text(
                json.dumps({"estimate": 3.0 if i % 2 else 3.2}))
    (results / "aggregate").mkdir()
    (results / "aggregate" / "estimate.json").write_text("not json\n")
    done = run_summary(tmp_path, "results/job-x", "0-19")
    assert done.returncode == 0, done.stderr
    assert done.stdout == ("pi ~ 3.112500 averaged over 16 of 20 tasks; "
                           "missing: 7, 11-13\n")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["pi"] == pytest.approx(3.1125)
    assert (summary["tasks"], summary["expected"], summary["missing"]) == (16, 20,
                                                                         [7, 11, 12, 13])
    whole = run_summary(tmp_path, "results/job-x", None)
    assert (whole.returncode, whole.stdout) == (0, "pi ~ 3.112500 averaged over 16 tasks\n")
    none = run_summary(tmp_path, "results/job-empty", "0-2")
    assert (none.returncode, none.stdout) == (1, "no estimates found of 3 tasks; missing: 0-2\n")
    bad = run_summary(tmp_path, "results/job-x", "19-0")
    assert bad.returncode == 2 and "ends before it starts" in bad.stdout


@dataclass
class BlobRootContext(StubContext):
    """A StubContext whose storage URLs point into a local blob directory."""

    root: Path = Path("/nonexistent")

    def input_url(self, ref: BlobRef) -> str:
        return f"file://{self.root}/{ref.container}/{ref.blob}"

    def output_container_url(self, container: str, prefix: str) -> str:
        return f"file://{self.root}/{container}"

    def input_container_url(self, container: str, prefix: str) -> str:
        return f"file://{self.root}/{container}"


def test_aggregate_runs_after_a_failed_task_on_the_local_executor(
        stub_ctx: StubContext, tmp_path: Path) -> None:
    """End to end: a pi sweep whose task 1 fails (``--seed bad``) still runs its
    aggregate, which is staged the other tasks' uploaded estimates and reports the
    missing one; the job's every task completes."""
    python = shlex.quote(sys.executable)
    env = {"PYTHONPATH": str(REPO)}
    ctx = BlobRootContext(programs=dict(stub_ctx.programs), root=tmp_path / "blobs",
                          job_id="sweep-e2e")
    ctx.programs["pi"] = Program(
        name="pi", command=f"{python} -m worker.demo pi --samples 200 --seed {{seed}}",
        environment=env, outputs=("estimate.json",))
    ctx.programs["pi-summary"] = Program(
        name="pi-summary", command=f"{python} -m worker.demo summary", environment=env,
        outputs=("summary.json",))
    job = SweepHandler().build(BuildRequest("sweep", {
        "program": "pi", "parameters": {"seed": [0, "bad", 2]},
        "aggregate": {"program": "pi-summary"}}, "key"), ctx)
    job.id = "sweep-e2e"
    backend = LocalBackend(home=tmp_path / "exec", slots=2, poll_interval=0.02)
    submitter = Submitter(backend=backend, config=SubmitConfig(),
                          metrics=Metrics(registry=CollectorRegistry()))
    try:
        backend.start()
        assert submitter.submit(job, handler="sweep").added == 4
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            agg = backend.task(job.id, AGGREGATE_ID)
            if agg is not None and agg.state == "completed":
                break
            time.sleep(0.05)
        failed = backend.task(job.id, "1")
        assert failed is not None and failed.state == "completed" and failed.exit_code == 2
        assert agg is not None and agg.state == "completed", agg
        assert agg.exit_code == 0
        out = (backend.task_dir(job.id, AGGREGATE_ID) / "stdout.txt").read_text()
        assert "averaged over 2 of 3 tasks; missing: 1" in out
        results = tmp_path / "blobs" / "fanout-results" / "results" / "sweep-e2e"
        assert sorted(p.relative_to(results).as_posix() for p in results.rglob("*.json")) == [
            "0/estimate.json", "2/estimate.json", "aggregate/summary.json"]
    finally:
        submitter.close()
        backend.close()
