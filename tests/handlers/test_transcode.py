"""The transcode handler, planned through the worker's real planner and local storage."""

from __future__ import annotations

import json
import shlex
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

from handlers.base import SATISFY_DEPENDENTS, JobOutput, TaskSpec
from handlers.errors import BudgetExceeded, ForeignStorage, InvalidParams
from handlers.transcode import DEFAULT_PRESETS, MANIFEST_ID, MARKER
from tests.handlers.conftest import PlanHarness, inner_argv

DANGEROUS = "my clip; rm -rf ~.mp4"
HEIGHTS = {"720p": 720, "480p": 480, "360p": 360}


def transcode(**params: Any) -> dict[str, Any]:
    """An envelope for the transcode handler."""
    return {"handler": "transcode", "id": "t-1", "params": params}


def two_inputs(**extra: Any) -> dict[str, Any]:
    """Two inputs (one with a hostile name) x three renditions, into renditions/web."""
    return transcode(
        inputs=[{"container": "videos", "blob": DANGEROUS},
                {"container": "videos", "blob": "2026/11/b.MOV"}],
        renditions=["720p", "480p", "360p"],
        output={"container": "renditions", "prefix": "web/"}, **extra)


@pytest.fixture
def planner(make_planner: Callable[..., PlanHarness]) -> PlanHarness:
    """A planner with default settings (built-in ladder, local storage)."""
    return make_planner()


def value_after(argv: list[str], flag: str) -> str:
    """The word after ``flag`` in ``argv``."""
    return argv[argv.index(flag) + 1]


def test_two_inputs_three_renditions_make_six_ffmpeg_tasks(planner: PlanHarness) -> None:
    """2 inputs x 3 renditions plan as six ffmpeg tasks with integer ids, input-major."""
    job, tasks = planner.job(two_inputs())
    assert job.task_count == 6 and len(tasks) == 6
    assert [t.id for t in tasks] == ["0", "1", "2", "3", "4", "5"]
    assert not job.uses_task_dependencies
    for task, (stem, name) in zip(tasks, [(s, r) for s in ("my clip; rm -rf ~", "2026/11/b")
                                          for r in HEIGHTS], strict=True):
        argv = inner_argv(task.command_line)
        assert argv[0] == "ffmpeg"
        assert value_after(argv, "-vf") == f"scale=-2:{HEIGHTS[name]}"
        assert value_after(argv, "-b:v") == DEFAULT_PRESETS[name].video_bitrate
        assert value_after(argv, "-c:a") == "aac"
        assert argv[-1] == "out.mp4"
        [out] = task.output_files
        assert (out.file_pattern, out.path) == ("out.mp4", f"web/{stem}/{name}.mp4")


def test_hostile_blob_name_stays_inside_one_argument(planner: PlanHarness) -> None:
    """A blob named ``my clip; rm -rf ~.mp4`` is one quoted word, never a command."""
    _, tasks = planner.job(two_inputs())
    for task in tasks[:3]:
        argv = inner_argv(task.command_line)
        holding = [word for word in argv if "rm -rf" in word]
        assert holding == [f"title={DANGEROUS}"]
        assert value_after(argv, "-i") == "input.mp4"
        assert ";" not in " ".join(w for w in argv if w != holding[0])
        [resource] = task.resource_files
        assert resource.file_path == "input.mp4"
        assert unquote(urlsplit(resource.http_url).path).endswith(f"/videos/{DANGEROUS}")
        assert task.environment["FANOUT_INPUT_BLOB"] == DANGEROUS


def test_input_extension_is_kept_only_when_safe(planner: PlanHarness) -> None:
    """Inputs stage as ``input<ext>``: ``.MOV`` becomes ``.mov``, odd extensions are dropped."""
    _, tasks = planner.job(transcode(
        inputs=[{"container": "videos", "blob": "b.MOV"},
                {"container": "videos", "blob": "c.m$v"}],
        renditions=["360p"], output={"container": "out"}))
    assert [t.resource_files[0].file_path for t in tasks] == ["input.mov", "input"]
    assert [t.output_files[0].path for t in tasks] == ["b/360p.mp4", "c.m$v/360p.mp4"]


def test_commands_run_as_written_by_a_real_shell(planner: PlanHarness, tmp_path: Path) -> None:
    """Run through /bin/sh, the command passes ffmpeg exactly the planned words."""
    _, tasks = planner.job(two_inputs())
    bin_dir, wd = tmp_path / "bin", tmp_path / "wd"
    bin_dir.mkdir()
    wd.mkdir()
    fake = bin_dir / "ffmpeg"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done > args.txt\n')
    fake.chmod(0o755)
    command = shlex.split(tasks[0].command_line)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    subprocess.run(command, cwd=wd, env=env, check=True, timeout=30)
    words = (wd / "args.txt").read_text().splitlines()
    assert words == inner_argv(tasks[0].command_line)[1:]
    assert [p.name for p in wd.iterdir()] == ["args.txt"]


def test_manifest_fan_in_depends_on_one_range(planner: PlanHarness, tmp_path: Path) -> None:
    """With manifest, a seventh task depends on ids 0..5 and writes each input's manifest
    (``skip``: it runs only when all succeeded, so the manifest says complete)."""
    job, tasks = planner.job(two_inputs(manifest=True, on_dependency_failure="skip"))
    assert job.task_count == 7 and job.uses_task_dependencies
    fanin = tasks[-1]
    assert fanin.id == MANIFEST_ID
    assert fanin.depends_on_ranges == ((0, 5),) and fanin.depends_on == ()
    subprocess.run(shlex.split(fanin.command_line), cwd=tmp_path, check=True, timeout=30)
    uploads = {o.file_pattern: o.path for o in fanin.output_files}
    assert uploads == {"manifest-0.json": "web/my clip; rm -rf ~/manifest.json",
                       "manifest-1.json": "web/2026/11/b/manifest.json"}
    manifest = json.loads((tmp_path / "manifest-0.json").read_text())
    assert manifest["input"] == {"container": "videos", "blob": DANGEROUS}
    assert [r["blob"] for r in manifest["renditions"]] == [
        f"web/my clip; rm -rf ~/{name}.mp4" for name in HEIGHTS]
    assert manifest["job"] == job.id
    assert (manifest["missing"], manifest["complete"]) == ([], True)
    assert fanin.resource_files == []
    assert all(t.exit_conditions is None and len(t.output_files) == 1 for t in tasks[:6])


def test_hls_adds_variants_and_master_playlists(planner: PlanHarness, tmp_path: Path) -> None:
    """With hls, each rendition also uploads hls/* and the fan-in writes master playlists."""
    _, tasks = planner.job(two_inputs(hls=True, on_dependency_failure="skip"))
    first = tasks[0]
    steps = shlex.split(first.command_line)[2].split(" && ")
    assert len(steps) == 3 and steps[1] == "mkdir -p hls"
    remux = shlex.split(steps[2])
    assert remux[-1] == "hls/index.m3u8" and value_after(remux, "-c") == "copy"
    assert [(o.file_pattern, o.path) for o in first.output_files][1] == (
        "hls/*", "web/my clip; rm -rf ~/720p/")
    fanin = tasks[-1]
    subprocess.run(shlex.split(fanin.command_line), cwd=tmp_path, check=True, timeout=30)
    master = (tmp_path / "master-1.m3u8").read_text().splitlines()
    assert master[0] == "#EXTM3U"
    assert [line for line in master if not line.startswith("#")] == [
        f"{name}/index.m3u8" for name in HEIGHTS]
    bandwidth = int(master[2].split("BANDWIDTH=")[1].split(",")[0])
    assert bandwidth == 2_996_000 + 128_000


def test_thumbnail_tasks_follow_the_renditions(planner: PlanHarness) -> None:
    """thumbnail {at} adds one task per input, ids after the renditions, at that time."""
    job, tasks = planner.job(two_inputs(thumbnail={"at": 2.5}, manifest=True))
    assert job.task_count == 9
    thumbs = tasks[6:8]
    assert [t.id for t in thumbs] == ["6", "7"]
    argv = inner_argv(thumbs[1].command_line)
    assert value_after(argv, "-ss") == "2.5" and value_after(argv, "-i") == "input.mov"
    assert argv[-8:] == ["&&", "test", "-s", "thumbnail.jpg", "&&", ":", ">", MARKER]
    assert thumbs[1].output_files[0].path == "web/2026/11/b/thumbnail.jpg"
    assert tasks[8].depends_on_ranges == ((0, 7),)


def test_input_singular_is_what_routes_fill(planner: PlanHarness) -> None:
    """``input`` (one ref) works like a one-item ``inputs``; the default is the whole ladder."""
    job, tasks = planner.job(transcode(input={"container": "videos", "blob": "a.mp4"},
                                       output={"container": "out"}))
    assert job.task_count == len(DEFAULT_PRESETS)
    assert [t.output_files[0].path for t in tasks] == [f"a/{n}.mp4" for n in DEFAULT_PRESETS]


@pytest.mark.parametrize(("params", "fault", "words"), [
    ({"renditions": ["720p", "4k"]}, InvalidParams, "'4k'"),
    ({"renditions": []}, InvalidParams, "empty"),
    ({"renditions": ["720p", "720p"]}, InvalidParams, "twice"),
    ({"inputs": [{"container": "videos", "blob": "a.mp4"}]}, InvalidParams, "not both"),
    ({"colour": "red"}, InvalidParams, "colour"),
    ({"thumbnail": {"at": -1}}, InvalidParams, "thumbnail"),
    ({"output": {"prefix": "x"}}, InvalidParams, "output.container"),
    ({"output": {"container": "out", "prefix": "a/../b"}}, InvalidParams, "'..'"),
])
def test_bad_params_are_message_faults(planner: PlanHarness, params: dict[str, Any],
                                       fault: type[Exception], words: str) -> None:
    """Unknown presets, bad shapes and bad outputs are dead-letter faults naming the problem."""
    body = {"input": {"container": "videos", "blob": "a.mp4"},
            "output": {"container": "out"}, **params}
    with pytest.raises(fault, match=words.replace(".", r"\.").replace("(", r"\(")):
        planner.plan(transcode(**body))


def test_inputs_writing_the_same_folder_are_refused(planner: PlanHarness) -> None:
    """a.mp4 and a.mov would both write a/<rendition>.mp4, so the message is refused."""
    with pytest.raises(InvalidParams, match="would both write"):
        planner.plan(transcode(inputs=[{"container": "vid", "blob": "a.mp4"},
                                       {"container": "vid", "blob": "a.mov"}],
                               output={"container": "out"}))


def test_foreign_url_input_is_refused(planner: PlanHarness) -> None:
    """An input URL of another account is ForeignStorage, before any task is built."""
    with pytest.raises(ForeignStorage):
        planner.plan(transcode(input="https://evil.example.com/videos/a.mp4",
                               output={"container": "out"}))


def test_budget_counts_every_task(make_planner: Callable[..., PlanHarness]) -> None:
    """inputs x renditions (+ thumbnails + fan-in) over the limit is BudgetExceeded."""
    planner = make_planner(limits={"max_tasks_per_message": 6})
    assert planner.job(two_inputs())[0].task_count == 6
    with pytest.raises(BudgetExceeded, match="7 tasks"):
        planner.plan(two_inputs(manifest=True))


def test_operator_presets_replace_the_ladder(make_planner: Callable[..., PlanHarness]) -> None:
    """Configured presets are the ladder; ffmpeg and the output container come from config."""
    planner = make_planner(handlers={"transcode": {
        "ffmpeg": "nice -n 10 /opt/ff/ffmpeg", "output_container": "media-out",
        "presets": {"240p": {"height": 240, "video_bitrate": "300k", "encoder_preset": ""},
                    "144p": {"height": 144, "video_bitrate": "150k", "audio_bitrate": "64k"}}}})
    job, tasks = planner.job(transcode(input={"container": "videos", "blob": "a.mp4"}))
    assert [t.output_files[0].path for t in tasks] == ["a/240p.mp4", "a/144p.mp4"]
    first, second = (inner_argv(t.command_line) for t in tasks)
    assert first[:4] == ["nice", "-n", "10", "/opt/ff/ffmpeg"]
    assert "-preset" not in first and value_after(second, "-preset") == "medium"
    assert value_after(second, "-b:a") == "64k" and value_after(first, "-bufsize") == "600k"
    assert tasks[0].output_files[0].container_url.endswith("/media-out")
    with pytest.raises(InvalidParams, match="'720p'"):
        planner.plan(transcode(input={"container": "videos", "blob": "a.mp4"},
                               renditions=["720p"]))


def test_bad_operator_presets_are_not_message_faults(
        make_planner: Callable[..., PlanHarness]) -> None:
    """A broken [handlers.transcode] table is a ValueError naming the key (retried, not DLQ)."""
    planner = make_planner(handlers={"transcode": {"presets": {"x": {"height": 240}}}})
    with pytest.raises(ValueError, match=r"handlers\.transcode.*video_bitrate") as info:
        planner.plan(transcode(input={"container": "videos", "blob": "a.mp4"},
                               output={"container": "out"}))
    assert not isinstance(info.value, InvalidParams)


def test_tasks_are_lazy(planner: PlanHarness) -> None:
    """The job's tasks are an iterator built on demand, not a list."""
    job, _ = planner.job(two_inputs())
    again = planner.plan(two_inputs()).jobs[0].job
    first: TaskSpec = next(iter(again.tasks))
    assert first.id == "0" and not isinstance(again.tasks, list) and job.task_count == 6


def markers_for(fanin: TaskSpec, root: Path, task_ids: list[int]) -> None:
    """Stage the success markers of ``task_ids`` where Batch would put them for ``fanin``."""
    [rf] = fanin.resource_files
    assert rf.blob_prefix is not None
    for task_id in task_ids:
        marker = root / rf.file_path / f"{rf.blob_prefix}{task_id}"
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("")


def test_fan_in_runs_after_failures_by_default(planner: PlanHarness) -> None:
    """Default ``run``: every rendition and thumbnail task carries the shared
    SATISFY_DEPENDENTS and uploads a success marker; the fan-in stages the markers."""
    job, tasks = planner.job(two_inputs(manifest=True, thumbnail=True))
    *numbered, fanin = tasks
    assert len(numbered) == 8
    assert all(t.exit_conditions is SATISFY_DEPENDENTS for t in numbered)
    assert fanin.exit_conditions is None
    prefix = f"web/.fanout/{job.id}/"
    for task in numbered:
        marker = task.output_files[-1]
        assert (marker.file_pattern, marker.path, marker.upload_condition) == (
            MARKER, f"{prefix}{task.id}", "success")
        assert shlex.split(task.command_line)[2].endswith(f" && : > {MARKER}")
    [staged] = fanin.resource_files
    assert (staged.blob_prefix, staged.file_path, staged.http_url) == (prefix, "done", "")
    assert staged.storage_container_url is not None
    assert fanin.environment == {"FANOUT_FAN_IN_RANGE": "0-7",
                                 "FANOUT_ON_DEPENDENCY_FAILURE": "run"}


def test_manifest_lists_missing_renditions(planner: PlanHarness, tmp_path: Path) -> None:
    """Run in a shell with some markers absent, the fan-in writes manifests that list
    only what exists, the rest as missing, and master playlists of existing variants."""
    _, tasks = planner.job(two_inputs(hls=True, thumbnail=True))
    fanin = tasks[-1]
    markers_for(fanin, tmp_path, [0, 2, 3, 4, 5, 7])  # 480p of input 0, its thumbnail fail
    subprocess.run(shlex.split(fanin.command_line), cwd=tmp_path, check=True, timeout=30)
    first = json.loads((tmp_path / "manifest-0.json").read_text())
    assert [r["name"] for r in first["renditions"]] == ["720p", "360p"]
    assert (first["missing"], first["complete"]) == (["480p", "thumbnail"], False)
    assert "thumbnail" not in first and first["hls"] == "web/my clip; rm -rf ~/master.m3u8"
    assert first["input"] == {"container": "videos", "blob": DANGEROUS}
    second = json.loads((tmp_path / "manifest-1.json").read_text())
    assert [r["name"] for r in second["renditions"]] == list(HEIGHTS)
    assert (second["missing"], second["complete"]) == ([], True)
    assert second["thumbnail"] == "web/2026/11/b/thumbnail.jpg"
    master = (tmp_path / "master-0.m3u8").read_text().splitlines()
    assert [line for line in master if not line.startswith("#")] == [
        "720p/index.m3u8", "360p/index.m3u8"]


def test_manifest_with_nothing_rendered_is_still_valid(planner: PlanHarness,
                                                       tmp_path: Path) -> None:
    """No marker at all: each manifest is valid JSON with no renditions, all missing."""
    _, tasks = planner.job(two_inputs(manifest=True))
    subprocess.run(shlex.split(tasks[-1].command_line), cwd=tmp_path, check=True, timeout=30)
    manifest = json.loads((tmp_path / "manifest-1.json").read_text())
    assert manifest["renditions"] == [] and manifest["missing"] == list(HEIGHTS)
    assert manifest["complete"] is False


def test_no_fan_in_no_exit_conditions_no_markers(planner: PlanHarness) -> None:
    """Without manifest or hls the job has no dependencies, so no exit conditions, and
    tasks upload only their renditions."""
    job, tasks = planner.job(two_inputs(thumbnail=True))
    assert not job.uses_task_dependencies
    assert all(t.exit_conditions is None for t in tasks)
    assert all(MARKER not in t.command_line and len(t.output_files) == 1 for t in tasks)


def test_outputs_per_input_then_by_prefix(planner: PlanHarness) -> None:
    """Few inputs: each input's folder, manifest and master playlist, as container/path;
    many inputs: one entry for the output prefix."""
    job, _ = planner.job(two_inputs(hls=True))
    assert job.outputs == [
        JobOutput("renditions-0", "renditions/web/my clip; rm -rf ~/"),
        JobOutput("manifest-0", "renditions/web/my clip; rm -rf ~/manifest.json"),
        JobOutput("master-0", "renditions/web/my clip; rm -rf ~/master.m3u8"),
        JobOutput("renditions-1", "renditions/web/2026/11/b/"),
        JobOutput("manifest-1", "renditions/web/2026/11/b/manifest.json"),
        JobOutput("master-1", "renditions/web/2026/11/b/master.m3u8")]
    one, _ = planner.job(transcode(input={"container": "videos", "blob": "a.mp4"},
                                   output={"container": "out"}))
    assert one.outputs == [JobOutput("renditions", "out/a/")]
    many, _ = planner.job(transcode(
        inputs=[{"container": "videos", "blob": f"clip-{i}.mp4"} for i in range(40)],
        renditions=["360p"], manifest=True, output={"container": "out", "prefix": "batch"}))
    assert many.outputs == [JobOutput("renditions", "out/batch/")]
    assert all("?" not in o.location and "://" not in o.location
               for o in job.outputs + one.outputs + many.outputs)


def test_on_dependency_failure_is_validated(planner: PlanHarness) -> None:
    """A value other than run or skip is InvalidParams naming the field."""
    with pytest.raises(InvalidParams, match=r"on_dependency_failure.*'run' or 'skip'"):
        planner.plan(two_inputs(manifest=True, on_dependency_failure="block"))
