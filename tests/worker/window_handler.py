"""A tiny blob handler for the window-job tests: ``tasks`` cheap tasks per blob, each
depending on the one before, and optionally a fan-in over an id range; a blob whose
name ends with ``fail`` makes its first task exit 1.

Also usable by a real ``fanout run`` process: :func:`install_entry_point` writes a
``.dist-info`` with a ``fanout.handlers`` entry point into a directory put on
``PYTHONPATH``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from handlers.base import BuildContext, BuildRequest, JobSpec, TaskSpec


class BlobTask:
    """``{"input": {container, blob}, "tasks": 1, "fanin": false}``."""

    def build(self, request: BuildRequest, ctx: BuildContext) -> JobSpec:
        params: dict[str, Any] = dict(request.params)
        ref = ctx.blob_ref(params["input"])
        count = int(params.get("tasks", 1))
        fanin = bool(params.get("fanin", False))
        fails = ref.blob.endswith("fail")

        def tasks() -> Iterator[TaskSpec]:
            for i in range(count):
                code = 1 if fails and i == 0 else 0
                yield TaskSpec(id=str(i), command_line=f"/bin/sh -c 'exit {code}'",
                               depends_on=(str(i - 1),) if i else (),
                               environment={"BLOB": ref.blob})
            if fanin:
                yield TaskSpec(id="fanin", command_line="/bin/sh -c 'exit 0'",
                               depends_on_ranges=((0, count - 1),))

        return JobSpec(tasks=tasks(), task_count=count + (1 if fanin else 0),
                       uses_task_dependencies=count > 1 or fanin)


def install_entry_point(site: Path) -> Path:
    """A distribution ``fanout-window-tests`` registering ``blobtask`` under ``site``."""
    info = site / "fanout_window_tests-0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fanout-window-tests\n"
                                   "Version: 0\n")
    (info / "entry_points.txt").write_text(
        "[fanout.handlers]\nblobtask = tests.worker.window_handler:BlobTask\n")
    return site
