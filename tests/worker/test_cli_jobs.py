"""The sender's commands on the embedded default: status JOB, status --watch JOB,
cancel and events, run in-process against a real local executor and events queue."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from handlers.base import JobSpec, TaskSpec
from worker.backends.local import LocalBackend
from worker.cli import main
from worker.context import job_id_for
from worker.sinks.local import LocalEventSink

PY = sys.executable
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.chdir(tmp_path)
    return CliRunner()


@pytest.fixture
def executor(tmp_path: Path) -> Iterator[LocalBackend]:
    backend = LocalBackend(home=tmp_path / ".fanout", slots=2, poll_interval=0.05)
    backend.start()
    yield backend
    backend.close()


def submit(backend: LocalBackend, key: str, commands: list[str]) -> str:
    """A sealed job as fanout's submitter leaves it (with its metadata)."""
    job_id = job_id_for("sweep", key)
    backend.create_job(JobSpec(tasks=[], task_count=len(commands), id=job_id, pool="local",
                               metadata={"fanout-handler": "sweep", "fanout-key": key}))
    backend.add_tasks(job_id, [TaskSpec(id=str(i), command_line=c)
                               for i, c in enumerate(commands)])
    backend.seal_job(job_id)
    return job_id


def wait_completed(backend: LocalBackend, job_id: str) -> None:
    deadline = time.monotonic() + 30
    while (job := backend.get_job(job_id)) is None or job.state != "completed":
        assert time.monotonic() < deadline, "the job did not complete"
        time.sleep(0.05)


FAIL = f"{PY} -c \"import sys; sys.exit('disk quota exceeded on /scratch')\""


def test_status_by_idempotency_key_shows_the_failed_task(
        cli: CliRunner, executor: LocalBackend) -> None:
    """status KEY finds the job from the message's key and shows the failed task's
    category, exit code and stderr tail; --json carries the same."""
    job_id = submit(executor, "nightly-1", ["true", FAIL])
    wait_completed(executor, job_id)
    result = cli.invoke(main, ["status", "nightly-1"])
    assert result.exit_code == 0, result.output
    assert f"job       {job_id}" in result.output
    assert "state     completed (failed)" in result.output
    assert "1  exit_code  exit 1" in result.output
    assert "| disk quota exceeded on /scratch" in result.output
    data = json.loads(cli.invoke(main, ["status", "--json", job_id]).output)
    assert data["outcome"] == "failed" and data["tasks"]["failed"] == 1
    assert data["failed_tasks"][0]["stderr_tail"].strip() == "disk quota exceeded on /scratch"


def test_status_of_an_unknown_job_exits_1(cli: CliRunner, executor: LocalBackend) -> None:
    result = cli.invoke(main, ["status", "no-such-thing"])
    assert result.exit_code == 1 and "no job of fanout's" in result.output


def test_watch_returns_when_the_job_ends_with_its_outcome(
        cli: CliRunner, executor: LocalBackend) -> None:
    """--watch JOB returns once the job ends: exit 0 when it succeeded, 4 when not."""
    good = submit(executor, "good", ["sleep 0.5", "true"])
    result = cli.invoke(main, ["status", "--watch", good])
    assert result.exit_code == 0, result.output
    assert "completed (succeeded)" in result.output
    bad = submit(executor, "bad", ["sleep 0.5", FAIL])
    result = cli.invoke(main, ["status", "--watch", bad])
    assert result.exit_code == 4 and "completed (failed)" in result.output


def test_cancel_stops_a_running_job(cli: CliRunner, executor: LocalBackend) -> None:
    """cancel KEY terminates the job; status then says cancelled; a second cancel says
    the job had already ended."""
    job_id = submit(executor, "long", ["sleep 60", "sleep 61"])
    deadline = time.monotonic() + 30
    while (counts := executor.task_counts(job_id)) is None or counts.running < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    result = cli.invoke(main, ["cancel", "long"])
    assert result.exit_code == 0 and f"cancelled {job_id}" in result.output
    job = executor.get_job(job_id)
    assert job is not None and job.state == "completed"
    assert job.terminate_reason == "FanoutCancelled"
    assert "completed (cancelled)" in cli.invoke(main, ["status", job_id]).output
    again = cli.invoke(main, ["cancel", job_id])
    assert again.exit_code == 0 and "had already ended" in again.output


def test_events_lists_without_consuming_and_follows(cli: CliRunner, tmp_path: Path) -> None:
    """events --json prints the events queue as a JSON array, twice the same (nothing
    consumed); --follow streams a newly published event as a JSON line."""
    sink = LocalEventSink(path=tmp_path / ".fanout" / "events.db", name="fanout.events")

    def publish(subject: str) -> None:
        body = json.dumps({"id": subject, "subject": subject, "time": "t",
                           "data": {"job_id": subject, "outcome": "succeeded"}}).encode()
        asyncio.run(sink.publish(body, message_id=subject))

    publish("job-1")
    first = json.loads(cli.invoke(main, ["events", "--json"]).output)
    second = json.loads(cli.invoke(main, ["events", "--json"]).output)
    assert [e["subject"] for e in first] == [e["subject"] for e in second] == ["job-1"]
    table = cli.invoke(main, ["events"]).output
    assert "job-1" in table and "succeeded" in table

    follower = subprocess.Popen([PY, "-m", "worker.cli", "events", "--follow"],
                                cwd=tmp_path, stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert follower.stdout is not None
        assert json.loads(follower.stdout.readline())["subject"] == "job-1"
        publish("job-2")
        assert json.loads(follower.stdout.readline())["subject"] == "job-2"
    finally:
        follower.kill()
        follower.wait(10)


def test_run_refuses_a_prefetch_the_lock_cannot_cover(tmp_path: Path) -> None:
    """`fanout run` (a real process) on a Service Bus queue whose lock cannot cover the
    prefetch exits 2 with the arithmetic, as plain text, not a traceback."""
    from tests.fakes.servicebus_peer import ServiceBusPeer

    with ServiceBusPeer(queues=["work"], lock_duration=5.0) as peer:
        (tmp_path / "fanout.toml").write_text("\n".join([
            "[servicebus]", f'connection_string = "{peer.connection_string}"',
            'queue = "work"', "prefetch = 50",
            f"emulator_admin_port = {peer.admin_port or 5300}",
            "[metrics]", "port = 0", "[jobs]", "monitor = false", ""]))
        done = subprocess.run([PY, "-m", "worker.cli", "run"], cwd=tmp_path, timeout=120,
                              capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2, done.stderr
    assert "servicebus.prefetch = 50" in done.stderr and "4 x 50 = 200" in done.stderr
    assert "Traceback" not in done.stderr
