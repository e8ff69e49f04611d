"""Cost: tags on messages, the task-hours budget, and usage in completion events on the
embedded default (the local executor's own start and end times per task)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from handlers.base import JobSpec
from handlers.errors import BudgetExceeded, InvalidEnvelope
from worker.backends.base import JobUsage
from worker.backends.local import LocalBackend
from worker.cli import main
from worker.config import CostConfig, LimitsConfig, Settings
from worker.context import job_id_for
from worker.cost import check_budget, price, tag_metadata
from worker.errors import SettingsError
from worker.plan import Planner

from .harness import RunningWorker

PY = sys.executable


def sweep(key: str, stop: int = 3, **job: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"handler": "sweep", "id": key, "params": {
        "program": "nap", "parameters": {"seed": {"start": 0, "stop": stop}}}}
    if job:
        body["job"] = job
    return body


def planner(make_settings: Callable[..., Settings], **overrides: Any) -> Planner:
    from worker.app import build_planner, make_storage

    settings = make_settings(**overrides)
    return build_planner(settings, make_storage(settings))


# -- tags -------------------------------------------------------------------------------


def test_allowed_tags_become_job_metadata_and_count_in_the_request_hash(
        make_settings: Callable[..., Settings]) -> None:
    """Allowed keys land in the job's metadata as fanout-tag-<key>; another value makes
    another request digest (so a redelivery with other tags is an IdempotencyConflict)."""
    p = planner(make_settings, cost={"allowed_tags": ["team", "project"]})
    body: dict[str, Any] = {"handler": "sweep", "id": "t1",
                            "job": {"tags": {"team": "vision", "project": "p-7"}},
                            "params": {"program": "pi",
                                       "parameters": {"samples": [10], "seed": [1]}}}
    (planned,) = p.plan(json.dumps(body).encode()).jobs
    meta = planned.job.metadata
    assert meta["fanout-tag-team"] == "vision" and meta["fanout-tag-project"] == "p-7"
    body["job"]["tags"]["team"] = "audio"
    (other,) = p.plan(json.dumps(body).encode()).jobs
    del body["job"]
    (untagged,) = p.plan(json.dumps(body).encode()).jobs
    assert len({planned.request_hash, other.request_hash, untagged.request_hash}) == 3
    assert not any(k.startswith("fanout-tag-") for k in untagged.job.metadata)


def test_a_tag_key_the_operator_does_not_allow_is_refused_naming_the_allowed_ones(
        make_settings: Callable[..., Settings]) -> None:
    p = planner(make_settings, cost={"allowed_tags": ["team", "project"]})
    body = {"handler": "sweep", "id": "t2", "job": {"tags": {"team": "x", "owner": "bob"}},
            "params": {"program": "pi", "parameters": {"samples": [10], "seed": [1]}}}
    with pytest.raises(InvalidEnvelope) as caught:
        p.plan(json.dumps(body).encode())
    assert caught.value.description == ("job.tags: 'owner' is not a tag key this worker "
                                        "allows (cost.allowed_tags: team, project)")
    with pytest.raises(InvalidEnvelope, match=r"allows \(cost.allowed_tags: none\)"):
        tag_metadata({"team": "x"}, [])


@pytest.mark.parametrize(("tags", "says"), [
    ({"Team": "x"}, "tag key 'Team' is not 1-32 lower-case letters"),
    ({"team": ""}, "tag 'team': the value '' is not 1-128 letters"),
    ({"team": "x" * 129}, "is not 1-128 letters"),
    ({"team": "a;b"}, "tag 'team': the value 'a;b'"),
    ({"team": " lead"}, "spaces (not at the ends)"),
    ({"team": 7}, "tag 'team': the value must be a string"),
    (["team"], "tags must be an object of strings"),
])
def test_malformed_tags_are_an_invalid_envelope(tags: Any, says: str) -> None:
    from worker.envelope import parse_body

    with pytest.raises(InvalidEnvelope, match=says.replace("(", r"\(").replace(")", r"\)")):
        parse_body(json.dumps({"handler": "sweep", "job": {"tags": tags}}).encode())


def test_tag_values_with_spaces_and_punctuation_pass() -> None:
    from worker.envelope import Envelope, parse_body

    parsed = parse_body(json.dumps({"handler": "sweep", "job": {
        "tags": {"team": "Data Science", "project": "proj-7/a.b@c:d+e=f_g"}}}).encode())
    assert isinstance(parsed, Envelope)
    assert parsed.job.tags == {"team": "Data Science", "project": "proj-7/a.b@c:d+e=f_g"}


@pytest.mark.parametrize(("cost", "says"), [
    ({"allowed_tags": ["Team"]}, "tag key 'Team' is not 1-32 lower-case letters"),
    ({"allowed_tags": ["handler"]}, "tag key 'handler' is a label the cost metrics"),
    ({"allowed_tags": ["team", "team"]}, "a tag key is listed twice"),
    ({"prices": {"Standard_D2s_v3": 1, "standard_d2s_v3": 2}}, "priced twice"),
    ({"prices": {"standard_d2s_v3": -1}}, "greater than or equal to 0"),
    ({"node_seconds": "always"}, "cost.node_seconds"),
])
def test_bad_cost_settings_stop_the_worker(make_settings: Callable[..., Settings],
                                           cost: dict[str, Any], says: str) -> None:
    with pytest.raises(SettingsError, match=says):
        make_settings(cost=cost)


def test_expected_duration_must_be_positive(make_settings: Callable[..., Settings]) -> None:
    with pytest.raises(SettingsError, match="programs.sim.expected_duration.*positive"):
        make_settings(programs={"sim": {"command": "sim {x}", "expected_duration": "PT0S"}})


# -- the budget -------------------------------------------------------------------------


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fanout.toml").write_text(
        '[limits]\nmax_task_hours = 2\n'
        '[programs.sim]\ncommand = "sim {seed}"\nexpected_duration = "PT10M"\n'
        'required_slots = 2\n'
        '[programs.summary]\ncommand = "summary"\nexpected_duration = "PT30M"\n'
        '[programs.free]\ncommand = "free {seed}"\n')
    return CliRunner()


def test_fanout_plan_refuses_a_sweep_over_the_task_hours_budget(cli: CliRunner) -> None:
    """6 tasks x 10 minutes x 2 slots + a 30-minute aggregate = 2.5 task-hours > 2:
    BudgetExceeded with the arithmetic, exit 3, before anything is submitted."""
    result = cli.invoke(main, ["plan", "-H", "sweep", "-p", "program=sim",
                               "-p", 'parameters.seed={"start":0,"stop":6}',
                               "-p", 'aggregate={"program":"summary"}'])
    assert result.exit_code == 3, result.output
    assert result.output.strip() == (
        "BudgetExceeded: the job is estimated at 2.5 task-hours (6 tasks x PT10M x 2 slots "
        "(programs.sim.expected_duration) + aggregate PT30M x 1 slot), over this worker's "
        "budget of 2 task-hours per message (limits.max_task_hours)")


def test_fanout_plan_passes_a_sweep_within_the_budget_or_without_an_estimate(
        cli: CliRunner) -> None:
    """6 tasks x 10 min x 2 slots = exactly the 2 task-hours of the budget: it passes,
    and a seventh task does not; a program without an expected duration has no
    estimate, so 1,000 of its tasks are not checked."""
    at = cli.invoke(main, ["plan", "-H", "sweep", "-p", "program=sim",
                           "-p", 'parameters.seed={"start":0,"stop":6}'])
    assert at.exit_code == 0, at.output
    over = cli.invoke(main, ["plan", "-H", "sweep", "-p", "program=sim",
                             "-p", 'parameters.seed={"start":0,"stop":7}'])
    assert over.exit_code == 3 and "estimated at 2.333 task-hours (7 tasks" in over.output
    free = cli.invoke(main, ["plan", "-H", "sweep", "-p", "program=free",
                             "-p", 'parameters.seed={"start":0,"stop":1000}'])
    assert free.exit_code == 0, free.output


def test_check_budget_boundaries() -> None:
    job = JobSpec(tasks=[], task_count=1, estimated_task_hours=2.0, estimate_basis="b")
    check_budget(job, LimitsConfig(max_task_hours=2))  # equal: within
    check_budget(job, LimitsConfig())  # no budget
    check_budget(JobSpec(tasks=[], task_count=1), LimitsConfig(max_task_hours=0.1))
    with pytest.raises(BudgetExceeded, match=r"estimated at 2 task-hours \(b\), over .* 1\.5"):
        check_budget(job, LimitsConfig(max_task_hours=1.5))


# -- pricing ----------------------------------------------------------------------------


def test_price_is_node_seconds_over_3600_times_the_node_hour_price() -> None:
    """7,200 slot-seconds on 4-slot nodes are 1,800 node-seconds: half a node-hour at
    0.4 a node-hour is 0.2; an unpriced VM size has no cost; unknown slots, no
    node-seconds."""
    config = CostConfig(prices={"Standard_D8s_v3": 0.4}, currency="EUR")
    cost = price(JobUsage(slot_seconds=7200, tasks=3, vm_size="standard_d8s_v3",
                          slots_per_node=4), config)
    assert (cost.node_seconds, cost.price_per_node_hour, cost.currency) == (1800, 0.4, "EUR")
    assert cost.estimated_cost == pytest.approx(0.2)
    unpriced = price(JobUsage(slot_seconds=60, tasks=1, vm_size="standard_e2_v5",
                              slots_per_node=1), config)
    assert unpriced.node_seconds == 60 and unpriced.estimated_cost is None
    unknown = price(JobUsage(slot_seconds=60, tasks=1), config)
    assert unknown.node_seconds is None and unknown.estimated_cost is None


# -- on the embedded default --------------------------------------------------------------


@pytest.fixture
def worker(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., RunningWorker]]:
    started: list[RunningWorker] = []

    def start(**overrides: Any) -> RunningWorker:
        nap = f"{PY} -c \"import time, sys; time.sleep(0.3); print(sys.argv[1])\" {{seed}}"
        settings = make_settings(
            programs={"nap": {"command": nap, "required_slots": 2}},
            consumer={"receive_wait": 0.2}, local={"slots": 2, "poll_interval": 0.05},
            jobs={"poll_interval": 1.0}, **overrides)
        running = RunningWorker(settings).start()
        started.append(running)
        return running

    yield start
    for running in started:
        if running.thread.is_alive():
            running.stop()


def test_local_usage_and_cost_in_the_event_and_the_tagged_metrics(
        worker: Callable[..., RunningWorker]) -> None:
    """Three tasks of 2 slots each, on a 2-slot executor, each sleeping 0.3 s: the
    event's slot-seconds are the sum of each task's own start-to-end times the stored
    required slots, node-seconds half of that, the cost at the 'local' price; the
    metrics carry the job's team tag and an empty project."""
    w = worker(cost={"allowed_tags": ["team", "project"], "prices": {"local": 36.0}})
    w.send(sweep("cost-local", tags={"team": "vision"}))
    job_id = job_id_for("sweep", "cost-local")
    data = w.wait_event(job_id)["data"]
    assert data["outcome"] == "succeeded" and data["tags"] == {"team": "vision"}
    usage = data["usage"]
    backend = w.app.backend
    assert isinstance(backend, LocalBackend)
    store = backend.store
    tasks = store.tasks(job_id)
    walls = [t.end_time - t.start_time for t in tasks
             if t.end_time is not None and t.start_time is not None]
    assert len(walls) == 3 and all(w_ >= 0.3 for w_ in walls)
    assert usage["tasks_measured"] == 3 and usage["task_slots_per_node"] == 2
    assert usage["vm_size"] == "local" and usage["currency"] == "USD"
    assert usage["slot_seconds"] == pytest.approx(sum(walls) * 2, abs=1e-3)
    assert usage["node_seconds"] == pytest.approx(sum(walls), abs=1e-3)
    assert usage["estimated_cost"] == pytest.approx(sum(walls) / 3600 * 36.0, abs=1e-5)
    labels = {"handler": "sweep", "team": "vision", "project": ""}
    assert w.sample("fanout_job_node_seconds_total", labels) == pytest.approx(
        usage["node_seconds"], abs=1e-3)
    assert w.sample("fanout_job_cost_total", labels) == pytest.approx(
        usage["estimated_cost"], abs=1e-6)


def test_local_usage_off_leaves_it_out(worker: Callable[..., RunningWorker]) -> None:
    w = worker(cost={"node_seconds": "off"})
    w.send(sweep("cost-off", 1))
    data = w.wait_event(job_id_for("sweep", "cost-off"))["data"]
    assert "usage" not in data and "tags" not in data
    assert w.sample("fanout_job_node_seconds_total", {"handler": "sweep"}) == 0
