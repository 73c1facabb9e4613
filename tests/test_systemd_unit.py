"""The production systemd unit (systemd/gatewayd.service): systemd accepts it, its sandbox scores well in
``systemd-analyze security``, and it keeps the lifecycle settings the daemon relies on.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "gatewayd.service"
UNIT_NAME = "gatewayd.service"
MAX_EXPOSURE = 2.5

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not on PATH")


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> every value assigned, in order (systemd.syntax: comments, continuations, repeats)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {raw!r}"
        assert current is not None, f"assignment outside a section: {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def run_analyze(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run([SYSTEMD_ANALYZE, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture(scope="module")
def service() -> dict[str, list[str]]:
    return parse_unit(UNIT.read_text(encoding="utf-8"))["Service"]


@pytest.fixture(scope="module")
def local_unit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The unit under its real name, with ExecStart pointing at a binary that exists on this machine: ``verify``
    refuses a unit whose ExecStart binary is missing, and /opt/gatewayd is only there on an installed gateway."""
    directory = tmp_path_factory.mktemp("unit")
    exe = Path(sys.executable).parent / "gatewayd"
    if not exe.exists():
        exe = directory / "gatewayd-stub"
        exe.write_text("#!/bin/sh\nexit 0\n", encoding="utf-8")
        exe.chmod(0o755)
    text, count = re.subn(r"(?m)^ExecStart=\S+", lambda _: f"ExecStart={exe}", UNIT.read_text(encoding="utf-8"))
    assert count == 1, "the unit must have exactly one ExecStart="
    path = directory / UNIT_NAME
    path.write_text(text, encoding="utf-8")
    return path


@needs_systemd_analyze
def test_systemd_accepts_the_unit(local_unit: Path) -> None:
    result = run_analyze("verify", str(local_unit), cwd=local_unit.parent)
    # verify exits 0 even for unknown keys and unparsable values, which it reports as "<file>:<line>: ..."; it may
    # also warn about unrelated units on the host. Every line naming our unit is a problem with it.
    ours = [line for line in (result.stderr + result.stdout).splitlines() if UNIT_NAME in line]
    assert result.returncode == 0, result.stderr
    assert ours == [], "\n".join(ours)


@needs_systemd_analyze
def test_sandbox_exposure_is_low(local_unit: Path) -> None:
    result = run_analyze("security", "--offline=true", str(local_unit), cwd=local_unit.parent)
    assert result.returncode == 0, result.stderr
    match = re.search(rf"Overall exposure level for {re.escape(UNIT_NAME)}: (\d+(?:\.\d+)?)", result.stdout)
    assert match is not None, result.stdout + result.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


def test_lifecycle_settings(service: dict[str, list[str]]) -> None:
    assert service["Type"] == ["notify"]
    assert service["NotifyAccess"] == ["main"]
    assert len(service["WatchdogSec"]) == 1 and service["WatchdogSec"][0] not in ("", "0", "infinity")
    assert service["Restart"] == ["on-failure"]
    # Exit 2 is an invalid configuration or a corrupt database: restarting cannot help.
    assert service["RestartPreventExitStatus"] == ["2"]
    assert service["ExecStart"] == ["/opt/gatewayd/.venv/bin/gatewayd run --config /etc/gatewayd/config.toml"]
    assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]


def test_identity_and_state(service: dict[str, list[str]]) -> None:
    assert service["User"] == ["gatewayd"]
    assert service["StateDirectory"] == ["gatewayd"]
    assert service["WorkingDirectory"] == ["/var/lib/gatewayd"]
    assert "GATEWAYD_GATEWAY__DATA_DIR=/var/lib/gatewayd" in service["Environment"]
    assert set(" ".join(service["SupplementaryGroups"]).split()) >= {"dialout", "gpio"}


def test_sandbox_settings(service: dict[str, list[str]]) -> None:
    assert service["ProtectSystem"] == ["strict"]
    assert service["NoNewPrivileges"] == ["yes"]
    assert service["PrivateTmp"] == ["yes"]
    assert service["DevicePolicy"] == ["closed"]
    assert {"char-ttyUSB rw", "char-ttyACM rw", "char-gpiochip rw"} <= set(service["DeviceAllow"])
    # A user namespace unmaps the dialout and gpio groups, and ProcSubset=pid hides /proc/cpuinfo and
    # /proc/device-tree, where gpiozero reads the board revision: either would cut the daemon off its hardware.
    assert "PrivateUsers" not in service
    assert "ProcSubset" not in service


def test_parse_unit_handles_comments_repeats_and_continuations() -> None:
    text = "# c\n[Service]\n; c\nA=1\nA=2\nB=x \\\n  y\n\n[Install]\nWantedBy=multi-user.target\n"
    assert parse_unit(text) == {
        "Service": {"A": ["1", "2"], "B": ["x  y"]},
        "Install": {"WantedBy": ["multi-user.target"]},
    }
