"""deploy/systemd: a hardened unit that outlasts fanout's drain, and a valid env file."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from worker.config import Settings

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "systemd" / "fanout.service"
ENV_EXAMPLE = ROOT / "deploy" / "systemd" / "fanout.env.example"
#: Seconds fanout needs after its drain to close its links and exit, before SIGKILL.
CLOSE_MARGIN = 10
#: systemd-analyze security's exposure scale is 0-10; --threshold takes it times ten.
MAX_EXPOSURE = 2.0

Unit = dict[str, list[tuple[str, str]]]


def parse_unit(text: str) -> Unit:
    """Sections of a unit file as (key, value) pairs in order; repeated keys kept."""
    sections: Unit = {}
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"key outside a section: {line}"
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def last(unit: Unit, section: str, key: str) -> str | None:
    """The effective (last) value of a key, as systemd reads it."""
    values = [v for k, v in unit.get(section, []) if k == key]
    return values[-1] if values else None


def seconds(value: str) -> float:
    """A systemd time span ("45", "45s", "1min 30s") in seconds."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "ms": 0.001}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit]
    return total


def env_file(text: str) -> dict[str, str]:
    """The assignments of an environment file (comments and blanks skipped)."""
    pairs = {}
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def drain_grace() -> float:
    """The drain grace the example environment sets, else fanout's default."""
    value = env_file(ENV_EXAMPLE.read_text()).get("FANOUT_CONSUMER__DRAIN_GRACE")
    return float(value) if value else Settings().consumer.drain_grace


HARDENING = {
    "ProtectSystem": "strict", "NoNewPrivileges": "yes", "PrivateTmp": "yes",
    "ProtectHome": "yes", "PrivateDevices": "yes", "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes", "ProtectControlGroups": "yes", "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes", "RestrictRealtime": "yes", "CapabilityBoundingSet": "",
}


def problems(text: str) -> list[str]:
    """Everything wrong with the unit; empty when it is right."""
    unit = parse_unit(text)
    found = []
    service = "Service"
    if last(unit, service, "DynamicUser") != "yes" and last(unit, service, "User") in (
            None, "root", "0"):
        found.append("runs as root: neither DynamicUser=yes nor a User=")
    for key, wanted in HARDENING.items():
        if last(unit, service, key) != wanted:
            found.append(f"{key} is {last(unit, service, key)!r}, not {wanted!r}")
    if last(unit, service, "Restart") not in ("on-failure", "always", "on-abnormal"):
        found.append("no restart policy")
    stop = last(unit, service, "TimeoutStopSec")
    grace = drain_grace()
    if stop is None or seconds(stop) < grace + CLOSE_MARGIN:
        found.append(f"TimeoutStopSec {stop} leaves less than {CLOSE_MARGIN} s after the "
                     f"{grace} s drain")
    if last(unit, service, "KillSignal") not in (None, "SIGTERM"):
        found.append("KillSignal is not SIGTERM: fanout drains on SIGTERM")
    if last(unit, service, "KillMode") in ("process", "none"):
        found.append("KillMode leaves task processes behind")
    exec_start = last(unit, service, "ExecStart") or ""
    if not re.search(r"(^|/)fanout run\b", exec_start):
        found.append(f"ExecStart {exec_start!r} is not `fanout run`")
    state = last(unit, service, "StateDirectory")
    env = dict(v.split("=", 1) for k, v in unit.get(service, []) if k == "Environment")
    if not state or env.get("FANOUT_HOME") != f"/var/lib/{state}":
        found.append("FANOUT_HOME is not the unit's StateDirectory (ProtectSystem=strict "
                     "leaves nothing else writable)")
    if not last(unit, service, "EnvironmentFile"):
        found.append("no EnvironmentFile")
    if "multi-user.target" not in (last(unit, "Install", "WantedBy") or ""):
        found.append("not wanted by multi-user.target: it would not start at boot")
    return found


def test_the_unit_has_no_problem() -> None:
    """The real unit passes every rule."""
    assert problems(UNIT.read_text()) == []


BREAKAGES = {
    "ProtectSystem relaxed": ("ProtectSystem=strict", "ProtectSystem=full"),
    "NoNewPrivileges off": ("NoNewPrivileges=yes", "NoNewPrivileges=no"),
    "no private /tmp": ("PrivateTmp=yes\n", ""),
    "runs as root": ("DynamicUser=yes\n", ""),
    "stop timeout within the drain": ("TimeoutStopSec=45", "TimeoutStopSec=25"),
    "stop timeout too short by a margin": ("TimeoutStopSec=45", "TimeoutStopSec=30s"),
    "no restart": ("Restart=on-failure", "Restart=no"),
    "SIGKILL first": ("KillSignal=SIGTERM", "KillSignal=SIGKILL"),
    "home outside the state directory": ("FANOUT_HOME=/var/lib/fanout", "FANOUT_HOME=/opt/x"),
    "not fanout run": ("/opt/fanout/bin/fanout run", "/opt/fanout/bin/fanout status"),
    "capabilities kept": ("CapabilityBoundingSet=\n", ""),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_each_breakage_is_caught(breakage: str) -> None:
    """A unit broken in one way has at least one problem."""
    old, new = BREAKAGES[breakage]
    text = UNIT.read_text()
    assert old in text
    assert problems(text.replace(old, new, 1)), f"{breakage} went unnoticed"


def test_time_spans_parse_like_systemd() -> None:
    """45, 45s and 1min 30s are 45, 45 and 90 seconds."""
    assert [seconds("45"), seconds("45s"), seconds("1min 30s")] == [45, 45, 90]


def _verifiable_copy(tmp_path: Path, text: str) -> Path:
    # verify insists that ExecStart's binary exists: point it at a stub.
    stub = tmp_path / "fanout"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    unit = tmp_path / "fanout.service"
    unit.write_text(text.replace("/opt/fanout/bin/fanout", str(stub)))
    return unit


needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze not installed (Debian: systemd)")


@needs_analyze
def test_systemd_analyze_verify_is_silent(tmp_path: Path) -> None:
    """systemd-analyze verify accepts the unit without a single warning."""
    unit = _verifiable_copy(tmp_path, UNIT.read_text())
    out = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0 and out.stderr.strip() == "", out.stderr


@needs_analyze
def test_systemd_analyze_verify_flags_a_misspelt_key(tmp_path: Path) -> None:
    """The verify check bites: an unknown key is reported."""
    text = UNIT.read_text().replace("ProtectSystem=strict", "ProtectSytem=strict")
    unit = _verifiable_copy(tmp_path, text)
    out = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert "ProtectSytem" in out.stderr


@needs_analyze
def test_the_exposure_score_is_low(tmp_path: Path) -> None:
    """systemd-analyze security rates the unit at most 2.0 ("OK") on its 0-10 scale."""
    unit = _verifiable_copy(tmp_path, UNIT.read_text())
    out = subprocess.run(["systemd-analyze", "security", "--offline=true",
                          f"--threshold={int(MAX_EXPOSURE * 10)}", str(unit)],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-600:]


@needs_analyze
def test_the_exposure_check_bites(tmp_path: Path) -> None:
    """Without its sandboxing lines the same unit scores above the threshold."""
    text = "\n".join(line for line in UNIT.read_text().splitlines()
                     if not line.startswith(("Protect", "Private", "Restrict", "SystemCall",
                                             "Capability", "DynamicUser")))
    unit = _verifiable_copy(tmp_path, text)
    out = subprocess.run(["systemd-analyze", "security", "--offline=true",
                          f"--threshold={int(MAX_EXPOSURE * 10)}", str(unit)],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode != 0


def test_the_env_example_sets_only_real_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every FANOUT_* line of fanout.env.example loads into Settings and takes effect."""
    pairs = env_file(ENV_EXAMPLE.read_text())
    fanout = {k: v for k, v in pairs.items() if k.startswith("FANOUT_")}
    assert fanout
    for key, value in fanout.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.servicebus.queue == pairs["FANOUT_SERVICEBUS__QUEUE"]
    assert settings.batch.account_url == pairs["FANOUT_BATCH__ACCOUNT_URL"]
    assert settings.queue_kind == "servicebus" and settings.backend_kind == "azure"
    assert settings.storage_kind == "azure"


def test_the_env_example_holds_no_secret() -> None:
    """Keys, connection strings and SAS tokens appear only commented out."""
    for key in env_file(ENV_EXAMPLE.read_text()):
        assert not re.search(r"KEY|CONNECTION_STRING|SECRET|SAS|PASSWORD", key), key
