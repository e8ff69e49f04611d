"""The Storage protocol: where task inputs come from and outputs go.

Implementations: ``local.py`` (a directory laid out as ``<root>/<container>/<blob>``,
the embedded default) and ``azure.py`` (Azure Blob storage with SAS URLs).

The URL methods take ``lifetime``: how long from now the URL must stay usable (on
Azure, the SAS's lifetime). The worker passes each job's own, computed from the
limits (``worker.context.sas_lifetime``); None means the storage's longest.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Protocol

from handlers.base import BlobRef


class Storage(Protocol):
    """Resolves blob references into URLs a task can read or write."""

    def parse_url(self, url: str) -> BlobRef:
        """Turn a blob URL into a reference; raise ``ForeignStorage`` when the URL
        belongs to no configured account, and ``InvalidParams`` for a bad name."""
        ...

    def input_url(self, ref: BlobRef, *, lifetime: timedelta | None = None) -> str:
        """A task-readable URL for one blob (read-only, valid ``lifetime`` from now)."""
        ...

    def output_container_url(self, container: str, prefix: str, *,
                             lifetime: timedelta | None = None) -> str:
        """A task-writable destination for blobs under ``prefix`` in ``container``
        (valid ``lifetime`` from now)."""
        ...

    def input_container_url(self, container: str, prefix: str, *,
                            lifetime: timedelta | None = None) -> str:
        """A task-readable, listable container URL for staging the blobs under
        ``prefix`` (read+list, valid ``lifetime`` from now; Batch's
        ``storageContainerUrl``)."""
        ...

    def upload(self, ref: BlobRef, data: bytes) -> None:
        """Write a blob (for ``fanout`` tooling and tests)."""
        ...

    def download(self, ref: BlobRef) -> bytes:
        """Read a blob (for ``fanout`` tooling and tests)."""
        ...

    def read_tail(self, ref: BlobRef, max_bytes: int) -> bytes | None:
        """The last ``max_bytes`` of a blob (all of it when smaller), read with a range
        read, never the whole blob; None when there is no such blob."""
        ...
