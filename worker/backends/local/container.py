"""Container tasks on the local executor: Docker or Podman, whichever answers.

A task with container settings runs the way Azure Batch runs a container task
("Run container applications on Azure Batch", learn.microsoft.com; the task's
``containerSettings`` in the REST spec BatchService.json, api-version 2025-06-01):

- the container is created from ``imageName`` with the engine's ``run`` (Batch uses
  ``docker create``), ``containerRunOptions`` split into words (``shlex``, never a
  shell) and passed after fanout's own options, so the operator's win;
- the task's directory and the node's shared directory are mounted at the same paths
  ("All directories recursively below the AZ_BATCH_NODE_ROOT_DIR ... are mapped into
  the container"; locally only these two, not the executor's database or blobs);
- with ``workingDirectory`` ``taskWorkingDirectory`` (the default) the task's working
  directory is the container's (``-w``); with ``containerImageDefault`` the image's
  WORKDIR is;
- "All task environment variables are mapped into the container": the task's own and
  the ``AZ_BATCH_*`` ones, passed by name (``--env NAME``, values from the engine's
  environment, so none shows in a process list); the host's PATH and HOME are not;
- the command line, split into words as for any task, replaces the image's
  ENTRYPOINT (``--entrypoint`` the first word, the rest as arguments); an empty command
  line runs the image's own ENTRYPOINT and CMD, as Batch documents;
- the container runs as this user (``--user uid:gid``; rootless Podman keeps the id
  with ``--userns=keep-id``), so files it writes in the task directory stay this user's.
- it is named after the executor's home and the task (``fanout-<digest>-<seq>``), so a
  task stopped or timed out, or found running by a scheduler started after a crash,
  has its container removed by name (``rm --force``) before it runs again.

The engine is found once (``docker info``, then ``podman info``; ``[local]
container_engine`` picks one or ``none``) and the answer kept. Without one, container
tasks are refused when they are added (``ContainerUnavailable``, naming the image),
never run on the host. Registry credentials are the engine's own (``docker login``):
the local executor does not log in with a configured registry's password.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from handlers.base import ContainerSettings

log = structlog.get_logger(__name__)

#: The engines tried by ``auto``, in order.
ENGINES = ("docker", "podman")
#: Seconds ``<engine> info`` may take to answer.
DETECT_TIMEOUT = 20.0
#: Seconds a clean-up ``<engine> rm -f`` may take.
CLEANUP_TIMEOUT = 30.0
#: The exit code Docker and Podman give when the engine itself failed (a pull, a bad
#: option), not the command in the container.
ENGINE_ERROR_EXIT = 125
#: The failure code of a container task with no engine to run it.
CONTAINER_UNAVAILABLE = "ContainerUnavailable"


@dataclass(frozen=True, slots=True)
class Engine:
    """A container engine that answered: its name and its executable."""

    name: str
    path: str


class ContainerRuntime:
    """Finds the container engine once, on first use, and keeps the answer.

    ``setting``: ``auto`` (docker, else podman), ``docker``, ``podman`` or ``none``.
    ``which`` and ``run`` are ``shutil.which`` and ``subprocess.run`` (tests replace
    them)."""

    def __init__(self, setting: str = "auto", *,
                 which: Callable[[str], str | None] = shutil.which,
                 run: Callable[..., subprocess.CompletedProcess[Any]] = subprocess.run
                 ) -> None:
        if setting not in ("auto", "none", *ENGINES):
            raise ValueError(f"container engine {setting!r} is not auto, docker, podman "
                             "or none")
        self.setting = setting
        self._which = which
        self._run = run
        self._lock = threading.Lock()
        self._detected = False
        self._engine: Engine | None = None
        self._why = ""

    def engine(self) -> Engine | None:
        """The engine that answers, or None (see :meth:`why_not`); found once."""
        with self._lock:
            if not self._detected:
                self._engine, self._why = self._detect()
                self._detected = True
                if self._engine is not None:
                    log.info("executor.container_engine", engine=self._engine.name,
                             path=self._engine.path)
                else:
                    log.info("executor.container_engine", engine=None, why=self._why)
            return self._engine

    def why_not(self) -> str:
        """Why there is no engine (after :meth:`engine` returned None)."""
        self.engine()
        return self._why

    def refusal(self, image: str) -> str:
        """The error for a task in ``image`` when no engine runs it."""
        return (f"the task runs in container image {image}, but the local executor has no "
                f"container engine: {self.why_not()}; start Docker or Podman (or set "
                "[local] container_engine), or use a program without container_image")

    def _detect(self) -> tuple[Engine | None, str]:
        if self.setting == "none":
            return None, 'container tasks are off ([local] container_engine = "none")'
        reasons = []
        for name in ENGINES if self.setting == "auto" else (self.setting,):
            path = self._which(name)
            if path is None:
                reasons.append(f"{name} is not on PATH")
                continue
            try:
                done = self._run([path, "info"], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 timeout=DETECT_TIMEOUT, check=False)
            except subprocess.TimeoutExpired:
                reasons.append(f"`{name} info` did not answer in {DETECT_TIMEOUT:g} s")
                continue
            except OSError as exc:
                reasons.append(f"`{name} info` could not start: {exc.strerror or exc}")
                continue
            if done.returncode == 0:
                return Engine(name=name, path=path), ""
            err = (done.stderr or b"").decode("utf-8", "replace").strip().splitlines()
            detail = f": {err[-1][:200]}" if err else ""
            reasons.append(f"`{name} info` exited {done.returncode}{detail}")
        return None, "; ".join(reasons)


def container_name(home: Path, seq: int) -> str:
    """The container name (``--name``) of task ``seq`` of the executor at ``home``: the
    same for every attempt, so the clean-up of a stopped task, and the recovery after
    a scheduler that died, can remove it by name (an attempt's container is removed
    before the next one starts)."""
    digest = hashlib.sha256(str(home).encode()).hexdigest()[:12]
    return f"fanout-{digest}-{seq}"


def run_argv(engine: Engine, settings: ContainerSettings, argv: Sequence[str], *,
             name: str, mounts: Sequence[Path], workdir: Path, env_names: Sequence[str],
             labels: Mapping[str, str], uid: int | None = None,
             gid: int | None = None) -> list[str]:
    """The engine command that runs ``argv`` in ``settings.image`` (see the module
    docstring); ``mounts`` are bound at their own paths."""
    uid = os.getuid() if uid is None else uid
    gid = os.getgid() if gid is None else gid
    out = [engine.path, "run", "--rm", "--name", name]
    if engine.name == "podman" and uid != 0:
        out.append("--userns=keep-id")  # rootless: the container's uid is this user's
    else:
        out += ["--user", f"{uid}:{gid}"]
    for mount in mounts:
        out += ["--volume", f"{mount}:{mount}"]
    if settings.working_directory == "taskWorkingDirectory":
        out += ["--workdir", str(workdir)]
    for key in env_names:
        out += ["--env", key]
    for key, value in labels.items():
        out += ["--label", f"{key}={value}"]
    if argv:
        out += ["--entrypoint", argv[0]]
    if settings.run_options:
        out += shlex.split(settings.run_options)
    out.append(settings.image)
    out += argv[1:]
    return out


def remove(engine: Engine, name: str) -> None:
    """Remove the container ``name`` if it still exists (a task stopped or killed: the
    engine's client is gone, but the container may still run); never raises."""
    try:
        subprocess.run([engine.path, "rm", "--force", name], stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=CLEANUP_TIMEOUT, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("task.container_cleanup_failed", container=name, error=str(exc))
