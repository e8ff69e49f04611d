"""Container settings in the configuration: [registries], program container fields,
start-up errors, and a registry password that never shows (repr, logs, plan, errors)."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import structlog
from click.testing import CliRunner

from handlers.base import ContainerRegistry, ContainerSettings, TaskSpec
from handlers.errors import InvalidParams
from worker import logs
from worker.cli import main
from worker.config import Settings, load_settings
from worker.errors import SettingsError

PASSWORD = "hunter2-Zq9!registry"
IDENTITY = ("/subscriptions/0000/resourceGroups/rg/providers/"
            "Microsoft.ManagedIdentity/userAssignedIdentities/fanout-pool")


def write_config(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


CONFIG = f"""
home = "{{home}}"

[registries.acr]
server = "myacr.azurecr.io"
identity = "{IDENTITY}"

[registries.hub]
server = "docker.io"
username = "fanoutbot"
password_env = "FANOUT_TEST_HUB_PASSWORD_X"

[programs.sim]
command = "python3 /app/sim.py --alpha {{{{alpha}}}}"
container_image = "myacr.azurecr.io/sim:2"
container_registry = "acr"
container_run_options = "--shm-size 1g"

[programs.hubsim]
command = "sim --alpha {{{{alpha}}}}"
container_image = "fanoutbot/sim:1"
container_registry = "hub"
container_working_directory = "containerImageDefault"
"""


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HUB_PASSWORD_X", PASSWORD)
    text = CONFIG.replace("FANOUT_TEST_HUB_PASSWORD_X", "HUB_PASSWORD_X")
    return write_config(tmp_path / "fanout.toml", text.format(home=tmp_path / "home"))


def test_programs_get_their_container_with_the_registry(config: Path) -> None:
    """A program's container fields become one ContainerSettings with its registry
    resolved: an ACR through the pool's managed identity, a username with the password
    read from the environment at start-up."""
    settings = load_settings(config)
    programs = settings.program_specs()
    sim = programs["sim"].container
    assert sim == ContainerSettings(
        image="myacr.azurecr.io/sim:2", run_options="--shm-size 1g",
        registry=ContainerRegistry(server="myacr.azurecr.io", identity_reference=IDENTITY,
                                   name="acr"))
    hub = programs["hubsim"].container
    assert hub is not None and hub.registry is not None
    assert (hub.registry.username, hub.registry.password) == ("fanoutbot", PASSWORD)
    assert hub.working_directory == "containerImageDefault"
    assert set(programs.registries) == {"acr", "hub"}


def test_a_password_never_shows_in_repr_logs_or_plan(config: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """repr of the settings, a log event carrying the task, and `fanout plan` (text and
    JSON) show the registry's server and user name, never its password."""
    settings = load_settings(config)
    container = settings.program_specs()["hubsim"].container
    task = TaskSpec(id="0", command_line="sim", container=container)
    for text in (repr(container), repr(task), repr(settings), str(settings.registries)):
        assert PASSWORD not in text
    stream = io.StringIO()
    logs.configure(fmt="json", level="debug", stream=stream)
    try:
        structlog.get_logger("t").info("task", task=task, body={"password": PASSWORD})
    finally:
        logs.configure(fmt="json", level="info")
    assert PASSWORD not in stream.getvalue() and "fanoutbot" in stream.getvalue()

    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    args = ["--config", str(config), "plan", "-H", "sweep", "-p", "program=hubsim",
            "-p", "parameters.alpha=[1,2]"]
    as_text = runner.invoke(main, args)
    assert as_text.exit_code == 0, as_text.output
    assert "[in fanoutbot/sim:1]" in as_text.output and PASSWORD not in as_text.output
    as_json = runner.invoke(main, [*args, "--json"])
    assert as_json.exit_code == 0, as_json.output
    assert PASSWORD not in as_json.output
    (job,) = json.loads(as_json.output)["jobs"]
    assert job["tasks"][0]["container"] == {
        "image": "fanoutbot/sim:1", "run_options": None,
        "working_directory": "containerImageDefault",
        "registry": {"name": "hub", "server": "docker.io", "identity": None,
                     "username": "fanoutbot"}}


def test_a_missing_password_variable_stops_start_up_naming_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unset (or empty) password_env is a SettingsError naming the variable."""
    monkeypatch.delenv("HUB_PASSWORD_X", raising=False)
    text = CONFIG.replace("FANOUT_TEST_HUB_PASSWORD_X", "HUB_PASSWORD_X")
    path = write_config(tmp_path / "f.toml", text.format(home=tmp_path / "home"))
    with pytest.raises(SettingsError, match="HUB_PASSWORD_X is not set"):
        load_settings(path)
    monkeypatch.setenv("HUB_PASSWORD_X", "")
    with pytest.raises(SettingsError, match="HUB_PASSWORD_X is empty"):
        load_settings(path)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"registries": {"r": {"server": "x.io"}}}, "give identity"),
    ({"registries": {"r": {"server": "x.io", "identity": IDENTITY, "username": "u",
                           "password_env": "P"}}}, "not both"),
    ({"registries": {"r": {"server": "x.io", "identity": "/subscriptions/x"}}},
     "user-assigned managed identity"),
    ({"registries": {"r": {"server": "not a host", "identity": IDENTITY}}},
     "not a host name"),
    ({"registries": {"r": {"server": "x.io", "username": "u",
                           "password_env": "FANOUT_PW"}}}, "outside FANOUT_"),
    ({"programs": {"p": {"command": "x", "container_image": "x.io/a:1",
                         "container_registry": "nope"}}}, "no registry named 'nope'"),
    ({"programs": {"p": {"command": "x", "container_registry": "r"}}},
     "container_registry needs container_image"),
    ({"programs": {"p": {"command": "x", "container_image": "-v/etc:/x"}}},
     "not a container image reference"),
    ({"programs": {"p": {"command": "x", "container_image": "a", "container_run_options":
                         "--label 'x"}}}, "does not parse"),
    ({"programs": {"p": {"command": "x", "container_image": "a",
                         "container_working_directory": "/app"}}}, "containerImageDefault"),
    ({"programs": {"p": {"command": "x", "container_image": "a",
                         "container_run_options": "--rm -dit"}}}, "the engine's to set"),
    ({"programs": {"p": {"command": "x", "container_image": "a",
                         "container_run_options": "--name=mine"}}}, "the engine's to set"),
    ({"registries": {"r": {"server": "x.io", "identity": IDENTITY}},
      "programs": {"p": {"command": "x", "container_image": "y.io/a:1",
                         "container_registry": "r"}}}, "not on registry r"),
    ({"handlers": {"render": {"profiles": {"toy": {
        "command": "x {start}", "container_image": "a", "container_registry": "gone"}}}}},
     r"handlers\.render\.profiles\.toy\.container_registry: no registry named 'gone'"),
])
def test_bad_container_configuration_stops_start_up(
        make_settings: Callable[..., Settings], overrides: dict[str, Any],
        message: str) -> None:
    """Each mistake is a SettingsError that says what is wrong, before any message."""
    with pytest.raises(SettingsError, match=message):
        make_settings(**overrides)


def test_worker_context_resolves_registries_and_refuses_unknown_ones(
        make_settings: Callable[..., Settings]) -> None:
    """ctx.container names a configured registry; an unknown name is InvalidParams
    listing the configured ones (a message of a plug-in that names one)."""
    from worker.app import make_storage
    from worker.context import WorkerContext

    settings = make_settings(registries={"acr": {"server": "myacr.azurecr.io",
                                                 "identity": IDENTITY}})
    programs = settings.program_specs()
    ctx = WorkerContext(job_id="j", max_tasks=10, allow_message_commands=False,
                        programs=programs, handler_options={},
                        storage=make_storage(settings), registries=programs.registries)
    made = ctx.container("myacr.azurecr.io/x:1", registry="acr",
                         working_directory="containerImageDefault")
    assert made.registry is not None and made.registry.identity_reference == IDENTITY
    with pytest.raises(InvalidParams, match=r"no container registry named 'nope'.*acr"):
        ctx.container("x:1", registry="nope")
    with pytest.raises(InvalidParams, match="not a container image"):
        ctx.container("--privileged")


def test_a_container_sweep_without_an_engine_is_dead_lettered_naming_the_image(
        make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    """The whole worker on the embedded default with container_engine "none": the
    message is dead-lettered ContainerUnavailable naming the image, the job it made is
    ended, and nothing ran on the host."""
    from worker.context import job_id_for

    from .harness import RunningWorker

    marker = tmp_path / "ran-on-host"
    settings = make_settings(
        programs={"tool": {"command": f"/usr/bin/touch {marker}.{{n}}",
                           "container_image": "repo/tool:1"}},
        consumer={"receive_wait": 0.2}, local={"slots": 2, "poll_interval": 0.05,
                                               "container_engine": "none"},
        jobs={"poll_interval": 1.0})
    worker = RunningWorker(settings).start()
    try:
        worker.send({"handler": "sweep", "id": "boxed",
                     "params": {"program": "tool", "parameters": {"n": [1, 2]}}})
        worker.wait_until(lambda: bool(worker.dead_letters()), what="a dead letter")
        (dead,) = worker.dead_letters()
        assert dead.reason == "ContainerUnavailable"
        assert dead.description is not None
        assert "repo/tool:1" in dead.description and "container_engine" in dead.description
        record = worker.app.backend.get_job(job_id_for("sweep", "boxed"))
        assert record is not None and record.state == "completed"
    finally:
        worker.stop()
    assert not list(tmp_path.glob("ran-on-host*"))
