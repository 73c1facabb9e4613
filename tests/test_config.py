"""Configuration: the bundled file, environment overrides, and check-config reporting every problem."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gatewayd.config import load_config
from gatewayd.errors import ConfigError
from tests.conftest import CONFIG, ROOT


def check_config(path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gatewayd", "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
    )


def test_bundled_config_is_valid_and_runs_on_mock_hardware() -> None:
    loaded = load_config(CONFIG, environ={})
    cfg = loaded.config
    assert cfg.gateway.mode == "mock"
    assert cfg.http.host == "127.0.0.1"
    assert set(cfg.devices) == {"pump1", "sensor1", "relay1", "meter1", "relays1"}
    assert cfg.serial["bus1"].protocol == "modbus_rtu"
    assert cfg.gateway.data_dir == ROOT / "var"  # relative to the file, not to the working directory
    out = check_config(CONFIG)
    assert out.returncode == 0 and "ok" in out.stdout


def test_environment_overrides_every_key() -> None:
    env = {
        "GATEWAYD_HTTP__PORT": "8081",
        "GATEWAYD_GATEWAY__DATA_DIR": "/tmp/gw",
        "GATEWAYD_LOG__LEVEL": "debug",
        "GATEWAYD_SERIAL__BUS0__BAUDRATE": "9600",
        "GATEWAYD_DEVICES__RELAY1__PIN": "27",
        "GATEWAYD_URL": "http://elsewhere",  # no "__": not a config key
    }
    loaded = load_config(CONFIG, environ=env)
    cfg = loaded.config
    assert cfg.http.port == 8081
    assert cfg.gateway.data_dir == Path("/tmp/gw")
    assert cfg.log.level == "debug"
    assert cfg.serial["bus0"].baudrate == 9600
    assert cfg.devices["relay1"].pin == 27
    assert loaded.overrides["http.port"] == "GATEWAYD_HTTP__PORT"
    out = check_config(CONFIG, {"GATEWAYD_HTTP__PORT": "8081"})
    assert out.returncode == 0 and "http.port overridden by GATEWAYD_HTTP__PORT" in out.stdout


def test_check_config_reports_every_problem_with_file_and_key(tmp_path: Path) -> None:
    text = CONFIG.read_text()
    text = text.replace("port = 8080", "port = 99999")  # 1: out of range
    text = text.replace('level = "info"', 'level = "loud"')  # 2: not a choice
    text = text.replace("grace_s = 10", "grace_s = 10\ngrase_s = 5")  # 3: unknown key (a typo)
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace('"./hardware/profiles"', f'"{ROOT}/hardware/profiles"'))
    out = check_config(bad)
    assert out.returncode == 2
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 3, out.stdout
    assert any(line.startswith(f"{bad}: http.port: ") and "65535" in line for line in lines)
    assert any(line.startswith(f"{bad}: log.level: ") and "'loud'" in line for line in lines)
    assert any(line.startswith(f"{bad}: shutdown.grase_s: unknown key") for line in lines)
    assert "3 problem(s)" in out.stderr


def test_cross_checks_and_profile_errors_are_all_reported(tmp_path: Path) -> None:
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "gpio_relay.toml").write_text((ROOT / "hardware/profiles/gpio_relay.toml").read_text())
    (profiles / "broken.toml").write_text(
        'kind = "serial_line"\n[actions.go]\nparams.speed = { type = "int", min = 10, max = 1 }\n'
    )
    (profiles / "syntax.toml").write_text("kind = \n")
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        '[gateway]\nprofiles_dir = "./profiles"\n'
        '[devices.a]\nprofile = "gpio_relay"\npin = 5\n'
        '[devices.b]\nprofile = "gpio_relay"\npin = 5\n'
        '[devices.c]\nprofile = "nothing"\n'
        '[devices.d]\nprofile = "gpio_relay"\n'
    )
    with pytest.raises(ConfigError) as info:
        load_config(cfg, environ={})
    found = [str(p) for p in info.value.problems]
    assert any("broken.toml: actions.go.params.speed" in p and "greater than max" in p for p in found), found
    assert any("syntax.toml: (file): not valid TOML" in p for p in found), found
    assert any(p.endswith("devices.b.pin: pin 5 is already used by a") for p in found), found
    assert any(p.endswith("devices.c.profile: unknown profile 'nothing'") for p in found), found
    assert any(p.endswith("devices.d.pin: a GPIO device needs a pin") for p in found), found


def test_bad_overrides_name_the_variable() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(
            CONFIG,
            environ={
                "GATEWAYD_HTTP__PROT": "1",
                "GATEWAYD_HTTP__PORT": "x",
                "GATEWAYD_HTPP__PORT": "1",  # an unknown section: the variable's fault, not the file's
                "GATEWAYD_LOG____LEVEL": "debug",  # an empty part between the separators
            },
        )
    found = {str(p) for p in info.value.problems}
    assert "env GATEWAYD_HTTP__PROT: http.prot: unknown key" in found
    assert any(p.startswith("env GATEWAYD_HTTP__PORT: http.port:") for p in found)
    assert "env GATEWAYD_HTPP__PORT: htpp: unknown key" in found
    assert "env GATEWAYD_LOG____LEVEL: log..level: not a key: a part between '__' is empty" in found
    assert len(found) == 4, found


def test_unreadable_and_missing_files(tmp_path: Path) -> None:
    out = check_config(tmp_path / "missing.toml")
    assert out.returncode == 2 and "file not found" in out.stdout
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    out = check_config(binary)
    assert out.returncode == 2 and "cannot read" in out.stdout and "Traceback" not in out.stderr


def test_resilience_settings_are_checked_with_their_key_paths(tmp_path: Path) -> None:
    text = (
        CONFIG.read_text()
        .replace("minimum_calls = 5", "minimum_calls = 50")
        .replace('jitter = "full"', 'jitter = "sometimes"')
    )
    bad = tmp_path / "config.toml"
    bad.write_text(text.replace('profiles_dir = "./hardware/profiles"', f'profiles_dir = "{ROOT}/hardware/profiles"'))
    out = check_config(bad, {"GATEWAYD_RESILIENCE__DEVICE_RETRY__MAX_ATTEMPTS": "0"})
    assert out.returncode == 2
    problems = out.stdout + out.stderr
    assert "resilience.device_breaker" in problems and "minimum_calls must not exceed window_size" in problems
    assert "resilience.device_retry.jitter" in problems
    assert "GATEWAYD_RESILIENCE__DEVICE_RETRY__MAX_ATTEMPTS" in problems
    settings = load_config(CONFIG, environ={"GATEWAYD_RESILIENCE__DEVICE_BREAKER__OPEN_S": "5"}).config.resilience
    assert settings.device_breaker.open_s == 5 and settings.device_retry.max_attempts == 3
