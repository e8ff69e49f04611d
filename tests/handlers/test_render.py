"""The render handler, planned through the worker's real planner and local storage."""

from __future__ import annotations

import base64
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from azure.core.credentials import AzureNamedKeyCredential
from prometheus_client import CollectorRegistry

from handlers.base import SATISFY_DEPENDENTS, JobOutput, TaskSpec
from handlers.errors import BudgetExceeded, InvalidParams
from handlers.render import MERGE_ID
from tests.fakes.batch_peer import BatchPeer
from tests.handlers.conftest import PlanHarness, inner_argv
from worker.backends.azure import AzureBatchBackend
from worker.backends.local import LocalBackend
from worker.config import SubmitConfig
from worker.metrics import Metrics
from worker.storage.local import file_url_path
from worker.submit import Submitter

#: Azure Batch's limit on the dependency ids of one task, in characters.
BATCH_DEPENDS_ON_LIMIT = 64_000
SCENE = {"container": "scenes", "blob": "shot-042/scene.blend"}


def render(**params: Any) -> dict[str, Any]:
    """An envelope for the render handler."""
    body = {"scene": SCENE, "output": {"container": "renders"}, **params}
    return {"handler": "render", "id": "r-1", "params": body}


def frames_of(task: TaskSpec) -> tuple[int, int, int]:
    """The -s, -e and -j values a Blender task was given."""
    argv = inner_argv(task.command_line)
    start, end, step = (int(argv[argv.index(flag) + 1]) for flag in ("-s", "-e", "-j"))
    return start, end, step


def dependency_text(tasks: list[TaskSpec]) -> int:
    """Characters of dependency ids, as Batch counts them (ranges as ``a-b``)."""
    return sum(len(",".join(t.depends_on)) + sum(len(f"{a}-{b}") for a, b in t.depends_on_ranges)
               for t in tasks)


@pytest.fixture
def planner(make_planner: Callable[..., PlanHarness]) -> PlanHarness:
    """A planner with default settings (built-in blender profile, local storage)."""
    return make_planner()


def test_blender_tasks_split_the_range_into_chunks(planner: PlanHarness) -> None:
    """48 frames at 10 per task are five Blender tasks; the last takes frames 41-48."""
    job, tasks = planner.job(render(frames={"start": 1, "end": 48}, frames_per_task=10))
    assert job.task_count == 5 and [t.id for t in tasks] == ["0", "1", "2", "3", "4"]
    assert [frames_of(t) for t in tasks] == [(1, 10, 1), (11, 20, 1), (21, 30, 1),
                                            (31, 40, 1), (41, 48, 1)]
    argv = inner_argv(tasks[0].command_line)
    assert argv[:6] == ["mkdir", "-p", "frames", "&&", "blender", "-b"]
    assert argv[6] == "scene.blend" and argv[-1] == "-a"
    assert argv[argv.index("-o") + 1] == "frames/frame_####"
    assert argv[argv.index("-F") + 1] == "PNG"
    [upload] = tasks[0].output_files
    assert (upload.file_pattern, upload.path) == ("frames/*.png", "shot-042/scene/frames")
    assert tasks[0].resource_files[0].file_path == "scene.blend"


def test_step_skips_frames_and_chunks_follow_it(planner: PlanHarness) -> None:
    """Frames 1..10 step 3 are 1, 4, 7, 10: two per task make tasks 1-4 and 7-10."""
    _, tasks = planner.job(render(frames={"start": 1, "end": 10, "step": 3}, frames_per_task=2))
    assert [frames_of(t) for t in tasks] == [(1, 4, 3), (7, 10, 3)]
    assert tasks[1].environment["FANOUT_FRAME_START"] == "7"


def test_encode_adds_one_merge_task_on_a_range(planner: PlanHarness) -> None:
    """encode adds a merge task that depends on every render task through one range."""
    job, tasks = planner.job(render(frames={"start": 1, "end": 48}, frames_per_task=4,
                                    output={"container": "renders", "prefix": "my shot;x"},
                                    encode={"fps": 25, "codec": "libx264"}))
    assert job.task_count == 13 and job.uses_task_dependencies
    merge = tasks[-1]
    assert merge.id == MERGE_ID and merge.depends_on_ranges == ((0, 11),)
    [frames] = merge.resource_files
    assert frames.http_url == "" and frames.file_path == "in"
    assert frames.blob_prefix == "my shot;x/frames/"
    assert frames.storage_container_url is not None
    assert file_url_path(frames.storage_container_url).name == "renders"
    words = inner_argv(merge.command_line)
    assert words[:4] == ["cd", "--", "in/my shot;x/frames", "&&"]
    ffmpeg = words[4:]
    assert ffmpeg[ffmpeg.index("-framerate") + 1] == "25"
    assert ffmpeg[ffmpeg.index("-i") + 1] == "frame_*.png"
    assert ffmpeg[-1] == "../../../video.mp4"
    [video] = merge.output_files
    assert (video.file_pattern, video.path) == ("video.mp4", "my shot;x/video.mp4")


def test_ten_thousand_frames_fit_batch_dependency_limits(planner: PlanHarness) -> None:
    """10,000 one-frame tasks plan with one merge task whose dependency text is tiny."""
    job, tasks = planner.job(render(frames={"start": 1, "end": 10_000}, encode={}))
    assert job.task_count == len(tasks) == 10_001
    merges = [t for t in tasks if t.depends_on or t.depends_on_ranges]
    assert [t.id for t in merges] == [MERGE_ID]
    assert merges[0].depends_on_ranges == ((0, 9_999),)
    assert dependency_text(tasks) <= BATCH_DEPENDS_ON_LIMIT
    last = inner_argv(tasks[-2].command_line)
    assert last[last.index("-o") + 1] == "frames/frame_#####"


def test_ten_thousand_task_render_submits_to_the_local_backend(
        planner: PlanHarness, tmp_path: Path) -> None:
    """The 10,001-task job is accepted whole by the local executor (not started)."""
    backend = LocalBackend(home=tmp_path / "exec", slots=1)
    submitter = Submitter(backend=backend, config=SubmitConfig(),
                          metrics=Metrics(registry=CollectorRegistry()))
    try:
        job = planner.plan(render(frames={"start": 1, "end": 10_000}, encode={})).jobs[0].job
        result = submitter.submit(job, handler="render")
        assert result.added == 10_001
        status = backend.job_status(job.id)
        assert status is not None and sum(status.counts.values()) == 10_001
        merge = backend.task(job.id, MERGE_ID)
        assert merge is not None and merge.state == "active"
    finally:
        submitter.close()
        backend.close()


def test_ten_thousand_task_render_submits_to_azure_batch(
        make_planner: Callable[..., PlanHarness]) -> None:
    """On Azure (a local Batch REST peer), the merge goes as one range and a container file."""
    planner = make_planner(
        blob={"account_url": "https://strender01.blob.core.windows.net",
              "account_key": base64.b64encode(b"offline signing only").decode()},
        backend={"default_pool": "fanout"})
    job = planner.plan(render(frames={"start": 1, "end": 10_000}, encode={})).jobs[0].job
    with BatchPeer() as peer:
        peer.add_pool("fanout", dedicated={"idle": 1})
        backend = AzureBatchBackend(endpoint=peer.url, default_pool="fanout",
                                    credential=AzureNamedKeyCredential(peer.account, peer.key))
        submitter = Submitter(backend=backend, config=SubmitConfig(),
                              metrics=Metrics(registry=CollectorRegistry()))
        try:
            assert submitter.submit(job, handler="render").added == 10_001
        finally:
            submitter.close()
            backend.close()
        sent = {t["id"]: t for t in peer.tasks(job.id)}
    assert len(sent) == 10_001
    merge = sent[MERGE_ID]
    assert merge["dependsOn"] == {"taskIdRanges": [{"start": 0, "end": 9_999}]}
    [frames] = merge["resourceFiles"]
    assert frames["blobPrefix"] == "shot-042/scene/frames/" and frames["filePath"] == "in"
    container = urlsplit(frames["storageContainerUrl"])
    assert container.path == "/renders" and "sp=rl" in container.query
    assert "httpUrl" not in frames


def test_custom_profile_fields(make_planner: Callable[..., PlanHarness]) -> None:
    """A configured profile gets printf patterns, counts and its own image extension."""
    planner = make_planner(handlers={"render": {"profiles": {
        "toy": {"command": "toy --out {output_printf} --from {start} --n {count} {scene}",
                "extension": "jpg"}}}})
    _, tasks = planner.job(render(scene={"container": "scenes", "blob": "a b.toy"},
                                  frames={"start": 0, "end": 5}, frames_per_task=4,
                                  profile="toy", encode={"format": "mkv"}))
    argv = inner_argv(tasks[1].command_line)[4:]
    assert argv == ["toy", "--out", "frames/frame_%04d.jpg", "--from", "4", "--n", "2",
                    "scene.toy"]
    assert tasks[1].output_files[0].file_pattern == "frames/*.jpg"
    merge = inner_argv(tasks[-1].command_line)
    assert merge[merge.index("-i") + 1] == "frame_*.jpg"
    assert tasks[-1].output_files[0].path == "a b/video.mkv"


@pytest.mark.parametrize(("params", "words"), [
    ({"frames": {"start": 10, "end": 5}}, "before start"),
    ({"frames": {"start": 1, "end": 5, "step": 0}}, "step"),
    ({"frames": {"start": 1, "end": 5}, "frames_per_task": 0}, "frames_per_task"),
    ({"frames": {"start": 1, "end": 5}, "profile": "maya"}, "'maya'"),
    ({"frames": {"start": 1, "end": 5}, "encode": {"fps": 0}}, "fps"),
    ({"frames": {"start": 1, "end": 5}, "encode": {"codec": "x;rm"}}, "codec"),
    ({"frames": {"start": "1", "end": 5}}, "start"),
])
def test_bad_params_are_invalid(planner: PlanHarness, params: dict[str, Any],
                                words: str) -> None:
    """Bad ranges, profiles and encode options are InvalidParams naming the problem."""
    with pytest.raises(InvalidParams, match=words):
        planner.plan(render(**params))


def test_budget_counts_the_merge(make_planner: Callable[..., PlanHarness]) -> None:
    """Render tasks plus the merge over the limit is BudgetExceeded, before any URL."""
    planner = make_planner(limits={"max_tasks_per_message": 48})
    assert planner.job(render(frames={"start": 1, "end": 48}))[0].task_count == 48
    with pytest.raises(BudgetExceeded, match="49 tasks"):
        planner.plan(render(frames={"start": 1, "end": 48}, encode={}))


def test_bad_profile_config_names_the_key(make_planner: Callable[..., PlanHarness]) -> None:
    """A profile using an unknown template field is a configuration error, not the message's."""
    planner = make_planner(handlers={"render": {"profiles": {"bad": "r {nope}"}}})
    with pytest.raises(ValueError, match=r"handlers\.render.*nope") as info:
        planner.plan(render(frames={"start": 1, "end": 2}))
    assert not isinstance(info.value, InvalidParams)


def test_commands_quote_hostile_scene_names(planner: PlanHarness) -> None:
    """A scene blob name never reaches a command: the scene is staged as scene<ext>."""
    _, tasks = planner.job(render(scene={"container": "scenes", "blob": "x'; rm -rf ~ #.blend"},
                                  frames={"start": 1, "end": 2}))
    for task in tasks:
        assert "rm" not in shlex.split(task.command_line)[2]
        assert task.resource_files[0].file_path == "scene.blend"
    assert [t.id for t in tasks] == ["0", "1"]
    assert tasks[0].output_files[0].path == "x'; rm -rf ~ #/frames"


def test_merge_skips_after_a_failure_by_default(planner: PlanHarness) -> None:
    """Default ``skip``: render tasks carry no exit conditions (Batch blocks the merge
    when one fails); the merge is told its range and policy."""
    job, tasks = planner.job(render(frames={"start": 1, "end": 6}, frames_per_task=2,
                                    encode={}))
    assert [t.exit_conditions for t in tasks] == [None] * 4
    merge = tasks[-1]
    assert merge.environment == {"FANOUT_FAN_IN_RANGE": "0-2",
                                 "FANOUT_ON_DEPENDENCY_FAILURE": "skip"}


def test_merge_run_satisfies_it_whatever_frames_do(planner: PlanHarness) -> None:
    """``run``: every render task carries the shared SATISFY_DEPENDENTS; the merge none."""
    _, tasks = planner.job(render(frames={"start": 1, "end": 6}, frames_per_task=2,
                                  encode={"on_dependency_failure": "run"}))
    *renders, merge = tasks
    assert all(t.exit_conditions is SATISFY_DEPENDENTS for t in renders) and len(renders) == 3
    assert merge.exit_conditions is None
    assert merge.environment["FANOUT_ON_DEPENDENCY_FAILURE"] == "run"


def test_render_without_encode_has_no_exit_conditions(planner: PlanHarness) -> None:
    """No merge, no dependencies, no exit conditions (Batch would refuse them)."""
    job, tasks = planner.job(render(frames={"start": 1, "end": 3}))
    assert not job.uses_task_dependencies
    assert [t.exit_conditions for t in tasks] == [None, None, None]
    assert job.outputs == [JobOutput("frames", "renders/shot-042/scene/frames/")]


def test_outputs_are_the_frames_prefix_and_the_video(planner: PlanHarness) -> None:
    """The job declares its frames prefix and video as container/path, no URL or SAS."""
    job, _ = planner.job(render(frames={"start": 1, "end": 3},
                                output={"container": "renders", "prefix": "my shot"},
                                encode={"format": "mkv"}))
    assert job.outputs == [JobOutput("frames", "renders/my shot/frames/"),
                           JobOutput("video", "renders/my shot/video.mkv")]


def test_on_dependency_failure_is_validated(planner: PlanHarness) -> None:
    """A value other than run or skip is InvalidParams naming the field."""
    with pytest.raises(InvalidParams, match=r"encode\.on_dependency_failure.*'run' or 'skip'"):
        planner.plan(render(frames={"start": 1, "end": 3},
                            encode={"on_dependency_failure": "continue"}))
