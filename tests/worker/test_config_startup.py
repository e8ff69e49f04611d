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


ENTRA_BLOB = '[blob]\naccount_url = "https://stlimits.blob.core.windows.net"\n'


@pytest.mark.parametrize("config, message", [
    (ENTRA_BLOB + '[limits]\nmax_wall_clock = "P7D"\n',
     "limits.max_wall_clock P7D + blob.sas_wait_allowance PT1H = P7DT1H: the SAS of the "
     "longest job would outlive what a user delegation SAS may (P6DT23H50M: a user "
     "delegation key is valid at most 7 days, less a 10-minute margin)"),
    (ENTRA_BLOB + 'sas_wait_allowance = "P1DT1M"\n',
     "limits.max_wall_clock P6D + blob.sas_wait_allowance P1DT1M = P7DT1M: the SAS"),
    ('[jobs]\nmax_wall_clock = "P8D"\n',
     "jobs.max_wall_clock P8D is over limits.max_wall_clock P6D: every job whose message "
     "sets no wall clock would run longer than the limit"),
    ('[blob]\nsas_ttl = 14400\n',
     "blob.sas_ttl = 14400: Value error, blob.sas_ttl was removed: each job's SAS now "
     "lives its own max wall clock"),
    ('[blob]\nsas_wait_allowance = "PT0S"\n',
     "blob.sas_wait_allowance = 'PT0S': Value error, must be a positive duration"),
])
@pytest.mark.parametrize("command", [["run"], ["plan", *SWEEP], ["send", *SWEEP]])
def test_limits_no_sas_could_cover_are_refused_at_start_up(
        command: list[str], config: str, message: str, workdir: Path) -> None:
    """A SAS lifetime shorter than the wall clock limit allows is refused before the
    worker starts, showing the arithmetic; nothing is created, no secret is shown."""
    (workdir / "fanout.toml").write_text(config)
    result = CliRunner().invoke(main, command)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert not (workdir / ".fanout" / "queue.db").exists()


def test_an_account_key_has_no_seven_day_cap(workdir: Path) -> None:
    """The same long limit passes with account-key signing (a service SAS has no cap)."""
    (workdir / "fanout.toml").write_text(
        ENTRA_BLOB + 'account_key = "a2V5"\n[limits]\nmax_wall_clock = "P30D"\n')
    result = CliRunner().invoke(main, ["plan", *SWEEP])
    assert result.exit_code == 0, result.output
    assert "a2V5" not in result.output


def test_the_removed_sas_ttl_is_named_from_the_environment_too(
        workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """FANOUT_BLOB__SAS_TTL gets the same explanation as the file's key, not a
    "no such setting" guess."""
    monkeypatch.setenv("FANOUT_BLOB__SAS_TTL", "14400")
    result = CliRunner().invoke(main, ["plan", *SWEEP])
    assert result.exit_code == 2, result.output
    assert "blob.sas_ttl = '14400': Value error, blob.sas_ttl was removed" in result.output
