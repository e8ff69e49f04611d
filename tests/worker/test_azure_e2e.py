"""The whole worker configured for Azure only through settings, as an operator would:
Azure Batch on the local Batch peer and Azure Blob storage on Azurite.

Checks what the peer records: the exact tasks of a sweep, and for a transcode the
resource files with read-only SAS URLs scoped to one blob and the output files with
a create/write-only container SAS; and that no signature reaches the logs.
"""

from __future__ import annotations

import io
import json
import logging
import shlex
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import structlog

from tests.fakes.azurite import ACCOUNT_KEY, Azurite, run_azurite
from tests.fakes.batch_peer import BatchPeer
from worker import logs
from worker.config import Settings

from .harness import RunningWorker


@pytest.fixture(scope="module")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    """Azurite's blob service for this module."""
    with run_azurite(tmp_path_factory.mktemp("azurite")) as running:
        yield running


@pytest.fixture
def peer() -> Iterator[BatchPeer]:
    """A Batch peer with the pool `cpu`."""
    running = BatchPeer().start()
    running.add_pool("cpu", dedicated={"idle": 2})
    yield running
    running.stop()


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    """Everything the worker logs, as JSON lines."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    stream = io.StringIO()
    logs.configure(fmt="json", level="debug", stream=stream)
    yield stream
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def azure_worker(make_settings: Callable[..., Settings], azurite: Azurite,
                 peer: BatchPeer) -> Iterator[RunningWorker]:
    """A worker whose backend and storage are chosen by its settings alone."""
    settings = make_settings(
        batch={"account_url": peer.url, "account_name": peer.account,
               "account_key": peer.key, "pool": "cpu", "poll_interval": 0.2},
        blob={"account_url": azurite.account_url, "account_key": ACCOUNT_KEY},
        consumer={"receive_wait": 0.2},
        programs={"simulate": {"command": "python3 sim.py --alpha {alpha}"}})
    assert (settings.backend_kind, settings.storage_kind) == ("azure", "azure")
    running = RunningWorker(settings).start()
    yield running
    if running.thread.is_alive():
        running.stop()


def query(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


def test_sweep_and_transcode_reach_the_batch_peer(azure_worker: RunningWorker,
                                                  peer: BatchPeer,
                                                  captured_logs: io.StringIO) -> None:
    """The peer records the sweep's exact tasks and the transcode's SAS-scoped files."""
    w = azure_worker
    w.send({"handler": "sweep", "id": "sweep-1", "params": {
        "program": "simulate", "parameters": {"alpha": ["0.5", "x; rm -rf ~"]}}})
    w.send({"handler": "transcode", "id": "tc-1", "params": {
        "input": {"container": "videos", "blob": "2026/my clip.mp4"},
        "renditions": ["720p", "360p"], "output": {"container": "renditions",
                                                   "prefix": "out"}}})
    w.wait_idle(2)
    assert w.sample("fanout_messages_total", {"handler": "sweep", "outcome": "completed"}) == 1
    assert w.sample("fanout_messages_total",
                    {"handler": "transcode", "outcome": "completed"}) == 1
    jobs = {job.id.split("-")[0]: job for job in peer.jobs()}
    sweep_tasks = sorted(peer.tasks(jobs["sweep"].id), key=lambda t: t["id"])
    argv = [shlex.split(shlex.split(t["commandLine"])[2]) for t in sweep_tasks]
    assert argv == [["python3", "sim.py", "--alpha", "0.5"],
                    ["python3", "sim.py", "--alpha", "x; rm -rf ~"]]
    assert jobs["sweep"].pool == "cpu"

    tc_tasks = peer.tasks(jobs["transc"].id)
    assert len(tc_tasks) == 2
    for task in tc_tasks:
        (resource,) = task["resourceFiles"]
        url = resource["httpUrl"]
        assert unquote(urlsplit(url).path).endswith("/devstoreaccount1/videos/2026/my clip.mp4")
        sas = query(url)
        assert (sas["sr"], sas["sp"]) == ("b", "r") and "sig" in sas
        logs = [o for o in task["outputFiles"] if o["filePattern"] == "../std*.txt"]
        outputs = [o for o in task["outputFiles"] if o not in logs]
        assert outputs
        (log,) = logs  # stdout/stderr go to the logs container when the task fails
        log_dest = log["destination"]["container"]
        assert unquote(urlsplit(log_dest["containerUrl"]).path).endswith("/fanout-logs")
        assert log_dest["path"] == f"{jobs['transc'].id}/{task['id']}"
        assert log["uploadOptions"]["uploadCondition"] == "taskfailure"
        for out in outputs:
            dest = out["destination"]["container"]
            assert unquote(urlsplit(dest["containerUrl"]).path).endswith("/renditions")
            out_sas = query(dest["containerUrl"])
            assert out_sas["sr"] == "c" and set(out_sas["sp"]) <= set("cw")
            assert dest["path"].startswith("out/")
    text = captured_logs.getvalue()
    assert "job.submitted" in text
    signatures = [query(t["resourceFiles"][0]["httpUrl"])["sig"] for t in tc_tasks]
    assert not any(sig in text for sig in signatures)
    assert ACCOUNT_KEY not in text and peer.key not in text


def test_foreign_blob_url_is_dead_lettered(azure_worker: RunningWorker) -> None:
    """A blob URL of another account is ForeignStorage, even with Azure storage set."""
    w = azure_worker
    body: dict[str, Any] = {"handler": "transcode", "params": {
        "input": "https://evil.blob.core.windows.net/videos/a.mp4", "renditions": ["720p"],
        "output": {"container": "renditions", "prefix": ""}}}
    w.send(body)
    w.wait_idle(1)
    (dead,) = w.dead_letters()
    assert dead.reason == "ForeignStorage"
    assert "evil.blob.core.windows.net" in (dead.description or "")
    assert json.loads(dead.body) == body
