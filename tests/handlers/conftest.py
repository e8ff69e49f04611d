"""A minimal BuildContext for handler tests (no worker needed)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

from handlers.base import BlobRef, Program
from handlers.errors import InvalidParams, UnknownProgram


@dataclass
class StubContext:
    """Implements handlers.base.BuildContext over plain dicts."""

    programs: dict[str, Program] = field(default_factory=dict)
    max_tasks: int = 100_000
    allow_message_commands: bool = False
    job_id: str = "job-1"
    handler_options: dict[str, Mapping[str, Any]] = field(default_factory=dict)

    def program(self, name: str) -> Program:
        if name not in self.programs:
            raise UnknownProgram(f"no program {name!r}")
        return self.programs[name]

    def options(self, handler: str) -> Mapping[str, Any]:
        return self.handler_options.get(handler, {})

    def blob_ref(self, value: object) -> BlobRef:
        if isinstance(value, dict):
            return BlobRef(value["container"], value["blob"])
        raise InvalidParams("stub takes dicts only")

    def input_url(self, ref: BlobRef) -> str:
        return f"file:///blobs/{ref.container}/{ref.blob}"

    def output_container_url(self, container: str, prefix: str) -> str:
        return f"file:///blobs/{container}"

    def input_container_url(self, container: str, prefix: str) -> str:
        return f"file:///blobs/{container}"


@pytest.fixture
def stub_ctx() -> StubContext:
    """A context with one program, `simulate`, taking alpha and beta."""
    return StubContext(programs={
        "simulate": Program(name="simulate",
                            command="python3 sim.py --alpha {alpha} --beta {beta}"),
        "reduce": Program(name="reduce", command="python3 reduce.py --n {task_count}"),
    })
