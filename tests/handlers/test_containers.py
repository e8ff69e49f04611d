"""Container settings through the handlers: every task of a job, fan-in tasks included,
runs in the container its program, profile or options name (one shared object)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from handlers.base import ContainerSettings
from handlers.render import MERGE_ID
from handlers.transcode import MANIFEST_ID
from tests.handlers.conftest import PlanHarness
from worker.errors import SettingsError

IDENTITY = ("/subscriptions/0000/resourceGroups/rg/providers/"
            "Microsoft.ManagedIdentity/userAssignedIdentities/fanout-pool")
ACR = {"acr": {"server": "myacr.azurecr.io", "identity": IDENTITY}}
SCENE = {"container": "scenes", "blob": "shot-042/scene.blend"}


def test_render_merge_runs_in_the_profile_image(
        make_planner: Callable[..., PlanHarness]) -> None:
    """Every render task and the merge carry the profile's container, registry and run
    options: the same object (the merge no longer drops it)."""
    planner = make_planner(registries=ACR, handlers={"render": {"profiles": {"gpu": {
        "command": "blender -b {scene} -o {output_pattern} -s {start} -e {end} -a",
        "container_image": "myacr.azurecr.io/blender:4.2", "container_registry": "acr",
        "container_run_options": "--shm-size 2g"}}}})
    job, tasks = planner.job({"handler": "render", "id": "r-1", "params": {
        "scene": SCENE, "frames": {"start": 1, "end": 8}, "frames_per_task": 4,
        "profile": "gpu", "output": {"container": "renders"}, "encode": {"fps": 24}}})
    assert [t.id for t in tasks] == ["0", "1", MERGE_ID]
    container = tasks[0].container
    assert container is not None and all(t.container is container for t in tasks)
    assert container.image == "myacr.azurecr.io/blender:4.2"
    assert container.run_options == "--shm-size 2g"
    assert container.registry is not None and container.registry.identity_reference == IDENTITY


def test_render_without_an_image_runs_every_task_on_the_node(
        make_planner: Callable[..., PlanHarness]) -> None:
    """The built-in profile names no image: no task has a container."""
    _job, tasks = make_planner().job({"handler": "render", "id": "r-2", "params": {
        "scene": SCENE, "frames": {"start": 1, "end": 2}, "output": {"container": "renders"},
        "encode": {}}})
    assert all(t.container is None for t in tasks)


def test_transcode_fan_in_runs_in_the_same_image(
        make_planner: Callable[..., PlanHarness]) -> None:
    """Rendition, thumbnail and manifest tasks share the transcode options' container."""
    planner = make_planner(handlers={"transcode": {
        "output_container": "renditions", "container_image": "jrottenberg/ffmpeg:7.1",
        "container_run_options": "--cpus 2"}})
    _job, tasks = planner.job({"handler": "transcode", "id": "t-1", "params": {
        "input": {"container": "videos", "blob": "a.mp4"}, "renditions": ["720p", "360p"],
        "thumbnail": True, "manifest": True}})
    assert tasks[-1].id == MANIFEST_ID
    assert len({id(t.container) for t in tasks}) == 1
    assert tasks[0].container == ContainerSettings("jrottenberg/ffmpeg:7.1",
                                                   run_options="--cpus 2")


def test_sweep_aggregate_inherits_the_sweep_image(
        make_planner: Callable[..., PlanHarness]) -> None:
    """An aggregate whose program names no image runs in the sweep program's container
    (the pool takes both); one with its own image keeps it."""
    programs = {"sim": {"command": "sim --a {a}", "container_image": "repo/sim:2"},
                "sum": {"command": "summarize"},
                "report": {"command": "report", "container_image": "repo/report:1"}}
    planner = make_planner(programs=programs)

    def sweep(aggregate: str) -> list[Any]:
        _job, tasks = planner.job({"handler": "sweep", "id": f"s-{aggregate}", "params": {
            "program": "sim", "parameters": {"a": [1, 2]},
            "aggregate": {"program": aggregate}}})
        return tasks

    tasks = sweep("sum")
    assert [t.container.image for t in tasks] == ["repo/sim:2"] * 3
    assert sweep("report")[-1].container.image == "repo/report:1"


@pytest.mark.parametrize(("options", "message"), [
    ({"transcode": {"container_image": "UPPER/case"}}, "not a container image"),
    ({"transcode": {"container_registry": "acr"}}, "no registry named 'acr'"),
    ({"render": {"profiles": {"p": {"command": "x {start}",
                                    "container_run_options": "--rm"}}}},
     "container_run_options needs container_image"),
    ({"transcode": {"container_image": "a", "container_working_directory":
                    "containerImageDefault"}}, "must be taskWorkingDirectory"),
    ({"render": {"profiles": {"p": {"command": "x {start}", "container_image": "a",
                                    "container_working_directory": "containerImageDefault"}}}},
     "must be taskWorkingDirectory"),
])
def test_bad_handler_container_options_stop_start_up(
        make_planner: Callable[..., PlanHarness], options: dict[str, Any],
        message: str) -> None:
    """A bad container option in a handler table is refused at start-up: the registry
    name by the settings, the rest by the handler's own options check."""
    from worker.routing import HandlerRegistry

    with pytest.raises((SettingsError, ValueError), match=message):
        planner = make_planner(handlers=options)
        HandlerRegistry.from_entry_points().check_options(planner.settings.handlers)
