"""Azure Batch: the ``Backend`` protocol through azure-batch's ``BatchClient``.

- ``backend.py``: :class:`AzureBatchBackend` (job lifecycle, bulk adds, stats);
- ``rest.py``: the client (retries off, pooled connections) and error classification;
- ``wire.py``: request bodies and answers as plain JSON.
"""

from __future__ import annotations

from worker.backends.azure.backend import AzureBatchBackend, make_credential

__all__ = ["AzureBatchBackend", "make_credential"]
