"""The plug-in test kit itself: it behaves as the worker does, ships in the wheel, is
typed, and the example plug-in and docs/handlers.md use it alone."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
import warnings
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from handlers.base import BuildContext, BuildRequest, JobSpec, Program, TaskSpec
from handlers.errors import BudgetExceeded, ForeignStorage, InvalidParams, UnknownProgram
from handlers.testing import StubContext, TaskLimits, make_context, request, tasks_of
from worker.config import LimitsConfig
from worker.context import check_retries, check_wall_clock
from worker.testing import (
    DEFAULT_HOME,
    SettingsError,
    build_job,
    draw,
    harness,
    make_settings,
    plan_message,
)

from .example_plugin.checksum import ChecksumHandler

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = Path(__file__).parent / "example_plugin"
INPUTS = [{"container": "data", "blob": "a.csv"}]


class Careless:
    """Sets per-task retries from its params without asking check_task_limits."""

    def build(self, request: BuildRequest, ctx: BuildContext) -> JobSpec:
        retries = request.params.get("retries")
        count = int(request.params.get("count", 3))
        declared = int(request.params.get("declared", count))
        self.params = request.params

        def tasks() -> Iterator[TaskSpec]:
            for i in range(count):
                yield TaskSpec(id=str(i), command_line="true",
                               max_task_retries=retries if i == count - 1 else None)

        return JobSpec(tasks=tasks(), task_count=declared)


# handlers.testing

def test_the_stub_is_a_build_context() -> None:
    assert isinstance(make_context(), BuildContext)
    assert isinstance(StubContext(), BuildContext)


def test_the_stub_limits_default_to_the_workers() -> None:
    worker = LimitsConfig()
    assert TaskLimits() == TaskLimits(max_task_retries=worker.max_task_retries,
                                      max_wall_clock=worker.max_wall_clock)


@pytest.mark.parametrize("limit", [0, 3, -1])
@pytest.mark.parametrize("retries", [None, 0, 3, 4, -1])
@pytest.mark.parametrize("wall", [None, timedelta(0), timedelta(hours=1), timedelta(days=7)])
def test_the_stub_refuses_what_the_worker_refuses(limit: int, retries: int | None,
                                                  wall: timedelta | None) -> None:
    """Same inputs, same outcome and message as worker.context's checks."""
    worker = LimitsConfig(max_task_retries=limit, max_wall_clock=timedelta(days=2))
    ctx = make_context(limits=TaskLimits(max_task_retries=limit,
                                         max_wall_clock=timedelta(days=2)))

    def outcome(check: Any) -> str:
        try:
            check()
        except BudgetExceeded as exc:
            return str(exc)
        return "ok"

    def worker_check() -> None:
        check_retries(retries, worker)
        check_wall_clock(wall, worker)

    stub = outcome(lambda: ctx.check_task_limits(max_task_retries=retries,
                                                 max_wall_clock=wall))
    assert stub == outcome(worker_check)


def test_make_context_programs_and_errors() -> None:
    ctx = make_context(programs={"sim": "python3 sim.py {a}",
                                 "own": Program(name="own", command="x")})
    assert ctx.program("sim") == Program(name="sim", command="python3 sim.py {a}")
    assert ctx.program("own").command == "x"
    with pytest.raises(UnknownProgram, match="configured: own, sim"):
        ctx.program("nope")
    with pytest.raises(InvalidParams, match="no container registry named 'acr'"):
        ctx.container("python:3.12", registry="acr")
    with pytest.raises(InvalidParams, match="container:"):
        ctx.container("Not An Image")


def test_the_stub_blob_refs_and_urls() -> None:
    ctx = make_context(blob_root="file:///srv/blobs/")
    ref = ctx.blob_ref({"container": "data", "blob": "a b.csv"})
    assert ctx.input_url(ref) == "file:///srv/blobs/data/a%20b.csv"
    assert ctx.blob_ref(ctx.input_url(ref)) == ref  # its own URLs read back
    assert ctx.output_container_url("out", "p/") == "file:///srv/blobs/out"
    with pytest.raises(ForeignStorage):
        ctx.blob_ref("https://elsewhere.example/data/a.csv")
    for bad in ({"container": "data"}, 7, "file:///srv/blobs/data"):
        with pytest.raises(InvalidParams):
            ctx.blob_ref(bad)


def test_tasks_of_holds_a_handler_to_its_task_count() -> None:
    for count, declared in ((3, 4), (3, 2)):
        job = Careless().build(request("careless", {"count": count, "declared": declared}),
                               make_context())
        with pytest.raises(RuntimeError, match=f"declared {declared} tasks but yielded 3"):
            tasks_of(job)
    job = Careless().build(request("careless", {}), make_context())
    assert tasks_of(job) == job.tasks and len(tasks_of(job)) == 3


# worker.testing

def test_build_job_checks_tasks_as_they_stream() -> None:
    """A handler that never asks check_task_limits is still refused, by the worker's
    streaming check, naming the task."""
    with pytest.raises(BudgetExceeded, match="task '2': max_task_retries 50"):
        build_job(Careless(), {"retries": 50})
    _, tasks = build_job(Careless(), {"retries": 50},
                         config={"limits": {"max_task_retries": 50}})
    assert [t.max_task_retries for t in tasks] == [None, None, 50]


def test_build_job_fills_job_task_defaults_and_holds_the_count() -> None:
    _, tasks = build_job(Careless(), {}, job_options={"task": {"max_task_retries": 2}})
    assert [t.max_task_retries for t in tasks] == [2, 2, 2]
    with pytest.raises(RuntimeError, match="declared 5 tasks but yielded 3"):
        build_job(Careless(), {"declared": 5})


def test_params_travel_as_json() -> None:
    handler = Careless()
    build_job(handler, {"values": (1, 2), "count": 1})
    assert handler.params["values"] == [1, 2]  # a tuple arrives as the list JSON makes it
    with pytest.raises(TypeError, match="not JSON serializable"):
        build_job(handler, {"values": {1, 2}})


def test_plan_keeps_tasks_lazy_until_drawn() -> None:
    kit = harness({"careless": Careless()})
    plan = kit.plan({"handler": "careless", "id": "k", "params": {"retries": 99}})
    [planned] = plan.jobs
    assert not isinstance(planned.job.tasks, list)  # nothing drawn, nothing refused yet
    with pytest.raises(BudgetExceeded, match="task '2'"):
        draw(planned.job)


def test_faults_the_worker_raises_before_the_handler() -> None:
    with pytest.raises(SettingsError, match="handlers.nope"):  # no such handler installed
        harness({"careless": Careless()}, config={"handlers": {"nope": {}}})
    with pytest.raises(SettingsError, match="limits"):
        make_settings({"limits": {"max_task_retries": -5}})
    kit = harness({"careless": Careless()})
    from handlers.errors import InvalidEnvelope, UnknownHandler

    with pytest.raises(UnknownHandler):
        kit.build("other", {})
    with pytest.raises(InvalidEnvelope):
        kit.job({"handler": "careless", "id": "k", "params": []})


def test_settings_ignore_the_environment_and_the_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FANOUT_LIMITS__MAX_TASKS_PER_MESSAGE", "3")
    (tmp_path / "fanout.toml").write_text("[limits]\nmax_priority = 1\n")
    monkeypatch.chdir(tmp_path)
    settings = make_settings()
    assert settings.limits == LimitsConfig()
    assert settings.home == DEFAULT_HOME
    assert make_settings({"home": str(tmp_path)}).home == tmp_path
    assert make_settings(home=tmp_path / "h").home == tmp_path / "h"


def test_planning_writes_nothing_under_home(tmp_path: Path) -> None:
    kit = harness({"checksum": ChecksumHandler()}, home=tmp_path / "home")
    kit.build("checksum", {"inputs": INPUTS})
    assert not (tmp_path / "home").exists()


def test_installed_plugins_load_from_their_entry_point(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The example plug-in installed as a package would be (a dist-info with its entry
    point): plan_message with the installed handlers builds its job."""
    dist = tmp_path / "fanout_checksum-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fanout-checksum\n"
                                   "Version: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[fanout.handlers]\nchecksum = tests.plugins.example_plugin.checksum:ChecksumHandler\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    plan = plan_message({"handler": "checksum", "id": "k", "params": {"inputs": INPUTS}})
    [planned] = plan.jobs
    assert planned.handler == "checksum" and planned.job.task_count == 1
    with pytest.raises(SettingsError, match="algorithm"):  # its check_options ran
        plan_message({}, {"handlers": {"checksum": {"algorithm": "crc32"}}})


# The example plug-in, the docs, the wheel and the types

def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            found.add("." * node.level + (node.module or ""))
    return found


def test_handlers_testing_imports_no_worker() -> None:
    assert not {m for m in _imports(ROOT / "handlers" / "testing.py")
                if m.split(".")[0] in ("worker", "tests", "pytest")}


@pytest.mark.parametrize("name", ["checksum.py", "test_checksum.py", "test_quickstart.py"])
def test_the_example_plugin_uses_the_kit_alone(name: str) -> None:
    fanout = {m for m in _imports(PLUGIN / name)
              if m.split(".")[0] in ("worker", "handlers", "tests")}
    allowed = {"handlers.base", "handlers.commands", "handlers.errors", "handlers.testing",
               "worker.testing"}
    assert fanout <= allowed, fanout - allowed
    if name == "checksum.py":
        assert not {m for m in fanout if m.startswith(("worker", "handlers.testing"))}


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start:] if end == -1 else text[start:end]


def test_the_docs_show_the_example_plugin() -> None:
    """docs/handlers.md's handler and test examples are the example plug-in's files
    (the test imports the handler from its package, mypkg, instead of relatively)."""
    section = _section((ROOT / "docs" / "handlers.md").read_text(), "## Writing a handler")
    blocks = re.findall(r"^```python\n(.*?)^```$", section, re.M | re.S)
    assert len(blocks) == 2
    assert blocks[0] == (PLUGIN / "checksum.py").read_text()
    assert blocks[1].replace("from mypkg.checksum import", "from .checksum import") == (
        PLUGIN / "test_quickstart.py").read_text()
    assert 'checksum = "mypkg.checksum:ChecksumHandler"' in section


def test_the_kit_ships_in_the_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """setuptools' build_py (what the wheel is made of) over pyproject.toml's package
    discovery copies both halves of the kit and the py.typed markers."""
    pyprojecttoml = importlib.import_module("setuptools.config.pyprojecttoml")
    setuptools_dist = importlib.import_module("setuptools.dist")  # both untyped

    monkeypatch.chdir(ROOT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dist = setuptools_dist.Distribution({"script_name": "setup.py"})
        pyprojecttoml.apply_configuration(dist, "pyproject.toml")
        build = dist.get_command_obj("build_py")
        build.build_lib = str(tmp_path)
        build.compile = 0
        build.ensure_finalized()
        build.run()
    shipped = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()}
    assert {"handlers/testing.py", "worker/testing.py", "handlers/base.py",
            "handlers/py.typed", "worker/py.typed"} <= shipped
    assert not any(p.startswith("tests/") for p in shipped)


@pytest.mark.slow
def test_mypy_sees_the_contracts(tmp_path: Path) -> None:
    """mypy --strict accepts the example plug-in and its tests against the kit, and
    refuses a settlement action or an options check that breaks the contracts."""
    bad = tmp_path / "bad_contracts.py"
    bad.write_text(
        "from collections.abc import Mapping\n"
        "from handlers.base import ChecksOptions\n"
        "from worker.consumer import Outcome\n"
        "from worker.sources.base import SettleAction\n"
        "from tests.plugins.example_plugin.checksum import ChecksumHandler\n"
        "checks: ChecksOptions = ChecksumHandler()\n"
        "good: SettleAction = 'dead_letter'\n"
        "Outcome('complet')\n"
        "class Wrong:\n"
        "    def check_options(self, options: Mapping[str, int], strict: bool) -> None: ...\n"
        "wrong: ChecksOptions = Wrong()\n")
    files = [str(PLUGIN / n) for n in ("checksum.py", "test_checksum.py",
                                        "test_quickstart.py")]
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path / "cache"),
         "--no-error-summary", *files, str(bad)],
        cwd=ROOT, capture_output=True, text=True, timeout=240)
    errors = [line for line in done.stdout.splitlines() if ": error:" in line]
    assert all(line.startswith(str(bad)) for line in errors), errors
    lines = sorted(int(line.split(":")[1]) for line in errors)
    assert lines == [8, 11], errors
