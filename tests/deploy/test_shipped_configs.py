"""Every configuration deploy/ ships loads with fanout's own loader (load_settings),
and names the completion-events queue, logs container and job limits the Bicep
template provides (or, for compose, the queue the emulator defines).

The shipped configurations: the k8s ConfigMap's fanout.toml, the Bicep fanoutToml
output (what the VM gets), that output plus the docs' overlay heredoc (what AKS
gets), the systemd environment example and compose's environment.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from pydantic import TypeAdapter

from tests.deploy import bicep, k8s
from worker.config import Settings, load_settings
from worker.errors import SettingsError

ROOT = Path(__file__).resolve().parents[2]
MAIN = ROOT / "deploy" / "bicep" / "main.bicep"
CONFIGMAP = ROOT / "deploy" / "k8s" / "configmap.yaml"
ENV_EXAMPLE = ROOT / "deploy" / "systemd" / "fanout.env.example"
COMPOSE = ROOT / "deploy" / "compose.yaml"
EMULATOR = ROOT / "deploy" / "servicebus-emulator" / "Config.json"
DOCS = ROOT / "docs" / "deploy.md"
#: What only a deployment knows, as it would fill the fanoutToml output in.
RUNTIME = {"serviceBusFqdn": "sb-fanout-abc.servicebus.windows.net",
           "batchAccountUrl": "https://bafanoutabc.westeurope.batch.azure.com",
           "cpuPool.outputs.name": "cpu",
           "blobAccountUrl": "https://stfanoutabc.blob.core.windows.net/",
           "allowedReplyTo": "[]"}

Loader = Callable[[str, Path, pytest.MonkeyPatch], Settings]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No FANOUT_* variable of the caller's, and no ./fanout.toml, leaks in."""
    for key in list(os.environ):
        if key.startswith("FANOUT_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


def _load_file(text: str, tmp_path: Path) -> Settings:
    path = tmp_path / "fanout.toml"
    path.write_text(text)
    settings = load_settings(path)
    assert settings.source == str(path)
    return settings


def _load_env(pairs: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    assert pairs
    for key, value in pairs.items():
        monkeypatch.setenv(key, value)
    settings = load_settings(None)
    assert settings.source == "defaults"  # the environment alone, no file found
    return settings


def configmap_toml(text: str) -> str:
    """The fanout.toml key of the ConfigMap manifest."""
    data: str = yaml.safe_load(text)["data"]["fanout.toml"]
    return data


def docs_heredoc(text: str) -> str:
    """What docs/deploy.md appends to the Bicep output for AKS."""
    match = re.search(r"cat >> \$OVERLAY/fanout\.toml <<'EOF'\n(.*?)\nEOF\n", text, re.S)
    assert match, "docs/deploy.md lost the heredoc that completes fanout.toml"
    return match.group(1) + "\n"


def env_pairs(text: str) -> dict[str, str]:
    """FANOUT_* assignments of an environment file."""
    pairs = {}
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#") and line.startswith("FANOUT_"):
            key, _, value = line.partition("=")
            pairs[key] = value
    return pairs


def compose_env(text: str) -> dict[str, str]:
    """fanout's environment in compose.yaml."""
    env = yaml.safe_load(text)["services"]["fanout"]["environment"]
    return {k: str(v) for k, v in env.items()}


SOURCES: dict[str, tuple[Path, Loader]] = {
    "k8s ConfigMap": (CONFIGMAP, lambda text, tmp, mp: _load_file(configmap_toml(text), tmp)),
    "Bicep fanoutToml (VM)": (MAIN, lambda text, tmp, mp: _load_file(
        bicep.fanout_toml(text, RUNTIME), tmp)),
    "Bicep fanoutToml + docs overlay (AKS)": (DOCS, lambda text, tmp, mp: _load_file(
        bicep.fanout_toml(MAIN.read_text(), RUNTIME) + docs_heredoc(text), tmp)),
    "systemd env example": (ENV_EXAMPLE, lambda text, tmp, mp: _load_env(env_pairs(text), mp)),
    "compose": (COMPOSE, lambda text, tmp, mp: _load_env(compose_env(text), mp)),
}
AZURE = [name for name in SOURCES if name != "compose"]


def _duration(value: str) -> timedelta:
    return TypeAdapter(timedelta).validate_python(value)


def azure_problems(settings: Settings) -> list[str]:
    """Where an Azure configuration disagrees with what main.bicep deploys."""
    defaults = bicep.param_defaults(bicep.declarations(MAIN.read_text()))
    found = []
    if settings.queue_kind != "servicebus":
        found.append(f"queue kind {settings.queue_kind}")
    if settings.servicebus.queue != defaults["queueName"]:
        found.append(f"servicebus.queue {settings.servicebus.queue}")
    if not settings.events.enabled or settings.events.topic is not None:
        found.append("events are not published to a queue")
    if settings.events.queue != defaults["eventsQueueName"]:
        found.append(f"events.queue {settings.events.queue} is not the template's "
                     f"{defaults['eventsQueueName']}")
    if settings.jobs.logs_container != defaults["logsContainerName"]:
        found.append(f"jobs.logs_container {settings.jobs.logs_container} is not the "
                     f"template's {defaults['logsContainerName']}")
    if settings.jobs.max_wall_clock != _duration(defaults["jobMaxWallClock"]):
        found.append(f"jobs.max_wall_clock {settings.jobs.max_wall_clock}")
    if settings.jobs.retention != _duration(defaults["jobRetention"]):
        found.append(f"jobs.retention {settings.jobs.retention}")
    if settings.jobs.retention > timedelta(days=int(defaults["logRetentionDays"])):
        found.append("the lifecycle rule deletes logs of jobs fanout still keeps")
    found += k8s._events_problems(settings)
    return found


@pytest.mark.parametrize("name", AZURE)
def test_each_azure_configuration_loads_and_matches_the_template(
        name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """load_settings reads it; it names the template's queues, logs container and limits."""
    path, loader = SOURCES[name]
    settings = loader(path.read_text(), tmp_path, monkeypatch)
    assert azure_problems(settings) == []
    assert settings.events.queue == "fanout-events"
    assert settings.jobs.max_wall_clock == timedelta(days=1)
    assert settings.jobs.retention == timedelta(days=7)


AZURE_BREAKAGES = {
    "k8s ConfigMap": [
        ('queue = "fanout-events"', 'queue = "fanout.events"'),
        ('queue = "fanout-events"', 'queue = "fanout"'),
        ('retention = "P7D"', 'retention = "P30D"'),
        ('max_wall_clock = "P1D"', 'max_wall_clock = "P2D"'),
        ('logs_container = "fanout-logs"', 'logs_container = "logs"'),
        ('retention = "P7D"', 'retension = "P7D"'),
    ],
    "Bicep fanoutToml (VM)": [
        ('queue = "${eventsQueue.name}"', 'queue = "${queue.name}"'),
        ("'[events]'", "'[event]'"),
        ("param jobRetention string = 'P7D'", "param jobRetention string = 'P21D'"),
    ],
    "systemd env example": [
        ("FANOUT_EVENTS__QUEUE=fanout-events", "FANOUT_EVENTS__QUEUE=fanout.events"),
        ("FANOUT_JOBS__RETENTION=P7D", "FANOUT_JOBS__RETENTION=seven days"),
        ("FANOUT_JOBS__LOGS_CONTAINER=fanout-logs", "FANOUT_JOBS__LOGS_CONTAINER=logs"),
    ],
}


@pytest.mark.parametrize("case", [(name, i) for name, cases in AZURE_BREAKAGES.items()
                                  for i in range(len(cases))],
                         ids=lambda case: f"{case[0]} {case[1]}")
def test_each_configuration_breakage_is_caught(
        case: tuple[str, int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A shipped configuration broken in one way fails to load or disagrees with the template."""
    name, index = case
    old, new = AZURE_BREAKAGES[name][index]
    path, loader = SOURCES[name]
    text = path.read_text()
    assert text.count(old) == 1, old
    try:
        found = azure_problems(loader(text.replace(old, new), tmp_path, monkeypatch))
    except SettingsError as exc:
        found = [str(exc)]
    assert found, f"{name}: {old!r} -> {new!r} went unnoticed"


def emulator_queues() -> dict[str, dict[str, object]]:
    """The emulator's queues by name."""
    config = json.loads(EMULATOR.read_text())
    (namespace,) = config["UserConfig"]["Namespaces"]
    return {q["Name"]: q["Properties"] for q in namespace["Queues"]}


def compose_problems(settings: Settings, queues: dict[str, dict[str, object]]) -> list[str]:
    """Where compose's fanout would publish its events somewhere the emulator lacks."""
    found = []
    if settings.queue_kind != "servicebus":
        found.append(f"queue kind {settings.queue_kind}: the emulator is not used")
    for what, name in (("servicebus.queue", settings.servicebus.queue),
                       ("events.queue", settings.events.queue)):
        if name not in queues:
            found.append(f"{what} {name} is not a queue of the emulator")
    events = queues.get(settings.events.queue or "", {})
    if events.get("RequiresDuplicateDetection") is not True:
        found.append("the emulator's events queue does not drop repeated event ids")
    found += k8s._events_problems(settings)
    return found


def test_compose_loads_and_its_events_queue_exists_in_the_emulator(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """compose's fanout uses the Service Bus emulator, so its events go to a queue the
    emulator defines (with duplicate detection), not to the embedded default's name."""
    path, loader = SOURCES["compose"]
    settings = loader(path.read_text(), tmp_path, monkeypatch)
    assert compose_problems(settings, emulator_queues()) == []
    assert settings.events.queue == "fanout-events"
    assert settings.backend_kind == "local"  # no Batch emulator: [jobs] logs do not apply


@pytest.mark.parametrize("breakage", ["no events queue set", "events queue missing",
                                      "no duplicate detection", "events on the work queue"])
def test_each_compose_breakage_is_caught(
        breakage: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """compose and the emulator config broken in one way disagree."""
    text = COMPOSE.read_text()
    queues = emulator_queues()
    if breakage == "no events queue set":
        text = text.replace("      FANOUT_EVENTS__QUEUE: fanout-events\n", "")
    elif breakage == "events queue missing":
        del queues["fanout-events"]
    elif breakage == "no duplicate detection":
        queues["fanout-events"]["RequiresDuplicateDetection"] = False
    else:
        text = text.replace("FANOUT_EVENTS__QUEUE: fanout-events", "FANOUT_EVENTS__QUEUE: fanout")
    assert text != COMPOSE.read_text() or queues != emulator_queues()
    settings = SOURCES["compose"][1](text, tmp_path, monkeypatch)
    assert compose_problems(settings, queues)
