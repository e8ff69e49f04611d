"""The injection canary: no string in a message makes a task run a command the operator
did not configure. Payloads that would ``touch`` a canary file if any layer let them
reach a shell unquoted go into every string a message carries: sweep values,
parameter names, blob names, the handler field, application properties, job display
names, idempotency keys and event fields. They run through a whole worker and the
local executor; the canary is never created. A control shows the canary would be.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from handlers.base import BlobRef
from handlers.errors import InvalidParams
from tests.worker.harness import RunningWorker
from worker.backends.local import LocalBackend
from worker.context import job_id_for
from worker.storage.local import LocalStorage
from worker.storage.refs import check_blob_name


def payloads(canary: Path) -> list[str]:
    """Strings that run ``touch <canary>`` if any layer hands them to a shell unquoted."""
    c = str(canary)
    return [
        f"$(touch {c})", f"`touch {c}`", f"; touch {c}", f";touch {c};", f"&& touch {c}",
        f"| touch {c}", f"|| touch {c}", f"\ntouch {c}", f"\r\ntouch {c}\n", f"x\n\ntouch {c}",
        f"'; touch {c}; '", f'"; touch {c}; "', f"'\"'\"'; touch {c}; '\"'\"'",
        f"\\'; touch {c}; \\'", f"\"$(touch {c})\"", f"'$(touch {c})'", f"$'\\x27'; touch {c}",
        f"$(IFS=_;x=touch_{c};$x)", f"${{IFS}}touch${{IFS}}{c}", f"$(eval 'touch {c}')",
        f"$(printf 'touch {c}' | sh)", f"<(touch {c})", f">(touch {c})", f"{{touch,{c}}}",
        f"a' 'b; touch {c} #", f"#'; touch {c}", f"%0atouch {c}", f"\\ntouch {c}",
        f"-exec touch {c} ;", f"--output={c}", f"> {c}", f">> {c}", f"*; touch {c}",
        f"$(touch {c})$(touch {c})", f"\u2018; touch {c}; \u2019", f"\uff07; touch {c}; \uff07",
        f"\x0btouch {c}", f"\ttouch\t{c}", f"{{value}}$(touch {c})", f"{{{{$(touch {c})}}}}",
    ]


def valid_blob_name(name: str) -> bool:
    try:
        check_blob_name(name)
    except InvalidParams:
        return False
    return True


def test_no_message_string_runs_a_command(
        hostile_worker: Callable[..., RunningWorker], tmp_path: Path) -> None:
    """Every payload, in every place a message holds a string, leaves the canary absent
    while the tasks carrying them run and succeed."""
    canary = tmp_path / "canary"
    control = tmp_path / "control"
    w = hostile_worker(programs={"toucher": {"command": f"touch {control}"}})
    storage = w.app.storage
    assert isinstance(storage, LocalStorage)
    strings = payloads(canary)
    sent = 0

    def send(body: dict[str, Any] | bytes, **kw: Any) -> None:
        nonlocal sent
        w.send(body, **kw)
        sent += 1

    # sweep values: one task per payload; display name and key hostile too
    send({"handler": "sweep", "id": "values", "job": {"display_name": strings[0]},
          "params": {"program": "echo", "parameters": {"value": strings}}})
    # every payload as the display name and in application properties
    for i, s in enumerate(strings):
        send({"handler": "sweep", "id": f"name-{i}", "job": {"display_name": s},
              "params": {"program": "echo", "parameters": {"value": ["x"]}}},
             properties={"team": s, "x-trace": s})
    # as idempotency keys (the job id is derived from them) and message ids
    for i, s in enumerate(strings[:10]):
        send({"handler": "sweep", "id": s, "params": {
            "program": "echo", "parameters": {"value": [i]}}}, message_id=s)
    # as blob names of transcode inputs (the fake ffmpeg records its arguments)
    names = [n for n in (f"{s.strip(' /')}.mp4" for s in strings) if valid_blob_name(n)]
    for name in names:
        storage.upload(BlobRef(container="videos", blob=name), b"video")
    send({"handler": "transcode", "id": "blobs", "params": {
        "inputs": [{"container": "videos", "blob": n} for n in names],
        "renditions": ["360p"]}})
    # as the handler field, the handler property, parameter names, programs, commands
    for s in strings[:8]:
        send({"handler": s, "params": {}})
        send({"params": {"program": "echo", "parameters": {"value": [1]}}},
             properties={"handler": s})
        send({"handler": "sweep", "params": {"program": "echo", "parameters": {
            "value": [1], s: [1]}}})
        send({"handler": "sweep", "params": {"program": s, "parameters": {"value": [1]}}})
        send({"handler": "sweep", "params": {"command": s, "parameters": {"value": [1]}}})
        send(json.dumps({"eventType": "Microsoft.Storage.BlobCreated", "id": s,
                         "subject": s, "data": {"url": s, "api": s}}).encode())
    # without the operator's opt-in a message's own command line is refused
    send({"handler": "sweep", "id": "own-command", "params": {
        "command": f"touch {canary}", "parameters": {"value": [1]}}})
    send({"handler": "sweep", "id": "own-aggregate", "params": {
        "program": "echo", "parameters": {"value": [1]},
        "aggregate": {"command": f"touch {canary}"}}})
    # the control: an operator-configured program that does touch its file
    send({"handler": "sweep", "id": "control", "params": {
        "program": "toucher", "parameters": {"value": [1]}}})
    w.wait_idle(sent, timeout=120)

    backend = w.app.backend
    assert isinstance(backend, LocalBackend)
    jobs = backend.list_jobs(1000)
    total = sum(sum(j.counts.values()) for j in jobs)
    w.wait_until(lambda: sum(j.counts.get("completed", 0)
                             for j in backend.list_jobs(1000)) == total, 120, "every task")
    assert control.exists(), "the control task did not run: the canary proves nothing"
    assert not canary.exists(), "a message string ran a command"
    failed = [(j.id, j.failed) for j in backend.list_jobs(1000) if j.failed]
    assert not failed, failed

    values = backend.tasks(job_id_for("sweep", "values"), limit=1000)
    assert len(values) == len(strings)
    for task in values:
        wd = backend.task_dir(task.job_id, task.id) / "wd"
        assert (wd / "value.txt").read_bytes() == strings[int(task.id)].encode()
    transcoded = backend.job_status(job_id_for("transcode", "blobs"))
    assert transcoded is not None and transcoded.succeeded == len(names) >= 30
    reasons = {d.reason for d in w.dead_letters()}
    assert reasons <= {"InvalidEnvelope", "UnknownHandler", "InvalidParams", "UnknownProgram",
                       "ForeignStorage"}
    refused = {d.message_id: d for d in w.dead_letters()}
    own = [d for d in refused.values() if b"own-command" in d.body or b"own-aggregate" in d.body]
    assert [d.reason for d in own] == ["InvalidParams", "InvalidParams"]
    assert all("allow_message_commands" in (d.description or "") for d in own)
