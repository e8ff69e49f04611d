"""The docs stay true to the code: every setting is documented, examples load."""

from __future__ import annotations

import base64
import copy
import json
import re
import textwrap
import tomllib
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from tests.handlers.conftest import sample
from worker.app import build_planner, make_storage
from worker.config import Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
#: Every markdown file whose ```toml blocks are checked.
MARKDOWN = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def leaf_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += leaf_keys(ann, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def test_every_setting_is_documented() -> None:
    """Each key of the Settings model appears in docs/configuration.md."""
    text = (DOCS / "configuration.md").read_text()
    missing = [key for key in leaf_keys(Settings) if f"`{key}" not in text
               and f"{key}`" not in text and f", `{key.split('.')[-1]}`" not in text]
    assert missing == []


def test_configuration_example_loads(tmp_path: Path) -> None:
    """The complete example in docs/configuration.md is a valid configuration."""
    text = (DOCS / "configuration.md").read_text()
    example = re.findall(r"```toml\n(.*?)```", text, re.S)[-1]
    path = tmp_path / "fanout.toml"
    path.write_text(example)
    settings = load_settings(path)
    assert settings.queue_kind == "servicebus" and settings.backend_kind == "azure"
    assert settings.routes[0].handler == "transcode"


def toml_blocks() -> list[tuple[str, str]]:
    """Every ```toml block of the README and docs/ (indented ones in lists too), as
    ``("<file>:<line>", text)``."""
    found = []
    fence = re.compile(r"^( *)```toml\n(.*?)^\1```", re.M | re.S)
    for path in MARKDOWN:
        text = path.read_text(encoding="utf-8")
        for match in fence.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            found.append((f"{path.relative_to(ROOT)}:{line}", textwrap.dedent(match.group(2))))
    return found


BLOCKS = toml_blocks()


def test_the_toml_examples_are_found() -> None:
    """The block finder sees the examples the next test loads (one in a list item)."""
    where = [w.split(":")[0] for w, _ in BLOCKS]
    assert where.count("docs/configuration.md") >= 2  # registries, the complete example
    assert where.count("docs/handlers.md") >= 5 and "README.md" in where
    assert "docs/messages.md" in where  # indented under a list item


@pytest.mark.parametrize("text", [t for _, t in BLOCKS], ids=[w for w, _ in BLOCKS])
def test_every_toml_example_starts_a_worker(text: str, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Each config example (a fragment is a whole config: every key has a default)
    loads, and the worker's start-up checks (handler tables, every route's params
    and job options) accept it. A pyproject.toml snippet is checked for what it shows:
    a handler's entry point. A registry's ``password_env`` is set, as a deployment
    would set it."""
    data = tomllib.loads(text)
    for registry in data.get("registries", {}).values():
        if "password_env" in registry:
            monkeypatch.setenv(registry["password_env"], "example-password")
    if "project" in data:
        [(name, target)] = data["project"]["entry-points"]["fanout.handlers"].items()
        assert re.fullmatch(r"[a-z_]+", name) and re.fullmatch(r"[\w.]+:\w+", target)
        return
    path = tmp_path / "fanout.toml"
    path.write_text(text)
    settings = load_settings(path, overrides={"home": str(tmp_path / "home")})
    planner = build_planner(settings, make_storage(settings))
    assert len(planner.router.routes) == len(data.get("routes", []))


def test_configuration_example_routes_an_upload_to_a_transcode_job(tmp_path: Path) -> None:
    """The complete example's route turns an uploaded video into a transcode job of
    three renditions (no network: an account key signs the SAS offline)."""
    text = (DOCS / "configuration.md").read_text()
    example = re.findall(r"```toml\n(.*?)```", text, re.S)[-1]
    path = tmp_path / "fanout.toml"
    path.write_text(example)
    key = base64.b64encode(b"not a real key, only signs offline").decode()
    settings = load_settings(path, overrides={"home": str(tmp_path / "home"),
                                              "blob": {"account_key": key}})
    planner = build_planner(settings, make_storage(settings))
    event: dict[str, Any] = copy.deepcopy(sample("eventgrid-blobcreated.json"))
    event["data"]["url"] = "https://stfanout.blob.core.windows.net/videos/2026/a.mov"
    plan = planner.plan(json.dumps(event).encode(), {}, message_id="m-1")
    [planned] = plan.jobs
    tasks = list(planned.job.tasks)
    assert planned.handler == "transcode" and planned.job.pool == "cpu"
    assert [t.output_files[0].path for t in tasks] == [
        "2026/a/1080p.mp4", "2026/a/720p.mp4", "2026/a/480p.mp4"]
