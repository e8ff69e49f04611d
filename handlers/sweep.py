"""The parametric sweep handler: one task per point of a parameter grid.

Params (validated once, at the message boundary)::

    {
      "program": "simulate",                      # a program from config
      "parameters": {"alpha": [0.1, 0.5],         # a list of values...
                     "beta": {"start": 0, "stop": 10, "step": 2}},  # ...or a range
      "mode": "product",                          # product | zip | combinations | random
      "repeat": 1,                                # run each point N times
      "aggregate": {"program": "reduce",          # optional final task after all others
                    "on_dependency_failure": "run"},  # run | skip when a task fails
      "task": {"max_task_retries": 1, "max_wall_clock": "PT1H"},
      "inputs": ["data/runs/{alpha}.csv"]         # more per-task inputs (see Data below)
    }

Ranges are half-open (``stop`` excluded) with a positive ``step``; integers stay
integers, floats are computed in decimal so ``0.1 + 2 * 0.1`` reads ``0.3``.
``random`` draws ``samples`` distinct points of the product grid with ``seed``;
``combinations`` takes every ``length``-subset of one list parameter (fields
``{name_1}``..``{name_N}``), as Batch Shipyard's task factory does.

Each task's command is the program's template with every value shell-quoted, and
each task sees its values in the environment as ``FANOUT_PARAM_<NAME>`` with
``FANOUT_TASK_INDEX`` and ``FANOUT_REPEAT_INDEX``. Task ids are the task's index
(``"0"``, ``"1"``...), so the aggregate task depends on one id range, never a list.

The aggregate's ``on_dependency_failure`` says what a failed sweep task does to it:
``run`` (the default) gives every sweep task exit conditions that satisfy their
dependents however they end, so the aggregate runs once all have ended and must
find out itself which results are missing; ``skip`` leaves Batch's default, so one
failed task blocks the aggregate (and fanout's job monitor ends the job as failed).
The aggregate sees ``FANOUT_TASK_COUNT``, ``FANOUT_FAN_IN_RANGE`` (the id range it
depends on, ``0-19``) and ``FANOUT_ON_DEPENDENCY_FAILURE``. A sweep without an
aggregate sets no exit conditions (Batch refuses dependency actions on a job that
does not use task dependencies).

Data (``handlers.datapath``): a program's ``inputs`` (``"<container>/<blob name>"``
templated by the task's fields, checked for every task before the job is returned)
and the message's own ``inputs`` (only within the program's ``allowed_inputs``) are
staged as resource files; its ``outputs`` (file patterns) are uploaded to
``results/<job>/<task>/`` in ``[handlers.sweep] output_container`` (default
``fanout-results``). The aggregate is staged all of ``results/<job>/``
(``FANOUT_RESULTS_DIR`` says where) and uploads its program's outputs to
``results/<job>/aggregate/``; the job declares ``results`` and ``aggregate`` as its
``JobSpec.outputs``. A sweep with no inputs or outputs adds nothing per task.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from datetime import timedelta
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from handlers import datapath
from handlers.base import (
    BuildContext,
    BuildRequest,
    ContainerSettings,
    DependencyFailure,
    ExitConditions,
    JobOutput,
    JobSpec,
    Program,
    ResourceFile,
    TaskSpec,
    fan_in_exit_conditions,
)
from handlers.commands import (
    CommandTemplate,
    as_text,
    bind_parts,
    parts_format,
    quote,
    sh,
    sh_escape,
    sh_parts,
)
from handlers.errors import BudgetExceeded, InvalidParams, describe_validation

Scalar = int | float | str | bool
#: Template fields every sweep task offers besides its parameters.
BUILTIN_FIELDS = ("task_index", "repeat_index")
AGGREGATE_ID = "aggregate"
TASK_INDEX = "FANOUT_TASK_INDEX"
REPEAT_INDEX = "FANOUT_REPEAT_INDEX"


class Range(BaseModel):
    """A half-open numeric range: ``start``, ``start + step``, ... below ``stop``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    start: int | float
    stop: int | float
    step: int | float = 1


class TaskOptions(BaseModel):
    """Per-task settings a message may choose for every task of the sweep."""

    model_config = ConfigDict(extra="forbid")

    max_task_retries: Annotated[int, Field(ge=-1, le=100)] | None = None
    max_wall_clock: timedelta | None = None
    retention: timedelta | None = None


class Aggregate(BaseModel):
    """The optional final task; it runs once every sweep task has ended (``run``) or
    only if every one succeeded (``skip``)."""

    model_config = ConfigDict(extra="forbid")

    program: str | None = None
    command: str | None = None
    on_dependency_failure: DependencyFailure = "run"


class SweepParams(BaseModel):
    """The sweep handler's params, as a message carries them."""

    model_config = ConfigDict(extra="forbid")

    program: str | None = None
    command: str | None = None
    parameters: dict[str, list[Scalar] | Range] = Field(default_factory=dict)
    mode: Literal["product", "zip", "combinations", "random"] = "product"
    repeat: Annotated[int, Field(ge=1)] = 1
    samples: Annotated[int, Field(ge=1)] | None = None
    seed: int | None = None
    length: Annotated[int, Field(ge=1)] | None = None
    replacement: bool = False
    aggregate: Aggregate | None = None
    task: TaskOptions = Field(default_factory=TaskOptions)
    #: More per-task inputs (templated like the program's), within the program's
    #: ``allowed_inputs``: ``"<container>/<blob>"``, ``{container, blob}`` or a blob URL.
    inputs: list[str | dict[str, Any]] = Field(default_factory=list)

    @field_validator("parameters")
    @classmethod
    def _names_are_identifiers(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in value:
            if not name.isidentifier() or name in BUILTIN_FIELDS or not name.isascii():
                raise ValueError(f"parameter name {name!r} must be an ASCII identifier "
                                 f"other than {', '.join(BUILTIN_FIELDS)}")
        return value


class SweepHandler:
    """Expands a parameter grid into one task per point (see module docstring)."""

    def build(self, request: BuildRequest, ctx: BuildContext) -> JobSpec:
        params = parse_params(request.params)
        ctx.check_task_limits(max_task_retries=params.task.max_task_retries,
                              max_wall_clock=params.task.max_wall_clock)
        axes = {name: expand_axis(name, spec, ctx.max_tasks)
                for name, spec in params.parameters.items()}
        points = Grid(params, axes)
        total = points.count * params.repeat
        extra = 1 if params.aggregate else 0
        if total + extra > ctx.max_tasks:
            raise BudgetExceeded(
                f"the sweep makes {total + extra} tasks; this worker allows at most "
                f"{ctx.max_tasks} per message (limits.max_tasks_per_message)"
            )
        if total == 0:
            raise InvalidParams("the sweep has no points: every parameter needs a value")
        program = resolve_program(ctx, params.program, params.command, "sweep")
        template = CommandTemplate(program.command)
        lacking = template.missing([*points.fields, *BUILTIN_FIELDS])
        if lacking:
            raise InvalidParams(
                f"program {program.name!r} needs {', '.join(lacking)}, "
                "which the sweep's parameters do not give"
            )
        conditions: ExitConditions | None = None
        aggregate: TaskSpec | None = None
        agg_program: Program | None = None
        if params.aggregate:
            agg = params.aggregate
            agg_program = resolve_program(ctx, agg.program, agg.command, "aggregate")
            aggregate = _aggregate_task(agg_program, total, agg.on_dependency_failure,
                                        program)
            conditions = fan_in_exit_conditions(agg.on_dependency_failure)
        tasks = _tasks(params, points, program, template, conditions)
        data = _data_path(ctx, params, program, points.fields)
        if data is not None:
            data.check(_points(points, params.repeat))
            tasks = data.attach(tasks)
        outputs = _results(ctx, data, aggregate, agg_program)
        if aggregate is not None:
            tasks = itertools.chain(tasks, [aggregate])
        hours, basis = estimate_task_hours(program, total, agg_program)
        return JobSpec(
            tasks=tasks,
            task_count=total + extra,
            uses_task_dependencies=bool(params.aggregate),
            metadata={"fanout-program": program.name},
            outputs=outputs,
            estimated_task_hours=hours,
            estimate_basis=basis,
        )

    def check_options(self, options: Mapping[str, Any]) -> None:
        """``[handlers.sweep]``: ``output_container`` (default ``fanout-results``)."""
        unknown = sorted(set(options) - {"output_container"})
        if unknown:
            raise ValueError(f"handlers.sweep: unknown option {', '.join(unknown)} "
                             "(the sweep takes output_container)")
        container = options.get("output_container", datapath.DEFAULT_OUTPUT_CONTAINER)
        if not isinstance(container, str):
            raise ValueError("handlers.sweep.output_container must be a container name")
        datapath.check_container_name(container, "handlers.sweep.output_container")


def _output_container(ctx: BuildContext) -> str:
    container = ctx.options("sweep").get("output_container")
    return container if isinstance(container, str) else datapath.DEFAULT_OUTPUT_CONTAINER


def _data_path(ctx: BuildContext, params: SweepParams, program: Program,
               fields: Sequence[str]) -> datapath.TaskData | None:
    """The sweep tasks' inputs (the program's, then the message's) and outputs, or None
    when there are none (the tasks then stream exactly as before)."""
    if not (program.inputs or params.inputs or program.outputs):
        return None
    order = [*fields, *BUILTIN_FIELDS]
    inputs: list[tuple[datapath.InputTemplate, tuple[str, ...] | None, str]] = []
    for i, text in enumerate(program.inputs):
        what = f"program {program.name!r} inputs[{i}]"
        try:
            inputs.append((datapath.parse_input(text, what), None, what))
        except ValueError as exc:
            raise InvalidParams(str(exc)) from None
    if params.inputs:
        if not program.allowed_inputs:
            raise InvalidParams(f"program {program.name!r} takes no inputs from messages "
                                "(its configuration sets no allowed_inputs)")
        allowed = datapath.Allowed.of(program.allowed_inputs)
        for i, value in enumerate(params.inputs):
            template = datapath.message_input(value, ctx, i)
            inputs.append((template, allowed.check(template, program.name, f"inputs[{i}]"),
                           f"inputs[{i}]"))
    for template, _prefixes, what in inputs:
        lacking = [f for f in template.fields if f not in order]
        if lacking:
            raise InvalidParams(f"{what} {template} needs {', '.join(lacking)}, which the "
                                "sweep's parameters do not give")
    return datapath.TaskData(ctx=ctx, fields=order, inputs=inputs, outputs=program.outputs,
                             output_container=_output_container(ctx),
                             upload_condition=program.upload_condition)


def _points(grid: Grid, repeat: int) -> Iterator[tuple[str, ...]]:
    """Each task's field values in template order (parameters, task and repeat index),
    in task order. (Mode ``random`` without a seed draws other points each time, so
    there the tasks' own check, as they stream, is what holds.)"""
    repeats = [str(rep) for rep in range(repeat)]
    for index, (row, rep) in enumerate(_with_repeats(grid.rows(), repeats)):
        yield (*row, str(index), rep)


def _results(ctx: BuildContext, data: datapath.TaskData | None, aggregate: TaskSpec | None,
             agg_program: Program | None) -> list[JobOutput]:
    """Give the aggregate its inputs (every task's results, then its program's own
    inputs) and outputs; return the job's output locations."""
    container = _output_container(ctx)
    prefix = datapath.results_prefix(ctx.job_id)
    outputs: list[JobOutput] = []
    if data is not None and data.outputs:
        outputs.append(JobOutput("results", f"{container}/{prefix}"))
    if aggregate is None or agg_program is None:
        return outputs
    files: list[ResourceFile] = []
    if data is not None and data.outputs:
        files.append(ResourceFile(
            http_url="", file_path="", blob_prefix=prefix,
            storage_container_url=ctx.input_container_url(container, prefix)))
        aggregate.environment["FANOUT_RESULTS_DIR"] = prefix.rstrip("/")
    if agg_program.inputs:
        own = [_aggregate_input(agg_program, i, text)
               for i, text in enumerate(agg_program.inputs)]
        files += datapath.TaskData(ctx=ctx, fields=BUILTIN_FIELDS, inputs=own, outputs=(),
                                   output_container=container,
                                   upload_condition="success").constant
    aggregate.resource_files = [*aggregate.resource_files, *files]
    if agg_program.outputs:
        url = ctx.output_container_url(container, prefix)
        aggregate.output_files = [*aggregate.output_files, *datapath.output_files(
            agg_program.outputs, url, f"{prefix}{AGGREGATE_ID}/",
            agg_program.upload_condition)]
        outputs.append(JobOutput(AGGREGATE_ID, f"{container}/{prefix}{AGGREGATE_ID}/"))
    return outputs


def _aggregate_input(program: Program, index: int,
                     text: str) -> tuple[datapath.InputTemplate, None, str]:
    """An aggregate program's input: the aggregate has no task fields, so none."""
    what = f"aggregate program {program.name!r} inputs[{index}]"
    try:
        template = datapath.parse_input(text, what)
    except ValueError as exc:
        raise InvalidParams(str(exc)) from None
    if template.fields:
        raise InvalidParams(f"{what} {template} uses {', '.join(template.fields)}: an "
                            "aggregate's inputs are plain blob names")
    return template, None, what


def parse_params(raw: Any) -> SweepParams:
    """Validate raw params, turning pydantic's errors into one readable line."""
    try:
        return SweepParams.model_validate(raw)
    except ValidationError as exc:
        raise InvalidParams(describe_validation(exc)) from None


def estimate_task_hours(program: Program, tasks: int, aggregate: Program | None = None
                        ) -> tuple[float | None, str | None]:
    """The sweep's task-hours estimate and how it was made: ``tasks`` x the program's
    ``expected_duration`` x its required slots, plus the aggregate's own when it
    declares one. None when the sweep's program declares no expected duration (a
    message's own command never does): no estimate, no budget check."""
    if program.expected_duration is None:
        return None, None
    hours = tasks * program.expected_duration.total_seconds() * program.required_slots / 3600
    basis = (f"{tasks} task{'s' if tasks != 1 else ''} x {_iso(program.expected_duration)} x "
             f"{program.required_slots} slot{'s' if program.required_slots != 1 else ''} "
             f"(programs.{program.name}.expected_duration)")
    if aggregate is not None and aggregate.expected_duration is not None:
        hours += aggregate.expected_duration.total_seconds() * aggregate.required_slots / 3600
        basis += (f" + aggregate {_iso(aggregate.expected_duration)} x "
                  f"{aggregate.required_slots} slot{'s' if aggregate.required_slots != 1 else ''}")
    return hours, basis


def _iso(duration: timedelta) -> str:
    """A duration as ISO 8601 (``PT10M``, ``P1DT2H``)."""
    seconds = int(duration.total_seconds())
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    time = "".join(f"{n}{u}" for n, u in ((hours, "H"), (minutes, "M"), (seconds, "S")) if n)
    return "P" + (f"{days}D" if days else "") + (f"T{time}" if time else "" if days else "T0S")


def resolve_program(ctx: BuildContext, name: str | None, command: str | None,
                    what: str) -> Program:
    """The configured program ``name`` or, with the operator's opt-in, ``command``."""
    if name and command:
        raise InvalidParams(f"{what}: give either a program or a command, not both")
    if name:
        return ctx.program(name)
    if command:
        if not ctx.allow_message_commands:
            raise InvalidParams(
                f"{what}: this worker runs only configured programs; a command line in "
                "a message needs the operator's opt-in (allow_message_commands)"
            )
        try:
            CommandTemplate(command)
        except ValueError as exc:
            raise InvalidParams(f"{what}: {exc}") from None
        return Program(name="(message)", command=command)
    raise InvalidParams(f"{what}: name a program from the worker's configuration")


def expand_axis(name: str, spec: list[Scalar] | Range, budget: int) -> list[str]:
    """The text values of one parameter, checked against ``budget`` before expanding."""
    if isinstance(spec, list):
        if not spec:
            raise InvalidParams(f"parameters.{name}: the list of values is empty")
        if len(spec) > budget:
            raise BudgetExceeded(f"parameters.{name} has {len(spec)} values; the limit "
                                 f"is {budget} tasks per message")
        return [as_text(v) for v in spec]
    return _expand_range(name, spec, budget)


def _expand_range(name: str, spec: Range, budget: int) -> list[str]:
    if any(isinstance(v, bool) for v in (spec.start, spec.stop, spec.step)):
        raise InvalidParams(f"parameters.{name}: a range takes numbers, not booleans")
    if not all(math.isfinite(v) for v in (spec.start, spec.stop, spec.step)):
        raise InvalidParams(f"parameters.{name}: start, stop and step must be finite")
    if spec.step <= 0:
        raise InvalidParams(f"parameters.{name}: step must be positive, got {spec.step}")
    if spec.stop <= spec.start:
        raise InvalidParams(f"parameters.{name}: the range is empty "
                            f"(stop {spec.stop} is not above start {spec.start})")
    if all(isinstance(v, int) for v in (spec.start, spec.stop, spec.step)):
        count = len(range(int(spec.start), int(spec.stop), int(spec.step)))
        _check_axis_budget(name, count, budget)
        return [str(v) for v in range(int(spec.start), int(spec.stop), int(spec.step))]
    try:
        start, stop, step = (Decimal(repr(v)) for v in (spec.start, spec.stop, spec.step))
    except InvalidOperation:
        raise InvalidParams(f"parameters.{name}: not a number") from None
    count = math.ceil((stop - start) / step)
    _check_axis_budget(name, count, budget)
    return [_decimal_text(start + i * step) for i in range(count)]


def _check_axis_budget(name: str, count: int, budget: int) -> None:
    if count > budget:
        raise BudgetExceeded(f"parameters.{name} expands to {count} values; the limit "
                             f"is {budget} tasks per message")


def _decimal_text(value: Decimal) -> str:
    text = format(value.normalize(), "f")
    return text if "." in text or "e" in text.lower() else text + ".0"


class Grid:
    """The sweep's points as rows of pre-quoted and raw values, streamed in order."""

    def __init__(self, params: SweepParams, axes: dict[str, list[str]]) -> None:
        self.params = params
        self.axes = axes
        self.fields: list[str] = list(axes)
        mode = params.mode
        if mode != "random" and params.samples is not None:
            raise InvalidParams("samples is only for mode 'random'")
        if mode != "combinations" and params.length is not None:
            raise InvalidParams("length is only for mode 'combinations'")
        if mode == "zip":
            lengths = {len(v) for v in axes.values()}
            if len(lengths) > 1:
                sizes = ", ".join(f"{k}={len(v)}" for k, v in axes.items())
                raise InvalidParams(f"mode 'zip' needs parameters of equal length ({sizes})")
            self.count = lengths.pop() if lengths else 0
        elif mode == "combinations":
            self._setup_combinations()
        else:
            self.count = math.prod(len(v) for v in axes.values()) if axes else 0
            if mode == "random":
                self._setup_random()

    def _setup_combinations(self) -> None:
        if len(self.axes) != 1 or self.params.length is None:
            raise InvalidParams("mode 'combinations' takes exactly one parameter and a length")
        (name, values), = self.axes.items()
        k = self.params.length
        n = len(values)
        self.count = math.comb(n + k - 1, k) if self.params.replacement else math.comb(n, k)
        self.fields = [f"{name}_{i + 1}" for i in range(k)]

    def _setup_random(self) -> None:
        if self.params.samples is None:
            raise InvalidParams("mode 'random' needs samples (and a seed to repeat it)")
        if self.params.samples > self.count:
            raise InvalidParams(f"samples {self.params.samples} exceeds the "
                                f"{self.count} points of the grid")
        self.population = self.count
        self.count = self.params.samples

    def rows(self) -> Iterator[Sequence[str]]:
        """Each point's raw text values, in ``self.fields`` order."""
        values = list(self.axes.values())
        mode = self.params.mode
        if mode == "zip":
            return zip(*values, strict=True)
        if mode == "combinations":
            pick = (itertools.combinations_with_replacement if self.params.replacement
                    else itertools.combinations)
            return pick(values[0], self.params.length or 1)
        if mode == "random":
            rng = random.Random(self.params.seed)
            chosen = rng.sample(range(self.population), self.count)
            return (_unrank(i, values) for i in chosen)
        return itertools.product(*values)


def _unrank(index: int, axes: list[list[str]]) -> tuple[str, ...]:
    """The ``index``-th point of ``itertools.product(*axes)`` without walking to it."""
    out: list[str] = []
    for axis in reversed(axes):
        index, digit = divmod(index, len(axis))
        out.append(axis[digit])
    return tuple(reversed(out))


def _tasks(params: SweepParams, grid: Grid, program: Program, template: CommandTemplate,
           conditions: ExitConditions | None = None) -> Iterator[TaskSpec]:
    """Stream the sweep's tasks; values are quoted once per distinct value, not per task,
    and each command line is put together from pieces (``sh_parts``) instead of quoted
    whole. Every task gets the same ``conditions`` object (one attribute store per
    task, no copy). A plain function returning the stream, not a generator of its own,
    so the stream has no extra layer per task."""
    parts = sh_parts(template, [*grid.fields, *BUILTIN_FIELDS])
    if parts is None:
        return _tasks_generic(params, grid, program, template, conditions)
    escaped = {v: sh_escape(quote(v)) for axis in grid.axes.values() for v in axis}
    shared = _Shared.of(params, program, conditions)
    if params.mode == "product" and grid.axes:
        return _product_tasks(params, grid, program, parts, escaped, shared)
    return _row_tasks(params, grid, program, parts, escaped, shared)


class _Shared(NamedTuple):
    """What every task of the sweep has the same: the message's ``task`` options, the
    program's slots and container, the aggregate's exit conditions."""

    retries: int | None
    wall: timedelta | None
    retention: timedelta | None
    slots: int
    container: ContainerSettings | None
    conditions: ExitConditions | None

    @classmethod
    def of(cls, params: SweepParams, program: Program,
           conditions: ExitConditions | None) -> _Shared:
        opts = params.task
        return cls(opts.max_task_retries, opts.max_wall_clock, opts.retention,
                   program.required_slots, program.container, conditions)

    @property
    def plain(self) -> bool:
        """True when a task's defaults already are all of it but the conditions."""
        return (self.retries is None and self.wall is None and self.retention is None
                and self.slots == 1 and self.container is None)


def _product_tasks(params: SweepParams, grid: Grid, program: Program,
                   parts: list[str | int], escaped: Mapping[str, str],
                   shared: _Shared) -> Iterator[TaskSpec]:
    """Mode ``product``, as nested loops: the last parameter varies fastest, so what
    depends only on the others (their environment entries, their text in the command
    line) is done once per combination of theirs, not once per task. Each task still
    gets a whole environment of its own (one ``dict.copy`` of a working dict that is
    never handed out) and a whole command line of its own."""
    *outer, inner = grid.axes.values()
    last = len(grid.fields) - 1  # the last parameter's position in ``parts``
    keys = [f"FANOUT_PARAM_{name.upper()}" for name in grid.fields]
    *outer_keys, inner_key = keys
    work = {**program.environment, **dict.fromkeys([*keys, TASK_INDEX, REPEAT_INDEX], "")}
    repeats = [str(rep) for rep in range(params.repeat)]
    single = len(repeats) == 1
    work[REPEAT_INDEX] = repeats[0]
    inner_pairs = [(value, escaped[value]) for value in inner]
    plain, conditions = shared.plain, shared.conditions
    retries, wall, retention, slots, container, _ = shared
    index = 0
    for prefix in itertools.product(*outer):
        work.update(zip(outer_keys, prefix, strict=True))
        bound = bind_parts(parts, {i: escaped[v] for i, v in enumerate(prefix)})
        concat = _concat_shape(bound, last)
        fmt = None if concat else parts_format(_shift(bound, last)).format
        head, tail = concat or ("", "")
        for value, text in inner_pairs:
            work[inner_key] = value
            line = head + text + tail
            for rep in repeats:
                task_id = str(index)
                index += 1
                if fmt is not None:
                    line = fmt(text, task_id, rep)
                if not single:
                    work[REPEAT_INDEX] = rep
                env = work.copy()
                env[TASK_INDEX] = task_id
                task = TaskSpec(task_id, line, env)  # positional: the per-task path is hot
                if not plain:
                    task.max_task_retries, task.max_wall_clock = retries, wall
                    task.retention, task.required_slots, task.container = (
                        retention, slots, container)
                if conditions is not None:
                    task.exit_conditions = conditions
                yield task


def _concat_shape(bound: list[str | int], last: int) -> tuple[str, str] | None:
    """``(head, tail)`` when the line is ``head + <last parameter> + tail`` (the
    template names the last parameter once and neither task nor repeat index)."""
    if len(bound) == 3 and bound[1] == last:
        return str(bound[0]), str(bound[2])
    return None


def _shift(bound: list[str | int], last: int) -> list[str | int]:
    """Positions ``last``, ``last + 1``, ``last + 2`` (the last parameter, task and
    repeat index) as 0, 1, 2: the arguments of the per-task ``str.format``."""
    return [p - last if isinstance(p, int) else p for p in bound]


def _row_tasks(params: SweepParams, grid: Grid, program: Program,
               parts: list[str | int], escaped: Mapping[str, str],
               shared: _Shared) -> Iterator[TaskSpec]:
    """The other modes (zip, combinations, random): one row of values per point, each
    command line one ``str.format`` call."""
    fields = grid.fields
    fmt = parts_format(parts).format
    lookup = escaped.__getitem__
    identity = all(e == v for v, e in escaped.items())  # digits and the like: no quoting
    env_keys = [f"FANOUT_PARAM_{name.upper()}" for name in fields]
    env_keys += [TASK_INDEX, REPEAT_INDEX]
    base_env = dict(program.environment)
    repeats = [str(rep) for rep in range(params.repeat)]
    plain, conditions = shared.plain, shared.conditions
    retries, wall, retention, slots, container, _ = shared
    for index, (row, rep) in enumerate(_with_repeats(grid.rows(), repeats)):
        task_id = str(index)
        point = (*row, task_id, rep)
        # rows are as long as fields, so every key gets its value
        env = dict(zip(env_keys, point, strict=False))
        if base_env:
            env = {**base_env, **env}
        line = fmt(*point) if identity else fmt(*map(lookup, row), task_id, rep)
        task = TaskSpec(task_id, line, env)  # positional: the per-task path is hot
        if not plain:
            task.max_task_retries, task.max_wall_clock = retries, wall
            task.retention, task.required_slots, task.container = retention, slots, container
        if conditions is not None:
            task.exit_conditions = conditions
        yield task


def _with_repeats(rows: Iterator[Sequence[str]],
                  repeats: list[str]) -> Iterator[tuple[Sequence[str], str]]:
    """Each row once per repeat, with the repeat's index as text."""
    if len(repeats) == 1:
        return zip(rows, itertools.repeat(repeats[0]))
    return ((row, rep) for row in rows for rep in repeats)


def _tasks_generic(params: SweepParams, grid: Grid, program: Program,
                   template: CommandTemplate,
                   conditions: ExitConditions | None) -> Iterator[TaskSpec]:
    """``_tasks`` for the rare template whose literal text needs no shell quoting."""
    fields = grid.fields
    env_keys = [f"FANOUT_PARAM_{name.upper()}" for name in fields]
    quoted_cache: dict[str, str] = {}
    base_env = dict(program.environment)
    opts = params.task
    index = 0
    for row in grid.rows():
        quoted = {}
        for name, value in zip(fields, row, strict=True):
            q = quoted_cache.get(value)
            if q is None:
                q = quoted_cache[value] = quote(value)
            quoted[name] = q
        env = dict(base_env)
        env.update(zip(env_keys, row, strict=False))  # rows are as long as fields
        for rep in range(params.repeat):
            quoted["task_index"] = str(index)
            quoted["repeat_index"] = str(rep)
            task_env = dict(env)
            task_env["FANOUT_TASK_INDEX"] = str(index)
            task_env["FANOUT_REPEAT_INDEX"] = str(rep)
            yield TaskSpec(
                id=str(index),
                command_line=sh(template.render_quoted(quoted)),
                environment=task_env,
                max_task_retries=opts.max_task_retries,
                max_wall_clock=opts.max_wall_clock,
                retention=opts.retention,
                required_slots=program.required_slots,
                container=program.container,
                exit_conditions=conditions,
            )
            index += 1


def _aggregate_task(program: Program, total: int, policy: DependencyFailure,
                    sweep: Program | None = None) -> TaskSpec:
    """The fan-in task; it runs in its own program's container, else the sweep's (the
    same pool takes both, and a container pool takes only container tasks)."""
    template = CommandTemplate(program.command)
    values = {"task_count": total}
    lacking = template.missing(values)
    if lacking:
        raise InvalidParams(f"aggregate program {program.name!r} may use only "
                            f"{{task_count}}, not {', '.join(lacking)}")
    env = dict(program.environment)
    env["FANOUT_TASK_COUNT"] = str(total)
    env["FANOUT_FAN_IN_RANGE"] = f"0-{total - 1}"
    env["FANOUT_ON_DEPENDENCY_FAILURE"] = policy
    return TaskSpec(
        id=AGGREGATE_ID,
        command_line=sh(template.render(values)),
        environment=env,
        depends_on_ranges=((0, total - 1),),
        required_slots=program.required_slots,
        container=program.container or (sweep.container if sweep is not None else None),
    )
