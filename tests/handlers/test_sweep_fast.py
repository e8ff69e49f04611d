"""The sweep's fast paths: command lines pieced together from ``sh_parts`` and mode
``product`` expanded as nested loops (handlers/sweep.py ``_product_tasks``). Each case
is held against the generic path, which quotes every value and then the whole line."""

from __future__ import annotations

import shlex
from typing import Any

import pytest

from handlers.base import SATISFY_DEPENDENTS, Program, TaskSpec
from handlers.commands import CommandTemplate, bind_parts, parts_format, quote, sh, sh_parts
from handlers.sweep import (
    BUILTIN_FIELDS,
    Grid,
    _concat_shape,
    _tasks,
    _tasks_generic,
    expand_axis,
    parse_params,
)

HOSTILE = ["'", "a b", "$(touch x)", "{x}", "", "é"]


def both(template: str, parameters: dict[str, Any], *, repeat: int = 1,
         environment: dict[str, str] | None = None, options: bool = False,
         mode: str = "product") -> tuple[list[TaskSpec], list[TaskSpec], str]:
    """The fast and the generic path's tasks for one sweep, and the fast one's name."""
    raw: dict[str, Any] = {"program": "p", "parameters": parameters, "repeat": repeat,
                           "mode": mode}
    if options:
        raw["task"] = {"max_task_retries": 2, "max_wall_clock": "PT1H", "retention": "P1D"}
    params = parse_params(raw)
    axes = {n: expand_axis(n, s, 10_000) for n, s in params.parameters.items()}
    program = Program(name="p", command=template, environment=environment or {},
                      required_slots=2 if options else 1)
    parsed = CommandTemplate(template)
    conditions = SATISFY_DEPENDENTS if options else None
    stream = _tasks(params, Grid(params, axes), program, parsed, conditions)
    name = getattr(stream, "__name__", "")
    fast = list(stream)
    generic = list(_tasks_generic(params, Grid(params, axes), program, parsed, conditions))
    return fast, generic, name


@pytest.mark.parametrize("template", [
    "run {c}",                                     # head + value + tail
    "run {a} {b} {c}",
    "run {c} {a} --i {task_index} --r {repeat_index}",  # per-task str.format
    "run {c}{c} '{b}'",                            # the last parameter twice
    "run {a} {b}",                                 # not the last parameter at all
    "echo '{c}' \"$HOME\" {{x}} }}{a}{{",           # quotes and braces in the literal text
    "{c} tail",
])
@pytest.mark.parametrize("repeat", [1, 3])
def test_product_path_equals_the_generic_quoting(template: str, repeat: int) -> None:
    """Three parameters, hostile values, a program environment whose keys the sweep's
    own override: the nested product loops give the generic path's tasks exactly,
    environments in the same order."""
    params = {"a": HOSTILE[1:4], "b": [1, 2], "c": HOSTILE}  # "{x}" among the a
    env = {"X": "1", "FANOUT_PARAM_C": "old", "FANOUT_TASK_INDEX": "old"}
    fast, generic, name = both(template, params, repeat=repeat, environment=env,
                               options=True)
    assert name == "_product_tasks"
    assert len(fast) == 3 * 2 * len(HOSTILE) * repeat
    assert fast == generic
    assert [list(t.environment.items()) for t in fast] == \
        [list(t.environment.items()) for t in generic]
    assert all(t.exit_conditions is SATISFY_DEPENDENTS and t.required_slots == 2
               for t in fast)


@pytest.mark.parametrize("parameters", [
    {"only": HOSTILE},                             # one parameter: no outer loop
    {"a": [1], "b": [2], "c": [3], "d": HOSTILE},  # outer loops of one value
    {"A": ["x", "y"], "a": ["1", "2"]},            # one environment key for both
])
def test_product_path_shapes(parameters: dict[str, Any]) -> None:
    """Grids of other shapes, including two names that give the same environment key
    (the later parameter's value wins, as in the generic path)."""
    template = " ".join(f"{{{n}}}" for n in parameters) + " x"
    fast, generic, name = both(template, parameters, repeat=2)
    assert name == "_product_tasks"
    assert fast == generic
    assert [list(t.environment.items()) for t in fast] == \
        [list(t.environment.items()) for t in generic]


def test_other_modes_take_the_row_path() -> None:
    """Mode ``zip`` is not nested by its last parameter; it still equals the generic."""
    fast, generic, name = both("run {a} {b}", {"a": ["1", "a b"], "b": ["'", "2"]},
                               mode="zip")
    assert name == "_row_tasks"
    assert fast == generic


def test_each_task_has_an_environment_of_its_own() -> None:
    """The nested loops fill one working dict; every task gets a copy of its own, with
    its own values, and changing one task's changes no other's."""
    fast, _generic, _name = both("run {a} {b}", {"a": ["1", "2"], "b": ["x", "y", "z"]})
    envs = [t.environment for t in fast]
    assert len({id(e) for e in envs}) == len(envs) == 6
    assert [(e["FANOUT_PARAM_A"], e["FANOUT_PARAM_B"], e["FANOUT_TASK_INDEX"])
            for e in envs] == [("1", "x", "0"), ("1", "y", "1"), ("1", "z", "2"),
                               ("2", "x", "3"), ("2", "y", "4"), ("2", "z", "5")]
    envs[0]["FANOUT_PARAM_B"] = "changed"
    assert [e["FANOUT_PARAM_B"] for e in envs[1:]] == ["y", "z", "x", "y", "z"]
    assert {t.environment["FANOUT_REPEAT_INDEX"] for t in fast} == {"0"}


def test_command_lines_run_as_one_argument_each() -> None:
    """The shell the task starts sees each hostile value as one literal word."""
    fast, _generic, _name = both("printf %s {a} {b}", {"a": ["1"], "b": HOSTILE})
    for task, value in zip(fast, HOSTILE, strict=True):
        outer = shlex.split(task.command_line)
        assert outer[:2] == ["/bin/sh", "-c"]
        assert shlex.split(outer[2]) == ["printf", "%s", "1", value]


def test_bound_parts_join_to_the_quoted_line() -> None:
    """Binding some positions, then formatting the rest, gives ``sh(render_quoted)``."""
    template = CommandTemplate("cp {a} '{b}' {c} {{{a}}}")
    order = ["a", "b", "c", *BUILTIN_FIELDS]
    parts = sh_parts(template, order)
    assert parts is not None
    values = {"a": "x'y", "b": "$(id)", "c": "a b"}
    escaped = {n: quote(v).replace("'", "'\"'\"'") for n, v in values.items()}
    bound = bind_parts(parts, {0: escaped["a"], 1: escaped["b"]})
    assert [p for p in bound if isinstance(p, int)] == [2]
    expected = sh(template.render_quoted({n: quote(v) for n, v in values.items()}))
    assert parts_format(bound).format("", "", escaped["c"]) == expected
    assert _concat_shape(bound, 2) is not None
    head, tail = _concat_shape(bound, 2) or ("", "")
    assert head + escaped["c"] + tail == expected


def test_concat_shape_only_for_one_last_parameter() -> None:
    """Any other shape (the last parameter twice, a task index, nothing) is None."""
    assert _concat_shape(["a", 2, "b"], 2) == ("a", "b")
    assert _concat_shape(["a", 2, "b", 2, "c"], 2) is None
    assert _concat_shape(["a", 3, "b"], 2) is None
    assert _concat_shape(["a"], 2) is None


def test_no_parts_when_the_literal_text_needs_no_quoting() -> None:
    """A template whose literal text is shell-safe falls back to the generic path."""
    assert sh_parts(CommandTemplate("{a}"), ["a"]) is None
    assert sh_parts(CommandTemplate("run {a}"), ["a"]) == ["/bin/sh -c 'run ", 0, "'"]
