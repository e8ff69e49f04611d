"""Per-task retries and wall clock: available on every handler (``job.task``), and held
to the same operator limits as job options, at build time and as tasks stream."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from prometheus_client import CollectorRegistry

from handlers.base import BuildContext, BuildRequest, JobSpec, TaskSpec
from handlers.errors import BudgetExceeded
from tests.worker.doubles import MemoryBackend
from tests.worker.harness import RunningWorker
from worker.app import make_planner
from worker.cli import EXIT_BAD_MESSAGE, main
from worker.config import Settings, SubmitConfig
from worker.metrics import Metrics
from worker.plan import Planner
from worker.routing import HandlerRegistry, Router
from worker.storage.local import LocalStorage
from worker.submit import Submitter

SWEEP = ["-H", "sweep", "-p", "program=pi", "-p", "parameters.samples=[10]",
         "-p", "parameters.seed=[1,2,3]"]
RETRIES = "max_task_retries -1 is over this worker's limit of 10 (limits.max_task_retries)"
WALL = ("max_wall_clock 365 days, 0:00:00 is outside this worker's limit of "
        "6 days, 0:00:00 (limits.max_wall_clock)")


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.chdir(tmp_path)
    return CliRunner()


def plan(cli: CliRunner, *args: str) -> tuple[int, str]:
    result = cli.invoke(main, ["plan", *args])
    return result.exit_code, result.output


@pytest.mark.parametrize("args, message", [
    # The example: the sweep's own task options...
    (["-p", "task.max_task_retries=-1", "-p", "task.max_wall_clock=P365D"], RETRIES),
    (["-p", "task.max_task_retries=-1"], RETRIES),
    (["-p", "task.max_wall_clock=P365D"], WALL),
    # ...refused exactly as the same values are as job options...
    (["-j", "max_task_retries=-1"], RETRIES),
    (["-j", "max_wall_clock=P365D"], WALL),
    # ...and as the generic per-task job option any handler takes.
    (["-j", "task.max_task_retries=-1"], RETRIES),
    (["-j", "task.max_wall_clock=P365D"], WALL),
])
def test_plan_refuses_per_task_settings_over_the_limits(cli: CliRunner, args: list[str],
                                                        message: str) -> None:
    """`fanout plan` exits 3 with BudgetExceeded and the job options' own message."""
    code, output = plan(cli, *SWEEP, *args)
    assert code == EXIT_BAD_MESSAGE, output
    assert output.strip() == f"BudgetExceeded: {message}"


def test_plan_shows_the_task_options_within_the_limits(cli: CliRunner) -> None:
    """`job.task` fills every task's constraints; the sweep's own `task` wins over it."""
    code, output = plan(cli, *SWEEP, "--json", "-j", "task.max_task_retries=2",
                        "-j", "task.max_wall_clock=PT1H")
    assert code == 0, output
    tasks = json.loads(output)["jobs"][0]["tasks"]
    assert [(t["max_task_retries"], t["max_wall_clock"]) for t in tasks] == [(2, 3600.0)] * 3
    code, output = plan(cli, *SWEEP, "--json", "-j", "task.max_task_retries=2",
                        "-j", "task.max_wall_clock=PT1H", "-p", "task.max_task_retries=5")
    tasks = json.loads(output)["jobs"][0]["tasks"]
    assert [(t["max_task_retries"], t["max_wall_clock"]) for t in tasks] == [(5, 3600.0)] * 3


def test_unlimited_retries_pass_when_the_operator_allows_them(cli: CliRunner,
                                                              tmp_path: Path) -> None:
    """-1 (Batch's unlimited) is allowed only with `limits.max_task_retries = -1`."""
    (tmp_path / "fanout.toml").write_text("[limits]\nmax_task_retries = -1\n")
    for args in (["-p", "task.max_task_retries=-1"], ["-j", "task.max_task_retries=-1"],
                 ["-j", "max_task_retries=-1"]):
        code, output = plan(cli, *SWEEP, *args)
        assert code == 0, output


def test_bad_task_options_are_invalid_envelopes(cli: CliRunner) -> None:
    """`job.task` is validated like the other job options: unknown keys, wrong types."""
    for option, words in (("task.retries=2", "InvalidEnvelope: job.task.retries"),
                          ("task.max_task_retries=-2", "InvalidEnvelope: job.task."),
                          ("task.max_wall_clock=soon", "InvalidEnvelope: job.task.")):
        code, output = plan(cli, *SWEEP, "-j", option)
        assert code == EXIT_BAD_MESSAGE and output.startswith(words), output


class Rogue:
    """A plug-in handler that sets per-task constraints itself, without checking them:
    task ``bad`` (an index) gets ``retries`` and ``wall``."""

    def __init__(self, count: int, bad: int, retries: int | None = None,
                 wall: timedelta | None = None) -> None:
        self.count, self.bad, self.retries, self.wall = count, bad, retries, wall

    def build(self, request: BuildRequest, ctx: BuildContext) -> JobSpec:
        def tasks() -> Iterator[TaskSpec]:
            for i in range(self.count):
                task = TaskSpec(id=str(i), command_line=f"echo {i}")
                if i == self.bad:
                    task.max_task_retries, task.max_wall_clock = self.retries, self.wall
                yield task
        return JobSpec(tasks=tasks(), task_count=self.count)


def planner(settings: Settings, handler: Any) -> Planner:
    storage = LocalStorage(root=settings.home / "blobs")
    router = Router(registry=HandlerRegistry({"rogue": handler}), routes=[], storage=storage)
    return make_planner(settings, router, storage)


@pytest.mark.parametrize("retries, wall, words", [
    (-1, None, "task '150': " + RETRIES),
    (11, None, "task '150': max_task_retries 11 is over this worker's limit of 10"),
    (None, timedelta(days=365), "task '150': " + WALL),
    (None, timedelta(0), "task '150': max_wall_clock 0:00:00 is outside"),
])
def test_a_plug_in_cannot_bypass_the_limits(make_settings: Callable[..., Settings],
                                            retries: int | None, wall: timedelta | None,
                                            words: str) -> None:
    """The planner checks every task as it streams: the build passes, the bad task
    raises BudgetExceeded naming it, and the submitter terminates the partial job."""
    body = json.dumps({"handler": "rogue", "id": "r-1"}).encode()
    (planned,) = planner(make_settings(), Rogue(300, 150, retries, wall)).plan(body).jobs
    backend = MemoryBackend()
    submitter = Submitter(backend=backend, config=SubmitConfig(backoff_base=0.001),
                          metrics=Metrics(registry=CollectorRegistry()))
    with pytest.raises(BudgetExceeded) as caught:
        submitter.submit(planned.job, handler="rogue")
    assert caught.value.description.startswith(words)
    assert backend.terminated == [(planned.job.id, "FanoutSubmitFailed")]
    assert planned.job.id not in backend.sealed


def test_job_task_defaults_fill_a_plug_in_s_tasks(make_settings: Callable[..., Settings]
                                                  ) -> None:
    """`job.task` reaches every task a plug-in yields, except what the plug-in set."""
    body = json.dumps({"handler": "rogue", "id": "r-2", "job": {
        "task": {"max_task_retries": 3, "max_wall_clock": "PT2H"}}}).encode()
    (planned,) = planner(make_settings(), Rogue(4, 2, retries=1)).plan(body).jobs
    got = [(t.max_task_retries, t.max_wall_clock) for t in planned.job.tasks]
    two = timedelta(hours=2)
    assert got == [(3, two), (3, two), (1, two), (3, two)]


def test_the_worker_dead_letters_a_message_whose_task_breaks_a_limit(
        make_settings: Callable[..., Settings]) -> None:
    """End to end: the partial job is terminated and the message is dead-lettered as
    BudgetExceeded, naming the task."""
    backend = MemoryBackend()
    settings = make_settings(consumer={"receive_wait": 0.2},
                             submit={"backoff_base": 0.001, "backoff_max": 0.01})
    worker = RunningWorker(settings, backend=backend,
                           handlers=HandlerRegistry({"rogue": Rogue(250, 120, retries=-1)}))
    worker.start()
    try:
        worker.send({"handler": "rogue", "id": "r-3"})
        worker.wait_until(lambda: worker.depth()["dead_letter"] == 1, what="dead letter")
        (dead,) = worker.dead_letters()
    finally:
        worker.stop()
    assert dead.reason == "BudgetExceeded"
    assert dead.description == "task '120': " + RETRIES
    (job_id,) = backend.jobs
    assert backend.terminated == [(job_id, "FanoutSubmitFailed")]
