"""The ``fanout`` command: run, send, plan, status, cancel, events, dlq.

Exit codes: 0 success; 1 an error of the system (queue or backend unreachable), or
no such job; 2 a usage or configuration error; 3 a message that would be
dead-lettered (``plan`` prints its reason code); 4 ``status --watch JOB`` saw the
job end without succeeding (failed, cancelled or timed out).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from handlers.base import ContainerSettings, JobSpec, TaskSpec
from worker import logs
from worker.backends.base import JobStatus
from worker.config import Settings, load_settings
from worker.errors import MessageFault, SettingsError

if TYPE_CHECKING:
    from worker.plan import Planner

EXIT_BAD_MESSAGE = 3
EXIT_JOB_FAILED = 4
#: Longest message id (and so ``send --id``): a Service Bus quota, kept on both queues
#: (https://learn.microsoft.com/azure/service-bus-messaging/service-bus-quotas).
MAX_MESSAGE_ID = 128
# Off a terminal (pipes, CI logs) tables keep their full width instead of 80 columns.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, soft_wrap=True)


class Ctx:
    """Lazily loaded settings shared by the subcommands."""

    def __init__(self, config: str | None) -> None:
        self.config = config
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            try:
                self._settings = load_settings(self.config)
            except SettingsError as exc:  # no markup: "[handlers.x]" is text here
                err.print(str(exc), style="red", markup=False, highlight=False)
                raise SystemExit(2) from None
        return self._settings


pass_ctx = click.make_pass_decorator(Ctx)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "-c", type=click.Path(dir_okay=False), envvar="FANOUT_CONFIG",
              help="Config file (default: ./fanout.toml if present; $FANOUT_CONFIG).")
@click.version_option(package_name="fanout")
@click.pass_context
def main(click_ctx: click.Context, config: str | None) -> None:
    """fanout: turn queued work into Azure Batch tasks (or local processes)."""
    click_ctx.obj = Ctx(config)
    logs.configure(fmt="console", level="warning")  # `run` sets the configured ones


@main.command()
@pass_ctx
def run(ctx: Ctx) -> None:
    """Start the daemon: receive, build, submit, settle, until SIGTERM."""
    settings = ctx.settings
    logs.configure(fmt=settings.log.format, level=settings.log.level)
    from worker.app import App

    try:
        app = App.build(settings)
        asyncio.run(app.run())  # start-up checks against the live queue raise here too
    except SettingsError as exc:
        err.print(str(exc), style="red", markup=False, highlight=False)
        raise SystemExit(2) from None


def _message_options(fn: Any) -> Any:
    for option in reversed([
        click.argument("file", required=False, type=click.File("rb")),
        click.option("--handler", "-H", help="Handler name (builds the envelope for you)."),
        click.option("--param", "-p", "params", multiple=True, metavar="KEY=VALUE",
                     help="A handler param; VALUE is JSON if it parses, else text; "
                          "dotted keys nest (parameters.alpha=[1,2])."),
        click.option("--job", "-j", "job_opts", multiple=True, metavar="KEY=VALUE",
                     help="A job option (pool, priority, max_task_retries, ...)."),
        click.option("--id", "message_key", help="Idempotency key (envelope id)."),
        click.option("--property", "props", multiple=True, metavar="KEY=VALUE",
                     help="An application property of the message."),
    ]):
        fn = option(fn)
    return fn


def _read_message(file: Any, handler: str | None, params: tuple[str, ...],
                  job_opts: tuple[str, ...], key: str | None) -> bytes:
    if file is not None:
        if handler or params or job_opts:
            raise click.UsageError("give a FILE or --handler/--param, not both")
        body: bytes = file.read()
        return body
    if not handler:
        raise click.UsageError("give a message FILE ('-' for stdin) or --handler")
    envelope: dict[str, Any] = {"handler": handler, "params": _pairs(params)}
    if job_opts:
        envelope["job"] = _pairs(job_opts)
    if key:
        envelope["id"] = key
    return json.dumps(envelope).encode()


def _pairs(items: tuple[str, ...]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE")
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        *parents, leaf = name.split(".")
        node = result
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return result


@main.command()
@_message_options
@click.option("--json", "as_json", is_flag=True,
              help='Print {"message_id": ..., "jobs": [...]} as JSON.')
@pass_ctx
def send(ctx: Ctx, file: Any, handler: str | None, params: tuple[str, ...],
         job_opts: tuple[str, ...], message_key: str | None, props: tuple[str, ...],
         as_json: bool) -> None:
    """Put a message on the queue; prints its message id and the job ids it creates.

    \b
    fanout send message.json
    fanout send -H sweep -p program=pi -p parameters.seed='{"start":0,"stop":20}' \\
                -p parameters.samples=[100000]
    """
    import uuid

    if message_key is not None and len(message_key) > MAX_MESSAGE_ID:
        raise click.UsageError(f"--id is {len(message_key)} characters; a message id has "
                               f"at most {MAX_MESSAGE_ID} (a Service Bus limit)")
    body = _read_message(file, handler, params, job_opts, message_key)
    properties = {k: str(v) for k, v in _pairs(props).items()}
    message_id = message_key or uuid.uuid4().hex
    jobs, problem = _jobs_of(ctx.settings, body, properties, message_id)
    from worker.app import make_source

    async def go() -> str:
        source = make_source(ctx.settings)
        try:
            return await source.send(body, message_id=message_id, properties=properties)
        finally:
            await source.close()

    sent = _system_call(go)
    if as_json:
        click.echo(json.dumps({"message_id": sent, "jobs": jobs}))
    else:
        click.echo(f"message {sent}")
        for job_id in jobs:
            click.echo(f"job     {job_id}")
    if problem:
        err.print(f"warning: this message will be dead-lettered: {problem}", markup=False,
                  emoji=False, highlight=False)


def _jobs_of(settings: Settings, body: bytes, properties: dict[str, str],
             message_id: str) -> tuple[list[str], str | None]:
    """The job ids a message will create (routing only: no task is built), or the
    reason it will be dead-lettered."""
    from worker.context import job_id_for
    from worker.envelope import parse_body
    from worker.routing import key_message_id

    router = _planner(settings).router
    try:
        routed = router.route(parse_body(body, properties,
                                         max_bytes=settings.queue.max_message_bytes),
                              message_id=key_message_id(message_id, properties))
    except MessageFault as fault:
        return [], str(fault)
    return [job_id_for(w.handler_name, w.key) for w in routed.works], None


@main.command()
@_message_options
@click.option("--json", "as_json", is_flag=True, help="Print the jobs and every task as JSON.")
@click.option("--show", default=3, show_default=True, help="Tasks to show per job.")
@pass_ctx
def plan(ctx: Ctx, file: Any, handler: str | None, params: tuple[str, ...],
         job_opts: tuple[str, ...], message_key: str | None, props: tuple[str, ...],
         as_json: bool, show: int) -> None:
    """Dry run: validate, route and build a message; submit nothing.

    Exits 3 with the reason code when the message would be dead-lettered.
    """
    body = _read_message(file, handler, params, job_opts, message_key)
    properties = {k: str(v) for k, v in _pairs(props).items()}
    planner = _planner(ctx.settings)
    try:
        result = planner.plan(body, properties, message_id=message_key or "(plan)")
        if as_json:
            _print_plan_json(result.jobs, result.ignored)
        else:
            _print_plan(result.jobs, result.ignored, show)
    except MessageFault as fault:
        err.print(f"{fault.reason}: {fault.description}", style="red", markup=False,
                  emoji=False, highlight=False)
        raise SystemExit(EXIT_BAD_MESSAGE) from None


def _planner(settings: Settings) -> Planner:
    """The planner ``fanout run`` builds (worker.app.build_planner); a configuration
    it refuses is printed and exits 2, as ``run`` does."""
    from worker.app import build_planner, make_storage

    try:
        return build_planner(settings, make_storage(settings))
    except SettingsError as exc:
        err.print(str(exc), style="red", markup=False, highlight=False)
        raise SystemExit(2) from None


def _print_plan(jobs: list[Any], ignored: list[str], show: int) -> None:
    for planned in jobs:
        job: JobSpec = planned.job
        out.print(f"[bold]job[/bold] {job.id}  handler={planned.handler}  pool={job.pool}  "
                  f"priority={job.priority}  tasks={job.task_count}"
                  + ("  (uses dependencies)" if job.uses_task_dependencies else ""),
                  highlight=False)
        counted = 0
        for task in job.tasks:
            if counted < show:
                deps = _deps_text(task)
                if task.container is not None:
                    deps += f"  [in {task.container.image}]"
                out.print(f"  task {task.id}: {task.command_line}{deps}", highlight=False,
                          soft_wrap=True, markup=False, emoji=False)
            counted += 1
        if counted > show:
            out.print(f"  ... {counted - show} more", highlight=False)
    for why in ignored:
        out.print(f"ignored event: {why}", highlight=False)


def _deps_text(task: TaskSpec) -> str:
    parts = list(task.depends_on) + [f"{a}..{b}" for a, b in task.depends_on_ranges]
    return f"  (after {', '.join(parts)})" if parts else ""


def _print_plan_json(jobs: list[Any], ignored: list[str]) -> None:
    write = sys.stdout.write
    write('{"jobs": [')
    for i, planned in enumerate(jobs):
        job: JobSpec = planned.job
        head = {"id": job.id, "handler": planned.handler, "pool": job.pool,
                "priority": job.priority, "task_count": job.task_count,
                "max_task_retries": job.max_task_retries,
                "max_wall_clock": _duration(job.max_wall_clock),
                "display_name": job.display_name, "metadata": job.metadata,
                "uses_task_dependencies": job.uses_task_dependencies}
        write(("," if i else "") + json.dumps(head)[:-1] + ', "tasks": [')
        for j, task in enumerate(job.tasks):
            write(("," if j else "") + "\n" + json.dumps(task_json(task)))
        write("]}")
    write("], \"ignored\": " + json.dumps(ignored) + "}\n")


def task_json(task: TaskSpec) -> dict[str, Any]:
    """A task spec as plain JSON (durations in seconds)."""
    return {
        "id": task.id, "command_line": task.command_line, "environment": task.environment,
        "resource_files": [{"http_url": _redact(r.http_url), "file_path": r.file_path}
                           if not r.storage_container_url else
                           {"storage_container_url": _redact(r.storage_container_url),
                            "blob_prefix": r.blob_prefix, "file_path": r.file_path}
                           for r in task.resource_files],
        "output_files": [{"file_pattern": o.file_pattern,
                          "container_url": _redact(o.container_url), "path": o.path,
                          "upload_condition": o.upload_condition}
                         for o in task.output_files],
        "depends_on": list(task.depends_on),
        "depends_on_ranges": [list(r) for r in task.depends_on_ranges],
        "max_task_retries": task.max_task_retries,
        "max_wall_clock": _duration(task.max_wall_clock),
        "retention": _duration(task.retention), "required_slots": task.required_slots,
        "container": container_json(task.container),
    }


def container_json(settings: ContainerSettings | None) -> dict[str, Any] | None:
    """A task's container settings for ``fanout plan --json``: the registry's server,
    name and identity or user name, never its password."""
    if settings is None:
        return None
    registry = settings.registry
    return {"image": settings.image, "run_options": settings.run_options,
            "working_directory": settings.working_directory,
            "registry": None if registry is None else {
                "name": registry.name, "server": registry.server,
                "identity": registry.identity_reference, "username": registry.username}}


def _redact(url: str) -> str:
    return logs.redact(url)


def _duration(value: Any) -> float | None:
    return None if value is None else float(value.total_seconds())


@main.command()
@click.argument("job_id", required=False)
@click.option("--watch", "-w", is_flag=True,
              help="Live progress until the job (or every listed job) ends.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--limit", default=20, show_default=True, help="How many recent jobs.")
@click.option("--pools", "pools", is_flag=True,
              help="The pools instead: slots, pending tasks, resize errors, and whether "
                   "admission waits for capacity (and why).")
@pass_ctx
def status(ctx: Ctx, job_id: str | None, watch: bool, as_json: bool, limit: int,
           pools: bool) -> None:
    """fanout's jobs and their task counts; with JOB (a job id or an idempotency
    key), that job's outcome, failed tasks (category, exit code, stderr tail) and
    outputs. ``--watch JOB`` returns when the job ends: exit 0 if it succeeded, 4 if
    it failed, was cancelled or timed out. ``--pools``: each pool's capacity."""
    with _backend(ctx) as backend:
        if pools:
            _status_pools(ctx, backend, as_json=as_json)
            return
        if job_id:
            _status_one(ctx, backend, job_id, watch=watch, as_json=as_json)
            return

        def fetch() -> list[JobStatus]:
            jobs: list[JobStatus] = backend.list_jobs(limit)
            return jobs

        if watch:
            _watch(fetch)
        elif as_json:
            click.echo(json.dumps([_status_json(j) for j in fetch()], indent=2))
        else:
            _print_status(fetch())


@main.command()
@click.argument("job_id")
@pass_ctx
def cancel(ctx: Ctx, job_id: str) -> None:
    """Terminate a job (a job id or an idempotency key): running tasks stop, the job's
    outcome is ``cancelled``, and its completion event says so."""
    from worker.backends.base import REASON_CANCELLED

    with _backend(ctx) as backend:
        job = _resolve(ctx, backend, job_id)
        if job.state == "completed":
            out.print(f"job {job.id} had already ended ({job.terminate_reason or 'completed'})",
                      highlight=False, markup=False)
            return
        _backend_call(lambda: backend.terminate_job(job.id, REASON_CANCELLED))
        out.print(f"cancelled {job.id}", highlight=False, markup=False)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of the events.")
@click.option("--follow", "-f", is_flag=True,
              help="Stream new events as JSON lines until interrupted.")
@click.option("--limit", default=100, show_default=True, help="How many events to show.")
@pass_ctx
def events(ctx: Ctx, as_json: bool, follow: bool, limit: int) -> None:
    """Completion events on the events queue, oldest first, without consuming them."""
    from worker.app import make_sink

    sink = make_sink(ctx.settings)
    if sink is None:
        err.print("completion events are disabled (events.enabled or events.queue/topic)")
        raise SystemExit(2)

    async def go() -> None:
        try:
            found = await sink.peek(limit)
            if follow:
                await _follow(sink, found)
            elif as_json:
                click.echo(json.dumps([_event_json(p.body) for p in found], indent=2))
            else:
                _print_events(found)
        finally:
            await sink.close()

    _system_call(go)


async def _follow(sink: Any, found: list[Any]) -> None:
    """Print events as JSON lines; poll for newer ones once a second."""
    last = None
    while True:
        for item in found:
            click.echo(json.dumps(_event_json(item.body)))
            last = item.sequence_number if item.sequence_number is not None else last
        await asyncio.sleep(1.0)
        found = await sink.peek(100, from_sequence=None if last is None else last + 1)


def _event_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return {"unreadable": body.decode("utf-8", "replace")[:200]}


def _print_events(found: list[Any]) -> None:
    if not found:
        out.print("no completion events yet")
        return
    table = Table("time", "job", "handler", "outcome", "total", "succeeded", "failed")
    for item in found:
        event = _event_json(item.body)
        data = event.get("data") or {}
        tasks = data.get("tasks") or {}
        table.add_row(str(event.get("time", "")), str(data.get("job_id", "")),
                      str(data.get("handler", "")), str(data.get("outcome", "")),
                      str(tasks.get("total", "")), str(tasks.get("succeeded", "")),
                      str(tasks.get("failed", "")))
    out.print(table)


class _backend:  # noqa: N801 - used as a context manager
    """The configured backend for one command, closed afterwards."""

    def __init__(self, ctx: Ctx) -> None:
        from worker.app import make_backend, make_storage

        self.backend = make_backend(ctx.settings, make_storage(ctx.settings))

    def __enter__(self) -> Any:
        return self.backend

    def __exit__(self, *exc: object) -> None:
        self.backend.close()


def _backend_call(fn: Any) -> Any:
    """A backend call; a fault of the system is one line on stderr and exit 1."""
    from worker.errors import ConfigFault, SystemFault

    try:
        return fn()
    except (SystemFault, ConfigFault, OSError) as exc:
        # Plain text: an AMQP condition such as amqp:link:detach-forced would otherwise
        # render as Rich markup or an emoji (":link:").
        err.print(f"error: {logs.redact(str(exc))}", markup=False, emoji=False,
                  highlight=False)
        raise SystemExit(1) from None


def _resolve(ctx: Ctx, backend: Any, ref: str) -> Any:
    """The fanout job named by a job id, or by the idempotency key of its message."""
    from worker.backends.base import META_HANDLER
    from worker.context import job_id_for
    from worker.routing import HandlerRegistry

    job = _backend_call(lambda: backend.get_job(ref)) if _is_job_id(ref) else None
    if job is None:
        for name in HandlerRegistry.from_entry_points().names:
            job = _backend_call(lambda n=name: backend.get_job(job_id_for(n, ref)))
            if job is not None:
                break
    if job is None or META_HANDLER not in job.metadata:
        err.print(f"no job of fanout's is named {ref!r} (by job id or idempotency key)",
                  markup=False, highlight=False)
        raise SystemExit(1)
    return job


def _is_job_id(ref: str) -> bool:
    from handlers.base import ID_PATTERN

    return bool(ID_PATTERN.match(ref))


def _status_one(ctx: Ctx, backend: Any, ref: str, *, watch: bool, as_json: bool) -> None:
    """One job in detail; with ``watch``, a progress bar until it ends."""
    job = _resolve(ctx, backend, ref)
    if watch:
        job = _watch_one(backend, job)
    detail = _job_detail(ctx.settings, backend, job)
    if as_json:
        click.echo(json.dumps(detail, indent=2))
    else:
        _print_detail(detail)
    if watch and detail["outcome"] != "succeeded":
        raise SystemExit(EXIT_JOB_FAILED)


def _watch_one(backend: Any, job: Any) -> Any:
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[detail]}"), console=out, transient=True)
    with progress:
        bar = progress.add_task(job.id, total=None, detail="")
        job_id = job.id
        while job.state != "completed":
            counts = _backend_call(lambda: backend.task_counts(job_id))
            if counts is not None:
                progress.update(bar, total=counts.total, completed=counts.completed,
                                detail=f"running {counts.running}  failed {counts.failed}")
            time.sleep(1.0)
            job = _backend_call(lambda: backend.get_job(job_id)) or job
    return job


def _job_detail(settings: Settings, backend: Any, job: Any) -> dict[str, Any]:
    """What ``status JOB`` shows: the completion event's data, for an active job too."""
    from worker.backends.base import TaskCounts
    from worker.events import JobReport, build_event
    from worker.monitor import collect_failed
    from worker.preemption import report_json

    counts = _backend_call(lambda: backend.task_counts(job.id)) or TaskCounts()
    failed = _backend_call(lambda: collect_failed(
        backend, job, counts, limit=settings.events.max_failed_tasks,
        tail_bytes=settings.events.stderr_tail_bytes))
    report = JobReport(job=job, counts=counts, failed=failed,
                       preemptions=report_json(job.id, job.metadata,
                                               settings.preemption.dedicated_pool))
    data: dict[str, Any] = build_event(report, source=settings.events.source)["data"]
    data["state"] = job.state
    data["counts"] = {"active": counts.active, "running": counts.running,
                      "completed": counts.completed}
    if job.state != "completed":
        data["outcome"] = None
        data["end_time"] = data["duration_seconds"] = None
    return data


def _print_detail(d: dict[str, Any]) -> None:
    def say(text: str) -> None:
        out.print(text, highlight=False, markup=False, soft_wrap=True)

    tasks = d["tasks"]
    state = d["state"] + (f" ({d['outcome']})" if d["outcome"] else "")
    say(f"job       {d['job_id']}")
    say(f"handler   {d['handler']}    pool {d['pool']}")
    say(f"state     {state}" + (f"    reason {d['terminate_reason']}"
                                 if d["terminate_reason"] else ""))
    say(f"tasks     {tasks['total']} total: {tasks['succeeded']} succeeded, "
        f"{tasks['failed']} failed, {d['counts']['running']} running, "
        f"{d['counts']['active']} waiting")
    if d["duration_seconds"] is not None:
        say(f"duration  {d['duration_seconds']:.1f} s ({d['start_time']} to {d['end_time']})")
    if d.get("preemptions"):
        from worker.preemption import summary_line

        say(f"preempted {summary_line(d['preemptions'])}")
    if d["failed_tasks"]:
        say("failed tasks")
    for f in d["failed_tasks"]:
        code = "" if f["exit_code"] is None else f"exit {f['exit_code']}  "
        say(f"  {f['task_id']}  {f['category']}  {code}{f['failure_code'] or ''}: "
            f"{f['failure_message'] or ''}")
        if f["stderr_tail"]:
            for line in f["stderr_tail"].rstrip().splitlines()[-10:]:
                say(f"      | {line}")
        if f["logs"]:
            say(f"      logs: {f['logs']}")
    if d["failed_tasks_omitted"]:
        say(f"  ... and {d['failed_tasks_omitted']} more failed tasks")
    for o in d["outputs"]:
        say(f"output    {o['name']}: {o['location']}")


def _status_pools(ctx: Ctx, backend: Any, *, as_json: bool) -> None:
    """``status --pools``: one stats read (the metrics poll's requests), each pool as
    admission sees it (worker/admission.py) under ``admission.max_backlog_per_slot``."""
    from worker.admission import WAITING, views

    limit = ctx.settings.admission.max_backlog_per_slot
    stats = _backend_call(backend.stats)
    found = views(stats, limit)
    if as_json:
        click.echo(json.dumps([v.as_json() for v in found], indent=2))
        return
    # the account's job quota is not readable from the data plane: /readyz names a
    # refusal (job_quota); here, how many jobs count against it
    out.print(f"account: {stats.active_jobs} active jobs", markup=False, highlight=False)
    if not found:
        out.print("no pools to report")
        return
    waiting = [v for v in found if v.wait is not None]
    out.print(f"{WAITING}: " + "; ".join(v.wait.text() for v in waiting if v.wait)
              if waiting else "admitting work" + ("" if limit is not None else
                                                  " (admission.max_backlog_per_slot is not set)"),
              markup=False, highlight=False)
    table = Table("pool", "slots", "pending", "running", "per slot", "nodes", "allocation",
                  "status")
    for v in found:
        cap = v.capacity
        nodes = ", ".join(f"{state} {n}" for state, n in sorted(cap.nodes.items()) if n)
        per = "-" if v.per_slot is None else f"{v.per_slot:.2f}"
        alloc = cap.allocation_state + (" (autoscale)" if cap.autoscale else "") + \
            f" {cap.current}/{cap.target}"
        state = "ok" if v.wait is None else f"{WAITING}: {v.wait.reason}: {v.wait.detail}"
        table.add_row(v.pool, str(v.slots), str(v.pending), str(v.running), per,
                      nodes or "none", alloc, state)
    out.print(table)
    for v in found:
        for e in v.resize_errors:
            out.print(f"resize error  {v.pool}  {e.code}: {e.message}", markup=False,
                      highlight=False)


def _status_json(job: JobStatus) -> dict[str, Any]:
    return {"id": job.id, "state": job.state, "pool": job.pool, "created": job.created,
            "display_name": job.display_name, "tasks": job.counts,
            "succeeded": job.succeeded, "failed": job.failed, "metadata": job.metadata}


def _print_status(jobs: list[JobStatus]) -> None:
    if not jobs:
        out.print("no jobs yet: send one with `fanout send`")
        return
    table = Table("job", "state", "pool", "active", "running", "completed", "succeeded",
                  "failed", "created")
    for job in jobs:
        c = job.counts
        table.add_row(job.id, job.state, job.pool or "", str(c.get("active", 0)),
                      str(c.get("running", 0) + c.get("preparing", 0)),
                      str(c.get("completed", 0)), str(job.succeeded), str(job.failed),
                      job.created or "")
    out.print(table)


def _watch(fetch: Any) -> None:
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[detail]}"), console=out)
    bars: dict[str, Any] = {}
    with progress:
        while True:
            jobs: list[JobStatus] = fetch()
            for job in jobs:
                total = sum(job.counts.values())
                done = job.counts.get("completed", 0)
                detail = (f"running {job.counts.get('running', 0)}  failed {job.failed}  "
                          f"{job.state}")
                if job.id not in bars:
                    bars[job.id] = progress.add_task(job.id, total=total, detail=detail)
                progress.update(bars[job.id], total=total, completed=done, detail=detail)
            if jobs and all(j.state == "completed" for j in jobs):
                return
            time.sleep(1.0)


@main.group()
def dlq() -> None:
    """Inspect and resubmit dead-lettered messages."""


@dlq.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.option("--limit", default=100, show_default=True)
@pass_ctx
def dlq_list(ctx: Ctx, as_json: bool, limit: int) -> None:
    """Dead-lettered messages with their reason codes."""
    items = _system_call(lambda: _with_source(ctx, lambda s: s.dead_letters(limit)))
    if as_json:
        click.echo(json.dumps([_dead_json(d, body=False) for d in items], indent=2))
        return
    table = Table("seq", "message id", "reason", "description")
    for d in items:
        table.add_row(str(d.sequence_number), d.message_id or "", d.reason or "",
                      (d.description or "")[:120])
    out.print(table)


@dlq.command("show")
@click.argument("sequence_number", type=int)
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def dlq_show(ctx: Ctx, sequence_number: int, as_json: bool) -> None:
    """One dead-lettered message with its body."""
    items = _system_call(lambda: _with_source(ctx, lambda s: s.dead_letters(10_000)))
    found = [d for d in items if d.sequence_number == sequence_number]
    if not found:
        err.print(f"no dead-lettered message with sequence number {sequence_number}",
                  markup=False, emoji=False, highlight=False)
        raise SystemExit(1)
    data = _dead_json(found[0], body=True)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    for key, value in data.items():
        out.print(f"[bold]{key}[/bold]: {value}", highlight=False)


@dlq.command("resubmit")
@click.argument("sequence_numbers", type=int, nargs=-1)
@click.option("--all", "every", is_flag=True, help="Resubmit every dead-lettered message.")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def dlq_resubmit(ctx: Ctx, sequence_numbers: tuple[int, ...], every: bool,
                 as_json: bool) -> None:
    """Send copies back to the main queue and drop the dead letters once accepted.

    A copy gets a new message id (duplicate detection would drop the original one) and
    carries the original id as its idempotency key (fanout-idempotency-key): it maps to
    the same job."""
    if not sequence_numbers and not every:
        raise click.UsageError("name sequence numbers or --all")

    async def go(source: Any) -> list[dict[str, Any]]:
        seqs = list(sequence_numbers)
        if every:
            seqs = [d.sequence_number for d in await source.dead_letters(10_000)]
        return [{"sequence_number": s, "message_id": await source.resubmit(s)} for s in seqs]

    done = _system_call(lambda: _with_source(ctx, go))
    if as_json:
        click.echo(json.dumps(done, indent=2))
        return
    for item in done:
        what = (f"resubmitted as {item['message_id']}" if item["message_id"]
                else "not found")
        out.print(f"{item['sequence_number']}: {what}", highlight=False)


def _dead_json(d: Any, *, body: bool) -> dict[str, Any]:
    data = {"sequence_number": d.sequence_number, "message_id": d.message_id,
            "reason": d.reason, "description": d.description,
            "delivery_count": d.delivery_count,
            "enqueued_time": d.enqueued_time.isoformat() if d.enqueued_time else None,
            "properties": dict(d.properties)}
    if body:
        data["body"] = d.body.decode("utf-8", "replace")
    return data


async def _with_source(ctx: Ctx, fn: Any) -> Any:
    from worker.app import make_source

    source = make_source(ctx.settings)
    try:
        return await fn(source)
    finally:
        await source.close()


def _system_call(fn: Any) -> Any:
    """Run an async call; a fault of the system is one line on stderr and exit 1 (see
    ``_backend_call``), a settings error exit 2."""
    try:
        return _backend_call(lambda: asyncio.run(fn()))
    except SettingsError as exc:
        err.print(f"error: {exc}", markup=False, emoji=False, highlight=False)
        raise SystemExit(2) from None


if __name__ == "__main__":  # pragma: no cover
    main()

