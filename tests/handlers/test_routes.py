"""Blob-created events (the samples in tests/handlers/samples) through route rules into the
transcode and render handlers, on an Azure storage configuration (no network used)."""

from __future__ import annotations

import base64
import copy
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

from handlers.errors import ForeignStorage, NoRoute
from tests.handlers.conftest import PlanHarness, inner_argv, sample

KEY = base64.b64encode(b"not a real key, only signs offline").decode()
ROUTES = [
    {"handler": "transcode", "account": "stmedia01", "container": "videos",
     "suffix": [".mp4", ".mov"], "content_type": "video/",
     "params": {"renditions": ["720p", "360p"], "output": {"container": "renditions"}}},
    {"handler": "render", "container": "scenes", "suffix": ".blend", "blob_param": "scene",
     "params": {"frames": {"start": 1, "end": 48}, "frames_per_task": 8,
                "output": {"container": "renders"}, "encode": {"fps": 24}}},
]


def account(name: str, **extra: Any) -> dict[str, Any]:
    """Settings overrides for the storage account ``name`` and the routes above."""
    return {"blob": {"account_url": f"https://{name}.blob.core.windows.net",
                     "account_key": KEY}, "routes": ROUTES, **extra}


@pytest.fixture
def media(make_planner: Callable[..., PlanHarness]) -> PlanHarness:
    """A planner whose storage is the sample's media account, stmedia01."""
    return make_planner(**account("stmedia01"))


def event_for(blob_url: str, *, api: str = "PutBlob", event_id: str = "e-1",
              content_type: str = "video/mp4") -> dict[str, Any]:
    """The Event Grid sample with another blob URL, api, id and content type."""
    event = copy.deepcopy(sample("eventgrid-blobcreated.json"))
    event["id"] = event_id
    event["data"].update(url=blob_url, api=api, contentType=content_type)
    return event


def test_event_grid_sample_routes_to_transcode(media: PlanHarness) -> None:
    """The Event Grid sample becomes a transcode job keyed by the event id."""
    event = sample("eventgrid-blobcreated.json")
    plan = media.plan(event)
    [planned] = plan.jobs
    assert planned.handler == "transcode" and planned.key == event["id"]
    tasks = list(planned.job.tasks)
    assert [t.output_files[0].path for t in tasks] == [
        "2026/11/launch-keynote/720p.mp4", "2026/11/launch-keynote/360p.mp4"]
    url = urlsplit(tasks[0].resource_files[0].http_url)
    assert (url.hostname, url.path) == ("stmedia01.blob.core.windows.net",
                                        "/videos/2026/11/launch-keynote.mp4")
    assert "sp=r" in url.query  # a read-only SAS for that blob
    assert urlsplit(tasks[0].output_files[0].container_url).path == "/renditions"


def test_cloudevents_sample_routes_to_render(make_planner: Callable[..., PlanHarness]) -> None:
    """The CloudEvents sample (a .blend in scenes) becomes a render job with its merge."""
    planner = make_planner(**account("strender01"))
    event = sample("cloudevents-blobcreated.json")
    [planned] = planner.plan(event).jobs
    assert planned.handler == "render" and planned.key == event["id"]
    tasks = list(planned.job.tasks)
    assert len(tasks) == 7 and tasks[-1].depends_on_ranges == ((0, 5),)
    assert tasks[0].output_files[0].path == "shot-042/scene/frames"
    merge_source = tasks[-1].resource_files[0]
    assert merge_source.blob_prefix == "shot-042/scene/frames/"
    assert merge_source.storage_container_url is not None
    assert "sp=rl" in urlsplit(merge_source.storage_container_url).query


def test_an_array_of_events_makes_one_job_each(media: PlanHarness) -> None:
    """A JSON array of events plans one job per event, each keyed by its own id."""
    base = "https://stmedia01.blob.core.windows.net/videos"
    plan = media.plan([event_for(f"{base}/a.mp4", event_id="e-a"),
                       event_for(f"{base}/b.mov", event_id="e-b")])
    assert [(p.handler, p.key) for p in plan.jobs] == [("transcode", "e-a"),
                                                     ("transcode", "e-b")]
    assert plan.jobs[0].job.id != plan.jobs[1].job.id


def test_percent_encoded_hostile_name_is_decoded_and_quoted(media: PlanHarness) -> None:
    """An event URL's %-escapes are decoded once; the name is then one quoted word."""
    url = "https://stmedia01.blob.core.windows.net/videos/my%20clip%3B%20rm%20-rf%20~.mp4"
    [planned] = media.plan(event_for(url)).jobs
    first = next(iter(planned.job.tasks))
    assert "title=my clip; rm -rf ~.mp4" in inner_argv(first.command_line)
    assert first.output_files[0].path == "my clip; rm -rf ~/720p.mp4"
    assert unquote(urlsplit(first.resource_files[0].http_url).path) == (
        "/videos/my clip; rm -rf ~.mp4")


def test_gen2_events_wait_for_flush_with_close(media: PlanHarness) -> None:
    """On Data Lake Gen2 only FlushWithClose starts work; CreateFile is ignored."""
    url = "https://stmedia01.dfs.core.windows.net/videos/lake/a.mp4"
    created = media.plan(event_for(url, api="CreateFile"))
    assert created.jobs == [] and created.ignored == ["gen2-CreateFile"]
    flushed = media.plan(event_for(url, api="FlushWithClose"))
    assert [p.handler for p in flushed.jobs] == ["transcode"]


def test_foreign_account_is_refused(media: PlanHarness) -> None:
    """An event from another storage account (the CloudEvents sample's) is ForeignStorage."""
    with pytest.raises(ForeignStorage, match="strender01"):
        media.plan(sample("cloudevents-blobcreated.json"))


def test_unmatched_event_is_no_route_or_dropped(media: PlanHarness,
                                                 make_planner: Callable[..., PlanHarness]) -> None:
    """No rule for the blob is NoRoute; with events.unrouted = drop it is ignored."""
    url = "https://stmedia01.blob.core.windows.net/videos/notes.txt"
    with pytest.raises(NoRoute, match="notes.txt"):
        media.plan(event_for(url, content_type="text/plain"))
    dropping = make_planner(**account("stmedia01", events={"unrouted": "drop"}))
    plan = dropping.plan(event_for(url, content_type="text/plain"))
    assert plan.jobs == [] and plan.ignored == ["unrouted"]


def test_rule_conditions_all_hold(media: PlanHarness) -> None:
    """A .mp4 with a non-video content type matches no rule (every condition must hold)."""
    url = "https://stmedia01.blob.core.windows.net/videos/a.mp4"
    with pytest.raises(NoRoute):
        media.plan(event_for(url, content_type="application/octet-stream"))
