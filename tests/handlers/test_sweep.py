"""Tests for the parametric sweep handler."""

from __future__ import annotations

import itertools
import shlex
from typing import Any

import pytest

from handlers.base import BuildRequest, JobSpec, TaskSpec
from handlers.errors import BudgetExceeded, InvalidParams, MessageFault, UnknownProgram
from handlers.sweep import SweepHandler

from .conftest import StubContext


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
