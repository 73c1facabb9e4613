"""Safety limits from device profiles, in the running daemon: too-frequent actuation is refused with a clear error,
the maximum on-time switches an output off by itself, confirmation is required where the profile says so, and the
safe action (off) is never held back."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from gatewayd.commands.safety import SafetyGate
from gatewayd.config import load_config
from gatewayd.config.profiles import Profile
from gatewayd.errors import ConfigError, SafetyLimited
from gatewayd.resilience import FakeClock
from tests.conftest import CONFIG, ROOT, Daemon, wait_until

LIMITED_RELAY = """
kind = "gpio_output"
[actions.on]
[actions.off]
safe = true
[safety]
min_interval_s = 0.6
max_actuations_per_minute = 3
"""

TIMED_RELAY = """
kind = "gpio_output"
[actions.on]
[actions.off]
safe = true
[safety]
max_on_s = 1.0
on_actions = ["on"]
off_action = "off"
"""


def _profiles(tmp_path: Path) -> Path:
    profiles = tmp_path / "profiles"
    shutil.copytree(ROOT / "hardware" / "profiles", profiles)
    (profiles / "limited_relay.toml").write_text(LIMITED_RELAY)
    (profiles / "timed_relay.toml").write_text(TIMED_RELAY)
    pump = (profiles / "sim_pump.toml").read_text()
    (profiles / "sim_pump.toml").write_text(
        pump.replace('description = "Start the pump"', 'description = "Start the pump"\nconfirm = true')
    )
    return profiles


@pytest.fixture
def gw(make_daemon: Any, tmp_path: Path) -> Daemon:
    d: Daemon = make_daemon(
        {
            "GATEWAYD_GATEWAY__PROFILES_DIR": str(_profiles(tmp_path)),
            "GATEWAYD_DEVICES__RELAY1__PROFILE": "limited_relay",
            "GATEWAYD_DEVICES__RELAY2__PROFILE": "timed_relay",
            "GATEWAYD_DEVICES__RELAY2__PIN": "27",
        }
    )
    d.start()
    return d


def _at(rec: dict[str, Any], state: str) -> float:
    from datetime import datetime

    stamp = next(t["at"] for t in rec["transitions"] if t["state"] == state)
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _send(d: Daemon, device: str, action: str, **extra: Any) -> dict[str, Any]:
    status, rec, _ = d.post({"device": device, "action": action, **extra}, wait=5)
    assert status == 200, rec
    return dict(rec)


def test_too_frequent_actuation_is_refused_and_off_never_is(gw: Daemon) -> None:
    assert _send(gw, "relay1", "on")["state"] == "succeeded"
    again = _send(gw, "relay1", "on")
    assert again["state"] == "rejected"
    assert again["error"]["code"] == "safety_limit"
    assert "at most one actuation every 0.6 s" in again["error"]["message"]
    assert "dispatched" not in [t["state"] for t in again["transitions"]]  # refused before it reached the pin
    assert _send(gw, "relay1", "off")["state"] == "succeeded"  # the safe state is always allowed
    # A critical command is held to the same hardware limit.
    assert _send(gw, "relay1", "on", priority="critical")["error"]["code"] == "safety_limit"

    for _ in range(2):
        time.sleep(0.65)
        assert _send(gw, "relay1", "on")["state"] == "succeeded"
        assert _send(gw, "relay1", "off")["state"] == "succeeded"
    time.sleep(0.65)
    fourth = _send(gw, "relay1", "on")
    assert fourth["state"] == "rejected" and "at most 3 actuations per minute" in fourth["error"]["message"]
    _, device = gw.get("/api/v1/devices/relay1")
    assert device["state"]["state"] == "off"


def test_max_on_time_switches_the_output_off_and_an_off_cancels_it(gw: Daemon) -> None:
    on = _send(gw, "relay2", "on")
    assert on["state"] == "succeeded"
    switched_on = time.monotonic()
    # The switch-off was written with the on command, and armed when it reached the pin: visible in the API.
    _, scheduled = gw.get("/api/v1/schedule?device=relay2")
    assert [(r["kind"], r["action"], r["after"], r["state"]) for r in scheduled["scheduled"]] == [
        ("max_on", "off", on["id"], "armed")
    ]
    wait_until(lambda: gw.get("/api/v1/devices/relay2")[1]["scheduled"], 2, "the switch-off on the device's card")
    _, device = gw.get("/api/v1/devices/relay2")
    assert device["scheduled"][0]["action"] == "off" and 0 <= device["scheduled"][0]["due_in_s"] <= 1.0
    auto: list[dict[str, Any]] = []

    def switched_off() -> bool:
        _, listing = gw.get("/api/v1/commands?device=relay2")
        auto[:] = [c for c in listing["commands"] if c["source"] == "safety" and c["state"] == "succeeded"]
        return bool(auto)

    wait_until(switched_off, 5, "the automatic off")
    assert time.monotonic() - switched_on < 5
    # Due max_on_s after the on reached the pin (the clock starts at its dispatch, not at its answer).
    assert _at(gw.command(auto[0]["id"]), "dispatched") - _at(on, "dispatched") >= 0.95
    assert auto[0]["action"] == "off" and auto[0]["priority"] == "critical"
    assert auto[0]["id"].startswith("~")  # a gateway-made id: no client can have used it
    _, device = gw.get("/api/v1/devices/relay2")
    assert device["state"]["state"] == "off"
    fired = [e for e in gw.log_lines() if e.get("event") == "scheduled_action_fired" and e.get("device") == "relay2"]
    assert len(fired) == 1 and fired[0]["kind"] == "max_on" and fired[0]["command_id"] == auto[0]["id"]

    # Switched off by hand before the limit: the automatic off is cancelled, said so, and never sent.
    second = _send(gw, "relay2", "on")
    off = _send(gw, "relay2", "off")
    _, every = gw.get("/api/v1/schedule?device=relay2&all=1")
    cancelled = [r for r in every["scheduled"] if r["after"] == second["id"]]
    assert [(r["state"], r["reason"]) for r in cancelled] == [("cancelled", f"done by {off['id']}")]
    _, listing = gw.get("/api/v1/commands?device=relay2")
    assert len([c for c in listing["commands"] if c["source"] == "safety"]) == 1


def test_an_action_that_needs_confirmation_is_refused_without_it(gw: Daemon) -> None:
    status, body, _ = gw.post({"device": "pump1", "action": "start"})
    assert status == 422
    assert body["error"]["details"]["errors"][0]["field"] == "confirm"
    assert _send(gw, "pump1", "start", confirm=True)["state"] == "succeeded"
    assert _send(gw, "pump1", "read")["state"] == "succeeded"  # no confirmation asked of the rest


def test_inconsistent_safety_sections_are_config_errors(tmp_path: Path) -> None:
    profiles = _profiles(tmp_path)
    (profiles / "timed_relay.toml").write_text(TIMED_RELAY.replace('off_action = "off"', 'off_action = "shut"'))
    (profiles / "limited_relay.toml").write_text(LIMITED_RELAY.replace("max_actuations_per_minute = 3", "max_on_s = 5"))
    with pytest.raises(ConfigError) as err:
        load_config(CONFIG, environ={"GATEWAYD_GATEWAY__PROFILES_DIR": str(profiles)})
    problems = "\n".join(str(p) for p in err.value.problems)
    assert "timed_relay.toml" in problems and "'shut'" in problems
    assert "limited_relay.toml" in problems and "max_on_s needs on_actions and an off_action" in problems


def test_a_command_that_went_back_to_the_queue_is_not_a_second_actuation() -> None:
    profile = Profile.model_validate(
        {
            "name": "limited_relay",
            "kind": "gpio_output",
            "actions": {"on": {}, "off": {"safe": True}},
            "safety": {"min_interval_s": 2, "max_actuations_per_minute": 2},
        }
    )
    clock = FakeClock()
    gate = SafetyGate("relay1", profile, clock)
    gate.admit("c1", "on")
    clock.advance(0.5)
    gate.admit("c1", "on")  # c1 requeued after its bus vanished, running again: still one actuation
    with pytest.raises(SafetyLimited):
        gate.admit("c2", "on")
    clock.advance(2)
    gate.admit("c2", "on")
    clock.advance(2)
    with pytest.raises(SafetyLimited, match="2 actuations per minute"):
        gate.admit("c3", "on")
