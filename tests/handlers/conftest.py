"""Handler test fixtures over the plug-in test kit (handlers.testing, worker.testing)."""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from handlers.base import Program
from handlers.testing import StubContext
from worker.config import Settings
from worker.testing import Harness, harness

__all__ = ["PlanHarness", "StubContext", "inner_argv", "sample"]

#: The worker's real planner over Settings (the kit's harness, kept under its old name).
PlanHarness = Harness


@pytest.fixture
def stub_ctx() -> StubContext:
    """A context with one program, `simulate`, taking alpha and beta."""
    return StubContext(programs={
        "simulate": Program(name="simulate",
                            command="python3 sim.py --alpha {alpha} --beta {beta}"),
        "reduce": Program(name="reduce", command="python3 reduce.py --n {task_count}"),
    })


@pytest.fixture
def make_planner(make_settings: Callable[..., Settings]) -> Callable[..., PlanHarness]:
    """A PlanHarness from Settings overrides (local storage unless blob is set) over
    the installed handlers; the start-up option and route checks are left out, so a
    test sees what a handler does at build time with any options."""

    def make(**overrides: Any) -> PlanHarness:
        return harness(config=make_settings(**overrides), start_up_checks=False)

    return make


def inner_argv(command_line: str) -> list[str]:
    """The words of the shell command a task runs: ``/bin/sh -c '<this>'`` split."""
    outer = shlex.split(command_line)
    assert outer[:2] == ["/bin/sh", "-c"] and len(outer) == 3, outer
    return shlex.split(outer[2])


SAMPLES = Path(__file__).parent / "samples"


def sample(name: str) -> dict[str, Any]:
    """A copy of one of the sample events (tests/handlers/samples)."""
    data: dict[str, Any] = json.loads((SAMPLES / name).read_text())
    return data
