"""A small Dockerfile reader and the checks fanout's image must pass.

Parses instructions (with line continuations, comments and JSON exec form) into
stages; ``problems`` returns what is wrong with a Dockerfile's text, so the tests can
show it is empty for deploy/Dockerfile and non-empty for broken copies of it.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

SECRET_WORDS = ("KEY", "SECRET", "PASSWORD", "TOKEN", "CONNECTION_STRING", "SAS", "CREDENTIAL")


@dataclass
class Instruction:
    """One instruction: its keyword, flags (``--from=build``) and argument text."""

    keyword: str
    flags: dict[str, str]
    args: str

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form instruction, or None for shell form."""
        text = self.args.strip()
        if not text.startswith("["):
            return None
        value = json.loads(text)
        assert isinstance(value, list)
        return [str(v) for v in value]


@dataclass
class Stage:
    """A ``FROM`` and the instructions under it."""

    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None


def logical_lines(text: str) -> list[str]:
    """Join continuation lines and drop comments, as Docker's parser does."""
    lines: list[str] = []
    current = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not current):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        if current.strip():
            lines.append(current.strip())
        current = ""
    if current.strip():
        lines.append(current.strip())
    return lines


def parse(text: str) -> tuple[list[Instruction], list[Stage]]:
    """The global ARGs before the first FROM, and the stages."""
    preamble: list[Instruction] = []
    stages: list[Stage] = []
    for line in logical_lines(text):
        keyword, _, rest = line.partition(" ")
        flags: dict[str, str] = {}
        rest = rest.strip()
        while rest.startswith("--"):
            flag, _, rest = rest.partition(" ")
            name, _, value = flag[2:].partition("=")
            flags[name] = value
            rest = rest.strip()
        ins = Instruction(keyword.upper(), flags, rest)
        if ins.keyword == "FROM":
            parts = rest.split()
            alias = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(base=parts[0], name=alias))
        elif stages:
            stages[-1].instructions.append(ins)
        else:
            preamble.append(ins)
    return preamble, stages


def env_names(ins: Instruction) -> list[str]:
    """Variable names an ENV or ARG instruction sets."""
    names = []
    for token in shlex.split(ins.args):
        names.append(token.split("=", 1)[0])
    if ins.keyword == "ENV" and "=" not in ins.args.split()[0]:
        names = [ins.args.split()[0]]  # legacy `ENV NAME value`
    return names


def problems(text: str) -> list[str]:
    """Everything that breaks fanout's image rules; empty when the Dockerfile is right."""
    found: list[str] = []
    preamble, stages = parse(text)
    if len(stages) < 2:
        return ["not multi-stage: a build stage and a runtime stage are expected"]
    final, builders = stages[-1], stages[:-1]
    if "slim" not in final.base and "distroless" not in final.base:
        found.append(f"final base {final.base} is not a slim image")
    if ":latest" in final.base or ":" not in final.base:
        found.append(f"final base {final.base} has no pinned tag")
    found += _user_problems(final)
    found += _install_problems(final, builders)
    found += _entrypoint_problems(final)
    found += _healthcheck_problems(final)
    for stage in [*builders, final]:
        for ins in stage.all("ENV") + stage.all("ARG"):
            for name in env_names(ins):
                if any(word in name.upper() for word in SECRET_WORDS):
                    found.append(f"{ins.keyword} {name} bakes a secret-like variable in")
    for ins in preamble:
        for name in env_names(ins):
            if any(word in name.upper() for word in SECRET_WORDS):
                found.append(f"ARG {name} bakes a secret-like variable in")
    return found


def _user_problems(final: Stage) -> list[str]:
    user = final.last("USER")
    if user is None:
        return ["the final stage runs as root (no USER)"]
    who = user.args.split(":")[0]
    if who in ("root", "0"):
        return [f"USER {user.args} is root"]
    return []


def _install_problems(final: Stage, builders: list[Stage]) -> list[str]:
    found = []
    for ins in final.all("COPY") + final.all("ADD"):
        source_stage = ins.flags.get("from")
        sources = ins.args.split()[:-1]
        if source_stage is None:
            found.append(f"final stage copies from the build context: {ins.args}")
        elif any(not s.endswith(".whl") and "wheels" not in s for s in sources):
            found.append(f"final stage copies more than wheels from {source_stage}: {ins.args}")
    installs = [i for i in final.all("RUN") if "pip install" in i.args]
    if not installs:
        found.append("final stage installs nothing with pip")
    for ins in installs:
        if ".whl" not in ins.args:
            found.append(f"final stage pip install is not of a wheel: {ins.args}")
        if "--no-index" not in ins.args:
            found.append("final stage pip install may reach an index (no --no-index)")
        if re.search(r"pip install[^&;]*\s(\.|/src)(\s|$)", ins.args):
            found.append("final stage installs the source tree")
    builds = [i for s in builders for i in s.all("RUN")
              if "pip wheel" in i.args or "python -m build" in i.args]
    if not builds:
        found.append("no build stage builds a wheel (pip wheel / python -m build)")
    return found


def _entrypoint_problems(final: Stage) -> list[str]:
    entry = final.last("ENTRYPOINT")
    cmd = final.last("CMD")
    if entry is None:
        return ["no ENTRYPOINT"]
    entry_argv = entry.exec_form()
    if entry_argv is None:
        return ["ENTRYPOINT is in shell form: signals would go to /bin/sh, not fanout"]
    argv = entry_argv + ((cmd.exec_form() or []) if cmd else [])
    core = [a for a in argv if a not in ("tini", "--", "/usr/bin/tini")]
    if core[:2] != ["fanout", "run"]:
        return [f"the container runs {argv}, not `fanout run`"]
    return []


def _healthcheck_problems(final: Stage) -> list[str]:
    health = final.last("HEALTHCHECK")
    if health is None:
        return ["no HEALTHCHECK"]
    if "/healthz" not in health.args:
        return [f"HEALTHCHECK does not probe /healthz: {health.args}"]
    expose = " ".join(i.args for i in final.all("EXPOSE"))
    port = re.search(r"127\.0\.0\.1:(\d+)/healthz|localhost:(\d+)/healthz", health.args)
    if port and (port.group(1) or port.group(2)) not in expose.split():
        return [f"HEALTHCHECK probes a port the image does not EXPOSE ({expose})"]
    return []


def dockerignore_allows(patterns: list[str], relpath: str) -> bool:
    """Whether a path reaches the build context under these .dockerignore patterns."""
    allowed = True
    parts = relpath.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.rstrip("/")
        matched = any(fnmatch.fnmatch(p, pat) or fnmatch.fnmatch(p, pat.replace("**/", ""))
                      for p in prefixes)
        if matched:
            allowed = negate
    return allowed


def read_dockerignore(path: Path) -> list[str]:
    """The patterns of a .dockerignore file, comments and blanks dropped."""
    return [line.strip() for line in path.read_text().splitlines()
            if line.strip() and not line.strip().startswith("#")]


#: Where a task image's executables come from: a Debian package that installs them,
#: or a symlink the Dockerfile makes on PATH.
PATH_DIRS = ("/usr/local/bin/", "/usr/bin/", "/bin/")


def apt_packages(stage: Stage) -> dict[str, str]:
    """Package name -> pinned version (or '' when unpinned) of a stage's apt installs."""
    found: dict[str, str] = {}
    for ins in stage.all("RUN"):
        for command in re.split(r"&&|;", ins.args):
            words = command.split()
            if "install" not in words or not words or words[0] not in ("apt-get", "apt"):
                continue
            for word in words[words.index("install") + 1:]:
                if not word.startswith("-"):
                    name, _, version = word.partition("=")
                    found[name] = version
    return found


def task_image_problems(text: str, executables: dict[str, str]) -> list[str]:
    """What keeps a task image (deploy/images/*) from running fanout's task command
    lines: ``executables`` maps each command the tasks run to the Debian package that
    provides it, or to ``"link"`` for one the Dockerfile links onto PATH."""
    found: list[str] = []
    preamble, stages = parse(text)
    if not stages:
        return ["no FROM"]
    final = stages[-1]
    for stage in stages:
        if ":" not in stage.base or stage.base.endswith(":latest"):
            found.append(f"base {stage.base} has no pinned tag")
    found += _user_problems(final)
    entry = final.last("ENTRYPOINT")
    if entry is not None:
        # Batch appends the task's command line to an ENTRYPOINT; fanout's command
        # lines are whole (/bin/sh -c '...'), so the image must not have one.
        found.append(f"ENTRYPOINT {entry.args}: Batch would pass the task's command "
                     "line to it as arguments")
    packages = apt_packages(final)
    links = " ".join(i.args for i in final.all("RUN"))
    for command, source in executables.items():
        if source == "link":
            if not re.search(rf"ln -s\S* \S+/{re.escape(command)} "
                             rf"({'|'.join(PATH_DIRS)}){re.escape(command)}\b", links):
                found.append(f"{command} is not linked onto PATH")
        elif source not in packages:
            found.append(f"{command}: the final stage does not install {source}")
    for name, version in packages.items():
        if not version:
            found.append(f"apt package {name} is not pinned")
    for stage in stages:
        for ins in stage.all("RUN"):
            if "apt-get install" in ins.args:
                if "--no-install-recommends" not in ins.args:
                    found.append("apt-get install without --no-install-recommends")
                if "rm -rf /var/lib/apt/lists" not in ins.args:
                    found.append("apt lists are left in a layer")
            downloads = [c for c in re.split(r"&&|;|\|", ins.args)
                         if c.split()[:1] in (["curl"], ["wget"])]
            if downloads and "sha256sum" not in ins.args:
                found.append(f"a download is not checked against a SHA-256: {ins.args[:80]}")
            if "sha256sum" in ins.args and "--check" not in ins.args \
                    and "-c" not in ins.args.split():
                found.append("sha256sum computes a digest but checks none")
        for ins in stage.all("ADD"):
            if "://" in ins.args and "checksum" not in ins.flags:
                found.append(f"ADD of a URL without --checksum: {ins.args}")
    for ins in [i for s in stages for i in s.all("ENV") + s.all("ARG")] + preamble:
        for name in env_names(ins):
            if any(word in name.upper() for word in SECRET_WORDS):
                found.append(f"{ins.keyword} {name} bakes a secret-like variable in")
    return found
