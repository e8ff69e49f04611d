"""The transcode handler: one ffmpeg task per input x rendition, plus optional extras.

Params (validated once, at the message boundary)::

    {
      "inputs": [{"container": "videos", "blob": "2026/11/a.mp4"},   # or blob URLs;
                 "https://acct.blob.core.windows.net/videos/b.mov"], # "input": one ref
      "renditions": ["720p", "360p"],        # preset names; default: every preset
      "output": {"container": "renditions", "prefix": "web"},
      "thumbnail": true,                     # or {"at": 2.5} (seconds into the video)
      "manifest": true,                      # a JSON manifest per input, after all tasks
      "hls": true,                           # HLS variants + a master playlist per input
      "on_dependency_failure": "run"         # run (default) | skip: the fan-in after a failure
    }

A route rule puts the blob of a BlobCreated event under ``input`` (the rule's
``blob_param``), so both ``input`` and ``inputs`` are accepted (not together).

Outputs, for an input blob ``2026/11/a.mp4`` (stem ``2026/11/a``: the blob name less
a short alphanumeric extension, folders, spaces and unicode kept)::

    <prefix>/2026/11/a/<rendition>.mp4             one per rendition
    <prefix>/2026/11/a/thumbnail.jpg               with "thumbnail"
    <prefix>/2026/11/a/<rendition>/index.m3u8      with "hls" (and seg_00000.ts ...)
    <prefix>/2026/11/a/master.m3u8                 with "hls"
    <prefix>/2026/11/a/manifest.json               with "manifest" or "hls"

Task ids are integers: input ``i`` and rendition ``r`` make task ``i * R + r``;
thumbnails follow (``I * R + i``). The fan-in task ``manifest`` depends on the one
id range of all of them, and writes the manifests and master playlists, whose
content is known when the job is planned, less what failed:

- ``on_dependency_failure = "run"`` (the default): every rendition and thumbnail
  task carries exit conditions that satisfy the fan-in however it ends, and on
  success also uploads an empty marker ``<prefix>/.fanout/<job id>/<task id>``. The
  fan-in stages those markers (one container resource file) and lists in each
  manifest only the renditions (and thumbnail) whose marker exists, the others
  under ``"missing"``, with ``"complete": true`` only when none is missing; each
  master playlist names only the variants that exist.
- ``"skip"``: no exit conditions, no markers; a failed task blocks the fan-in
  (Batch's default) and fanout's job monitor ends the job as failed, so a manifest
  present means the input's renditions are complete.

The fan-in sees ``FANOUT_FAN_IN_RANGE`` (``0-<N-1>``) and ``FANOUT_ON_DEPENDENCY_FAILURE``.

``JobSpec.outputs``: for one to six inputs, per input ``renditions`` (its folder,
``<container>/<folder>/``) and, with a fan-in, ``manifest`` (and ``master`` with
``hls``), suffixed ``-<input index>`` when there are several inputs; for more
inputs one ``renditions`` entry for the output prefix (each folder under it holds
its input's files).

Operator configuration, ``[handlers.transcode]``: ``ffmpeg`` (the command, default
``ffmpeg``), ``output_container`` (the default output container), ``presets`` (a
table of presets that replaces the built-in H.264 ladder below), ``hls_segment_seconds``
(default 6) and the container every task runs in, the fan-in too (``container_image``,
``container_registry``, ``container_run_options``, ``container_working_directory``:
``handlers.containers``; for container task pools).
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from handlers.base import (
    BlobRef,
    BuildContext,
    BuildRequest,
    ContainerSettings,
    DependencyFailure,
    ExitConditions,
    JobOutput,
    JobSpec,
    OutputFile,
    ResourceFile,
    TaskSpec,
    fan_in_exit_conditions,
)
from handlers.commands import sh
from handlers.containers import ContainerFields
from handlers.errors import BudgetExceeded, InvalidParams, describe_validation
from handlers.media import (
    Destination,
    OutputParams,
    blob_stem,
    command_words,
    load_options,
    resolve_output,
    safe_extension,
    shell_join,
)

MANIFEST_ID = "manifest"
#: Largest manifest text the fan-in task carries in its command line (Batch takes at
#: most 1 MB per add-task request).
MAX_FANIN_TEXT = 256 * 1024
#: The empty file a task writes (and uploads on success) for the fan-in to find.
MARKER = "fanout-ok"
#: Where the fan-in task stages the markers.
MARKER_DIR = "done"
#: Up to this many inputs, outputs are declared per input; above, by prefix.
OUTPUTS_PER_INPUT_LIMIT = 6
_BITRATE = r"^[1-9][0-9]*(\.[0-9]+)?[kM]?$"
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$"
_CODEC = r"^[A-Za-z0-9_.-]{1,32}$"
Bitrate = Annotated[str, Field(pattern=_BITRATE)]


class Preset(BaseModel):
    """One rendition: a height (width follows the input's aspect ratio) and bitrates."""

    model_config = ConfigDict(extra="forbid")

    height: Annotated[int, Field(ge=16, le=8640)]
    video_bitrate: Bitrate
    maxrate: Bitrate | None = None
    bufsize: Bitrate | None = None
    audio_bitrate: Bitrate = "128k"
    video_codec: Annotated[str, Field(pattern=_CODEC)] = "libx264"
    audio_codec: Annotated[str, Field(pattern=_CODEC)] = "aac"
    encoder_preset: Annotated[str, Field(pattern=_CODEC)] | None = "medium"
    profile: Annotated[str, Field(pattern=_CODEC)] | None = None
    extra_args: list[str] = Field(default_factory=list)

    @field_validator("encoder_preset", "profile", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value == "" else value  # TOML has no null: "" leaves it out

    def max_bits(self) -> int:
        """Peak bits per second of video and audio (HLS ``BANDWIDTH``)."""
        return bits(self.maxrate or self.video_bitrate) + bits(self.audio_bitrate)


#: The built-in H.264 + AAC ladder (used when the operator configures no presets).
DEFAULT_PRESETS: dict[str, Preset] = {
    "1080p": Preset(height=1080, video_bitrate="5000k", maxrate="5350k", bufsize="7500k"),
    "720p": Preset(height=720, video_bitrate="2800k", maxrate="2996k", bufsize="4200k"),
    "480p": Preset(height=480, video_bitrate="1400k", maxrate="1498k", bufsize="2100k"),
    "360p": Preset(height=360, video_bitrate="800k", maxrate="856k", bufsize="1200k"),
}


class TranscodeOptions(ContainerFields):
    """The operator's ``[handlers.transcode]`` table (with ``ContainerFields``)."""

    model_config = ConfigDict(extra="forbid")

    ffmpeg: str = "ffmpeg"
    output_container: str | None = None
    presets: dict[Annotated[str, Field(pattern=_NAME)], Preset] | None = None
    hls_segment_seconds: Annotated[int, Field(ge=1, le=60)] = 6

    @model_validator(mode="after")
    def _working_directory(self) -> TranscodeOptions:
        self.needs_task_working_directory("transcode")
        return self

    @property
    def ladder(self) -> dict[str, Preset]:
        return self.presets if self.presets else DEFAULT_PRESETS


class Thumbnail(BaseModel):
    """``thumbnail``: one JPEG frame taken ``at`` seconds into each input."""

    model_config = ConfigDict(extra="forbid")

    at: Annotated[float, Field(ge=0, le=24 * 3600)] = 1.0


class TranscodeParams(BaseModel):
    """The transcode handler's params, as a message carries them."""

    model_config = ConfigDict(extra="forbid")

    input: Any = None
    inputs: list[Any] | None = None
    renditions: list[str] | None = None
    output: OutputParams | None = None
    thumbnail: bool | Thumbnail = False
    manifest: bool = False
    hls: bool = False
    on_dependency_failure: DependencyFailure = "run"

    @model_validator(mode="after")
    def _one_input_form(self) -> TranscodeParams:
        if self.input is not None and self.inputs is not None:
            raise ValueError("give input or inputs, not both")
        if self.input is None and not self.inputs:
            raise ValueError("give input (one blob) or inputs (a list of blobs)")
        return self

    @property
    def refs(self) -> list[Any]:
        return [self.input] if self.input is not None else list(self.inputs or [])

    @property
    def thumb(self) -> Thumbnail | None:
        if self.thumbnail is True:
            return Thumbnail()
        return self.thumbnail or None


@dataclass(frozen=True, slots=True)
class Source:
    """One input: its reference, task-readable URL, staged file name and output folder."""

    index: int
    ref: BlobRef
    url: str
    local: str
    folder: str


class TranscodeHandler:
    """Builds the transcode job (see the module docstring)."""

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Refuse a broken ``[handlers.transcode]`` table at start-up (ValueError)."""
        load_options(TranscodeOptions, options, "transcode")

    def build(self, request: BuildRequest, ctx: BuildContext) -> JobSpec:
        opts: TranscodeOptions = load_options(TranscodeOptions, ctx.options("transcode"),
                                              "transcode")
        params = parse_params(request.params)
        renditions = pick_renditions(params.renditions, opts.ladder)
        refs = params.refs
        fanin = params.manifest or params.hls
        numbered = len(refs) * len(renditions) + (len(refs) if params.thumb else 0)
        total = numbered + (1 if fanin else 0)
        if total > ctx.max_tasks:
            raise BudgetExceeded(
                f"{len(refs)} inputs x {len(renditions)} renditions make {total} tasks; "
                f"this worker allows at most {ctx.max_tasks} per message "
                "(limits.max_tasks_per_message)")
        dest = resolve_output(ctx, params.output, handler="transcode",
                              default_container=opts.output_container)
        sources = resolve_sources(ctx, refs, dest)
        markers = None
        if fanin and params.on_dependency_failure == "run":
            prefix = dest.blob(".fanout", ctx.job_id) + "/"
            markers = Markers(prefix=prefix,
                              container_url=ctx.input_container_url(dest.container, prefix))
        plan = Plan(opts=opts, params=params, renditions=renditions, dest=dest,
                    sources=sources, markers=markers, container=opts.container_settings(ctx),
                    exit_conditions=(fan_in_exit_conditions(params.on_dependency_failure)
                                     if fanin else None))
        tasks: Iterator[TaskSpec] = plan.rendition_tasks()
        if params.thumb:
            tasks = itertools.chain(tasks, plan.thumbnail_tasks(params.thumb))
        if fanin:
            tasks = itertools.chain(tasks, [plan.fanin_task(numbered, ctx.job_id)])
        return JobSpec(tasks=tasks, task_count=total, uses_task_dependencies=fanin,
                       metadata={"fanout-renditions": ",".join(renditions)},
                       outputs=plan.outputs())


def parse_params(raw: Any) -> TranscodeParams:
    """Validate raw params, turning pydantic's errors into one readable line."""
    try:
        return TranscodeParams.model_validate(raw)
    except ValidationError as exc:
        raise InvalidParams(describe_validation(exc)) from None


def pick_renditions(names: Sequence[str] | None, ladder: Mapping[str, Preset]) -> list[str]:
    """The renditions asked for, in order; every preset when none are named."""
    if names is None:
        return list(ladder)
    if not names:
        raise InvalidParams("renditions is empty: name one or more presets")
    unknown = [n for n in names if n not in ladder]
    if unknown:
        raise InvalidParams(f"unknown rendition {unknown[0][:64]!r} "
                            f"(presets: {', '.join(ladder)})")
    if len(set(names)) != len(names):
        raise InvalidParams("renditions names a preset twice")
    return list(names)


def resolve_sources(ctx: BuildContext, refs: Sequence[Any], dest: Destination) -> list[Source]:
    """Parse every input; refuse two inputs that would write the same output folder."""
    sources: list[Source] = []
    seen: dict[str, BlobRef] = {}
    for index, value in enumerate(refs):
        ref = ctx.blob_ref(value)
        folder = dest.blob(blob_stem(ref.blob))
        if folder in seen:
            raise InvalidParams(f"inputs {seen[folder]} and {ref} would both write to "
                                f"{folder!r}: transcode them in separate messages")
        seen[folder] = ref
        sources.append(Source(index=index, ref=ref, url=ctx.input_url(ref),
                              local="input" + safe_extension(ref.blob), folder=folder))
    return sources


@dataclass(frozen=True, slots=True)
class Markers:
    """Where tasks leave their success markers for the fan-in (policy ``run``)."""

    prefix: str
    container_url: str

    def blob(self, task_id: int) -> str:
        return f"{self.prefix}{task_id}"

    def local(self, task_id: int) -> str:
        """Where the fan-in finds the marker (Batch keeps the full blob name)."""
        return f"{MARKER_DIR}/{self.prefix}{task_id}"


@dataclass(slots=True)
class Plan:
    """Everything the task builders share for one job."""

    opts: TranscodeOptions
    params: TranscodeParams
    renditions: list[str]
    dest: Destination
    sources: list[Source]
    #: Success markers for the fan-in (None: policy ``skip`` or no fan-in).
    markers: Markers | None = None
    #: The exit conditions of every task the fan-in depends on.
    exit_conditions: ExitConditions | None = None
    #: The container every task runs in, the fan-in too (one object for all), or None.
    container: ContainerSettings | None = None

    def outputs(self) -> list[JobOutput]:
        """Where the results land (see the module docstring)."""
        container = self.dest.container
        if len(self.sources) > OUTPUTS_PER_INPUT_LIMIT:
            top = f"{self.dest.prefix}/" if self.dest.prefix else ""
            return [JobOutput("renditions", f"{container}/{top}")]
        fanin = self.params.manifest or self.params.hls
        out: list[JobOutput] = []
        for source in self.sources:
            suffix = f"-{source.index}" if len(self.sources) > 1 else ""
            out.append(JobOutput(f"renditions{suffix}", f"{container}/{source.folder}/"))
            if fanin:
                out.append(JobOutput(f"manifest{suffix}",
                                     f"{container}/{source.folder}/manifest.json"))
            if self.params.hls:
                out.append(JobOutput(f"master{suffix}",
                                     f"{container}/{source.folder}/master.m3u8"))
        return out

    def _marked(self, task_id: int, steps: list[str], outputs: list[OutputFile]) -> None:
        """Add the success marker to a task the fan-in depends on (policy ``run``)."""
        if self.markers is not None:
            steps.append(f": > {MARKER}")
            outputs.append(self._output(MARKER, self.markers.blob(task_id)))

    @property
    def ffmpeg(self) -> list[str]:
        return command_words(self.opts.ffmpeg, what="handlers.transcode.ffmpeg")

    def rendition_tasks(self) -> Iterator[TaskSpec]:
        """Task ``i * R + r``: input ``i`` encoded to rendition ``r``."""
        ffmpeg = self.ffmpeg
        count = len(self.renditions)
        for source in self.sources:
            for r, name in enumerate(self.renditions):
                yield self._rendition_task(source.index * count + r, source, name, ffmpeg)

    def _rendition_task(self, task_id: int, source: Source, name: str,
                        ffmpeg: list[str]) -> TaskSpec:
        preset = self.opts.ladder[name]
        steps = [shell_join(encode_argv(ffmpeg, source.local, preset, title=source.ref.blob))]
        outputs = [self._output("out.mp4", f"{source.folder}/{name}.mp4")]
        if self.params.hls:
            steps += ["mkdir -p hls",
                      shell_join(hls_argv(ffmpeg, self.opts.hls_segment_seconds))]
            outputs.append(self._output("hls/*", f"{source.folder}/{name}/"))
        self._marked(task_id, steps, outputs)
        return TaskSpec(
            id=str(task_id),
            command_line=sh(" && ".join(steps)),
            environment=_environment(source, name),
            resource_files=[ResourceFile(http_url=source.url, file_path=source.local)],
            output_files=outputs,
            container=self.container,
            display_name=_display(f"{name} of {source.ref}"),
            exit_conditions=self.exit_conditions,
        )

    def thumbnail_tasks(self, thumb: Thumbnail) -> Iterator[TaskSpec]:
        """Task ``I * R + i``: one JPEG frame of input ``i``."""
        ffmpeg = self.ffmpeg
        first = len(self.sources) * len(self.renditions)
        for source in self.sources:
            argv = [*ffmpeg, "-hide_banner", "-nostdin", "-y", "-ss", _seconds(thumb.at),
                    "-i", source.local, "-frames:v", "1", "-q:v", "3", "thumbnail.jpg"]
            # ffmpeg exits 0 writing nothing when `at` is past the end: fail instead
            steps = [shell_join(argv), "test -s thumbnail.jpg"]
            outputs = [self._output("thumbnail.jpg", f"{source.folder}/thumbnail.jpg")]
            self._marked(first + source.index, steps, outputs)
            yield TaskSpec(
                id=str(first + source.index),
                command_line=sh(" && ".join(steps)),
                environment=_environment(source, "thumbnail"),
                resource_files=[ResourceFile(http_url=source.url, file_path=source.local)],
                output_files=outputs,
                container=self.container,
                display_name=_display(f"thumbnail of {source.ref}"),
                exit_conditions=self.exit_conditions,
            )

    def fanin_task(self, numbered: int, job_id: str) -> TaskSpec:
        """The ``manifest`` task: writes each input's manifest (and master playlist);
        with markers, only what exists, the rest listed as missing."""
        files: list[tuple[str, str, str]] = []  # (local name, blob name, shell statement)
        size = 0
        for source in self.sources:
            local = f"manifest-{source.index}.json"
            manifest = self.manifest(source, job_id)
            size += len(json.dumps(manifest, ensure_ascii=False)) + 1
            files.append((local, f"{source.folder}/manifest.json",
                          self._manifest_statement(source, manifest, local)))
            if self.params.hls:
                local = f"master-{source.index}.m3u8"
                size += len(self.master_playlist())
                files.append((local, f"{source.folder}/master.m3u8",
                              self._master_statement(source, local)))
        if size > MAX_FANIN_TEXT:
            raise BudgetExceeded(f"the manifests come to {size} characters, over the "
                                 f"{MAX_FANIN_TEXT} one task may carry: send fewer inputs")
        resources = []
        if self.markers is not None:
            resources.append(ResourceFile(http_url="", file_path=MARKER_DIR,
                                          storage_container_url=self.markers.container_url,
                                          blob_prefix=self.markers.prefix))
        return TaskSpec(
            id=MANIFEST_ID,
            command_line=sh(" && ".join(statement for _, _, statement in files)),
            environment={"FANOUT_FAN_IN_RANGE": f"0-{numbered - 1}",
                         "FANOUT_ON_DEPENDENCY_FAILURE": self.params.on_dependency_failure},
            resource_files=resources,
            output_files=[self._output(local, blob) for local, blob, _ in files],
            depends_on_ranges=((0, numbered - 1),),
            container=self.container,
            display_name="manifest",
        )

    def _task_ids(self, source: Source) -> list[tuple[str, int]]:
        """(what, task id) of every task of ``source`` the fan-in depends on."""
        count = len(self.renditions)
        ids = [(name, source.index * count + r) for r, name in enumerate(self.renditions)]
        if self.params.thumb:
            ids.append(("thumbnail", len(self.sources) * count + source.index))
        return ids

    def _manifest_statement(self, source: Source, manifest: dict[str, Any], local: str) -> str:
        """Shell writing ``manifest`` to ``local``; with markers, only what exists."""
        if self.markers is None:
            # policy skip: the fan-in runs only when every task succeeded
            complete = {**manifest, "missing": [], "complete": True}
            content = json.dumps(complete, ensure_ascii=False) + "\n"
            return f"{_printf(content)} > {shell_join([local])}"
        head = {k: v for k, v in manifest.items() if k not in ("renditions", "thumbnail", "hls")}
        entries = dict(zip(self.renditions, manifest["renditions"], strict=True))
        ids = self._task_ids(source)
        steps = [_printf(json.dumps(head, ensure_ascii=False)[:-1] + ', "renditions": ['),
                 "s="]
        for what, task_id in ids:
            if what in entries:
                steps.append(f"if {self._exists(task_id)}; then printf '%s%s' \"$s\" "
                             f"{shell_join([json.dumps(entries[what], ensure_ascii=False)])}; "
                             "s=', '; fi")
        steps.append(_printf("]"))
        for what, task_id in ids:
            if what == "thumbnail":
                field = ', "thumbnail": ' + json.dumps(manifest[what], ensure_ascii=False)
                steps.append(f"if {self._exists(task_id)}; then {_printf(field)}; fi")
        if self.params.hls:
            steps.append(_printf(', "hls": ' + json.dumps(manifest["hls"], ensure_ascii=False)))
        steps += [_printf(', "missing": ['), "s=", "c=true"]
        for what, task_id in ids:
            steps.append(f"if ! {self._exists(task_id)}; then printf '%s%s' \"$s\" "
                         f"{shell_join([json.dumps(what)])}; s=', '; c=false; fi")
        steps += [_printf('], "complete": '), "printf '%s' \"$c\"", _printf("}\n")]
        return "{ " + " && ".join(steps) + "; } > " + shell_join([local])

    def _master_statement(self, source: Source, local: str) -> str:
        """Shell writing the master playlist; with markers, only variants that exist."""
        if self.markers is None:
            return f"{_printf(self.master_playlist())} > {shell_join([local])}"
        steps = [_printf("#EXTM3U\n#EXT-X-VERSION:3\n")]
        count = len(self.renditions)
        for r, name in enumerate(self.renditions):
            variant = self._variant(name)
            steps.append(f"if {self._exists(source.index * count + r)}; then "
                         f"{_printf(variant)}; fi")
        return "{ " + " && ".join(steps) + "; } > " + shell_join([local])

    def _exists(self, task_id: int) -> str:
        assert self.markers is not None
        return f"[ -e {shell_join([self.markers.local(task_id)])} ]"

    def manifest(self, source: Source, job_id: str) -> dict[str, Any]:
        """What one input's ``manifest.json`` says."""
        ladder = self.opts.ladder
        out: dict[str, Any] = {
            "job": job_id,
            "input": {"container": source.ref.container, "blob": source.ref.blob},
            "output": {"container": self.dest.container, "folder": source.folder},
            "renditions": [
                {"name": name, "blob": f"{source.folder}/{name}.mp4",
                 "height": ladder[name].height, "video_bitrate": ladder[name].video_bitrate,
                 "audio_bitrate": ladder[name].audio_bitrate,
                 "video_codec": ladder[name].video_codec}
                for name in self.renditions
            ],
        }
        if self.params.thumb:
            out["thumbnail"] = f"{source.folder}/thumbnail.jpg"
        if self.params.hls:
            out["hls"] = f"{source.folder}/master.m3u8"
        return out

    def master_playlist(self) -> str:
        """An HLS master playlist naming each rendition's ``<name>/index.m3u8``."""
        return "#EXTM3U\n#EXT-X-VERSION:3\n" + "".join(map(self._variant, self.renditions))

    def _variant(self, name: str) -> str:
        preset = self.opts.ladder[name]
        return (f'#EXT-X-STREAM-INF:BANDWIDTH={preset.max_bits()},NAME="{name}"\n'
                f"{name}/index.m3u8\n")

    def _output(self, pattern: str, blob: str) -> OutputFile:
        return OutputFile(file_pattern=pattern, container_url=self.dest.container_url,
                          path=blob)


def encode_argv(ffmpeg: Sequence[str], local: str, preset: Preset, *,
                title: str) -> list[str]:
    """ffmpeg's words for one rendition: H.264/AAC (per the preset) into ``out.mp4``."""
    argv = [*ffmpeg, "-hide_banner", "-nostdin", "-y", "-i", local,
            "-map", "0:v:0", "-map", "0:a:0?",
            "-vf", f"scale=-2:{preset.height}", "-c:v", preset.video_codec]
    if preset.encoder_preset:
        argv += ["-preset", preset.encoder_preset]
    if preset.profile:
        argv += ["-profile:v", preset.profile]
    maxrate = preset.maxrate or preset.video_bitrate
    bufsize = preset.bufsize or f"{2 * bits(maxrate) // 1000}k"
    argv += ["-b:v", preset.video_bitrate, "-maxrate", maxrate, "-bufsize", bufsize,
             "-pix_fmt", "yuv420p", "-c:a", preset.audio_codec, "-b:a", preset.audio_bitrate,
             "-metadata", f"title={title}", "-movflags", "+faststart",
             *preset.extra_args, "out.mp4"]
    return argv


def hls_argv(ffmpeg: Sequence[str], segment_seconds: int) -> list[str]:
    """ffmpeg's words to repackage ``out.mp4`` as an HLS variant in ``hls/``."""
    return [*ffmpeg, "-hide_banner", "-nostdin", "-y", "-i", "out.mp4", "-c", "copy",
            "-f", "hls", "-hls_time", str(segment_seconds), "-hls_playlist_type", "vod",
            "-hls_segment_filename", "hls/seg_%05d.ts", "hls/index.m3u8"]


def bits(rate: str) -> int:
    """``2800k`` -> 2800000 bits per second."""
    match = re.match(r"^([0-9.]+)([kM]?)$", rate)
    if match is None:
        raise ValueError(f"bitrate {rate!r} is not a number with an optional k or M")
    scale = {"": 1, "k": 1000, "M": 1000_000}[match[2]]
    return int(float(match[1]) * scale)


def _printf(text: str) -> str:
    """A shell statement printing ``text`` exactly (no format directives apply)."""
    return f"printf '%s' {shell_join([text])}"


def _seconds(value: float) -> str:
    return f"{value:.3f}".rstrip("0").rstrip(".") or "0"


def _environment(source: Source, what: str) -> dict[str, str]:
    return {"FANOUT_INPUT_CONTAINER": source.ref.container, "FANOUT_INPUT_BLOB": source.ref.blob,
            "FANOUT_RENDITION": what}


def _display(text: str) -> str:
    return text if len(text) <= 1024 else text[:1021] + "..."
