"""Contracts the type checker sees: the settlement action and the handler option
check (their static side is checked by tests/plugins/test_kit.py's mypy run)."""

from __future__ import annotations

import typing
from collections.abc import Mapping
from typing import Any

import pytest

from handlers.base import BuildContext, BuildRequest, ChecksOptions, JobSpec
from handlers.render import RenderHandler
from handlers.sweep import SweepHandler
from handlers.transcode import TranscodeHandler
from worker import consumer
from worker.errors import SettingsError
from worker.routing import HandlerRegistry
from worker.sources.base import SETTLE_ACTIONS, SettleAction, Source


def test_the_settlement_actions() -> None:
    assert SETTLE_ACTIONS == ("complete", "dead_letter", "abandon")
    assert typing.get_type_hints(consumer.Outcome)["action"] == SettleAction
    for action in SETTLE_ACTIONS:  # each is the Source method that settles that way
        assert callable(getattr(Source, action))
    assert set(consumer._OUTCOME_LABEL) == set(SETTLE_ACTIONS)


class Plain:
    def build(self, request: BuildRequest, ctx: BuildContext) -> JobSpec:
        raise NotImplementedError


class Picky(Plain):
    """Satisfies ChecksOptions structurally: no base class."""

    def __init__(self) -> None:
        self.seen: list[Mapping[str, Any]] = []

    def check_options(self, options: Mapping[str, Any]) -> None:
        self.seen.append(options)
        if "bad" in options:
            raise ValueError("[handlers.picky] bad: no")


def test_the_built_in_handlers_check_their_options() -> None:
    for handler in (SweepHandler(), TranscodeHandler(), RenderHandler()):
        assert isinstance(handler, ChecksOptions)
    assert not isinstance(Plain(), ChecksOptions)


def test_the_registry_checks_through_the_protocol() -> None:
    picky = Picky()
    registry = HandlerRegistry({"plain": Plain(), "picky": picky})
    registry.check_options({"plain": {"anything": 1}})  # Plain has no check: not asked
    assert picky.seen == [{}]  # no table: an empty one
    registry.check_options({"picky": {"fine": 1}})
    assert picky.seen[-1] == {"fine": 1}
    with pytest.raises(SettingsError, match=r"^\[handlers.picky\] bad: no$"):
        registry.check_options({"picky": {"bad": 1}})
