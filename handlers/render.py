"""The render handler: one task per chunk of frames, then an optional ffmpeg merge.

Params (validated once, at the message boundary)::

    {
      "scene": {"container": "scenes", "blob": "shot-042/scene.blend"},  # or a blob URL
      "frames": {"start": 1, "end": 240, "step": 1},   # end inclusive, as renderers count
      "frames_per_task": 10,                           # default 1
      "output": {"container": "renders", "prefix": "shot-042"},
      "profile": "blender",                            # a renderer profile from config
      "encode": {"fps": 24, "codec": "libx264",        # optional: merge into a video
                 "on_dependency_failure": "skip"}       # skip (default) | run
    }

Each render task stages the scene as ``scene<ext>`` in its working directory and
runs the profile's command template for its frames; the profile writes frames to
``frames/`` and they are uploaded to ``<prefix>/frames/`` in the output container
(``frame_0001.png`` ...; four digits, more when the last frame needs them, so the
names sort in frame order). ``output.prefix`` defaults to the scene's blob name less
its extension.

With ``encode``, a merge task depends on every render task through ONE id range
(render task ids are ``"0"``, ``"1"``...): Azure Batch allows at most 64,000
characters of dependency ids per task, and a 10,000-task render listed id by id
would pass that. The merge task stages every frame with one container resource
file (``storage_container_url`` + ``blob_prefix``: Batch downloads each blob under
the prefix, keeping its full name under ``in/``), runs ffmpeg on them in name
order and uploads ``<prefix>/video.<format>``.

``encode.on_dependency_failure`` says what a failed render task does to the merge:
``skip`` (the default: a video with missing frames is wrong) leaves Batch's default,
so the merge stays blocked and fanout's job monitor ends the job as failed; ``run``
gives every render task exit conditions that satisfy the merge however they end,
so the merge encodes whatever frames exist. The merge sees ``FANOUT_FAN_IN_RANGE``
(``0-<N-1>``) and ``FANOUT_ON_DEPENDENCY_FAILURE``.

Outputs (``JobSpec.outputs``): ``frames`` (``<container>/<prefix>/frames/``) and, with
``encode``, ``video`` (``<container>/<prefix>/video.<format>``).

Profiles are command templates in ``[handlers.render.profiles]``: a string, or a
table with ``command`` and optional ``extension`` (of the frames, default ``png``),
``environment``, ``required_slots`` and the container its tasks run in
(``container_image``, ``container_registry``, ``container_run_options``,
``container_working_directory``: ``handlers.containers``; the merge task runs in the
same image, so a container image for it needs ffmpeg too). Their fields are
``{scene}``, ``{start}``, ``{end}``, ``{step}``, ``{count}``, ``{task_index}``,
``{output_dir}`` (``frames``), ``{output_pattern}`` (``frames/frame_####``, Blender's
``#`` placeholders), ``{output_printf}`` (``frames/frame_%04d.png``) and
``{extension}``. Every value is shell-quoted. The built-in ``blender`` profile::

    blender -b {scene} -o {output_pattern} -F PNG -s {start} -e {end} -j {step} -a

Other options: ``ffmpeg`` (the merge's command, default ``ffmpeg``),
``output_container`` and ``default_profile`` (default ``blender``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from handlers.base import (
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
from handlers.commands import CommandTemplate, sh
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

MERGE_ID = "merge"
#: Blender's largest frame number (MAXFRAME).
MAX_FRAME = 1_048_574
FRAMES_DIR = "frames"
#: Fields a profile's command template may use.
PROFILE_FIELDS = ("scene", "start", "end", "step", "count", "task_index", "output_dir",
                  "output_pattern", "output_printf", "extension")
BLENDER = "blender -b {scene} -o {output_pattern} -F PNG -s {start} -e {end} -j {step} -a"


class Profile(ContainerFields):
    """A renderer: a command template, the image format it writes, and optionally the
    container it runs in (``ContainerFields``)."""

    model_config = ConfigDict(extra="forbid")

    command: str
    extension: Annotated[str, Field(pattern=r"^[a-z0-9]{1,8}$")] = "png"
    environment: dict[str, str] = Field(default_factory=dict)
    required_slots: Annotated[int, Field(ge=1)] = 1

    @model_validator(mode="after")
    def _template(self) -> Profile:
        self.needs_task_working_directory("a render profile")
        template = CommandTemplate(self.command)  # ValueError names a bad field
        unknown = [f for f in template.fields if f not in PROFILE_FIELDS]
        if unknown:
            raise ValueError(f"unknown field {{{unknown[0]}}} (fields: "
                             f"{', '.join(PROFILE_FIELDS)})")
        return self


class RenderOptions(BaseModel):
    """The operator's ``[handlers.render]`` table."""

    model_config = ConfigDict(extra="forbid")

    ffmpeg: str = "ffmpeg"
    output_container: str | None = None
    default_profile: str = "blender"
    profiles: dict[str, Profile] = Field(default_factory=dict)

    @field_validator("profiles", mode="before")
    @classmethod
    def _strings_are_commands(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: {"command": v} if isinstance(v, str) else v for k, v in value.items()}
        return value

    def profile(self, name: str) -> Profile:
        """The profile ``name`` (configured ones first, then the built-in blender)."""
        known = {"blender": Profile(command=BLENDER), **self.profiles}
        if name not in known:
            raise InvalidParams(f"unknown profile {name[:64]!r} (profiles: "
                                f"{', '.join(known)})")
        return known[name]


class FrameRange(BaseModel):
    """``frames``: ``start`` to ``end`` inclusive, every ``step``-th frame."""

    model_config = ConfigDict(extra="forbid")

    start: Annotated[int, Field(ge=0, le=MAX_FRAME, strict=True)]
    end: Annotated[int, Field(ge=0, le=MAX_FRAME, strict=True)]
    step: Annotated[int, Field(gt=0, le=MAX_FRAME, strict=True)] = 1

    @model_validator(mode="after")
    def _ordered(self) -> FrameRange:
        if self.end < self.start:
            raise ValueError(f"end {self.end} is before start {self.start}")
        return self

    @property
    def count(self) -> int:
        return (self.end - self.start) // self.step + 1


class Encode(BaseModel):
    """``encode``: merge the frames into one video once every frame is rendered."""

    model_config = ConfigDict(extra="forbid")

    fps: Annotated[float, Field(gt=0, le=240)] = 24
    codec: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,32}$")] = "libx264"
    format: Literal["mp4", "mov", "mkv", "webm"] = "mp4"
    on_dependency_failure: DependencyFailure = "skip"


class RenderParams(BaseModel):
    """The render handler's params, as a message carries them."""

    model_config = ConfigDict(extra="forbid")

    scene: Any
    frames: FrameRange
    frames_per_task: Annotated[int, Field(ge=1, strict=True)] = 1
    output: OutputParams | None = None
    profile: str | None = None
    encode: Encode | None = None


class RenderHandler:
    """Builds the render job (see the module docstring)."""

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Refuse a broken ``[handlers.render]`` table at start-up (ValueError)."""
        load_options(RenderOptions, options, "render")

    def build(self, request: BuildRequest, ctx: BuildContext) -> JobSpec:
        opts: RenderOptions = load_options(RenderOptions, ctx.options("render"), "render")
        params = parse_params(request.params)
        chunks = math.ceil(params.frames.count / params.frames_per_task)
        total = chunks + (1 if params.encode else 0)
        if total > ctx.max_tasks:
            raise BudgetExceeded(f"the render makes {total} tasks; this worker allows at "
                                 f"most {ctx.max_tasks} per message "
                                 "(limits.max_tasks_per_message)")
        profile = opts.profile(params.profile or opts.default_profile)
        scene = ctx.blob_ref(params.scene)
        dest = resolve_output(ctx, params.output, handler="render",
                              default_container=opts.output_container,
                              default_prefix=blob_stem(scene.blob))
        layout = Layout(dest=dest, frames=params.frames, extension=profile.extension)
        conditions = (fan_in_exit_conditions(params.encode.on_dependency_failure)
                      if params.encode else None)
        container = profile.container_settings(ctx)  # one object, shared by every task
        render = Render(params=params, profile=profile, layout=layout, chunks=chunks,
                        scene_url=ctx.input_url(scene),
                        scene_local="scene" + safe_extension(scene.blob),
                        exit_conditions=conditions, container=container)
        tasks: Iterator[TaskSpec] = render.tasks()
        outputs = [JobOutput("frames", f"{dest.container}/{layout.frames_prefix}")]
        if params.encode:
            frames_url = ctx.input_container_url(dest.container, layout.frames_prefix)
            merge = merge_task(params.encode, layout, frames_url, chunks,
                               command_words(opts.ffmpeg, what="handlers.render.ffmpeg"),
                               container=container)
            tasks = itertools.chain(tasks, [merge])
            outputs.append(JobOutput("video", f"{dest.container}/{merge.output_files[0].path}"))
        return JobSpec(tasks=tasks, task_count=total, uses_task_dependencies=bool(params.encode),
                       metadata={"fanout-frames": f"{params.frames.start}-{params.frames.end}"},
                       outputs=outputs)


def parse_params(raw: Any) -> RenderParams:
    """Validate raw params, turning pydantic's errors into one readable line."""
    try:
        return RenderParams.model_validate(raw)
    except ValidationError as exc:
        raise InvalidParams(describe_validation(exc)) from None


@dataclass(frozen=True, slots=True)
class Layout:
    """Where frames are written locally and in the output container."""

    dest: Destination
    frames: FrameRange
    extension: str

    @property
    def digits(self) -> int:
        """Zero padding: four digits, or as many as the last frame needs."""
        return max(4, len(str(self.frames.end)))

    @property
    def frames_prefix(self) -> str:
        """The blob-name prefix of every frame: ``<prefix>/frames/``."""
        return self.dest.blob(FRAMES_DIR) + "/"

    def fields(self) -> dict[str, object]:
        """The output fields every render task's template gets."""
        return {"output_dir": FRAMES_DIR,
                "output_pattern": f"{FRAMES_DIR}/frame_" + "#" * self.digits,
                "output_printf": f"{FRAMES_DIR}/frame_%0{self.digits}d.{self.extension}",
                "extension": self.extension}


@dataclass(frozen=True, slots=True)
class Render:
    """The render tasks of one job."""

    params: RenderParams
    profile: Profile
    layout: Layout
    chunks: int
    scene_url: str
    scene_local: str
    #: What each render task's end does to the merge (None: Batch's default).
    exit_conditions: ExitConditions | None = None
    #: The container every task of the job runs in (the profile's), or None.
    container: ContainerSettings | None = None

    def tasks(self) -> Iterator[TaskSpec]:
        """Task ``k`` renders frames ``start + k * per * step`` onwards, ``per`` of them."""
        frames = self.params.frames
        per = self.params.frames_per_task
        template = CommandTemplate(self.profile.command)
        fixed = {"scene": self.scene_local, "step": frames.step, **self.layout.fields()}
        upload = OutputFile(file_pattern=f"{FRAMES_DIR}/*.{self.layout.extension}",
                            container_url=self.layout.dest.container_url,
                            path=self.layout.frames_prefix.rstrip("/"))
        scene = ResourceFile(http_url=self.scene_url, file_path=self.scene_local)
        for k in range(self.chunks):
            first = frames.start + k * per * frames.step
            last = min(first + (per - 1) * frames.step, frames.end)
            count = (last - first) // frames.step + 1
            values = {**fixed, "start": first, "end": last, "count": count, "task_index": k}
            env = dict(self.profile.environment)
            env.update(FANOUT_FRAME_START=str(first), FANOUT_FRAME_END=str(last),
                       FANOUT_FRAME_STEP=str(frames.step))
            yield TaskSpec(
                id=str(k),
                command_line=sh(f"mkdir -p {FRAMES_DIR} && {template.render(values)}"),
                environment=env,
                resource_files=[scene],
                output_files=[upload],
                required_slots=self.profile.required_slots,
                container=self.container,
                display_name=f"frames {first}-{last}",
                exit_conditions=self.exit_conditions,
            )


def merge_task(encode: Encode, layout: Layout, frames_url: str, chunks: int,
               ffmpeg: list[str], container: ContainerSettings | None = None) -> TaskSpec:
    """The task that turns every frame into ``<prefix>/video.<format>``, in the same
    container as the render tasks (the job's pool takes both).

    Batch keeps each blob's full name under the resource file's directory, so the
    frames land in ``in/<prefix>/frames/``; ffmpeg runs there (on a fixed glob, so
    no blob name reaches its pattern syntax) and writes the video back in the
    working directory.
    """
    frame_dir = f"in/{layout.frames_prefix.rstrip('/')}"
    video = f"video.{encode.format}"
    back = "../" * frame_dir.count("/") + "../" + video
    argv = [*ffmpeg, "-hide_banner", "-nostdin", "-y", "-framerate", _number(encode.fps),
            "-pattern_type", "glob", "-i", f"frame_*.{layout.extension}",
            "-vf", "scale=trunc(iw/2)*2:trunc(ih/2)*2",
            "-c:v", encode.codec, "-pix_fmt", "yuv420p", back]
    return TaskSpec(
        id=MERGE_ID,
        command_line=sh(f"cd -- {shell_join([frame_dir])} && {shell_join(argv)}"),
        resource_files=[ResourceFile(http_url="", file_path="in",
                                     storage_container_url=frames_url,
                                     blob_prefix=layout.frames_prefix)],
        output_files=[OutputFile(file_pattern=video, container_url=layout.dest.container_url,
                                 path=layout.dest.blob(video))],
        environment={"FANOUT_FAN_IN_RANGE": f"0-{chunks - 1}",
                     "FANOUT_ON_DEPENDENCY_FAILURE": encode.on_dependency_failure},
        depends_on_ranges=((0, chunks - 1),),
        container=container,
        display_name=f"encode {video}",
    )


def _number(value: float) -> str:
    return str(int(value)) if value == int(value) else repr(value)
