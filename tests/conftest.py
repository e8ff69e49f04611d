"""Shared fixtures: a settings factory with an isolated FANOUT_HOME."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from worker.config import Settings, load_settings


@pytest.fixture(autouse=True)
def _no_fanout_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Keep the developer's own FANOUT_* variables out of the tests."""
    import os

    for key in list(os.environ):
        if key.startswith("FANOUT_"):
            monkeypatch.delenv(key)
    yield


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Undo what a test's ``configure_logging`` did (a CLI run at warning level, say),
    so a later test's log capture does not depend on which tests ran before it."""
    import logging

    import structlog

    saved = structlog.get_config()
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    structlog.configure(**saved)
    root.setLevel(level)
    root.handlers[:] = handlers


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    """Build Settings from keyword overrides, with home under tmp_path."""

    def make(**overrides: Any) -> Settings:
        data: dict[str, Any] = {"home": str(tmp_path / "home"),
                                "metrics": {"port": 0}}
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
        empty = tmp_path / "empty.toml"
        empty.write_text("")
        return load_settings(empty, overrides=data)

    return make
