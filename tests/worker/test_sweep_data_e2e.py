"""The sweep's data path end to end: templated inputs staged from blob storage, outputs
uploaded to ``results/<job>/<task>/``, an aggregate that reads every task's outputs
back from storage and writes one result, and the output locations in the completion
event and ``fanout status``.

On the embedded default the whole worker runs (SQLite queue, local executor, local
blob directory). Against Azure, the worker talks to the Batch peer and Azurite; the
peer does not run commands, so the test plays the Batch node: it takes each task as
the peer received it, stages its ``resourceFiles`` from Azurite with their SAS URLs,
runs its command line, uploads its ``outputFiles`` to their SAS destination, and
tells the peer how the task ended.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
from click.testing import CliRunner
from pydantic import SecretStr

from handlers.base import BlobRef, OutputFile, ResourceFile, UploadCondition
from tests.fakes.azurite import ACCOUNT_KEY, Azurite, run_azurite
from tests.fakes.batch_peer import BatchPeer
from worker.backends.local import transfer
from worker.cli import main
from worker.config import BlobConfig, Settings
from worker.context import job_id_for
from worker.storage.azure import AzureBlobStorage
from worker.storage.local import LocalStorage

from .harness import RunningWorker

PY = sys.executable
REPO = Path(__file__).resolve().parents[2]
#: A sweep task: reads its staged sample (the path is its blob name), writes result.json
#: and a plot; the score is the sum of the sample's numbers times the weight.
SCORE = (f"{shlex.quote(PY)} -c \"import json, os, sys; "
         "nums = [float(x) for x in open(sys.argv[1]).read().split()]; "
         "os.makedirs('plots', exist_ok=True); "
         "open('plots/' + sys.argv[2] + '.txt', 'w').write('plot of ' + sys.argv[2]); "
         "json.dump(dict(sample=sys.argv[2], score=sum(nums) * float(sys.argv[3])), "
         "open('result.json', 'w'))\" samples/{sample}.csv {sample} {weight}")
#: The aggregate: every staged result.json under $FANOUT_RESULTS_DIR, into total.json.
COMBINE = (f"{shlex.quote(PY)} -c \"import glob, json, os; "
           "top = os.environ['FANOUT_RESULTS_DIR']; "
           "found = sorted(glob.glob(top + '/*/result.json')); "
           "plots = sorted(glob.glob(top + '/*/plots/*.txt')); "
           "rs = [json.load(open(p)) for p in found]; "
           "json.dump(dict(tasks=len(rs), plots=len(plots), "
           "total=sum(r['score'] for r in rs), "
           "samples=sorted(r['sample'] for r in rs)), open('total.json', 'w')); "
           "print('combined', len(rs))\"")
PROGRAMS: dict[str, Any] = {
    "score": {"command": SCORE, "inputs": ["data/samples/{sample}.csv"],
              "outputs": ["result.json", "plots/*.txt"],
              "environment": {"PYTHONPATH": str(REPO)}},
    "combine": {"command": COMBINE, "outputs": ["total.json"]},
}
SAMPLES = {"a": "1 2 3", "b b": "10 20", "c": "100"}


def sweep(key: str) -> dict[str, Any]:
    return {"handler": "sweep", "id": key, "params": {
        "program": "score", "parameters": {"sample": sorted(SAMPLES), "weight": [1, 2]},
        "aggregate": {"program": "combine"}}}


EXPECTED_TOTAL = 3 * sum(sum(float(x) for x in v.split()) for v in SAMPLES.values())


@pytest.fixture
def local_worker(make_settings: Callable[..., Settings]) -> Iterator[RunningWorker]:
    settings = make_settings(programs=PROGRAMS, consumer={"receive_wait": 0.2},
                             local={"slots": 2, "poll_interval": 0.05},
                             jobs={"poll_interval": 1.0})
    storage = LocalStorage(root=settings.home / "blobs")
    for name, text in SAMPLES.items():
        storage.upload(BlobRef("data", f"samples/{name}.csv"), text.encode())
    running = RunningWorker(settings).start()
    yield running
    if running.thread.is_alive():
        running.stop()


def test_templated_inputs_outputs_and_aggregate_on_the_embedded_default(
        local_worker: RunningWorker, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Six tasks each read their own staged sample and upload result.json and a plot;
    the aggregate is staged all six results from storage (no shared directory) and
    writes total.json; the event and `fanout status` name both locations."""
    w = local_worker
    w.send(sweep("data-local"))
    job_id = job_id_for("sweep", "data-local")
    data = w.wait_event(job_id)["data"]
    assert data["outcome"] == "succeeded", data
    assert data["tasks"]["total"] == 7 and data["tasks"]["succeeded"] == 7
    assert data["outputs"] == [
        {"name": "results", "location": f"fanout-results/results/{job_id}/"},
        {"name": "aggregate", "location": f"fanout-results/results/{job_id}/aggregate/"}]
    storage = LocalStorage(root=w.app.settings.home / "blobs")
    names = [r.blob for r in storage.list("fanout-results", f"results/{job_id}/")]
    assert len([n for n in names if n.endswith("/result.json")]) == 6
    assert f"results/{job_id}/0/plots/a.txt" in names
    total = json.loads(storage.download(
        BlobRef("fanout-results", f"results/{job_id}/aggregate/total.json")))
    assert total == {"tasks": 6, "plots": 6, "total": EXPECTED_TOTAL,
                     "samples": sorted([*SAMPLES, *SAMPLES])}
    # `fanout status JOB` with the same home lists the output locations
    config = tmp_path / "status.toml"
    config.write_text(f"home = {json.dumps(str(w.app.settings.home))}\n")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["--config", str(config), "status", job_id])
    assert result.exit_code == 0, result.output
    assert f"output    results: fanout-results/results/{job_id}/" in result.output
    assert f"output    aggregate: fanout-results/results/{job_id}/aggregate/" in result.output


def test_the_pi_demo_aggregates_uploaded_estimates(make_settings: Callable[..., Settings]
                                                   ) -> None:
    """The built-in demo (no programs configured): each pi task's estimate.json is
    uploaded, the summary reads them back from storage and writes summary.json."""
    settings = make_settings(consumer={"receive_wait": 0.2},
                             local={"slots": 2, "poll_interval": 0.05},
                             jobs={"poll_interval": 1.0})
    assert set(settings.programs) == {"pi", "pi-summary"}
    w = RunningWorker(settings).start()
    try:
        w.send({"handler": "sweep", "id": "demo-1", "params": {
            "program": "pi", "parameters": {"samples": [2000], "seed": {"start": 0, "stop": 4}},
            "aggregate": {"program": "pi-summary"}}})
        job_id = job_id_for("sweep", "demo-1")
        data = w.wait_event(job_id)["data"]
        assert data["outcome"] == "succeeded", data
        stdout = (settings.home / "tasks" / job_id / "aggregate" / "stdout.txt").read_text()
        assert stdout.startswith("pi ~ 3.") and stdout.endswith(
            "averaged over 4 of 4 tasks\n"), stdout
        storage = LocalStorage(root=settings.home / "blobs")
        summary = json.loads(storage.download(
            BlobRef("fanout-results", f"results/{job_id}/aggregate/summary.json")))
        assert summary["tasks"] == summary["expected"] == 4 and summary["missing"] == []
        assert summary["text"] == stdout.strip()
    finally:
        w.stop()


def test_local_staging_refuses_a_symlink_out_of_the_container(tmp_path: Path) -> None:
    """A blob URL built from its container's (as the sweep builds templated inputs)
    still goes through the storage, so a symlinked blob cannot reach outside."""
    storage = LocalStorage(root=tmp_path / "blobs")
    storage.upload(BlobRef("data", "ok.csv"), b"fine")
    (tmp_path / "secret").write_text("secret")
    os.symlink(tmp_path / "secret", tmp_path / "blobs" / "data" / "leak.csv")
    base = storage.input_container_url("data", "")
    wd = tmp_path / "wd"
    wd.mkdir()
    transfer.stage([ResourceFile(http_url=f"{base}/ok.csv", file_path="ok.csv")], wd, storage)
    assert (wd / "ok.csv").read_text() == "fine"
    with pytest.raises(transfer.TransferError, match="resolves outside"):
        transfer.stage([ResourceFile(http_url=f"{base}/leak.csv", file_path="leak.csv")],
                       wd, storage)
    assert not (wd / "leak.csv").exists()


# -- Azure: the Batch peer and Azurite ---------------------------------------------------


@pytest.fixture(scope="module")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    with run_azurite(tmp_path_factory.mktemp("azurite")) as running:
        yield running


@pytest.fixture
def peer() -> Iterator[BatchPeer]:
    running = BatchPeer().start()
    running.add_pool("cpu", dedicated={"idle": 2})
    yield running
    running.stop()


def query(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


_CONDITIONS: dict[str, UploadCondition] = {
    "tasksuccess": "success", "taskfailure": "failure", "taskcompletion": "completion"}


def run_as_a_node(task: dict[str, Any], job_id: str, work: Path) -> int:
    """What a Batch node does with a task body: stage, run, upload; the exit code."""
    task_dir = work / job_id / task["id"]
    wd = task_dir / "wd"
    wd.mkdir(parents=True)
    transfer.stage([ResourceFile(http_url=r.get("httpUrl", ""), file_path=r.get("filePath", ""),
                                 storage_container_url=r.get("storageContainerUrl"),
                                 blob_prefix=r.get("blobPrefix"))
                    for r in task.get("resourceFiles") or []], wd)
    env = {"PATH": os.defpath, "AZ_BATCH_JOB_ID": job_id, "AZ_BATCH_TASK_ID": task["id"],
           **{e["name"]: e["value"] for e in task.get("environmentSettings") or []}}
    with open(task_dir / "stdout.txt", "wb") as out, open(task_dir / "stderr.txt", "wb") as err:
        code = subprocess.run(shlex.split(task["commandLine"]), cwd=wd, env=env, stdout=out,
                              stderr=err, timeout=60, check=False).returncode
    outputs = [OutputFile(file_pattern=o["filePattern"],
                          container_url=o["destination"]["container"]["containerUrl"],
                          path=o["destination"]["container"].get("path", ""),
                          upload_condition=_CONDITIONS[
                              o["uploadOptions"]["uploadCondition"].lower()])
               for o in task.get("outputFiles") or []]
    transfer.upload(outputs, success=code == 0, task_dir=task_dir, wd=wd, env=env)
    return code


def test_the_data_path_on_batch_and_azurite(make_settings: Callable[..., Settings],
                                            azurite: Azurite, peer: BatchPeer,
                                            tmp_path: Path) -> None:
    """The peer receives per-task httpUrl resource files under one read+list container
    SAS, output files to the results container with a create+write SAS, and an
    aggregate staging results/<job>/ as storageContainerUrl + blobPrefix; played as a
    node, the job computes the same total as on the embedded default."""
    admin = AzureBlobStorage(config=BlobConfig(account_url=azurite.account_url,
                                               account_key=SecretStr(ACCOUNT_KEY)))
    try:
        for container in ("data", "fanout-results"):
            admin.ensure_container(container)
        for name, text in SAMPLES.items():
            admin.upload(BlobRef("data", f"samples/{name}.csv"), text.encode())
        settings = make_settings(
            batch={"account_url": peer.url, "account_name": peer.account,
                   "account_key": peer.key, "pool": "cpu", "poll_interval": 0.2},
            blob={"account_url": azurite.account_url, "account_key": ACCOUNT_KEY},
            consumer={"receive_wait": 0.2}, jobs={"poll_interval": 0.3},
            programs=PROGRAMS)
        w = RunningWorker(settings).start()
        try:
            w.send(sweep("data-azure"))
            w.wait_idle(1)
            job_id = job_id_for("sweep", "data-azure")
            tasks = {t["id"]: t for t in peer.tasks(job_id)}
            assert sorted(tasks) == ["0", "1", "2", "3", "4", "5", "aggregate"]
            check_request_bodies(tasks, job_id)
            for task_id in ["0", "1", "2", "3", "4", "5", "aggregate"]:
                code = run_as_a_node(tasks[task_id], job_id, tmp_path / "node")
                assert code == 0, (tmp_path / "node" / job_id / task_id / "stderr.txt"
                                   ).read_text()
                peer.set_task_state(job_id, task_id, "completed", exit_code=code)
            data = w.wait_event(job_id)["data"]
            assert data["outcome"] == "succeeded", data
            assert [o["location"] for o in data["outputs"]] == [
                f"fanout-results/results/{job_id}/",
                f"fanout-results/results/{job_id}/aggregate/"]
            assert "sig=" not in json.dumps(data)
        finally:
            w.stop()
        total = json.loads(admin.download(
            BlobRef("fanout-results", f"results/{job_id}/aggregate/total.json")))
        assert total == {"tasks": 6, "plots": 6, "total": EXPECTED_TOTAL,
                         "samples": sorted([*SAMPLES, *SAMPLES])}
        listed = [r.blob for r in admin.list("fanout-results", f"results/{job_id}/")]
        assert f"results/{job_id}/1/plots/a.txt" in listed
    finally:
        admin.close()


def check_request_bodies(tasks: dict[str, dict[str, Any]], job_id: str) -> None:
    """The resource and output files as the Batch REST API received them."""
    signatures = set()
    for task_id in ["0", "1"]:  # sample "a", weight 1 and 2
        (resource,) = tasks[task_id]["resourceFiles"]
        assert set(resource) == {"httpUrl", "filePath"}
        assert resource["filePath"] == "samples/a.csv"
        url = resource["httpUrl"]
        assert unquote(urlsplit(url).path).endswith("/devstoreaccount1/data/samples/a.csv")
        sas = query(url)
        assert sas["sr"] == "c" and sas["sp"] == "rl" and "sig" in sas
        signatures.add(sas["sig"])
    (spaced,) = tasks["2"]["resourceFiles"]  # sample "b b": percent-encoded in the URL
    assert spaced["filePath"] == "samples/b b.csv"
    assert urlsplit(spaced["httpUrl"]).path.endswith("/data/samples/b%20b.csv")
    assert len(signatures) == 1, "one container SAS for every task of the job"
    outputs = tasks["3"]["outputFiles"]
    mine = [o for o in outputs if o["filePattern"] != "../std*.txt"]
    assert [(o["filePattern"], o["destination"]["container"]["path"],
             o["uploadOptions"]["uploadCondition"]) for o in mine] == [
        ("result.json", f"results/{job_id}/3/result.json", "tasksuccess"),
        ("plots/*.txt", f"results/{job_id}/3/plots", "tasksuccess")]
    for out in mine:
        dest = out["destination"]["container"]["containerUrl"]
        assert unquote(urlsplit(dest).path).endswith("/devstoreaccount1/fanout-results")
        out_sas = query(dest)
        assert out_sas["sr"] == "c" and set(out_sas["sp"]) <= set("cw")
    agg = tasks["aggregate"]
    (staged,) = agg["resourceFiles"]
    assert set(staged) == {"storageContainerUrl", "blobPrefix"}
    assert staged["blobPrefix"] == f"results/{job_id}/"
    assert unquote(urlsplit(staged["storageContainerUrl"]).path).endswith("/fanout-results")
    assert query(staged["storageContainerUrl"])["sp"] == "rl"
    env = {e["name"]: e["value"] for e in agg["environmentSettings"]}
    assert env["FANOUT_RESULTS_DIR"] == f"results/{job_id}"
    (agg_out,) = [o for o in agg["outputFiles"] if o["filePattern"] != "../std*.txt"]
    assert agg_out["destination"]["container"]["path"] == (
        f"results/{job_id}/aggregate/total.json")
