"""The actuation-safety matrix, against the real daemon: what an actuator must never do, each shown as a user
would check it (the simulators' execution logs, the command records, the schedule, kill -9 and restart).

- A command whose deadline passes while it waits for a busy bus is never written to the port.
- The max on-time holds across kill -9 (a GPIO relay, the Modbus relay board) and so does the end of a
  natural-language on-period: off within the limit plus two seconds, although the daemon died a second after on.
- The switch-off is never answered by someone else's command: gateway-made ids live where client ids cannot.
- An emergency stop reaches the wire first, behind a full queue, a busy bus, an exhausted rate limit and a hanging
  provider chain.
- Safety limits hold for every source and priority; a `confirm` action is not run from a local-rules reading
  without the confirmation.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from gatewayd.interpret.simulator import Fault
from tests.conftest import ROOT, Daemon, http, wait_until
from tests.faults.mixed_load import ProviderThread, daemon_overrides
from tests.mqtt_broker import GW, Broker, daemon_env, publish

pytestmark = pytest.mark.timeout(300)

NO_KEYS = {"OPENAI_API_KEY": "", "ANTHROPIC_API_KEY": ""}
FINAL = ("succeeded", "failed", "expired", "rejected", "cancelled")

LIMITED_RELAY = """
kind = "gpio_output"
[actions.on]
[actions.off]
safe = true
[safety]
min_interval_s = 30
max_actuations_per_minute = 3
"""

COUNTED_RELAY = """
kind = "gpio_output"
[actions.on]
[actions.off]
[safety]
max_actuations_per_minute = 2
"""

TIMED_RELAY = """
kind = "gpio_output"
[actions.on]
[actions.off]
safe = true
[safety]
max_on_s = 4
on_actions = ["on"]
off_action = "off"
"""


def profiles(tmp_path: Path, *, board_max_on_s: float | None = None, pump_confirm: bool = False) -> Path:
    target = tmp_path / "profiles"
    shutil.copytree(ROOT / "hardware" / "profiles", target)
    (target / "limited_relay.toml").write_text(LIMITED_RELAY)
    (target / "timed_relay.toml").write_text(TIMED_RELAY)
    (target / "counted_relay.toml").write_text(COUNTED_RELAY)
    if board_max_on_s is not None:
        board = (target / "waveshare_relay8.toml").read_text()
        assert "max_on_s = 3600" in board
        (target / "waveshare_relay8.toml").write_text(board.replace("max_on_s = 3600", f"max_on_s = {board_max_on_s}"))
    if pump_confirm:
        pump = (target / "sim_pump.toml").read_text()
        (target / "sim_pump.toml").write_text(
            pump.replace('description = "Start the pump"', 'description = "Start the pump"\nconfirm = true')
        )
    return target


def final(d: Daemon, command_id: str, timeout: float = 15.0) -> dict[str, Any]:
    return d.wait_final(command_id, timeout=timeout)


def at(rec: dict[str, Any], state: str) -> float:
    """The wall-clock time of a command's transition, in seconds."""
    from datetime import datetime

    stamp = next(t["at"] for t in rec["transitions"] if t["state"] == state)
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


# --- deadlines on the wire -------------------------------------------------------------------------------------------


def test_a_command_whose_deadline_passes_waiting_for_a_busy_bus_is_never_written(make_daemon: Any) -> None:
    """pump1 and sensor1 share bus0; pump1 takes a second to answer. sensor1's command, good for 0.4 s, waits for
    the line behind it and expires there: sensor1's execution log never sees it."""
    d: Daemon = make_daemon(
        {
            "GATEWAYD_DEVICES__PUMP1__SIMULATOR__LATENCY_S": "1.0",
            "GATEWAYD_SERIAL__BUS0__RESPONSE_TIMEOUT_S": "3",
        }
    )
    d.start()
    for i in range(3):
        assert d.post({"id": f"slow-{i}", "device": "pump1", "action": "read"})[0] == 202
        d.wait_state(f"slow-{i}", "dispatched")
        stale = {"id": f"stale-{i}", "device": "sensor1", "action": "read", "ttl_s": 0.4}
        assert d.post(stale)[0] == 202
        rec = final(d, f"stale-{i}")
        assert rec["state"] == "expired" and rec["error"]["code"] == "expired", rec
        assert "was not sent" in rec["error"]["message"]
        assert final(d, f"slow-{i}")["state"] == "succeeded"
    assert not [e for e in d.sim_log("sensor1") if e["id"].startswith("stale-")]  # never on the wire
    fresh = {"id": "fresh", "device": "sensor1", "action": "read"}
    assert d.post(fresh, wait=5)[1]["state"] == "succeeded"  # the bus carries on
    assert d.executions("fresh", "sensor1") == 1
    assert d.stop() == 0


# --- the max on-time and on-periods across kill -9 --------------------------------------------------------------


def test_the_max_on_time_of_a_gpio_relay_holds_across_kill_9(make_daemon: Any, tmp_path: Path) -> None:
    d: Daemon = make_daemon(
        {
            "GATEWAYD_GATEWAY__PROFILES_DIR": str(profiles(tmp_path)),
            "GATEWAYD_DEVICES__RELAY1__PROFILE": "timed_relay",
        }
    )
    d.start()
    on = d.post({"id": "valve-on", "device": "relay1", "action": "on"}, wait=5)[1]
    assert on["state"] == "succeeded"
    on_at = at(on, "dispatched")
    time.sleep(max(0.0, on_at + 1.0 - time.time()))
    d.kill9()  # a second after the valve opened: the switch-off was due in three more
    d.start()
    wait_until(
        lambda: any(c["source"] == "safety" for c in d.get("/api/v1/commands?device=relay1")[1]["commands"]),
        10,
        "the switch-off",
    )
    auto = next(c for c in d.get("/api/v1/commands?device=relay1")[1]["commands"] if c["source"] == "safety")
    off = final(d, auto["id"])
    assert off["state"] == "succeeded" and off["action"] == "off" and off["priority"] == "critical"
    assert at(off, "dispatched") - on_at <= 4 + 2, off
    assert d.get("/api/v1/devices/relay1")[1]["state"]["state"] == "off"
    assert d.stop() == 0


def test_the_max_on_time_of_the_modbus_relay_board_holds_across_kill_9(make_daemon: Any, tmp_path: Path) -> None:
    d: Daemon = make_daemon({"GATEWAYD_GATEWAY__PROFILES_DIR": str(profiles(tmp_path, board_max_on_s=4))})
    d.start()
    on = d.post({"id": "board-on3", "device": "relays1", "action": "on3"}, wait=5)[1]
    assert on["state"] == "succeeded", on
    on_at = at(on, "dispatched")
    time.sleep(max(0.0, on_at + 1.0 - time.time()))
    d.kill9()
    d.start()
    writes = d.data_dir / "sim" / "relays1.jsonl"

    def switched_off() -> list[dict[str, Any]]:
        if not writes.exists():
            return []
        lines = [json.loads(line) for line in writes.read_text().splitlines() if line.strip()]
        return [w for w in lines if w["ts"] > on_at and w.get("action") == "all_off"]

    wait_until(lambda: bool(switched_off()), 10, "the board switched off")
    assert switched_off()[0]["ts"] - on_at <= 4 + 2
    assert d.stop() == 0


def test_the_end_of_a_natural_language_on_period_holds_across_kill_9(make_daemon: Any) -> None:
    d: Daemon = make_daemon(NO_KEYS)
    d.start()
    status, on, _ = d.post({"id": "water-5", "text": "start the pump for 4 seconds"}, wait=5)
    assert status == 200 and on["state"] == "succeeded", on
    on_at = at(on, "dispatched")
    time.sleep(max(0.0, on_at + 1.0 - time.time()))
    d.kill9()
    d.start()

    def stopped() -> list[dict[str, Any]]:
        return [e for e in d.sim_log() if e["ts"] > on_at and e["action"] == "stop"]

    wait_until(lambda: bool(stopped()), 10, "the pump stopped")
    assert stopped()[0]["ts"] - on_at <= 4 + 2
    assert stopped()[0]["id"].startswith("~")
    assert d.stop() == 0


# --- follow-up ids ---------------------------------------------------------------------------------------------------


def test_the_switch_off_is_never_answered_by_someone_elses_command(make_daemon: Any) -> None:
    """Two legal 128-character ids sharing their first 120 characters, and a client that used "water-7.off" for a
    stop of its own: each on-period still ends with the pump off."""
    d: Daemon = make_daemon(NO_KEYS)
    d.start()
    stem = "x" * 120
    for tail in ("AAAAAAAA", "BBBBBBBB"):
        status, on, _ = d.post({"id": stem + tail, "text": "start the pump for 1 second"}, wait=5)
        assert status == 200 and on["state"] == "succeeded", on
        wait_until(lambda i=on["id"]: _stopped_after(d, i), 10, f"the stop after {tail}")
    assert d.post({"id": "water-7.off", "device": "pump1", "action": "stop"}, wait=5)[1]["state"] == "succeeded"
    status, on, _ = d.post({"id": "water-7", "text": "start the pump for 1 second"}, wait=5)
    assert status == 200 and on["state"] == "succeeded", on
    wait_until(lambda: _stopped_after(d, "water-7"), 10, "the stop after water-7")
    assert d.post({"device": "pump1", "action": "read"}, wait=5)[1]["result"]["running"] is False
    # No client can take a gateway-made id.
    status, err, _ = d.post({"id": "~stolen", "device": "pump1", "action": "stop"})
    assert status == 422 and err["error"]["details"]["errors"][0]["field"] == "id"
    assert d.stop() == 0


def _stopped_after(d: Daemon, on_id: str) -> bool:
    log = d.sim_log()
    starts = [i for i, e in enumerate(log) if e["id"] == on_id]
    return bool(starts) and any(e["action"] == "stop" and e["id"].startswith("~") for e in log[starts[0] + 1 :])


# --- the emergency stop first ----------------------------------------------------------------------------------------


def test_an_emergency_stop_reaches_the_wire_first_behind_everything(broker: Broker, make_daemon: Any) -> None:
    """Twenty commands queued for pump1 and twenty for sensor1 on the same bus, pump1 slow to answer, the bus
    limited to 4 transactions a second, and ten natural-language requests waiting on a hanging provider: the
    emergency stop for pump1 is on the wire within a second, before any of the queued commands after it."""
    broker.start()
    with ProviderThread() as provider:
        env = {
            **daemon_env(broker),
            **daemon_overrides(provider.base_url),
            "GATEWAYD_DEVICES__PUMP1__SIMULATOR__LATENCY_S": "0.2",
            "GATEWAYD_DEVICES__SENSOR1__SIMULATOR__LATENCY_S": "0.3",
            "GATEWAYD_SERIAL__BUS0__TRANSACTIONS_PER_S": "4",
            "GATEWAYD_SERIAL__BUS0__TRANSACTIONS_BURST": "1",
            "GATEWAYD_INTERPRET__DEADLINE_S": "10",
            "GATEWAYD_INTERPRET__PROVIDERS__OPENAI__TIMEOUT_S": "9",
        }
        d: Daemon = make_daemon(env)
        d.start(timeout=15)
        provider.fail(Fault.hang(20))
        for i in range(10):
            publish(broker, f"{GW}/cmd", json.dumps({"id": f"text-{i}", "text": "read the pump"}))
        for i in range(20):
            assert (
                d.post({"id": f"p{i:02d}", "device": "pump1", "action": "set_speed", "params": {"percent": i}})[0]
                == 202
            )
            assert d.post({"id": f"s{i:02d}", "device": "sensor1", "action": "read"})[0] == 202
        d.wait_state("p02", "dispatched")  # the bus busy with both devices: pump1's worker waits for its turn
        sent = time.time()
        assert d.post({"id": "estop", "device": "pump1", "action": "stop", "priority": "critical"})[0] == 202
        rec = final(d, "estop", timeout=10)
        assert rec["state"] == "succeeded", rec
        log = d.sim_log()
        ran = next(e for e in log if e["id"] == "estop")
        assert ran["ts"] - sent <= 1.0, ran["ts"] - sent
        # Of the commands queued before it, only one already on the wire when it came may go out first: not the
        # pump command waiting for its turn, nor the sensor's.
        overtook = [e["id"] for e in log if sent <= e["ts"] < ran["ts"]]
        overtook += [e["id"] for e in d.sim_log("sensor1") if e["id"].startswith("s") and sent <= e["ts"] < ran["ts"]]
        assert len(overtook) <= 1, overtook
        provider.heal()
        assert d.stop() == 0


# --- limits for every source ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("limit", ["min_interval", "per_minute"])
def test_safety_limits_hold_for_every_source_and_priority(
    broker: Broker, make_daemon: Any, tmp_path: Path, limit: str
) -> None:
    """relay1 with a 30 s minimum interval, or with two actuations a minute (and no off exempt): once the limit is
    reached, the next actuation is refused safety_limit whether it comes over HTTP at any priority, over MQTT as a
    critical command, or as natural language, and none reaches the pin."""
    broker.start()
    profile = "limited_relay" if limit == "min_interval" else "counted_relay"
    d: Daemon = make_daemon(
        {
            **daemon_env(broker),
            **NO_KEYS,
            "GATEWAYD_GATEWAY__PROFILES_DIR": str(profiles(tmp_path)),
            "GATEWAYD_DEVICES__RELAY1__PROFILE": profile,
        }
    )
    d.start(timeout=15)
    assert d.post({"device": "relay1", "action": "on"}, wait=5)[1]["state"] == "succeeded"
    if limit == "per_minute":
        assert d.post({"device": "relay1", "action": "off"}, wait=5)[1]["state"] == "succeeded"
    refused = []
    for i, body in enumerate(
        [
            {"device": "relay1", "action": "on"},
            {"device": "relay1", "action": "on", "priority": "critical"},
            {"device": "relay1", "action": "on", "priority": "high"},
            {"device": "relay1", "action": "on", "priority": "low"},
            {"text": "turn on relay 1"},
        ]
    ):
        refused.append(d.post({**body, "id": f"again-{i}"}, wait=5)[1])
    critical = {"id": "again-mqtt", "device": "relay1", "action": "on", "priority": "critical"}
    publish(broker, f"{GW}/cmd", json.dumps(critical))
    refused.append(final(d, "again-mqtt"))
    for rec in refused:
        assert rec["state"] == "rejected" and rec["error"]["code"] == "safety_limit", rec
        assert "dispatched" not in [t["state"] for t in rec["transitions"]]
        assert rec["source"] in ("http", "mqtt") and (rec.get("interpretation") is None or rec["source"] == "http")
    if limit == "min_interval":
        assert d.post({"device": "relay1", "action": "off"}, wait=5)[1]["state"] == "succeeded"  # safe: always
    assert d.stop() == 0


def test_a_confirm_action_is_never_run_from_the_local_rules_without_confirmation(
    make_daemon: Any, tmp_path: Path
) -> None:
    d: Daemon = make_daemon({**NO_KEYS, "GATEWAYD_GATEWAY__PROFILES_DIR": str(profiles(tmp_path, pump_confirm=True))})
    d.start()
    for text in ("start the pump", "start pump 1", "switch the irrigation pump on"):
        status, err, _ = d.post({"id": f"nl-{len(text)}", "text": text})
        assert status in (409, 422) and err["error"]["code"] == "confirmation_required", (text, err)
        assert http("GET", f"{d.url}/api/v1/commands/nl-{len(text)}")[0] == 404
    assert not [e for e in d.sim_log() if e["action"] == "start"]
    status, rec, _ = d.post({"id": "nl-confirmed", "text": "start the pump", "confirm": True}, wait=5)
    assert status == 200 and rec["state"] == "succeeded" and rec["action"] == "start"
    assert d.stop() == 0
