"""The resilience kit in the running daemon: a busy device is asked again, a dead one has its circuit opened,
commands for it wait instead of failing, and the open circuit survives a restart."""

from __future__ import annotations

import signal
import sqlite3
import time
from typing import Any

from tests.conftest import Daemon, http

FAST_FAILURE = {
    "GATEWAYD_SERIAL__BUS0__RESPONSE_TIMEOUT_S": "0.1",
    "GATEWAYD_RESILIENCE__DEVICE_RETRY__MAX_ATTEMPTS": "3",
    "GATEWAYD_RESILIENCE__DEVICE_RETRY__BASE_S": "0.01",
    "GATEWAYD_RESILIENCE__DEVICE_BREAKER__WINDOW_SIZE": "4",
    "GATEWAYD_RESILIENCE__DEVICE_BREAKER__MINIMUM_CALLS": "4",
    "GATEWAYD_RESILIENCE__DEVICE_BREAKER__OPEN_S": "6",
}


def _states(rec: dict[str, Any]) -> list[str]:
    return [t["state"] for t in rec["transitions"]]


def _breaker(d: Daemon) -> dict[str, Any]:
    status, body = d.get("/api/v1/devices/pump1")
    assert status == 200, body
    return dict(body["breaker"])


def _metric(d: Daemon, line_start: str) -> float:
    status, text, headers = http("GET", f"{d.url}/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"not {what} within {timeout} s")


def test_a_busy_device_is_asked_again_and_acts_once(make_daemon: Any) -> None:
    d: Daemon = make_daemon(
        {
            "GATEWAYD_DEVICES__PUMP1__SIMULATOR__BUSY_REPLIES": "2",
            "GATEWAYD_RESILIENCE__DEVICE_RETRY__BASE_S": "0.01",
        }
    )
    d.start()
    status, rec, _ = d.post({"device": "pump1", "action": "set_speed", "params": {"percent": 40}}, wait=10)
    assert status == 200 and rec["state"] == "succeeded", rec
    assert rec["result"]["speed"] == 40
    assert d.executions(rec["id"]) == 1
    failed = [e for e in d.log_lines() if e.get("event") == "retry_attempt_failed" and e.get("command_id") == rec["id"]]
    assert [e["error"] for e in failed] == ["device_busy", "device_busy"]
    assert _metric(d, 'gatewayd_retry_attempts_total{outcome="transient",policy="device:pump1"}') == 2
    assert _metric(d, 'gatewayd_retry_attempts_total{outcome="success",policy="device:pump1"}') == 1
    assert _metric(d, "process_resident_memory_bytes") > 10 * 2**20
    assert _breaker(d)["state"] == "closed"


def test_busy_past_the_last_attempt_fails_with_the_device_error(make_daemon: Any) -> None:
    d: Daemon = make_daemon(
        {
            "GATEWAYD_DEVICES__PUMP1__SIMULATOR__BUSY_REPLIES": "5",
            "GATEWAYD_RESILIENCE__DEVICE_RETRY__MAX_ATTEMPTS": "3",
            "GATEWAYD_RESILIENCE__DEVICE_RETRY__BASE_S": "0.01",
        }
    )
    d.start()
    status, rec, _ = d.post({"device": "pump1", "action": "set_speed", "params": {"percent": 40}}, wait=10)
    assert status == 200 and rec["state"] == "failed", rec
    assert rec["error"]["code"] == "device_busy"
    assert "gave up after 3 attempt(s)" in rec["error"]["message"]
    assert d.executions(rec["id"]) == 0


def test_an_open_circuit_holds_commands_and_survives_a_restart(make_daemon: Any) -> None:
    d: Daemon = make_daemon({**FAST_FAILURE, "GATEWAYD_DEVICES__PUMP1__SIMULATOR__MUTE": "true"})
    d.start()
    speed = {"device": "pump1", "action": "set_speed"}

    # A dead device: three timeouts fail the first command; the fourth call opens the circuit, so the second
    # command goes back to the queue instead of failing.
    _, first, _ = d.post({**speed, "params": {"percent": 10}}, wait=10)
    assert first["state"] == "failed" and first["error"]["code"] == "device_timeout", first
    _, second, _ = d.post({**speed, "params": {"percent": 20}})
    _wait_for(lambda: _breaker(d)["state"] == "open", 10, "open")
    _wait_for(lambda: _states(d.command(second["id"]))[-1] == "queued", 5, "requeued")
    requeue = d.command(second["id"])["transitions"][-1]
    assert requeue["detail"].startswith("device circuit open")
    opened = [e for e in d.log_lines() if e.get("event") == "breaker_opened"]
    assert len(opened) == 1 and opened[0]["breaker"] == "device:pump1"

    # While open, a new command waits, unsent.
    _, third, _ = d.post({**speed, "params": {"percent": 30}})
    time.sleep(0.5)
    assert d.command(third["id"])["state"] == "queued"
    assert d.stop(signal.SIGTERM) == 0

    with sqlite3.connect(d.data_dir / "gatewayd.sqlite3") as conn:
        row = conn.execute("SELECT kind, state FROM resilience_state WHERE key = 'breaker:device:pump1'").fetchone()
    assert row is not None and row[0] == "circuit_breaker" and '"open"' in row[1]

    # Restarted with the device answering again: the circuit is still open for what was left of its wait.
    d.env["GATEWAYD_DEVICES__PUMP1__SIMULATOR__MUTE"] = "false"
    d.start()
    restarted = time.monotonic()
    breaker = _breaker(d)
    assert breaker["state"] == "open", breaker
    assert 0 < breaker["retry_after_s"] < 6
    assert d.command(second["id"])["state"] == "queued"
    assert d.command(third["id"])["state"] == "queued"
    assert d.executions(second["id"]) == d.executions(third["id"]) == 0

    # A critical command does not wait behind the open circuit.
    status, stop, _ = d.post({"device": "pump1", "action": "stop", "priority": "critical"}, wait=5)
    assert status == 200 and stop["state"] == "succeeded", stop
    assert time.monotonic() - restarted < breaker["retry_after_s"]
    assert d.command(second["id"])["state"] == "queued"

    # When the wait is over, the oldest command probes, succeeds, closes the circuit, and the rest follow.
    done_second = d.wait_final(second["id"], timeout=10)
    done_third = d.wait_final(third["id"], timeout=5)
    assert done_second["state"] == done_third["state"] == "succeeded"
    assert time.monotonic() - restarted >= breaker["retry_after_s"] - 0.2
    assert _states(done_second) == [
        "received",
        "accepted",
        "queued",
        "dispatched",
        "queued",
        "dispatched",
        "succeeded",
    ]
    assert d.executions(second["id"]) == d.executions(third["id"]) == 1
    assert _breaker(d)["state"] == "closed"
    assert d.stop(signal.SIGTERM) == 0


def test_commands_for_an_unplugged_device_wait_unsent_until_their_deadline(make_daemon: Any, tmp_path: Any) -> None:
    d: Daemon = make_daemon(
        {"GATEWAYD_SERIAL__BUS0__SIMULATE": "false", "GATEWAYD_SERIAL__BUS0__PORT": str(tmp_path / "no-such-tty")}
    )
    d.start()
    status, device = d.get("/api/v1/devices/pump1")
    assert status == 200 and device["available"] is False and "no-such-tty" in device["last_error"]
    started = time.monotonic()
    status, rec, _ = d.post({"device": "pump1", "action": "set_speed", "params": {"percent": 5}, "ttl_s": 2})
    assert status == 202, rec
    time.sleep(0.8)
    assert d.command(rec["id"])["state"] == "queued"  # held, not failed after a few retries
    done = d.wait_final(rec["id"], timeout=5)
    assert done["state"] == "expired" and done["error"]["code"] == "expired", done
    assert "dispatched" not in _states(done)
    assert time.monotonic() - started >= 1.9
    # The relay on GPIO is not held up by the pump's bus.
    status, relay, _ = d.post({"device": "relay1", "action": "on"}, wait=5)
    assert relay["state"] == "succeeded", relay
    assert _breaker(d)["state"] == "closed"
