"""Local blob storage: a directory laid out as ``<root>/<container>/<blob>``.

The embedded default (``root`` is ``<FANOUT_HOME>/blobs``). Blob names use ``/`` as
the directory separator, so ``videos/2026/11/a.mp4`` is the file
``<root>/videos/2026/11/a.mp4``. Task URLs are ``file://`` URLs of absolute paths,
percent-encoded (``my clip.mp4`` is ``my%20clip.mp4``); the local executor reads
inputs from them and writes outputs to ``<container dir>/<OutputFile.path>``.

Every path is resolved and must stay inside its container's directory under the
root, so neither a ``..`` name nor a symlink can reach outside. (A symlink swapped
in between the check and the use is not defended against: the root is the
operator's own directory.)
"""

from __future__ import annotations

import os
import tempfile
from datetime import timedelta
from pathlib import Path
from urllib.parse import quote_from_bytes, unquote_to_bytes, urlsplit

import structlog

from handlers.base import BlobRef
from handlers.errors import ForeignStorage, InvalidParams
from worker.storage.refs import (
    check_blob_name,
    check_container,
    check_prefix,
    decode_path,
    make_ref,
    redact_url,
    ref_from_path,
    split_url,
)

__all__ = ["LocalStorage", "file_url", "file_url_path", "safe_join"]

log = structlog.get_logger(__name__)

#: Where uploads are written before they are renamed into place. Container names
#: cannot start with a dot, so this never collides with a container.
STAGING = ".staging"


def file_url(path: Path) -> str:
    """The ``file://`` URL of an absolute path, every unsafe byte percent-encoded."""
    return "file://" + quote_from_bytes(os.fsencode(path), safe="/")


def file_url_path(url: str) -> Path:
    """The local path a ``file://`` URL names (the inverse of :func:`file_url`).

    Raises ``ValueError`` for a URL that is not a local ``file://`` URL.
    """
    parts = urlsplit(url)
    if parts.scheme != "file" or parts.netloc not in ("", "localhost") or parts.query:
        raise ValueError(f"not a local file URL: {redact_url(url)}")
    return Path(os.fsdecode(unquote_to_bytes(parts.path)))


def safe_join(directory: Path, name: str) -> Path:
    """``directory / name`` for a checked blob name, refusing anything that resolves
    outside ``directory`` (for the executor writing output files)."""
    check_blob_name(name)
    base = directory.resolve()
    target = (base / name).resolve()
    if not target.is_relative_to(base):
        raise ForeignStorage(f"{name!r} resolves outside {base} (a symlink?)")
    return target


class LocalStorage:
    """Blob storage in a local directory; implements ``worker.storage.base.Storage``."""

    def __init__(self, *, root: Path) -> None:
        self.root = root.expanduser().absolute()
        self._real_root = self.root.resolve()
        self._roots = {str(self.root), str(self._real_root)}

    def __repr__(self) -> str:
        return f"LocalStorage(root={str(self.root)!r})"

    @property
    def account_url(self) -> str:
        """The ``file://`` URL of the root: blob URLs this storage accepts start with it."""
        return file_url(self._real_root)

    def container_dir(self, container: str) -> Path:
        """The directory of a container (checked name; not created)."""
        path = self._real_root / check_container(container)
        if path.exists() and path.resolve() != path:
            raise ForeignStorage(f"container {container} is a symlink; refused")
        return path

    def path(self, ref: BlobRef) -> Path:
        """The resolved file of a blob; ``ForeignStorage`` if it escapes its container."""
        ref = make_ref(ref.container, ref.blob)
        base = self.container_dir(ref.container)
        target = (base / ref.blob).resolve()
        if not target.is_relative_to(base):
            raise ForeignStorage(f"blob {ref} resolves outside {base} (a symlink?); refused")
        return target

    def parse_url(self, url: str) -> BlobRef:
        """Parse ``file://<root>/<container>/<blob>``; anything else is ``ForeignStorage``."""
        parts = split_url(url)
        if parts.scheme.lower() != "file" or parts.netloc.lower() not in ("", "localhost"):
            where = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"[:120]
            raise ForeignStorage(
                f"blob URL {where} is not the local blob store (accepted: {self.account_url}/...)"
            )
        path = decode_path(parts)
        for root in self._roots:
            if path.startswith(root + "/"):
                return ref_from_path(path[len(root) + 1 :], url=url)
        raise ForeignStorage(
            f"file URL {redact_url(url)} is outside the local blob root {self._real_root}"
        )

    def input_url(self, ref: BlobRef, *, lifetime: timedelta | None = None) -> str:
        """The ``file://`` URL of the blob's file (the executor copies from it). A
        file URL never expires, so ``lifetime`` changes nothing."""
        return file_url(self.path(ref))

    def output_container_url(self, container: str, prefix: str, *,
                             lifetime: timedelta | None = None) -> str:
        """The ``file://`` URL of the container's directory; ``OutputFile.path`` carries
        the prefix and blob name, and the executor writes ``<dir>/<path>``."""
        check_prefix(prefix)
        return file_url(self.container_dir(container))

    def input_container_url(self, container: str, prefix: str, *,
                            lifetime: timedelta | None = None) -> str:
        """The ``file://`` URL of the container's directory; the executor copies the
        files under ``prefix`` from it (``ResourceFile.storage_container_url``)."""
        check_prefix(prefix)
        return file_url(self.container_dir(container))

    def ensure_container(self, container: str) -> None:
        """Create a container's directory if it is missing."""
        self.container_dir(container).mkdir(parents=True, exist_ok=True)

    def upload(self, ref: BlobRef, data: bytes) -> None:
        """Write a blob atomically: readers (and the watcher) never see half a file."""
        target = self.path(ref)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = self._real_root / STAGING
        staging.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=staging, prefix="upload-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        log.debug("blob_uploaded", blob=str(ref), bytes=len(data))

    def download(self, ref: BlobRef) -> bytes:
        """Read a blob; ``FileNotFoundError`` if there is none."""
        target = self.path(ref)
        if not target.is_file():
            raise FileNotFoundError(f"blob {ref} does not exist")
        return target.read_bytes()

    def read_tail(self, ref: BlobRef, max_bytes: int) -> bytes | None:
        """The last ``max_bytes`` of a blob's file (a seek from its end); None if absent."""
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be 0 or more, not {max_bytes}")
        try:
            with self.path(ref).open("rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                handle.seek(max(0, size - max_bytes))
                return handle.read(max_bytes)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def exists(self, ref: BlobRef) -> bool:
        """True when the blob's file exists."""
        return self.path(ref).is_file()

    def list(self, container: str, prefix: str = "") -> list[BlobRef]:
        """The blobs in ``container`` whose names start with ``prefix``, sorted by name."""
        check_prefix(prefix)
        base = self.container_dir(container)
        if not base.is_dir():
            return []
        found = []
        for dirpath, _dirs, files in os.walk(base):
            for filename in files:
                name = Path(dirpath, filename).relative_to(base).as_posix()
                if name.startswith(prefix) and self._listable(container, name):
                    found.append(BlobRef(container=container, blob=name))
        return sorted(found, key=lambda ref: ref.blob)

    def _listable(self, container: str, name: str) -> bool:
        """True for a file whose name is a valid blob name and that stays inside root."""
        try:
            return self.path(BlobRef(container=container, blob=name)).is_file()
        except (InvalidParams, ForeignStorage):
            log.debug("blob_skipped", container=container, name=name)
            return False
