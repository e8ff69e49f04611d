"""The poison corpus (``poison.jsonl``): every bad message is dead-lettered at once with
its reason code while one worker keeps serving; hostile but valid values are not
poison: they run, quoted, as the literal values.

Each corpus line is ``{"reason", "why", <body>}`` where the body is ``text`` (UTF-8),
``b64`` (raw bytes), ``json`` (any JSON value) or ``size`` (a valid sweep padded to
that many bytes), with optional ``properties``. ``{root}`` stands for the local blob
store's directory. The worker runs with ``hostile_config`` (conftest.py): at most
1,000 tasks and priority within -100..100 per message, 64 KiB bodies, programs
``echo`` and ``pair``, one route (``videos/*.mp4`` to transcode).
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from handlers.base import BlobRef, JobSpec, TaskSpec
from tests.worker.harness import RunningWorker
from worker.backends.local import LocalBackend
from worker.context import job_id_for
from worker.storage.local import LocalStorage

from .daemon import wait_for

CORPUS = Path(__file__).with_name("poison.jsonl")
#: Every reason code a message fault may carry (worker/errors.py, handlers/errors.py).
REASONS = {"InvalidJson", "InvalidEnvelope", "UnknownHandler", "UnknownProgram",
           "InvalidParams", "BudgetExceeded", "ForeignStorage", "NoRoute"}

#: Hostile but valid string values: shell syntax, quotes, newlines, unicode.
HOSTILE = [
    "; touch pwned", "$(touch pwned)", "`touch pwned`", "' ; touch pwned ; '",
    '" ; touch pwned ; "', "&& touch pwned", "| touch pwned", "> pwned", "< /etc/passwd",
    "a\nb", "line one\nline two\n", "\ttab\tseparated\t", "carriage\rreturn",
    "unicode ✓ 日本語 Ελληνικά 🎉", "\u202eright-to-left override", "zero\u200bwidth",
    "$HOME", "${PATH}", "$((1+1))", "*", "?", "[a-z]*", "~", "~root", "-n", "--help",
    "-e \\x41", "\\", "\\n", "'", "''", '"', '""', "'\"'\"'", " leading and trailing ",
    "", " ", "%s %d %n", "{value}", "{{value}}", "#not a comment", "!!", "a=b c=d",
    "x" * 4000,
]
#: Hostile but valid blob names (inputs of transcode): each must arrive literally.
HOSTILE_BLOBS = [
    "a b;$(touch pwned)`touch pwned`.mp4", "it's \"quoted\".mp4", "日本語/ビデオ 1.mp4",
    "$HOME/${PATH}/*.mp4", "-rf --no-preserve-root.mp4", "%2e%2e/%00.mp4",
]


def load_corpus(root: str) -> list[tuple[bytes, dict[str, str], str, str]]:
    """(body, properties, reason, why) for each line of the corpus."""
    cases = []
    for line in CORPUS.read_text(encoding="utf-8").splitlines():
        row: dict[str, Any] = json.loads(line)
        if "text" in row:
            body = row["text"].replace("{root}", root).encode("utf-8")
        elif "b64" in row:
            body = base64.b64decode(row["b64"])
        elif "size" in row:
            pad = "x" * int(row["size"])
            body = json.dumps({"handler": "sweep", "params": {
                "program": "echo", "parameters": {"value": [pad]}}}).encode()
        else:
            body = json.dumps(row["json"]).replace("{root}", root).encode("utf-8")
        cases.append((body, row.get("properties") or {}, row["reason"], row["why"]))
    return cases


def blob_root(w: RunningWorker) -> str:
    storage = w.app.storage
    assert isinstance(storage, LocalStorage)
    return storage.account_url.removeprefix("file://")


def wait_for_job(w: RunningWorker, key: str, tasks: int) -> str:
    """Wait until the job of idempotency key ``key`` has ``tasks`` finished tasks."""
    job_id = job_id_for("sweep", key)
    backend = w.app.backend
    assert isinstance(backend, LocalBackend)
    w.wait_until(lambda: (s := backend.job_status(job_id)) is not None
                 and s.counts.get("completed", 0) == tasks, 60, f"{tasks} tasks of {key}")
    return job_id


def test_corpus_covers_every_reason() -> None:
    """At least 50 bad messages, every reason code among them, no two alike."""
    cases = load_corpus("/blobs")
    assert len(cases) >= 50
    assert {reason for _, _, reason, _ in cases} == REASONS
    assert len({(body, json.dumps(props)) for body, props, _, _ in cases}) == len(cases)
    assert len({why for _, _, _, why in cases}) == len(cases)


def test_poison_is_dead_lettered_with_its_reason_and_serving_goes_on(
        hostile_worker: Callable[..., RunningWorker]) -> None:
    """Each corpus message lands in the DLQ on its first delivery with its reason and a
    description; a good message sent after all of them still runs."""
    w = hostile_worker()
    cases = load_corpus(blob_root(w))
    expected = {}
    for i, (body, props, reason, why) in enumerate(cases):
        expected[w.send(body, message_id=f"poison-{i}", properties=props)] = (reason, why)
    w.send({"handler": "sweep", "id": "after-the-poison", "params": {
        "program": "echo", "parameters": {"value": ["still serving"]}}})
    w.wait_idle(len(cases) + 1, timeout=120)

    dead = {d.message_id: d for d in w.dead_letters()}
    wrong = {why: (reason, dead[mid].reason if mid in dead else "not dead-lettered")
             for mid, (reason, why) in expected.items()
             if mid not in dead or dead[mid].reason != reason}
    assert not wrong, wrong
    assert len(dead) == len(cases)
    assert all(d.description and len(d.description) <= 4096 for d in dead.values())
    assert w.sample("fanout_messages_total", {"handler": "none", "outcome": "abandoned"}) == 0
    by_reason = Counter(reason for reason, _ in expected.values())
    for reason, n in by_reason.items():
        assert w.sample("fanout_dead_letters_total", {"reason": reason}) == n, reason

    job_id = wait_for_job(w, "after-the-poison", 1)
    backend = w.app.backend
    assert isinstance(backend, LocalBackend)
    wd = backend.task_dir(job_id, "0") / "wd"
    assert (wd / "value.txt").read_text() == "still serving"
    assert w.depth() == {"active": 0, "dead_letter": len(cases), "scheduled": 0}


def test_hostile_values_run_as_literal_values(
        hostile_worker: Callable[..., RunningWorker], tmp_path: Path) -> None:
    """Shell syntax, quotes, newlines and unicode in a sweep's values reach the task's
    argument and environment byte for byte, and nothing they name is run."""
    w = hostile_worker()
    w.send({"handler": "sweep", "id": "hostile", "params": {
        "program": "echo", "parameters": {"value": HOSTILE}}})
    job_id = wait_for_job(w, "hostile", len(HOSTILE))
    backend = w.app.backend
    assert isinstance(backend, LocalBackend)
    for i, value in enumerate(HOSTILE):
        info = backend.task(job_id, str(i))
        assert info is not None and info.exit_code == 0, (value, info)
        wd = backend.task_dir(job_id, str(i)) / "wd"
        assert (wd / "value.txt").read_bytes() == value.encode("utf-8"), value
        assert (wd / "env.txt").read_bytes() == value.encode("utf-8"), value
        assert sorted(p.name for p in wd.iterdir()) == ["env.txt", "value.txt"], value
    assert not list(w.app.settings.home.rglob("pwned"))
    assert w.dead_letters() == []


@pytest.mark.parametrize("values", [[1, -2, 3.5, 1e-7, True, False]])
def test_non_string_values_have_their_documented_text(
        hostile_worker: Callable[..., RunningWorker], values: list[Any]) -> None:
    """Numbers and booleans reach the task as their JSON-ish text."""
    w = hostile_worker()
    w.send({"handler": "sweep", "id": "scalars", "params": {
        "program": "echo", "parameters": {"value": values}}})
    job_id = wait_for_job(w, "scalars", len(values))
    backend = w.app.backend
    assert isinstance(backend, LocalBackend)
    texts = [(backend.task_dir(job_id, str(i)) / "wd" / "value.txt").read_text()
             for i in range(len(values))]
    assert texts == ["1", "-2", "3.5", "1e-07", "true", "false"]


def test_hostile_blob_names_reach_the_task_literally(
        hostile_worker: Callable[..., RunningWorker]) -> None:
    """Transcode inputs with shell syntax, quotes and unicode in their names are staged,
    named in ffmpeg's arguments literally, and their outputs land under their names."""
    w = hostile_worker()
    storage = w.app.storage
    assert isinstance(storage, LocalStorage)
    for name in HOSTILE_BLOBS:
        storage.upload(BlobRef(container="videos", blob=name), b"video bytes")
    w.send({"handler": "transcode", "id": "hostile-blobs", "params": {
        "inputs": [{"container": "videos", "blob": name} for name in HOSTILE_BLOBS],
        "renditions": ["360p"]}})
    job_id = job_id_for("transcode", "hostile-blobs")
    backend = w.app.backend
    assert isinstance(backend, LocalBackend)
    w.wait_until(lambda: (s := backend.job_status(job_id)) is not None
                 and s.counts.get("completed", 0) == len(HOSTILE_BLOBS), 60, "transcodes")
    for i, name in enumerate(HOSTILE_BLOBS):
        info = backend.task(job_id, str(i))
        assert info is not None and info.exit_code == 0, (name, info)
        stem = name.removesuffix(".mp4")
        out = storage.root / "renditions" / stem / "360p.mp4"
        args = out.read_bytes().split(b"\0")
        assert f"title={name}".encode() in args, (name, args)
        assert b"input.mp4" in args  # staged under a fixed name, never the blob's
    assert not list(w.app.settings.home.rglob("pwned"))


def test_a_task_no_process_can_start_fails_once(tmp_path: Path) -> None:
    """A command line no process can carry (a NUL, from a handler that let one through)
    fails its task as not runnable instead of being requeued for ever."""
    with LocalBackend(home=tmp_path / "home", slots=1, poll_interval=0.02) as backend:
        backend.start()
        backend.create_job(JobSpec(tasks=[], task_count=1, id="nul", pool="local"))
        backend.add_tasks("nul", [TaskSpec(id="0", command_line="printf a\x00b")])
        backend.seal_job("nul")
        wait_for(lambda: (t := backend.task("nul", "0")) is not None
                 and t.state == "completed", 10, "the task to end")
        info = backend.task("nul", "0")
    assert info is not None and info.failure_code == "CommandProgramNotStarted"
    assert info.requeue_count == 0
