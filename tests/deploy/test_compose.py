"""deploy/compose.yaml: a valid Compose file whose fanout talks to the emulators it starts."""

from __future__ import annotations

import importlib.resources
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from worker.config import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "deploy" / "compose.yaml"
EMULATOR_CONFIG_IN_CONTAINER = "/ServiceBus_Emulator/ConfigFiles/Config.json"


@pytest.fixture
def compose() -> dict[str, Any]:
    """compose.yaml, parsed."""
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def compose_schema() -> dict[str, Any]:
    """The Compose specification's JSON schema, as vendored by check-jsonschema."""
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    schema: dict[str, Any] = json.loads(vendor.joinpath("compose-spec.json").read_text())
    return schema


def test_compose_file_follows_the_compose_specification(compose: dict[str, Any]) -> None:
    """compose.yaml validates against the Compose spec's schema."""
    errors = list(jsonschema.Draft202012Validator(compose_schema()).iter_errors(compose))
    assert [e.message for e in errors] == []


def test_the_schema_check_rejects_a_misspelt_key(compose: dict[str, Any]) -> None:
    """A service with an unknown key (enviroment) fails the schema."""
    compose["services"]["fanout"]["enviroment"] = compose["services"]["fanout"].pop("environment")
    assert list(jsonschema.Draft202012Validator(compose_schema()).iter_errors(compose))


def test_fanout_is_built_from_the_repository_with_deploy_dockerfile(
        compose: dict[str, Any]) -> None:
    """The build context is the repository root and the Dockerfile is deploy/Dockerfile."""
    build = compose["services"]["fanout"]["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert context == ROOT
    assert (context / build["dockerfile"]).resolve() == ROOT / "deploy" / "Dockerfile"


def test_fanouts_environment_selects_the_emulators(
        compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """fanout's environment loads into Settings: Service Bus and Blob emulators, local tasks."""
    env = compose["services"]["fanout"]["environment"]
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    settings = Settings()
    assert (settings.queue_kind, settings.backend_kind, settings.storage_kind) == \
        ("servicebus", "local", "azure")
    secret = settings.servicebus.connection_string
    assert secret is not None and "Endpoint=sb://servicebus;" in secret.get_secret_value()
    assert "servicebus" in compose["services"] and "azurite" in compose["services"]
    blob = settings.blob.connection_string
    assert blob is not None and "http://azurite:10000/" in blob.get_secret_value()


def test_the_emulator_creates_fanouts_queue_within_its_limits(compose: dict[str, Any]) -> None:
    """The emulator config mounted into the container defines the queue fanout reads."""
    service = compose["services"]["servicebus"]
    (mount,) = [v for v in service["volumes"] if EMULATOR_CONFIG_IN_CONTAINER in v]
    config = json.loads((COMPOSE.parent / mount.split(":")[0]).read_text())
    (namespace,) = config["UserConfig"]["Namespaces"]
    assert namespace["Name"] == "sbemulatorns"  # the only name the emulator accepts
    queues = {q["Name"]: q["Properties"] for q in namespace["Queues"]}
    props = queues[compose["services"]["fanout"]["environment"]["FANOUT_SERVICEBUS__QUEUE"]]
    assert props["RequiresDuplicateDetection"] is True
    assert props["DeadLetteringOnMessageExpiration"] is True
    assert 1 <= props["MaxDeliveryCount"] <= 10  # the emulator's range
    assert props["LockDuration"] in ("PT30S", "PT1M", "PT2M", "PT5M")
    assert re.fullmatch(r"PT([5-9]S|[1-5]\dS|[1-5]M)", props["DuplicateDetectionHistoryTimeWindow"])
    assert config["UserConfig"]["Logging"]["Type"] in ("File", "Console", "File,Console")


def test_no_password_is_written_into_the_file(compose: dict[str, Any]) -> None:
    """SQL Server's password comes from the caller's environment, required, never a default."""
    for name in ("servicebus", "sqlserver"):
        value = compose["services"][name]["environment"]["MSSQL_SA_PASSWORD"]
        assert value.startswith("${MSSQL_SA_PASSWORD:?"), value


def test_compose_stops_fanout_after_its_drain(compose: dict[str, Any]) -> None:
    """stop_grace_period leaves fanout its drain grace plus time to close."""
    fanout = compose["services"]["fanout"]
    grace = float(fanout["environment"]["FANOUT_CONSUMER__DRAIN_GRACE"])
    assert float(fanout["stop_grace_period"].rstrip("s")) >= grace + 10
