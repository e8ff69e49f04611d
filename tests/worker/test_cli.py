"""Tests for the `fanout` command line (in-process, through click's runner)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from worker.cli import main
from worker.sources.local import LocalQueue


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    """A runner in a fresh working directory (so .fanout/ lands there)."""
    monkeypatch.chdir(tmp_path)
    return CliRunner()


def queue(tmp_path: Path) -> LocalQueue:
    return LocalQueue(path=tmp_path / ".fanout" / "queue.db")


def test_send_builds_an_envelope_from_flags(cli: CliRunner, tmp_path: Path) -> None:
    """--handler/--param/--job/--id make an envelope; the message id is printed."""
    result = cli.invoke(main, ["send", "-H", "sweep", "-p", "program=pi",
                               "-p", "parameters.seed=[1,2]", "-j", "priority=5",
                               "--id", "k1", "--property", "team=render"])
    assert result.exit_code == 0, result.output
    from worker.context import job_id_for

    assert result.output.splitlines() == ["message k1", f"job     {job_id_for('sweep', 'k1')}"]

    async def read() -> tuple[bytes, dict[str, str]]:
        q = queue(tmp_path)
        (msg,) = await q.receive(1, 1)
        await q.close()
        return msg.body, dict(msg.properties)

    body, props = asyncio.run(read())
    assert json.loads(body) == {"handler": "sweep", "id": "k1", "job": {"priority": 5},
                                "params": {"program": "pi", "parameters": {"seed": [1, 2]}}}
    assert props == {"team": "render"}


def test_send_from_stdin(cli: CliRunner) -> None:
    """A file or stdin is sent as is; the message id is generated and named."""
    result = cli.invoke(main, ["send", "-"], input='{"handler": "sweep"}')
    assert result.exit_code == 0
    first = result.output.splitlines()[0]
    assert first.startswith("message ") and len(first.split()[1]) == 32


def test_send_json_names_the_message_and_its_job(cli: CliRunner, tmp_path: Path) -> None:
    """send --json prints the message id and the job id the message will create, the
    same job id the worker derives from the key."""
    from worker.context import job_id_for

    result = cli.invoke(main, ["send", "--json", "-H", "sweep", "-p", "program=pi"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["jobs"] == [job_id_for("sweep", data["message_id"])]

    async def read() -> str | None:
        q = queue(tmp_path)
        (msg,) = await q.receive(1, 1)
        await q.close()
        return msg.message_id

    assert asyncio.run(read()) == data["message_id"]


def test_send_warns_when_the_message_will_be_dead_lettered(cli: CliRunner) -> None:
    """A message no handler takes is still sent, with a warning naming the reason."""
    result = cli.invoke(main, ["send", "--json", "-"], input='{"handler": "nope"}')
    assert result.exit_code == 0
    assert "UnknownHandler" in result.output


def test_plan_json_lists_every_task(cli: CliRunner) -> None:
    """plan --json prints the job and all of its tasks."""
    result = cli.invoke(main, ["plan", "--json", "-H", "sweep", "-p", "program=pi",
                               "-p", 'parameters.samples=[10]',
                               "-p", 'parameters.seed={"start":0,"stop":7}'])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    (job,) = data["jobs"]
    assert job["task_count"] == 7 and len(job["tasks"]) == 7
    assert job["tasks"][6]["environment"]["FANOUT_PARAM_SEED"] == "6"


def test_plan_bad_message_exits_3_with_reason(cli: CliRunner) -> None:
    """A message that would be dead-lettered exits 3 and names its reason code."""
    result = cli.invoke(main, ["plan", "-H", "sweep", "-p", "program=pi",
                               "-p", 'parameters.seed={"start":0,"stop":5,"step":-1}'])
    assert result.exit_code == 3
    assert "InvalidParams" in result.output


def test_dlq_list_show_resubmit(cli: CliRunner, tmp_path: Path) -> None:
    """A dead letter is listed, shown with its body, and resubmitted with its id."""

    async def dead_letter() -> None:
        q = queue(tmp_path)
        await q.send(b'{"handler": "nope"}', message_id="m-1")
        (msg,) = await q.receive(1, 1)
        await q.dead_letter(msg, "UnknownHandler", "no handler named 'nope'")
        await q.close()

    asyncio.run(dead_letter())
    listed = json.loads(cli.invoke(main, ["dlq", "list", "--json"]).output)
    assert [(d["message_id"], d["reason"]) for d in listed] == [("m-1", "UnknownHandler")]
    seq = listed[0]["sequence_number"]
    shown = json.loads(cli.invoke(main, ["dlq", "show", str(seq), "--json"]).output)
    assert shown["body"] == '{"handler": "nope"}'
    done = json.loads(cli.invoke(main, ["dlq", "resubmit", str(seq), "--json"]).output)
    # The copy has a new message id (duplicate detection) and keeps m-1 as its key.
    assert [d["sequence_number"] for d in done] == [seq]
    assert done[0]["message_id"] not in (None, "m-1")
    assert json.loads(cli.invoke(main, ["dlq", "list", "--json"]).output) == []


def test_bad_config_names_the_key(cli: CliRunner, tmp_path: Path) -> None:
    """A bad setting exits 2 and names the key and the value."""
    (tmp_path / "fanout.toml").write_text("[consumer]\nconcurrency = 'many'\n")
    result = cli.invoke(main, ["plan", "-H", "sweep"])
    assert result.exit_code == 2
    assert "consumer.concurrency" in result.output and "'many'" in result.output


def test_status_json_after_a_job(cli: CliRunner, tmp_path: Path) -> None:
    """status --json reports a job with its task counts."""
    from handlers.base import JobSpec, TaskSpec
    from worker.backends.local import LocalBackend

    backend = LocalBackend(home=tmp_path / ".fanout", slots=1)
    backend.create_job(JobSpec(tasks=[], task_count=2, id="job-a", pool="local"))
    backend.add_tasks("job-a", [TaskSpec(id="0", command_line="true"),
                                TaskSpec(id="1", command_line="true")])
    backend.close()
    result = cli.invoke(main, ["status", "--json"])
    assert result.exit_code == 0, result.output
    (job,) = json.loads(result.output)
    assert job["id"] == "job-a" and sum(job["tasks"].values()) == 2


def test_status_watch_ends_when_jobs_complete(cli: CliRunner, tmp_path: Path) -> None:
    """status --watch draws a progress bar per job and returns once all are complete."""
    import time

    from handlers.base import JobSpec, TaskSpec
    from worker.backends.local import LocalBackend

    backend = LocalBackend(home=tmp_path / ".fanout", slots=2, poll_interval=0.05)
    backend.start()
    try:
        backend.create_job(JobSpec(tasks=[], task_count=3, id="job-w", pool="local"))
        backend.add_tasks("job-w", [TaskSpec(id=str(i), command_line="true")
                                    for i in range(3)])
        backend.seal_job("job-w")
        deadline = time.monotonic() + 30
        while (status := backend.job_status("job-w")) is None or status.state != "completed":
            assert time.monotonic() < deadline, "job did not complete"
            time.sleep(0.05)
    finally:
        backend.close()
    result = cli.invoke(main, ["status", "--watch"])
    assert result.exit_code == 0, result.output
    assert "job-w" in result.output and "3/3" in result.output


def test_send_id_over_128_characters_is_a_usage_error(cli: CliRunner) -> None:
    """--id longer than a message id may be exits 2 with a message, not a traceback."""
    result = cli.invoke(main, ["send", "-H", "sweep", "--id", "k" * 129])
    assert result.exit_code == 2
    assert "128" in result.output and "Traceback" not in result.output


def test_errors_print_amqp_conditions_verbatim(capsys: pytest.CaptureFixture[str]) -> None:
    """An error naming amqp:link:detach-forced prints as is: no markup, no emoji."""
    from worker.cli import _system_call
    from worker.errors import SystemFault

    async def failing() -> None:
        raise SystemFault("amqp:link:detach-forced [bold]x[/bold] :smile:")

    with pytest.raises(SystemExit):
        _system_call(failing)
    assert "amqp:link:detach-forced [bold]x[/bold] :smile:" in capsys.readouterr().err
