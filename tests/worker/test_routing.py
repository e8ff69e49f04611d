"""Tests for the handler registry and blob route rules."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from handlers.base import BlobRef
from handlers.errors import ForeignStorage, NoRoute, UnknownHandler
from worker.app import App, build_planner, make_storage
from worker.config import RouteConfig, Settings
from worker.envelope import BlobEvent, Envelope, JobOptions
from worker.errors import SettingsError
from worker.routing import HandlerRegistry, Router, account_of, sample_blob
from worker.storage.local import LocalStorage


class Dummy:
    def build(self, request: Any, ctx: Any) -> Any:
        raise NotImplementedError


def test_registry_loads_installed_handlers() -> None:
    """The sweep handler comes from this distribution's entry points."""
    registry = HandlerRegistry.from_entry_points()
    assert "sweep" in registry.names
    with pytest.raises(UnknownHandler, match="sweep"):
        registry.get("nope")


def test_duplicate_entry_points_are_a_startup_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two distributions registering one name stop the worker at start-up."""
    from importlib.metadata import EntryPoint

    eps = [EntryPoint("sweep", "handlers.sweep:SweepHandler", "fanout.handlers"),
           EntryPoint("sweep", "other.mod:Sweep", "fanout.handlers")]
    monkeypatch.setattr("worker.routing.entry_points", lambda group: eps)
    with pytest.raises(SettingsError, match="registered twice"):
        HandlerRegistry.from_entry_points()


def router(tmp_path: Path, *rules: RouteConfig, drop: bool = False) -> Router:
    registry = HandlerRegistry({"transcode": Dummy(), "render": Dummy()})
    return Router(registry=registry, routes=rules, storage=LocalStorage(root=tmp_path),
                  drop_unrouted=drop)


def event(storage_root: Path, blob: str, content_type: str = "video/mp4",
          api: str = "PutBlob") -> BlobEvent:
    url = LocalStorage(root=storage_root).input_url(
        __import__("handlers.base", fromlist=["BlobRef"]).BlobRef("videos", blob))
    return BlobEvent(id="e1", type="Microsoft.Storage.BlobCreated", url=url, api=api,
                     content_type=content_type)


def test_first_matching_rule_wins(tmp_path: Path) -> None:
    """Rules are tried in order; the blob lands in the params under blob_param."""
    r = router(tmp_path,
               RouteConfig(handler="render", container="videos", suffix=".blend"),
               RouteConfig(handler="transcode", container="videos", suffix=[".mp4", ".mov"],
                           params={"renditions": ["720p"]}, blob_param="inputs"),
               RouteConfig(handler="render", container="videos"))
    routed = r.route([event(tmp_path, "2026/a clip.MP4")], message_id="m")
    (work,) = routed.works
    assert work.handler_name == "transcode" and work.key == "e1"
    assert work.params == {"renditions": ["720p"],
                           "inputs": {"container": "videos", "blob": "2026/a clip.MP4"}}


def test_content_type_prefix_and_no_route(tmp_path: Path) -> None:
    """A content-type prefix matches; an event no rule takes is NoRoute or dropped."""
    rule = RouteConfig(handler="transcode", content_type="video/")
    assert router(tmp_path, rule).route([event(tmp_path, "a.mp4")], message_id="m").works
    with pytest.raises(NoRoute):
        router(tmp_path, rule).route([event(tmp_path, "a.png", "image/png")], message_id="m")
    dropped = router(tmp_path, rule, drop=True).route(
        [event(tmp_path, "a.png", "image/png")], message_id="m")
    assert dropped.works == [] and dropped.ignored == ["unrouted"]


def test_gen2_partial_write_is_ignored(tmp_path: Path) -> None:
    """A Data Lake CreateFile event makes no job; it is reported as ignored."""
    routed = router(tmp_path, RouteConfig(handler="transcode")).route(
        [event(tmp_path, "a.mp4", api="CreateFile")], message_id="m")
    assert routed.works == [] and routed.ignored == ["gen2-CreateFile"]


def test_foreign_account_is_refused(tmp_path: Path) -> None:
    """An event for a blob in an unconfigured account is ForeignStorage."""
    foreign = BlobEvent(id="e", type="Microsoft.Storage.BlobCreated", api="PutBlob",
                        url="https://evil.blob.core.windows.net/videos/a.mp4")
    with pytest.raises(ForeignStorage):
        router(tmp_path, RouteConfig(handler="transcode")).route([foreign], message_id="m")


def test_envelope_key_falls_back_to_message_id(tmp_path: Path) -> None:
    """Without an envelope id, the queue's message id is the idempotency key."""
    env = Envelope(handler="render", id=None, job=JobOptions(), params={})
    (work,) = router(tmp_path).route(env, message_id="mid-7").works
    assert work.key == "mid-7"


def test_routes_naming_missing_handlers_fail_at_startup(tmp_path: Path) -> None:
    """A route to a handler that is not installed is a configuration error."""
    with pytest.raises(SettingsError, match="sweepx"):
        router(tmp_path, RouteConfig(handler="sweepx"))


@pytest.mark.parametrize("url, account", [
    ("https://stmedia01.blob.core.windows.net/videos/a.mp4", "stmedia01"),
    ("https://stmedia01.dfs.core.windows.net/videos/a.mp4", "stmedia01"),
    ("http://127.0.0.1:10000/devstoreaccount1/videos/a.mp4", "devstoreaccount1"),
    ("file:///srv/blobs/videos/a.mp4", "local"),
])
def test_account_of(url: str, account: str) -> None:
    """The account is the host's first label, or the first path segment path-style."""
    assert account_of(url) == account


def test_broken_handler_options_stop_the_worker_at_startup() -> None:
    """A bad [handlers.transcode] table, or one for no handler, is a start-up error."""
    registry = HandlerRegistry.from_entry_points()
    registry.check_options({"transcode": {}, "render": {}})
    with pytest.raises(SettingsError, match="handlers.transcode"):
        registry.check_options({"transcode": {"presets": "not a table"}})
    with pytest.raises(SettingsError, match="no handler 'transcod'"):
        registry.check_options({"transcod": {}})


def test_bad_job_options_of_a_route_fail_at_startup(tmp_path: Path) -> None:
    """A route's job table is validated when the router is built, naming the rule."""
    with pytest.raises(SettingsError) as caught:
        router(tmp_path, RouteConfig(handler="transcode"),
               RouteConfig(handler="render", job={"priority": "high"}))
    assert str(caught.value).startswith("routes[1] (handler 'render'): job: priority: ")


def test_sample_blob_matches_its_rule(tmp_path: Path) -> None:
    """The blob the start-up check builds for is one the rule itself would take."""
    rule = RouteConfig(handler="transcode", container="videos", prefix="in/",
                       suffix=[".MP4", ".mov"])
    assert sample_blob(rule) == BlobRef("videos", "in/example.mp4")
    assert sample_blob(RouteConfig(handler="render")) == BlobRef("uploads", "example")
    r = router(tmp_path, rule)
    assert r.match(event(tmp_path, "in/example.mp4"), sample_blob(rule), "local") is rule


ROUTE_PARAMS = {"renditions": ["720p"], "output": {"container": "renditions"}}


@pytest.mark.parametrize("route, problem", [
    ({"handler": "transcode", "container": "videos", "suffix": ".mp4",
      "blob_param": "inputs", "params": ROUTE_PARAMS},
     "routes[0] (handler 'transcode'): every blob it takes would be dead-lettered "
     "(tried videos/example.mp4): InvalidParams: inputs: Input should be a valid list"),
    ({"handler": "transcode", "params": {"renditions": ["4k"]}},
     "routes[0] (handler 'transcode'): every blob it takes would be dead-lettered "
     "(tried uploads/example): InvalidParams: "),
    ({"handler": "transcode", "params": ROUTE_PARAMS, "job": {"pool": "gpu"}},
     "routes[0] (handler 'transcode'): every blob it takes would be dead-lettered "
     "(tried uploads/example): BudgetExceeded: pool 'gpu' is not one this worker may use"),
    ({"handler": "render", "container": "scenes", "blob_param": "scene",
      "params": {"frames": {"start": 1, "end": 10}}},
     "routes[0] (handler 'render'): every blob it takes would be dead-lettered "
     "(tried scenes/example): InvalidParams: "),
    ({"handler": "sweep", "params": {"program": "pi", "parameters": {"samples": [1]}}},
     "routes[0] (handler 'sweep'): every blob it takes would be dead-lettered "
     "(tried uploads/example): InvalidParams: input: Extra inputs are not permitted"),
])
def test_route_params_no_blob_can_satisfy_fail_at_startup(
        route: dict[str, Any], problem: str, make_settings: Callable[..., Settings]) -> None:
    """build_planner builds each route's job for a matching blob and names the rule."""
    settings = make_settings(routes=[route], limits={"allowed_pools": ["local"]})
    with pytest.raises(SettingsError) as caught:
        build_planner(settings, make_storage(settings))
    assert str(caught.value).startswith(problem), str(caught.value)


def test_good_routes_pass_the_startup_check(make_settings: Callable[..., Settings]) -> None:
    """Routes whose jobs build are kept, in order, and nothing is written to storage."""
    settings = make_settings(routes=[
        {"handler": "transcode", "container": "videos", "suffix": [".mp4"],
         "params": {**ROUTE_PARAMS, "manifest": True}},
        {"handler": "render", "container": "scenes", "suffix": ".blend", "blob_param": "scene",
         "params": {"frames": {"start": 1, "end": 48}, "output": {"container": "renders"}}},
    ])
    planner = build_planner(settings, make_storage(settings))
    assert [r.handler for r in planner.router.routes] == ["transcode", "render"]
    assert not (settings.home / "blobs").exists()


class Broken:
    def build(self, request: Any, ctx: Any) -> Any:
        raise KeyError("oops")


def test_a_handler_bug_in_the_route_check_names_the_rule(
        make_settings: Callable[..., Settings]) -> None:
    """Not a message fault, still a SettingsError that says which rule."""
    settings = make_settings(routes=[{"handler": "broken"}])
    registry = HandlerRegistry({"broken": Broken()})
    with pytest.raises(SettingsError, match=r"^routes\[0\] \(handler 'broken'\): building a "
                                            r"job for uploads/example failed: KeyError"):
        build_planner(settings, make_storage(settings), handlers=registry)


def test_app_build_refuses_a_bad_route_before_creating_state(
        make_settings: Callable[..., Settings]) -> None:
    """`fanout run` stops on a bad route before the queue or executor exist."""
    settings = make_settings(routes=[{"handler": "transcode", "blob_param": "inputs"}])
    with pytest.raises(SettingsError, match=r"routes\[0\]"):
        App.build(settings)
    assert not (settings.home / "queue.db").exists()
