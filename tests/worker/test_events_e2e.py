"""End to end on the embedded default: the whole daemon in-process, real ffmpeg.

A video dropped into a watched local container becomes a BlobCreated event on the
local queue, a route sends it to the transcode handler, the local executor runs
ffmpeg, and the renditions land in the output container, playable. A render with a
toy renderer profile produces its frames and one merged video.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from handlers.base import BlobRef
from tests.worker.harness import RunningWorker
from worker.config import Settings
from worker.storage.local import LocalStorage

SMALL_PRESETS = {
    "240p": {"height": 240, "video_bitrate": "300k", "audio_bitrate": "64k",
             "encoder_preset": "ultrafast"},
    "144p": {"height": 144, "video_bitrate": "150k", "audio_bitrate": "48k",
             "encoder_preset": "ultrafast"},
}


def tool(name: str) -> str:
    """The path of ffmpeg: the one on the PATH, else the static build the
    imageio-ffmpeg wheel ships (a dev extra), so no system ffmpeg is needed."""
    path = shutil.which(name)
    if path is not None:
        return path
    if name == "ffmpeg":
        try:
            import imageio_ffmpeg
        except ImportError:
            pytest.fail("ffmpeg is needed for the media tests: install the dev extras "
                        "(imageio-ffmpeg) or a system ffmpeg")
        found: str = imageio_ffmpeg.get_ffmpeg_exe()
        return found
    pytest.fail(f"{name} is not on the PATH")


def probe(path: Path, *, count: bool = False) -> dict[str, Any]:
    """ffprobe's view of a file's streams (with a decoded frame count if asked); PyAV's
    when no ffprobe is on the PATH (the imageio-ffmpeg wheel ships none)."""
    if shutil.which("ffprobe") is None:
        return probe_with_av(path, count=count)
    argv = [tool("ffprobe"), "-v", "error", "-show_entries",
            "stream=codec_type,codec_name,width,height,nb_read_frames", "-of", "json"]
    if count:
        argv.append("-count_frames")
    out = subprocess.run([*argv, str(path)], capture_output=True, check=True, timeout=60)
    streams: list[dict[str, Any]] = json.loads(out.stdout)["streams"]
    return {s["codec_type"]: s for s in streams}


def probe_with_av(path: Path, *, count: bool = False) -> dict[str, Any]:
    """The same fields as ``probe`` read with PyAV (``av``, a dev extra)."""
    try:
        import av
    except ImportError:
        pytest.fail("ffprobe or PyAV is needed for the media tests: install the dev extras "
                    "(av) or a system ffmpeg")
    found: dict[str, Any] = {}
    with av.open(str(path)) as container:
        for stream in container.streams:
            codec = stream.codec_context
            entry: dict[str, Any] = {"codec_type": stream.type, "codec_name": codec.name}
            if isinstance(codec, av.VideoCodecContext):
                entry.update(width=codec.width, height=codec.height)
            found[stream.type] = entry
        if count and "video" in found:
            frames = sum(1 for _ in container.decode(video=0))
            found["video"]["nb_read_frames"] = str(frames)
    return found


def make_test_video(path: Path) -> None:
    """A 2-second 640x360 test pattern with a sine tone, H.264 + AAC."""
    subprocess.run(
        [tool("ffmpeg"), "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
         "-f", "lavfi", "-i", "testsrc=duration=2:size=640x360:rate=25",
         "-f", "lavfi", "-i", "sine=duration=2", "-c:v", "libx264", "-preset", "ultrafast",
         "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", str(path)],
        check=True, timeout=60)


def test_media_tools_work_without_a_system_ffmpeg(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no ffmpeg or ffprobe on the PATH, the wheel's ffmpeg makes the test video
    and PyAV reads it as ffprobe would (the same fields, frame count included)."""
    system = shutil.which("ffprobe")
    path = os.environ.get("PATH", "")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert shutil.which("ffmpeg") is None and shutil.which("ffprobe") is None
    ffmpeg = tool("ffmpeg")
    assert "imageio_ffmpeg" in ffmpeg
    video = tmp_path / "v.mp4"
    make_test_video(video)
    streams = probe(video, count=True)
    assert {k: streams["video"][k] for k in ("codec_name", "width", "height")} == {
        "codec_name": "h264", "width": 640, "height": 360}
    assert streams["video"]["nb_read_frames"] == "50"  # 2 s at 25 fps
    assert streams["audio"]["codec_name"] == "aac"
    if system is not None:  # where a system ffprobe exists, both views agree
        monkeypatch.setenv("PATH", path)
        by_ffprobe = probe(video, count=True)
        for kind, entry in streams.items():
            assert {key: by_ffprobe[kind].get(key) for key in entry} == entry


@pytest.fixture
def media_worker(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., RunningWorker]]:
    """Start daemons on the embedded default with small presets; stop them after."""
    started: list[RunningWorker] = []

    def start(**overrides: Any) -> RunningWorker:
        ffmpeg = tool("ffmpeg")
        toy = (f"{ffmpeg} -hide_banner -nostdin -loglevel error -y -f lavfi "
               "-i testsrc=size=64x48:rate=24 -frames:v {count} -start_number {start} "
               "{output_printf}")
        settings = make_settings(
            local={"slots": 2, "poll_interval": 0.05},
            consumer={"receive_wait": 0.5},
            handlers={"transcode": {"ffmpeg": ffmpeg, "presets": SMALL_PRESETS},
                      "render": {"ffmpeg": ffmpeg, "profiles": {"toy": toy}}},
            **overrides)
        worker = RunningWorker(settings).start()
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


def storage_of(worker: RunningWorker) -> LocalStorage:
    storage = worker.app.storage
    assert isinstance(storage, LocalStorage)
    return storage


def test_video_dropped_into_watched_container_is_transcoded(
        media_worker: Callable[..., RunningWorker], tmp_path: Path) -> None:
    """A file copied into videos/ yields playable 240p and 144p renditions, a thumbnail
    and a manifest."""
    worker = media_worker(
        watch={"containers": ["videos"], "interval": 0.1, "settle": 0.3},
        routes=[{"handler": "transcode", "container": "videos", "suffix": ".mp4",
                 "content_type": "video/",
                 "params": {"output": {"container": "renditions"}, "manifest": True,
                            "thumbnail": {"at": 0.5}}}])
    storage = storage_of(worker)
    source = tmp_path / "source.mp4"
    make_test_video(source)
    incoming = storage.container_dir("videos") / "2026" / "clip one; ü.mp4"
    incoming.parent.mkdir(parents=True)
    partial = incoming.with_name("clip one; ü.mp4.tmp")
    shutil.copyfile(source, partial)  # written under a temporary name, then renamed
    partial.rename(incoming)

    manifest = BlobRef("renditions", "2026/clip one; ü/manifest.json")
    worker.wait_until(lambda: storage.exists(manifest), timeout=120, what="the manifest")

    for name, (width, height) in {"240p": (426, 240), "144p": (256, 144)}.items():
        streams = probe(storage.path(BlobRef("renditions", f"2026/clip one; ü/{name}.mp4")))
        assert (streams["video"]["codec_name"], streams["video"]["width"],
                streams["video"]["height"]) == ("h264", width, height)
        assert streams["audio"]["codec_name"] == "aac"
    thumb = probe(storage.path(BlobRef("renditions", "2026/clip one; ü/thumbnail.jpg")))
    assert (thumb["video"]["codec_name"], thumb["video"]["width"]) == ("mjpeg", 640)
    listed = json.loads(storage.download(manifest))
    assert listed["input"] == {"container": "videos", "blob": "2026/clip one; ü.mp4"}
    [job] = worker.app.backend.list_jobs()
    assert job.metadata.get("fanout-handler") == "transcode"
    assert job.succeeded == 4 and job.failed == 0
    assert worker.dead_letters() == []


def test_render_of_48_frames_produces_frames_and_one_video(
        media_worker: Callable[..., RunningWorker]) -> None:
    """48 frames in 4 tasks with a toy profile, then the merge task encodes one video."""
    worker = media_worker()
    storage = storage_of(worker)
    storage.upload(BlobRef("scenes", "toy/scene.txt"), b"a scene the toy renderer ignores")
    worker.send({"handler": "render", "id": "render-48", "params": {
        "scene": {"container": "scenes", "blob": "toy/scene.txt"},
        "frames": {"start": 1, "end": 48}, "frames_per_task": 12, "profile": "toy",
        "output": {"container": "renders", "prefix": "toy shot"},
        "encode": {"fps": 24, "codec": "libx264"}}})

    video = BlobRef("renders", "toy shot/video.mp4")
    worker.wait_until(lambda: storage.exists(video), timeout=120, what="the merged video")

    frames = [ref.blob for ref in storage.list("renders", "toy shot/frames/")]
    assert frames == [f"toy shot/frames/frame_{n:04d}.png" for n in range(1, 49)]
    streams = probe(storage.path(video), count=True)
    assert streams["video"]["codec_name"] == "h264"
    assert (streams["video"]["width"], streams["video"]["height"]) == (64, 48)
    assert int(streams["video"]["nb_read_frames"]) == 48
    [job] = worker.app.backend.list_jobs()
    assert job.succeeded == 5 and job.failed == 0
