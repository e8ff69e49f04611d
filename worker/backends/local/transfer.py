"""Resource files in, output files out, the way Azure Batch moves them.

URLs may be ``file://`` (the local storage directory; absolute, percent-encoded
paths) or ``http(s)://`` (downloaded with urllib; uploads are Put Blob requests on a
container URL, as to an Azure container SAS URL). Any other scheme goes through the
configured ``Storage`` when one was given. Messages never show a URL's query
string, where a SAS signature lives.
"""

from __future__ import annotations

import contextlib
import glob
import io
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import BinaryIO, cast
from xml.etree import ElementTree

from handlers.base import OutputFile, ResourceFile
from handlers.errors import MessageFault
from worker.storage.base import Storage

#: Seconds an HTTP transfer may stall before it fails.
HTTP_TIMEOUT = 60.0
#: The Blob service REST version used for List Blobs and Get Blob.
_API_VERSION = "2021-08-06"
_COPY_BUFFER = 1024 * 1024
_WILDCARDS = re.compile(r"[*?\[]")
_ENV_REFERENCE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


class TransferError(Exception):
    """Raised when a resource file cannot be staged or an output file uploaded."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def safe_url(url: str) -> str:
    """The URL without its query string and fragment (where secrets hide)."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


# -- resource files --------------------------------------------------------------------


def stage(files: Sequence[ResourceFile], wd: Path, storage: Storage | None = None) -> None:
    """Download every resource file into the working directory ``wd``."""
    if not files:
        return  # most tasks have none: skip resolving wd (a few syscalls per task)
    root = wd.resolve()
    for rf in files:
        if rf.storage_container_url:
            stage_container(rf, root)
            continue
        dest = inside(root, rf.file_path, code="ResourceFilePathInvalid")
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            _fetch(rf.http_url, dest, storage)
            if rf.file_mode:
                os.chmod(dest, int(rf.file_mode, 8))
        except TransferError:
            raise
        except ValueError:
            raise TransferError("ResourceFileModeInvalid",
                                f"file mode {rf.file_mode!r} of {rf.file_path} is not octal"
                                ) from None
        except (OSError, urllib.error.URLError) as exc:
            raise TransferError("ResourceFileDownloadError",
                                f"cannot download {safe_url(rf.http_url)} to {rf.file_path}: "
                                f"{_reason(exc)}") from None


def stage_container(rf: ResourceFile, root: Path) -> None:
    """Batch's ``storageContainerUrl`` + ``blobPrefix``: every blob under the prefix,
    each to ``<file_path>/<full blob name>``.

    A ``file://`` container is a local storage directory (files still being written,
    ``.fanout-*.part``, are not blobs yet); an ``http(s)://`` one is listed with the
    Blob service's List Blobs call, as Batch does with a read+list SAS URL.
    """
    url = rf.storage_container_url or ""
    prefix = rf.blob_prefix or ""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    try:
        if scheme == "file":
            names, opener = _local_container(url, prefix)
        elif scheme in ("http", "https"):
            names, opener = _remote_container(url, prefix)
        else:
            raise TransferError("ResourceFileDownloadError",
                                f"unsupported container URL scheme {scheme!r} in {safe_url(url)}")
    except (OSError, urllib.error.URLError, ElementTree.ParseError) as exc:
        raise TransferError("ResourceFileDownloadError",
                            f"cannot list {safe_url(url)}: {_reason(exc)}") from None
    for name in names:
        dest = inside(root, str(Path(rf.file_path or ".") / name),
                      code="ResourceFilePathInvalid")
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            with opener(name) as src:
                _write_atomic(src, dest)
        except (OSError, urllib.error.URLError) as exc:
            raise TransferError("ResourceFileDownloadError",
                                f"cannot download {name!r} from {safe_url(url)}: "
                                f"{_reason(exc)}") from None


_Opener = Callable[[str], AbstractContextManager[BinaryIO]]


def _local_container(url: str, prefix: str) -> tuple[list[str], _Opener]:
    container = file_url_path(url).resolve()
    top = container / prefix.rpartition("/")[0]
    names = [p.relative_to(container).as_posix() for p in sorted(top.rglob("*"))
             if p.is_file() and p.resolve().is_relative_to(container)
             and not (p.name.startswith(".fanout-") and p.name.endswith(".part"))]
    return ([n for n in names if n.startswith(prefix)],
            lambda name: open(container / name, "rb"))


def _remote_container(url: str, prefix: str) -> tuple[list[str], _Opener]:
    parts = urllib.parse.urlsplit(url)
    path = parts.path.rstrip("/")

    def at(blob_path: str, query: str) -> str:
        full = "&".join(q for q in (parts.query, query) if q)
        return urllib.parse.urlunsplit((parts.scheme, parts.netloc, blob_path, full, ""))

    names: list[str] = []
    marker = ""
    while True:
        query = urllib.parse.urlencode({"restype": "container", "comp": "list",
                                        "prefix": prefix, **({"marker": marker} if marker else {})})
        request = urllib.request.Request(at(path, query), headers={"x-ms-version": _API_VERSION})
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:
            listing = ElementTree.fromstring(response.read())
        names += [n.text for n in listing.iterfind("Blobs/Blob/Name") if n.text]
        marker = listing.findtext("NextMarker") or ""
        if not marker:
            break

    def opener(name: str) -> AbstractContextManager[BinaryIO]:
        request = urllib.request.Request(at(f"{path}/{urllib.parse.quote(name)}", ""),
                                         headers={"x-ms-version": _API_VERSION})
        return cast(AbstractContextManager[BinaryIO],
                    urllib.request.urlopen(request, timeout=HTTP_TIMEOUT))

    return [n for n in names if n.startswith(prefix)], opener


def inside(root: Path, relative: str, *, code: str) -> Path:
    """``root / relative``, refusing absolute paths and any that escape ``root``
    (including through a symlink already present)."""
    if not relative or os.path.isabs(relative):
        raise TransferError(code, f"{relative!r} is not a relative file path")
    dest = root / relative
    if ".." in Path(relative).parts or not dest.parent.resolve().is_relative_to(root):
        raise TransferError(code, f"{relative!r} escapes the task's working directory")
    return dest


def _fetch(url: str, dest: Path, storage: Storage | None) -> None:
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme == "file":
        with open(_local_blob(url, storage), "rb") as src:
            _write_atomic(src, dest)
    elif scheme in ("http", "https"):
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as response:
            _write_atomic(response, dest)
    elif storage is not None:
        _write_atomic(io.BytesIO(storage.download(storage.parse_url(url))), dest)
    else:
        raise TransferError("ResourceFileDownloadError",
                            f"unsupported URL scheme {scheme!r} in {safe_url(url)}")


def _local_blob(url: str, storage: Storage | None) -> Path:
    """The file a ``file://`` URL names. When it names a blob of the configured storage
    (a handler may build a blob's URL from its container's, as Batch does), the storage
    resolves it, so a symlink cannot lead outside its container."""
    path = file_url_path(url)
    if storage is None:
        return path
    try:
        ref = storage.parse_url(url)
    except MessageFault:
        return path  # not a blob of the storage: a file the task spec names itself
    try:
        return file_url_path(storage.input_url(ref))
    except MessageFault as exc:
        raise TransferError("ResourceFileDownloadError",
                            f"cannot stage {ref}: {exc.description}") from None


def file_url_path(url: str) -> Path:
    """The local path of a ``file://`` URL (``file:///abs/path``, percent-encoded)."""
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise TransferError("InvalidUrl", f"{safe_url(url)} names a remote host")
    return Path(os.fsdecode(urllib.parse.unquote_to_bytes(parts.path)))


def _write_atomic(src: BinaryIO, dest: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".fanout-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(src, out, _COPY_BUFFER)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# -- output files ----------------------------------------------------------------------


def should_upload(condition: str, success: bool) -> bool:
    """Batch's upload conditions: taskSuccess, taskFailure, taskCompletion."""
    return condition == "completion" or (condition == "success") == success


def upload(outputs: Sequence[OutputFile], *, success: bool, task_dir: Path, wd: Path,
           env: Mapping[str, str], storage: Storage | None = None) -> int:
    """Upload the outputs whose condition matches; return the number of files sent.

    Patterns are relative to the working directory (``../stdout.txt`` reaches the
    task directory, as on Batch) and may not leave the task directory.
    """
    sent = 0
    for out in outputs:
        if should_upload(out.upload_condition, success):
            for source, blob in matches(out, task_dir=task_dir, wd=wd, env=env):
                try:
                    _put(source, out.container_url, blob, storage)
                except TransferError:
                    raise
                except (OSError, urllib.error.URLError) as exc:
                    raise TransferError(
                        "FileUploadError",
                        f"cannot upload {source.name} to {safe_url(out.container_url)}: "
                        f"{_reason(exc)}") from None
                sent += 1
    return sent


def matches(out: OutputFile, *, task_dir: Path, wd: Path,
            env: Mapping[str, str]) -> Iterator[tuple[Path, str]]:
    """(file, blob name) pairs for one output: ``path`` names the blob of a plain
    pattern and prefixes each relative name of a wildcard pattern."""
    pattern = _ENV_REFERENCE.sub(lambda m: env.get(m[1] or m[2], m[0]), out.file_pattern)
    if os.path.isabs(pattern):
        raise TransferError("FileUploadError", f"output pattern {pattern!r} is not relative")
    top = task_dir.resolve()
    base = _literal_prefix(pattern)
    base_dir = (wd / base).resolve() if base else wd.resolve()
    if not base_dir.is_relative_to(top):
        raise TransferError("FileUploadError",
                            f"output pattern {pattern!r} leaves the task directory")
    if not _WILDCARDS.search(pattern):
        source = wd / pattern
        if source.is_file():
            yield source, out.path or source.name
        return
    for name in sorted(glob.glob(pattern, root_dir=wd, recursive=True)):
        source = wd / name
        if source.is_file() and source.resolve().is_relative_to(top):
            relative = Path(os.path.relpath(source, wd / base)).as_posix()
            yield source, f"{out.path.rstrip('/')}/{relative}" if out.path else relative


def _literal_prefix(pattern: str) -> str:
    """The leading directories of a pattern that hold no wildcard."""
    parts = pattern.split("/")
    literal = []
    for part in parts[:-1]:
        if _WILDCARDS.search(part):
            break
        literal.append(part)
    return "/".join(literal)


def _put(source: Path, container_url: str, blob: str, storage: Storage | None) -> None:
    parts = urllib.parse.urlsplit(container_url)
    scheme = parts.scheme.lower()
    if scheme == "file":
        root = file_url_path(container_url).resolve()
        dest = root / blob
        if ".." in Path(blob).parts or os.path.isabs(blob):
            raise TransferError("FileUploadError", f"blob name {blob!r} escapes the container")
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(source, "rb") as src:
            _write_atomic(src, dest)
    elif scheme in ("http", "https"):
        path = parts.path.rstrip("/") + "/" + urllib.parse.quote(blob)
        url = urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))
        with open(source, "rb") as body:
            request = urllib.request.Request(url, data=body, method="PUT", headers={
                "x-ms-blob-type": "BlockBlob",
                "Content-Length": str(source.stat().st_size),
                "Content-Type": "application/octet-stream",
            })
            with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT):
                pass
    elif storage is not None:
        ref = storage.parse_url(f"{container_url.rstrip('/')}/{blob}")
        storage.upload(ref, source.read_bytes())
    else:
        raise TransferError("FileUploadError",
                            f"unsupported URL scheme {scheme!r} in {safe_url(container_url)}")


def _reason(exc: BaseException) -> str:
    """A short reason that never repeats a URL (urllib errors may carry one)."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason) if not isinstance(exc.reason, str) else exc.reason
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return type(exc).__name__
