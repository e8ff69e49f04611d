"""The sweep's data path, planned by the worker's real planner on local storage:
templated inputs, the allowed inputs of a message, outputs, and the aggregate's
staging of every task's results."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest

from handlers import datapath
from handlers.base import JobOutput, ResourceFile, TaskSpec
from handlers.errors import ForeignStorage, InvalidParams
from handlers.sweep import SweepHandler
from worker.storage.local import LocalStorage

from .conftest import PlanHarness


def local_root(planner: PlanHarness) -> Path:
    """The root of the harness's storage, the local default here."""
    storage = planner.storage
    assert isinstance(storage, LocalStorage)
    return storage.root

Make = Callable[..., PlanHarness]

PROGRAMS: dict[str, Any] = {
    "analyse": {"command": "python3 analyse.py samples/{sample}.csv",
                "inputs": ["data/samples/{sample}.csv", "models/v3/model.bin"],
                "outputs": ["result.json", "plots/*.png", "**/*.log"]},
    "runs": {"command": "python3 run.py {seed}",
             "allowed_inputs": ["data/runs/", "shared"]},
    "summary": {"command": "python3 summary.py", "inputs": ["models/v3/model.bin"],
                "outputs": ["summary.json"]},
    "plain": {"command": "python3 plain.py {seed}"},
    "plain-agg": {"command": "python3 plain-agg.py"},
}


@pytest.fixture
def planner(make_planner: Make) -> PlanHarness:
    return make_planner(programs=PROGRAMS)


def sweep(program: str, **params: Any) -> dict[str, Any]:
    return {"handler": "sweep", "id": "data-1", "params": {"program": program, **params}}


def local_path(url: str) -> str:
    assert url.startswith("file://"), url
    return unquote(url[len("file://"):])


def test_templated_inputs_are_staged_per_task(planner: PlanHarness) -> None:
    """Each task gets its own sample at its blob name, and the model every task shares
    is one resource file (signed once) for all of them."""
    root = local_root(planner)
    job, tasks = planner.job(sweep("analyse", parameters={"sample": ["a", "b c", "ü"]}))
    assert len(tasks) == 3
    for task, sample in zip(tasks, ["a", "b c", "ü"], strict=True):
        staged, model = task.resource_files
        assert staged.file_path == f"samples/{sample}.csv"
        assert local_path(staged.http_url) == f"{root}/data/samples/{sample}.csv"
        assert model.file_path == "v3/model.bin"
        assert local_path(model.http_url) == f"{root}/models/v3/model.bin"
    assert tasks[0].resource_files[1] is tasks[2].resource_files[1]


def test_outputs_go_to_the_tasks_results_prefix(planner: PlanHarness) -> None:
    """Plain files keep their name, wildcard patterns their literal folders, under
    results/<job>/<task>/ of fanout-results; the job lists the location."""
    root = local_root(planner)
    job, tasks = planner.job(sweep("analyse", parameters={"sample": ["a", "b"]}))
    prefix = f"results/{job.id}/1"
    outs = tasks[1].output_files
    assert [(o.file_pattern, o.path, o.upload_condition) for o in outs] == [
        ("result.json", f"{prefix}/result.json", "success"),
        ("plots/*.png", f"{prefix}/plots", "success"),
        ("**/*.log", prefix, "success"),
    ]
    assert {local_path(o.container_url) for o in outs} == {f"{root}/fanout-results"}
    assert job.outputs == [JobOutput("results", f"fanout-results/results/{job.id}/")]


def test_upload_condition_and_output_container_are_configurable(make_planner: Make) -> None:
    planner = make_planner(
        programs={"p": {"command": "run {seed}", "outputs": ["out.txt"],
                        "upload_condition": "completion"}},
        handlers={"sweep": {"output_container": "lab-results"}})
    job, tasks = planner.job(sweep("p", parameters={"seed": [1]}))
    (out,) = tasks[0].output_files
    assert out.upload_condition == "completion"
    assert out.container_url.endswith("/lab-results")
    assert job.outputs == [JobOutput("results", f"lab-results/results/{job.id}/")]


def test_aggregate_stages_every_result_and_writes_its_own(planner: PlanHarness) -> None:
    """The aggregate gets one container-plus-prefix resource file of results/<job>/,
    its program's own inputs, outputs under results/<job>/aggregate/, and is told
    where the results are staged."""
    job, tasks = planner.job(sweep("analyse", parameters={"sample": ["a", "b"]},
                                   aggregate={"program": "summary"}))
    agg = tasks[-1]
    assert agg.id == "aggregate"
    results, model = agg.resource_files
    assert results.http_url == "" and results.file_path == ""
    assert results.blob_prefix == f"results/{job.id}/"
    assert results.storage_container_url is not None
    assert results.storage_container_url.endswith("/fanout-results")
    assert model.file_path == "v3/model.bin"
    assert agg.environment["FANOUT_RESULTS_DIR"] == f"results/{job.id}"
    (out,) = agg.output_files
    assert out.path == f"results/{job.id}/aggregate/summary.json"
    assert job.outputs == [
        JobOutput("results", f"fanout-results/results/{job.id}/"),
        JobOutput("aggregate", f"fanout-results/results/{job.id}/aggregate/"),
    ]


def test_a_sweep_without_data_is_untouched(planner: PlanHarness) -> None:
    """No inputs or outputs: no files, no job outputs, the aggregate stages nothing."""
    job, tasks = planner.job(sweep("plain", parameters={"seed": [1, 2]},
                                   aggregate={"program": "plain-agg"}))
    assert job.outputs == []
    assert all(not t.resource_files and not t.output_files for t in tasks)
    assert "fanout-outputs" not in job.metadata


def test_message_inputs_within_the_allowed_prefixes(planner: PlanHarness) -> None:
    """A message may add inputs under the program's allowed_inputs, as container/blob,
    {container, blob} or a blob URL of the storage (no fields in a URL)."""
    root = local_root(planner)
    url = f"file://{root}/shared/calibration.dat"
    _, tasks = planner.job(sweep("runs", parameters={"seed": [1, 2]}, inputs=[
        "data/runs/{seed}/input.csv", {"container": "data", "blob": "runs/all.csv"}, url,
        "data/runs/{seed}/extra/"]))
    first = tasks[0].resource_files
    assert [f.file_path for f in first[:3]] == ["runs/1/input.csv", "runs/all.csv",
                                                "calibration.dat"]
    assert first[3].blob_prefix == "runs/1/extra/" and first[3].file_path == ""
    assert tasks[1].resource_files[0].file_path == "runs/2/input.csv"


@pytest.mark.parametrize(("inputs", "fault", "text"), [
    (["data/private/{seed}.csv"], ForeignStorage, "outside the inputs program 'runs'"),
    (["other/runs/{seed}.csv"], ForeignStorage, "allowed_inputs: data/runs/, shared/"),
    (["data/runs-old/x.csv"], ForeignStorage, "outside"),
    (["data/{seed}.csv"], ForeignStorage, "outside the program's allowed inputs"),
    (["https://evil.blob.core.windows.net/data/runs/x.csv"], ForeignStorage, "evil"),
    (["data/runs/{nope}.csv"], InvalidParams, "needs nope"),
    (["data/runs/{seed!r}.csv"], InvalidParams, "plain name"),
    (["{seed}/runs/x.csv"], InvalidParams, "must be literal"),
    (["data/runs/../../x.csv"], InvalidParams, "'..' path segment"),
    ([{"container": "data", "blob": "runs/x", "path": "y"}], InvalidParams, "exactly"),
    (["data"], InvalidParams, "is not"),
])
def test_bad_message_inputs_are_refused(planner: PlanHarness, inputs: list[Any],
                                        fault: type[Exception], text: str) -> None:
    with pytest.raises(fault, match=text if text.isalnum() else None) as caught:
        planner.job(sweep("runs", parameters={"seed": [1, 2]}, inputs=inputs))
    assert text in str(caught.value)


@pytest.mark.parametrize("value", ["../../secret", "x/../../y", "a/./b", "a//b", "/etc",
                                   "ok\x01", "back\\slash"])
def test_values_cannot_escape_through_a_template(planner: PlanHarness, value: str) -> None:
    """Field values come from messages: a rendered name with a '..' or '.' segment,
    '//', a leading '/', a control character or a backslash is refused before any
    task is built, naming the task."""
    with pytest.raises(InvalidParams, match="task 1 names") as caught:
        planner.job(sweep("analyse", parameters={"sample": ["fine", value]}))
    assert "data/samples/{sample}.csv" in str(caught.value)


def test_values_cannot_leave_the_allowed_prefix(planner: PlanHarness) -> None:
    """Even when the rendered name is a valid blob name, a message's templated input
    must stay under the prefix: data/{seed} is refused for seed 'private/x'."""
    with pytest.raises(ForeignStorage, match="task 1 names 'data/elsewhere/x.csv'"):
        planner.job(sweep("runs", parameters={"seed": ["runs/ok", "elsewhere/x"]},
                          inputs=["data/{seed}.csv"]))


def test_a_program_without_allowed_inputs_takes_none(planner: PlanHarness) -> None:
    with pytest.raises(InvalidParams, match="takes no inputs from messages"):
        planner.job(sweep("plain", parameters={"seed": [1]}, inputs=["data/x.csv"]))


def test_program_inputs_needing_missing_fields_are_refused(planner: PlanHarness) -> None:
    with pytest.raises(InvalidParams, match=r"needs sample, which the sweep's parameters"):
        planner.job(sweep("analyse", parameters={"seed": [1]}))


@pytest.mark.parametrize(("program", "text"), [
    ({"inputs": ["Data/x.csv"]}, "container 'Data'"),
    ({"inputs": ["data/../x.csv"]}, "'..' path segment"),
    ({"inputs": ["data/{a.b}.csv"]}, "plain name"),
    ({"inputs": ["nocontainer"]}, "is not"),
    ({"allowed_inputs": ["data/{x}/"]}, "not a template"),
    ({"outputs": ["../escape.txt"]}, "'..' path segment"),
    ({"outputs": ["/abs/file"]}, "starts with '/'"),
    ({"upload_condition": "always"}, "upload_condition"),
])
def test_bad_program_configuration_is_refused(make_planner: Make, program: dict[str, Any],
                                              text: str) -> None:
    with pytest.raises(Exception, match="programs") as caught:
        make_planner(programs={"p": {"command": "run", **program}})
    assert text in str(caught.value)


def test_sweep_options_are_checked() -> None:
    handler = SweepHandler()
    handler.check_options({"output_container": "fine-name"})
    with pytest.raises(ValueError, match="container 'Bad_Name'"):
        handler.check_options({"output_container": "Bad_Name"})
    with pytest.raises(ValueError, match="unknown option colour"):
        handler.check_options({"colour": "red"})


def test_aggregate_inputs_take_no_fields(make_planner: Make) -> None:
    planner = make_planner(programs={**PROGRAMS, "agg": {
        "command": "python3 agg.py", "inputs": ["data/{seed}.csv"]}})
    with pytest.raises(InvalidParams, match="an aggregate's inputs are plain blob names"):
        planner.job(sweep("plain", parameters={"seed": [1]}, aggregate={"program": "agg"}))


def test_templated_inputs_sign_once_per_job(make_planner: Make,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A thousand tasks of a templated input ask the storage for one container URL,
    not a thousand blob URLs; each task's URL is that container's plus its name."""
    planner = make_planner(programs=PROGRAMS)
    storage = planner.storage
    calls: list[tuple[str, str]] = []
    real = storage.input_container_url

    def counting(container: str, prefix: str, *args: Any, **kw: Any) -> str:
        calls.append((container, prefix))
        return str(real(container, prefix, *args, **kw)) + "?sig=SECRET"

    monkeypatch.setattr(storage, "input_container_url", counting)
    _, tasks = planner.job(sweep("analyse", parameters={"sample": {"start": 0, "stop": 1000}}))
    assert calls == [("data", "samples/")]
    assert tasks[999].resource_files[0].http_url.endswith("/data/samples/999.csv?sig=SECRET")


def test_task_data_reads_fields_from_the_tasks(stub_ctx: Any) -> None:
    """TaskData renders from each task's FANOUT_PARAM_* and id (the sweep's own stream
    is untouched) and appends to files a task already has."""
    template = datapath.parse_input("data/{alpha}/{task_index}-{repeat_index}.bin")
    data = datapath.TaskData(ctx=stub_ctx, fields=["alpha", "task_index", "repeat_index"],
                             inputs=[(template, None, "input")], outputs=["o.txt"],
                             output_container="out-c", upload_condition="failure")
    existing = ResourceFile(http_url="file:///x", file_path="x")
    task = TaskSpec("7", "true", {"FANOUT_PARAM_ALPHA": "0.5", "FANOUT_REPEAT_INDEX": "2"},
                    resource_files=[existing])
    (out,) = list(data.attach([task]))
    assert out.resource_files[0] is existing
    assert out.resource_files[1].file_path == "0.5/7-2.bin"
    assert out.resource_files[1].http_url == "file:///blobs/data/0.5/7-2.bin"
    assert [(o.path, o.upload_condition) for o in out.output_files] == [
        ("results/job-1/7/o.txt", "failure")]


def test_inputs_on_the_sweeps_unquoted_path(make_planner: Make) -> None:
    """A command whose literal text needs no quoting streams through the sweep's other
    task builder; its tasks get their inputs and outputs the same way."""
    planner = make_planner(programs={"bare": {"command": "{seed}", "inputs": ["data/{seed}.csv"],
                                              "outputs": ["o.txt"]}})
    job, tasks = planner.job(sweep("bare", parameters={"seed": ["x", "y"]}, repeat=2))
    assert [t.resource_files[0].file_path for t in tasks] == ["x.csv", "x.csv", "y.csv",
                                                              "y.csv"]
    assert [t.output_files[0].path for t in tasks] == [
        f"results/{job.id}/{i}/o.txt" for i in range(4)]


def test_braces_in_a_blob_url_and_escaped_braces_are_literal(make_planner: Make) -> None:
    """A blob URL names one blob, braces and all (%7B is not a template field); in a
    template, {{ and }} stand for braces."""
    planner = make_planner(programs={**PROGRAMS, "curly": {
        "command": "run {seed}", "inputs": ["models/{{v1}}.bin"],
        "allowed_inputs": ["data/"]}})
    root = local_root(planner)
    _, tasks = planner.job(sweep("curly", parameters={"seed": [1]}, inputs=[
        f"file://{root}/data/a%7Bseed%7D.csv"]))
    model, url_input = tasks[0].resource_files
    assert model.file_path == "{v1}.bin"
    assert local_path(model.http_url) == f"{root}/models/{{v1}}.bin"
    assert url_input.file_path == "a{seed}.csv"
