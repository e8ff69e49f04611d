"""Tests for loading the settings: unknown FANOUT_* variables, and the demo programs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.test_docs import leaf_keys
from worker.cli import main
from worker.config import Settings, demo_programs, load_settings, unknown_environment
from worker.errors import SettingsError


@pytest.fixture
def empty_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty fanout.toml in a fresh working directory."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "fanout.toml"
    path.write_text("")
    return path


@pytest.mark.parametrize("name, nearest", [
    ("FANOUT_METRICS_PORT", "FANOUT_METRICS__PORT"),
    ("FANOUT_BATCH_ACCOUNT_URL", "FANOUT_BATCH__ACCOUNT_URL"),
    ("FANOUT_CONSUMER__CONCURENCY", "FANOUT_CONSUMER__CONCURRENCY"),
    ("FANOUT_PROGRAM__SIM__COMMAND", "FANOUT_PROGRAMS__SIM__COMMAND"),
])
def test_unknown_variable_is_an_error_naming_the_nearest_setting(
        name: str, nearest: str, empty_config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A FANOUT_* variable that sets nothing stops start-up, with the nearest name."""
    monkeypatch.setenv(name, "9000")
    with pytest.raises(SettingsError) as caught:
        load_settings(empty_config)
    assert str(caught.value) == (
        f"invalid configuration ({empty_config}; FANOUT_* environment):\n"
        f"  {name}: no such setting; did you mean {nearest}?")


def test_single_underscore_batch_url_no_longer_falls_back_to_local(
        empty_config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The right spelling selects Azure Batch; the slip is refused, not run locally."""
    monkeypatch.setenv("FANOUT_BATCH__ACCOUNT_URL", "https://b.westeurope.batch.azure.com")
    assert load_settings(empty_config).backend_kind == "azure"
    monkeypatch.delenv("FANOUT_BATCH__ACCOUNT_URL")
    monkeypatch.setenv("FANOUT_BATCH_ACCOUNT_URL", "https://b.westeurope.batch.azure.com")
    with pytest.raises(SettingsError, match="FANOUT_BATCH__ACCOUNT_URL"):
        load_settings(empty_config)


def test_every_unknown_variable_is_listed_and_values_are_never_echoed(
        empty_config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two slips, two lines; a secret's value does not appear."""
    monkeypatch.setenv("FANOUT_BLOB_ACCOUNT_KEY", "s3cret-value")
    monkeypatch.setenv("FANOUT_NONSENSE", "x")
    with pytest.raises(SettingsError) as caught:
        load_settings(empty_config)
    lines = str(caught.value).splitlines()[1:]
    assert lines == [
        "  FANOUT_BLOB_ACCOUNT_KEY: no such setting; did you mean FANOUT_BLOB__ACCOUNT_KEY?",
        "  FANOUT_NONSENSE: no such setting; nested keys take a double underscore, as in "
        "FANOUT_CONSUMER__CONCURRENCY"]
    assert "s3cret" not in str(caught.value)


def test_list_items_are_not_variables(empty_config: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A list is given whole; an indexed variable says so."""
    assert unknown_environment({"FANOUT_ROUTES__0__HANDLER": "x"}) == [
        "FANOUT_ROUTES__0__HANDLER: no such setting; FANOUT_ROUTES takes the whole value "
        "(JSON for a list or a table)"]
    monkeypatch.setenv("FANOUT_LIMITS__ALLOWED_POOLS", '["cpu"]')
    assert load_settings(empty_config).limits.allowed_pools == ["cpu"]


def test_every_setting_is_a_valid_variable() -> None:
    """No real setting is refused: every leaf key, every section, as a variable."""
    names = [f"FANOUT_{key.replace('.', '__').upper()}" for key in leaf_keys(Settings)]
    names += [f"FANOUT_{name.upper()}" for name in Settings.model_fields]
    assert len(names) > 100
    assert unknown_environment(dict.fromkeys(names, "x")) == []


def test_known_variables_and_table_keys_keep_working(
        empty_config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """FANOUT_CONFIG, FANOUT_HOME, the tasks' own variables, lower case and table keys."""
    other = tmp_path / "other.toml"
    other.write_text("[consumer]\nconcurrency = 3\n")
    for name, value in {
        "FANOUT_CONFIG": str(other), "FANOUT_HOME": str(tmp_path / "h"),
        "FANOUT_PARAM_ALPHA": "0.5", "FANOUT_TASK_INDEX": "7", "FANOUT_FAN_IN_RANGE": "0-9",
        "FANOUT_ON_DEPENDENCY_FAILURE": "run", "FANOUT_INPUT_BLOB": "a.mp4",
        "fanout_metrics__port": "9999",
        "FANOUT_PROGRAMS__SIM__COMMAND": "python3 sim.py {a}",
        "FANOUT_PROGRAMS__SIM__ENVIRONMENT__MODE": "fast",
        "FANOUT_HANDLERS__TRANSCODE__FFMPEG": "/opt/ffmpeg",
    }.items():
        monkeypatch.setenv(name, value)
    settings = load_settings(None)  # FANOUT_CONFIG names the file
    assert settings.source == str(other) and settings.consumer.concurrency == 3
    assert settings.home == tmp_path / "h" and settings.metrics.port == 9999
    assert settings.programs["sim"].command == "python3 sim.py {a}"
    assert settings.programs["sim"].environment == {"mode": "fast"}
    assert settings.handlers == {"transcode": {"ffmpeg": "/opt/ffmpeg"}}


def test_cli_refuses_an_unknown_variable(empty_config: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """`fanout plan` exits 2 with the message, building nothing."""
    monkeypatch.setenv("FANOUT_METRICS_PORT", "9000")
    result = CliRunner().invoke(main, ["plan", "-H", "sweep", "-p", "program=pi"])
    assert result.exit_code == 2, result.output
    assert "FANOUT_METRICS_PORT: no such setting; did you mean FANOUT_METRICS__PORT?" in (
        result.output)
    assert not (empty_config.parent / ".fanout").exists()


def test_demo_programs_run_this_interpreter_only_locally(
        empty_config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Locally the demo runs sys.executable; on Azure Batch, python3 from the PATH."""
    local = load_settings(empty_config)
    assert local.backend_kind == "local"
    assert local.programs["pi"].command.startswith(f"{sys.executable} -m worker.demo pi ")
    monkeypatch.setenv("FANOUT_BATCH__ACCOUNT_URL", "https://b.westeurope.batch.azure.com")
    azure = load_settings(empty_config)
    assert azure.backend_kind == "azure"
    assert azure.programs["pi"].command == (
        "python3 -m worker.demo pi --samples {samples} --seed {seed}")
    assert azure.programs["pi-summary"].command == "python3 -m worker.demo summary"
    assert all(sys.executable not in p.command for p in azure.programs.values())
    forced = load_settings(empty_config, overrides={"backend": {"kind": "local"}})
    assert forced.programs["pi"].command.startswith(sys.executable)
    assert demo_programs("azure")["pi"].command.startswith("python3 ")


def test_configured_programs_replace_the_demo(empty_config: Path) -> None:
    """With programs configured there is no pi demo, on either backend."""
    settings = load_settings(empty_config, overrides={
        "programs": {"sim": {"command": "python3 sim.py {a}"}}})
    assert list(settings.programs) == ["sim"]


def test_each_backend_section_gives_its_poll_intervals(empty_config: Path) -> None:
    """The stats and monitor intervals come from the backend's own section; unset, they
    follow the older keys as before (locally ten scheduler ticks and a tenth of
    jobs.poll_interval, at least a second each; on Azure batch.poll_interval and
    jobs.poll_interval), and a value set wins."""
    local = load_settings(empty_config).backend_config
    assert (local.stats_interval, local.monitor_interval) == (2.0, 3.0)
    derived = load_settings(empty_config, overrides={
        "local": {"poll_interval": 0.5}, "jobs": {"poll_interval": 5}}).backend_config
    assert (derived.stats_interval, derived.monitor_interval) == (5.0, 1.0)
    chosen = load_settings(empty_config, overrides={"local": {
        "stats_interval": 0.5, "monitor_interval": 0.25}}).backend_config
    assert (chosen.stats_interval, chosen.monitor_interval) == (0.5, 0.25)
    azure = {"account_url": "https://acct.westeurope.batch.azure.com", "account_key": "a2V5"}
    batch = load_settings(empty_config, overrides={
        "batch": {**azure, "poll_interval": 12}, "jobs": {"poll_interval": 7}}).backend_config
    assert (batch.stats_interval, batch.monitor_interval) == (12.0, 7.0)
    batch = load_settings(empty_config, overrides={
        "batch": {**azure, "monitor_interval": 4}}).backend_config
    assert (batch.stats_interval, batch.monitor_interval) == (30.0, 4.0)
