"""`fanout run`, `plan` and `send` refuse the same configurations, the same way."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from worker.cli import main

SWEEP = ["-H", "sweep", "-p", "program=pi", "-p", "parameters.samples=[10]",
         "-p", "parameters.seed=[1]"]
BAD_ROUTE = """
[[routes]]
handler = "transcode"
container = "videos"
blob_param = "inputs"
"""
ROUTE_ERROR = ("routes[0] (handler 'transcode'): every blob it takes would be dead-lettered "
               "(tried videos/example): InvalidParams: inputs: Input should be a valid list")


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("config, message", [
    ("[handlers.nope]\nx = 1\n",
     "[handlers.nope]: no handler 'nope' is installed (installed: render, sweep, transcode)"),
    (BAD_ROUTE, ROUTE_ERROR),
    ('[[routes]]\nhandler = "render"\njob = { priority = "high" }\n',
     "routes[0] (handler 'render'): job: priority: "),
])
@pytest.mark.parametrize("command", [["run"], ["plan", *SWEEP], ["send", *SWEEP]])
def test_run_plan_and_send_refuse_the_same_config(
        command: list[str], config: str, message: str, workdir: Path) -> None:
    """Each command exits 2 with one message (no traceback), and nothing is created:
    no queue (so `send` sent nothing), no executor state."""
    (workdir / "fanout.toml").write_text(config)
    result = CliRunner().invoke(main, command)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output and result.exception is not None
    assert isinstance(result.exception, SystemExit)
    assert not (workdir / ".fanout" / "queue.db").exists()


def test_plan_with_a_good_route_plans_an_upload(workdir: Path) -> None:
    """The same build_planner, with a route that checks out, plans a message."""
    good = BAD_ROUTE.replace('blob_param = "inputs"', 'params = { output = { container = "out" } }')
    (workdir / "fanout.toml").write_text(good)
    result = CliRunner().invoke(main, ["plan", *SWEEP])
    assert result.exit_code == 0, result.output
    assert "tasks=1" in result.output
