"""What the transcode and render handlers share: output locations, safe local file
names, operator-configured command words and shell-quoted command lines.

Blob names come from messages and may hold spaces, quotes, ``;``, ``$`` and unicode.
They never become local paths: a task stages its input under a fixed name such as
``input.mp4`` (only a short alphanumeric extension is kept) and writes fixed names
such as ``out.mp4``. Blob names appear only in resource and output file specs (as
URLs and destination names) and, where a command shows one, as one shell-quoted
word.
"""

from __future__ import annotations

import re
import shlex
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from handlers.base import BuildContext
from handlers.commands import quote
from handlers.errors import InvalidParams, describe_validation

__all__ = [
    "Destination",
    "OutputParams",
    "blob_stem",
    "check_output_name",
    "command_words",
    "join_blob",
    "load_options",
    "resolve_output",
    "safe_extension",
    "shell_join",
]

MAX_BLOB_NAME = 1024
_EXTENSION = re.compile(r"^\.[a-z0-9]{1,10}$")


class OutputParams(BaseModel):
    """``output``: where a job's files go. ``container`` defaults to the handler's
    ``output_container`` option; ``prefix`` is a folder (``""`` for the top)."""

    model_config = ConfigDict(extra="forbid")

    container: str | None = None
    prefix: str | None = None


@dataclass(frozen=True, slots=True)
class Destination:
    """A checked output location: a task-writable container URL and a folder prefix."""

    container: str
    prefix: str
    container_url: str

    def blob(self, *parts: str) -> str:
        """The blob name ``<prefix>/<part>/...``, checked to be a valid blob name."""
        return check_output_name(join_blob(self.prefix, *parts))


def load_options(model: type[Any], options: Mapping[str, Any], handler: str) -> Any:
    """Validate the operator's ``[handlers.<handler>]`` table with ``model``.

    A bad table is the operator's mistake, not the message's, so this raises
    ``ValueError`` (the message is retried, not dead-lettered) naming the key.
    """
    try:
        return model.model_validate(dict(options))
    except ValidationError as exc:
        raise ValueError(f"configuration [handlers.{handler}]: "
                         f"{describe_validation(exc)}") from None


def resolve_output(ctx: BuildContext, output: OutputParams | None, *, handler: str,
                   default_container: str | None, default_prefix: str = "") -> Destination:
    """The message's output location, or the handler's configured default."""
    out = output or OutputParams()
    container = out.container or default_container
    if not container:
        raise InvalidParams(f"output.container is required: the {handler} handler has no "
                            f"default (handlers.{handler}.output_container)")
    raw = default_prefix if out.prefix is None else out.prefix
    prefix = raw.strip("/")
    if prefix:
        check_output_name(prefix, what="output.prefix")
    url = ctx.output_container_url(container, prefix + "/" if prefix else "")
    return Destination(container=container, prefix=prefix, container_url=url)


def join_blob(*parts: str) -> str:
    """Join blob-name parts with ``/``, skipping empty ones."""
    return "/".join(p for p in parts if p)


def check_output_name(name: str, *, what: str = "output blob name") -> str:
    """Return ``name`` if it is a valid blob name to write, else raise ``InvalidParams``.

    Spaces, quotes, ``;`` and unicode are fine; empty, ``.`` and ``..`` segments, a
    trailing dot or slash, backslashes, control characters and names over 1024
    characters are not.
    """
    shown = name if len(name) <= 80 else name[:77] + "..."
    if not name or len(name) > MAX_BLOB_NAME:
        raise InvalidParams(f"{what} {shown!r} is empty or over {MAX_BLOB_NAME} characters")
    if any(segment in ("", ".", "..") for segment in name.split("/")):
        raise InvalidParams(f"{what} {shown!r} has an empty, '.' or '..' segment")
    if name.endswith(".") or "\\" in name:
        raise InvalidParams(f"{what} {shown!r} ends with '.' or holds a backslash")
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in name):
        raise InvalidParams(f"{what} {shown!r} holds a control character")
    return name


def safe_extension(blob: str) -> str:
    """The blob's extension, lowercased, if it is short and alphanumeric; else ``""``.

    ``clip.MP4`` gives ``.mp4``; ``x.m$4`` and ``.bashrc`` give ``""``.
    """
    suffix = PurePosixPath(blob).suffix.lower()
    return suffix if _EXTENSION.match(suffix) else ""


def blob_stem(blob: str) -> str:
    """The blob name without its extension, folders kept: ``2026/a b.mp4`` -> ``2026/a b``.

    Only an extension :func:`safe_extension` would keep is removed, so the stem of
    ``x.m$4`` is ``x.m$4``.
    """
    ext = safe_extension(blob)
    stem = blob[: -len(ext)] if ext else blob
    return stem if stem and not stem.endswith("/") else blob


def command_words(command: str, *, what: str) -> list[str]:
    """Split an operator-configured command (``ffmpeg``, ``nice -n 10 ffmpeg``) into
    words; raise ``ValueError`` naming the option if it is empty or unbalanced."""
    try:
        words = shlex.split(command)
    except ValueError as exc:
        raise ValueError(f"configuration {what} = {command!r}: {exc}") from None
    if not words:
        raise ValueError(f"configuration {what} is empty")
    return words


def shell_join(words: Iterable[object]) -> str:
    """One shell command from words, each shell-quoted: no word can split or expand."""
    return " ".join(quote(word) for word in words)
