"""The local executor: the embedded default backend that runs tasks as processes.

``store.py`` keeps jobs and tasks in SQLite, ``executor.py`` schedules them,
``runner.py`` runs one attempt, ``transfer.py`` moves resource and output files and
``process.py`` handles process groups.
"""

from __future__ import annotations

from worker.backends.local.executor import LocalBackend
from worker.backends.local.store import TaskInfo

__all__ = ["LocalBackend", "TaskInfo"]
