"""The local executor's file moves and process-group helpers, unit by unit."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from handlers.base import OutputFile, ResourceFile
from worker.backends.local import process, transfer
from worker.backends.local.transfer import TransferError


@pytest.fixture
def task_dir(tmp_path: Path) -> Path:
    """A task directory with a working dir holding a few files."""
    root = tmp_path / "tasks" / "job" / "task"
    wd = root / "wd"
    (wd / "a" / "b").mkdir(parents=True)
    (wd / "one.txt").write_text("1")
    (wd / ".hidden.txt").write_text("h")
    (wd / "a" / "b" / "two.txt").write_text("2")
    (root / "stdout.txt").write_text("out")
    (root / "stderr.txt").write_text("err")
    return root


def names(out: OutputFile, task_dir: Path, env: dict[str, str] | None = None) -> list[str]:
    return [blob for _, blob in transfer.matches(out, task_dir=task_dir, wd=task_dir / "wd",
                                                 env=env or {})]


@pytest.mark.parametrize(("pattern", "path", "expected"), [
    ("one.txt", "dest/renamed.txt", ["dest/renamed.txt"]),
    ("one.txt", "", ["one.txt"]),
    ("missing.txt", "x", []),
    ("*.txt", "pre", ["pre/one.txt"]),
    ("**/*.txt", "pre/", ["pre/a/b/two.txt", "pre/one.txt"]),
    ("a/**/*.txt", "p", ["p/b/two.txt"]),
    (".*.txt", "p", ["p/.hidden.txt"]),
    ("../std*.txt", "logs", ["logs/stderr.txt", "logs/stdout.txt"]),
    ("../stdout.txt", "logs/out.txt", ["logs/out.txt"]),
    ("$SUB/b/*.txt", "p", ["p/two.txt"]),
])
def test_output_patterns_name_blobs_as_batch_does(task_dir: Path, pattern: str, path: str,
                                                  expected: list[str]) -> None:
    """A plain pattern's path is the blob name; a wildcard's path is a prefix."""
    assert names(OutputFile(pattern, "file:///x", path), task_dir, {"SUB": "a"}) == expected


@pytest.mark.parametrize("pattern", ["../../*", "/etc/passwd", "a/../../../x.txt"])
def test_output_patterns_stay_in_the_task_dir(task_dir: Path, pattern: str) -> None:
    """A pattern reaching outside the task directory is refused."""
    with pytest.raises(TransferError) as caught:
        names(OutputFile(pattern, "file:///x", "p"), task_dir)
    assert caught.value.code == "FileUploadError"


@pytest.mark.parametrize(("condition", "success", "expected"), [
    ("success", True, True), ("success", False, False),
    ("failure", True, False), ("failure", False, True),
    ("completion", True, True), ("completion", False, True),
])
def test_upload_conditions(condition: str, success: bool, expected: bool) -> None:
    """taskSuccess, taskFailure and taskCompletion as on Batch."""
    assert transfer.should_upload(condition, success) is expected


def test_upload_refuses_blob_names_that_escape(task_dir: Path, tmp_path: Path) -> None:
    """An output path with ``..`` cannot write outside the destination directory."""
    dest = tmp_path / "dest"
    out = OutputFile("one.txt", "file://" + str(dest), "../escaped.txt", "completion")
    with pytest.raises(TransferError):
        transfer.upload([out], success=True, task_dir=task_dir, wd=task_dir / "wd", env={})
    assert not (tmp_path / "escaped.txt").exists()


def test_stage_refuses_symlink_escape(tmp_path: Path) -> None:
    """A symlink in the working dir cannot carry a resource file outside it."""
    wd = tmp_path / "wd"
    wd.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (wd / "link").symlink_to(outside)
    source = tmp_path / "src.txt"
    source.write_text("x")
    with pytest.raises(TransferError) as caught:
        transfer.stage([ResourceFile("file://" + str(source), "link/x.txt")], wd)
    assert caught.value.code == "ResourceFilePathInvalid"
    assert not (outside / "x.txt").exists()


def test_file_urls_are_percent_decoded(tmp_path: Path) -> None:
    """``file://`` URLs decode percent escapes; remote hosts are refused."""
    assert transfer.file_url_path("file:///a%20b/c%23d") == Path("/a b/c#d")
    assert transfer.file_url_path("file://localhost/x") == Path("/x")
    with pytest.raises(TransferError):
        transfer.file_url_path("file://server/share/x")


def test_safe_url_drops_the_query() -> None:
    """SAS tokens never reach a message."""
    assert transfer.safe_url("https://a.blob/c/x?sv=1&sig=SECRET#f") == "https://a.blob/c/x"


@pytest.fixture
def blob_service() -> Iterator[dict[str, Any]]:
    """A tiny Blob service: List Blobs (two names per page) and Get Blob of ``blobs``."""
    state: dict[str, Any] = {"blobs": {}, "queries": []}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            parts = urllib.parse.urlsplit(self.path)
            query = urllib.parse.parse_qs(parts.query)
            state["queries"].append(query)
            if query.get("comp") == ["list"]:
                self._list(query)
                return
            blob = urllib.parse.unquote(parts.path.removeprefix("/c/"))
            body = state["blobs"].get(blob)
            self._send(200 if body is not None else 404, body or b"")

        def _list(self, query: dict[str, list[str]]) -> None:
            prefix = query.get("prefix", [""])[0]
            names = sorted(n for n in state["blobs"] if n.startswith(prefix))
            start = int(query.get("marker", ["0"])[0])
            page = names[start:start + 2]
            more = f"<NextMarker>{start + 2}</NextMarker>" if start + 2 < len(names) else (
                "<NextMarker/>")
            xml = ("<?xml version='1.0' encoding='utf-8'?><EnumerationResults><Blobs>"
                   + "".join(f"<Blob><Name>{n}</Name></Blob>" for n in page)
                   + f"</Blobs>{more}</EnumerationResults>")
            self._send(200, xml.encode())

        def _send(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    state["url"] = f"http://127.0.0.1:{server.server_address[1]}/c?sv=1&sig=SECRET"
    yield state
    server.shutdown()
    server.server_close()
    thread.join()


def test_stage_container_over_http(tmp_path: Path, blob_service: dict[str, Any]) -> None:
    """Every blob under the prefix is listed page by page and staged under file_path."""
    blob_service["blobs"].update({"frames/0001.png": b"1", "frames/0002.png": b"2",
                                  "frames/sub/0003.png": b"3", "frames-other/x": b"no",
                                  "other/y": b"no"})
    wd = tmp_path / "wd"
    wd.mkdir()
    transfer.stage([ResourceFile("", "in", storage_container_url=blob_service["url"],
                                 blob_prefix="frames/")], wd)
    staged = sorted(p.relative_to(wd).as_posix() for p in wd.rglob("*") if p.is_file())
    assert staged == ["in/frames/0001.png", "in/frames/0002.png", "in/frames/sub/0003.png"]
    assert (wd / "in" / "frames" / "sub" / "0003.png").read_bytes() == b"3"
    assert all(q.get("sig") == ["SECRET"] for q in blob_service["queries"])
    assert sum(q.get("comp") == ["list"] for q in blob_service["queries"]) == 2


def test_stage_container_errors_hide_the_sas(tmp_path: Path) -> None:
    """An unreachable container fails staging without echoing its SAS."""
    with pytest.raises(TransferError) as caught:
        transfer.stage([ResourceFile("", "", storage_container_url=(
            "http://127.0.0.1:9/c?sv=1&sig=SECRET"), blob_prefix="p/")], tmp_path)
    assert caught.value.code == "ResourceFileDownloadError"
    assert "SECRET" not in caught.value.message


def test_stage_local_container(tmp_path: Path) -> None:
    """A file:// container stages the files whose names start with the prefix."""
    container = tmp_path / "blobs" / "media"
    (container / "frames" / "sub").mkdir(parents=True)
    (container / "frames" / "a.png").write_text("a")
    (container / "frames" / "sub" / "b.png").write_text("b")
    (container / "frames" / ".fanout-x.part").write_text("partial")
    (container / "framesX.png").write_text("no")
    wd = tmp_path / "wd"
    wd.mkdir()
    transfer.stage([ResourceFile("", "", storage_container_url="file://" + str(container),
                                 blob_prefix="frames/")], wd)
    staged = sorted(p.relative_to(wd).as_posix() for p in wd.rglob("*") if p.is_file())
    assert staged == ["frames/a.png", "frames/sub/b.png"]


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A process leading its own group, reaped at teardown."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                            start_new_session=True)
    yield proc
    proc.kill()
    proc.wait()


def test_orphan_with_another_start_time_is_spared(sleeper: subprocess.Popen[bytes]) -> None:
    """A pid whose start time differs from the recorded one is a reused pid: not killed."""
    started = process.start_time(sleeper.pid)
    assert started is not None
    assert process.kill_orphan(sleeper.pid, started + 1) is False
    assert process.kill_orphan(sleeper.pid, None) is False
    assert sleeper.poll() is None
    assert process.kill_orphan(sleeper.pid, started) is True
    assert sleeper.wait(timeout=10) < 0


def test_wait_exit_leaves_the_leader_unreaped(sleeper: subprocess.Popen[bytes]) -> None:
    """wait_exit times out on a live process and returns once it exits, still a zombie."""
    assert process.wait_exit(sleeper, 0.05) is False
    process.signal_group(sleeper.pid, 9)
    assert process.wait_exit(sleeper, None) is True
    assert os.path.exists(f"/proc/{sleeper.pid}")  # a zombie until reaped
    assert sleeper.wait() == -9
