"""A fanout handler: one checksum task per input blob."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from handlers.base import BuildContext, BuildRequest, JobSpec, OutputFile, ResourceFile, TaskSpec
from handlers.commands import sh
from handlers.errors import BudgetExceeded, InvalidParams

TOOLS = {"sha256": "sha256sum", "sha1": "sha1sum", "md5": "md5sum"}


class ChecksumHandler:
    """Params: {"inputs": [blob refs], "retries": 2}. Options ([handlers.checksum]):
    "algorithm" (sha256, sha1, md5) and "container" (where the sums go)."""

    def check_options(self, options: Mapping[str, Any]) -> None:
        unknown = sorted(set(options) - {"algorithm", "container"})
        if unknown:
            raise ValueError(f"[handlers.checksum]: unknown option {', '.join(unknown)}")
        algorithm = options.get("algorithm", "sha256")
        if not isinstance(algorithm, str) or algorithm not in TOOLS:
            raise ValueError(f"[handlers.checksum] algorithm: one of {', '.join(TOOLS)}")
        if not isinstance(options.get("container", ""), str):
            raise ValueError("[handlers.checksum] container: a container name")

    def build(self, request: BuildRequest, ctx: BuildContext) -> JobSpec:
        options = ctx.options(request.handler)
        algorithm = options.get("algorithm", "sha256")  # checked at start-up
        inputs = request.params.get("inputs")
        if not isinstance(inputs, list) or not inputs:
            raise InvalidParams("inputs: give a list of blob references")
        if len(inputs) > ctx.max_tasks:
            raise BudgetExceeded(f"{len(inputs)} inputs; the limit is {ctx.max_tasks}")
        retries = request.params.get("retries")
        if retries is not None and (type(retries) is not int or retries < 0):
            raise InvalidParams("retries: give a whole number, 0 or more")
        ctx.check_task_limits(max_task_retries=retries)  # the operator's [limits]
        refs = [ctx.blob_ref(value) for value in inputs]  # ForeignStorage, bad names
        out = ctx.output_container_url(options.get("container", "checksums"), "")
        tasks = (
            TaskSpec(
                id=str(i),  # integer ids let a later task depend on a range
                command_line=sh(f"{TOOLS[algorithm]} input > sum.txt"),  # fixed local names only
                resource_files=[ResourceFile(http_url=ctx.input_url(ref), file_path="input")],
                output_files=[OutputFile(file_pattern="sum.txt", container_url=out,
                                         path=f"{ref.blob}.{algorithm}")],
                max_task_retries=retries,
            )
            for i, ref in enumerate(refs)
        )
        return JobSpec(tasks=tasks, task_count=len(refs))
