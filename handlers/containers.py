"""Container fields for operator configuration: programs, render profiles, transcode.

``[programs.<name>]``, a ``[handlers.render.profiles.<name>]`` table and
``[handlers.transcode]`` may each name the image their tasks run in::

    container_image = "myacr.azurecr.io/ffmpeg:7"
    container_registry = "acr"                  # a [registries.<name>] table
    container_run_options = "--shm-size 1g"     # more `docker create` arguments
    container_working_directory = "taskWorkingDirectory"   # or containerImageDefault

They map to Batch's task ``containerSettings`` (``imageName``, ``registry``,
``containerRunOptions``, ``workingDirectory``: ``BatchTaskContainerSettings`` in the
REST spec BatchService.json, api-version 2025-06-01). Every ``container_registry`` key
anywhere in a ``[handlers.*]`` table must name a configured registry: the worker checks
that at start-up, so a handler may rely on it.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping

from pydantic import BaseModel, field_validator, model_validator

from handlers.base import (
    BuildContext,
    ContainerRegistry,
    ContainerSettings,
    ContainerWorkingDirectory,
    check_image,
)
from handlers.errors import InvalidParams

#: A ``[registries.<name>]`` table's name.
REGISTRY_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class ContainerFields(BaseModel):
    """The ``container_*`` keys of a program, profile or handler options table."""

    container_image: str | None = None
    container_registry: str | None = None
    container_run_options: str | None = None
    container_working_directory: ContainerWorkingDirectory = "taskWorkingDirectory"

    @field_validator("container_image")
    @classmethod
    def _image(cls, value: str | None) -> str | None:
        return None if value is None else check_image(value)

    @field_validator("container_registry")
    @classmethod
    def _registry_name(cls, value: str | None) -> str | None:
        if value is not None and not REGISTRY_NAME.match(value):
            raise ValueError(f"{value[:80]!r} is not a registry name (1-64 letters, digits, "
                             "hyphens, underscores)")
        return value

    @field_validator("container_run_options")
    @classmethod
    def _run_options(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                shlex.split(value)
            except ValueError as exc:
                raise ValueError(f"does not parse as words: {exc}") from None
        return value

    @model_validator(mode="after")
    def _needs_image(self) -> ContainerFields:
        if self.container_image is None:
            given = [name for name, value in (
                ("container_registry", self.container_registry),
                ("container_run_options", self.container_run_options),
                ("container_working_directory",
                 None if self.container_working_directory == "taskWorkingDirectory"
                 else self.container_working_directory)) if value is not None]
            if given:
                raise ValueError(f"{given[0]} needs container_image")
        return self

    def needs_task_working_directory(self, what: str) -> None:
        """``ValueError`` for ``containerImageDefault`` where the commands read their
        staged files by relative paths: Batch stages resource files in the task's
        working directory, and "Beware that this directory will not contain the
        Resource Files downloaded by Batch" (ContainerWorkingDirectory,
        BatchService.json) of the image's own."""
        if self.container_working_directory == "containerImageDefault":
            raise ValueError(f"{what} reads its staged inputs from the task working "
                             "directory: container_working_directory must be "
                             "taskWorkingDirectory (the image's WORKDIR holds none of them)")

    def container_settings(self, ctx: BuildContext) -> ContainerSettings | None:
        """The settings these fields name (the registry resolved by ``ctx``), or None."""
        if self.container_image is None:
            return None
        return ctx.container(self.container_image, registry=self.container_registry,
                             run_options=self.container_run_options,
                             working_directory=self.container_working_directory)


def find_registry(registries: Mapping[str, ContainerRegistry], name: str) -> ContainerRegistry:
    """The configured registry ``name``; ``InvalidParams`` listing the configured ones."""
    try:
        return registries[name]
    except (KeyError, TypeError):
        known = ", ".join(sorted(registries)) or "none"
        raise InvalidParams(f"no container registry named {str(name)[:64]!r} is "
                            f"configured ([registries]: {known})") from None


def make_container(registries: Mapping[str, ContainerRegistry], image: str, *,
                   registry: str | None = None, run_options: str | None = None,
                   working_directory: ContainerWorkingDirectory = "taskWorkingDirectory"
                   ) -> ContainerSettings:
    """``BuildContext.container``: the settings, with ``InvalidParams`` for a bad one."""
    found = find_registry(registries, registry) if registry is not None else None
    try:
        return ContainerSettings(image=image, registry=found, run_options=run_options,
                                 working_directory=working_directory)
    except ValueError as exc:
        raise InvalidParams(f"container: {exc}") from None
