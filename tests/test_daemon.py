"""The daemon as users meet it: started from the bundled config, driven over HTTP and the CLI, stopped by
signals and killed, and restarted on the same data directory."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from typing import Any

from tests.conftest import CONFIG, ROOT, Daemon, wait_until

STATES = ["received", "accepted", "queued", "dispatched", "succeeded"]


def _states(rec: dict[str, Any]) -> list[str]:
    return [t["state"] for t in rec["transitions"]]


def _db_rows(d: Daemon) -> tuple[int, int]:
    with sqlite3.connect(d.data_dir / "gatewayd.sqlite3") as conn:
        commands = conn.execute("SELECT count(*) FROM commands").fetchone()[0]
        transitions = conn.execute("SELECT count(*) FROM transitions").fetchone()[0]
    return commands, transitions


def test_ready_quickly_and_a_command_over_http_succeeds_once(make_daemon: Any) -> None:
    d: Daemon = make_daemon()
    took = d.start(timeout=5.0)
    assert took < 5.0
    status, rec, headers = d.post({"device": "pump1", "action": "set_speed", "params": {"percent": 55}}, wait=10)
    assert status == 200, rec
    assert rec["state"] == "succeeded"
    assert rec["result"]["speed"] == 55
    assert rec["params"] == {"percent": 55, "ramp_s": 0}  # the profile's default was applied
    assert _states(rec) == STATES
    assert headers["Location"] == f"/api/v1/commands/{rec['id']}"
    assert d.executions(rec["id"]) == 1
    # The stored record says the same when read back.
    assert _states(d.command(rec["id"])) == STATES


def test_command_over_the_cli_succeeds_once(daemon: Daemon) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "gatewayd", "send", "pump1", "set_speed", "percent=30", "--url", daemon.url],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    rec = json.loads(out.stdout)
    assert rec["state"] == "succeeded" and rec["source"] == "cli"
    assert _states(rec) == STATES
    assert daemon.executions(rec["id"]) == 1

    relay = subprocess.run(
        [sys.executable, "-m", "gatewayd", "send", "relay1", "on", "--url", daemon.url],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert relay.returncode == 0, relay.stderr
    assert json.loads(relay.stdout)["result"] == {"state": "on"}
    _, device = daemon.get("/api/v1/devices/relay1")
    assert device["state"] == {"state": "on"} and device["available"] is True


def test_cli_says_clearly_when_the_daemon_is_not_running(tmp_path: Any) -> None:
    from tests.conftest import free_port

    url = f"http://127.0.0.1:{free_port()}"
    for args in (["send", "pump1", "start"], ["status"]):
        out = subprocess.run(
            [sys.executable, "-m", "gatewayd", *args, "--url", url], capture_output=True, text=True, timeout=30
        )
        assert out.returncode == 3
        assert "not reachable" in out.stderr and "Traceback" not in out.stderr


def test_cli_reports_invalid_commands_with_their_fields(daemon: Daemon) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "gatewayd", "send", "pump1", "set_speed", "percent=250", "--url", daemon.url],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert "validation_failed" in out.stderr and "params.percent" in out.stderr


def test_status_command_lists_devices(daemon: Daemon) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "gatewayd", "status", "--url", daemon.url], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    assert "pump1" in out.stdout and "relay1" in out.stdout and "running" in out.stdout


def test_devices_list_actions_with_parameter_schemas(daemon: Daemon) -> None:
    status, body = daemon.get("/api/v1/devices")
    assert status == 200
    devices = {d["name"]: d for d in body["devices"]}
    assert set(devices) == {"pump1", "sensor1", "relay1", "meter1", "relays1"}
    pump = devices["pump1"]
    assert pump["available"] is True
    percent = pump["actions"]["set_speed"]["params"]["properties"]["percent"]
    assert percent == {
        "type": "integer",
        "minimum": 0,
        "maximum": 100,
        "x-unit": "%",
        "description": "Speed in percent of maximum",
    }
    assert pump["actions"]["set_speed"]["params"]["required"] == ["percent"]
    assert set(devices["relay1"]["actions"]) == {"on", "off"}


def test_invalid_commands_get_typed_errors_and_change_nothing(daemon: Daemon) -> None:
    before = _db_rows(daemon)
    cases = [
        ({"device": "nope", "action": "start"}, 404, "unknown_device"),
        ({"device": "pump1", "action": "explode"}, 422, "validation_failed"),
        ({"device": "pump1", "action": "set_speed", "params": {"percent": 101}}, 422, "validation_failed"),
        ({"device": "pump1", "action": "set_speed", "params": {"percent": "fast"}}, 422, "validation_failed"),
        ({"device": "pump1", "action": "set_speed", "params": {}}, 422, "validation_failed"),
        ({"device": "pump1", "action": "start", "params": {"extra": 1}}, 422, "validation_failed"),
        ({"device": "pump1", "action": "start", "priority": "urgent"}, 422, "validation_failed"),
        ({"device": "pump1", "action": "start", "ttl_s": -1}, 422, "validation_failed"),
        ({"device": "pump1", "action": "start", "id": "has spaces"}, 422, "validation_failed"),
        ({"action": "start"}, 422, "validation_failed"),
        ([1, 2, 3], 400, "bad_request"),
    ]
    for body, want_status, want_code in cases:
        status, err, _ = daemon.post(body)
        assert status == want_status, (body, err)
        assert set(err) == {"error"} and set(err["error"]) == {"code", "message", "details"}, err
        assert err["error"]["code"] == want_code, (body, err)
    # The offending field is named.
    _, err, _ = daemon.post({"device": "pump1", "action": "set_speed", "params": {"percent": 101}})
    assert err["error"]["details"]["errors"][0]["field"] == "params.percent"
    _, err, _ = daemon.post({"device": "nope", "action": "start"})
    assert err["error"]["details"]["field"] == "device"
    # Malformed JSON, empty body, oversized body.
    for raw, want_status, want_code in [
        (b'{"device": "pump1", ', 400, "bad_request"),
        (b"", 400, "bad_request"),
        (b"\xff\xfe", 400, "bad_request"),
        (
            b'{"device": "pump1", "action": "start", "params": {"x": "' + b"a" * 70_000 + b'"}}',
            413,
            "payload_too_large",
        ),
    ]:
        status, err, _ = daemon.post(None, raw=raw)
        assert status == want_status and err["error"]["code"] == want_code, (raw[:40], err)
    # Bad query parameter.
    status, err, _ = daemon.post({"device": "pump1", "action": "start"}, wait=-1)  # type: ignore[arg-type]
    assert status == 400 and err["error"]["details"]["field"] == "wait"
    assert _db_rows(daemon) == before
    assert daemon.sim_log() == []
    status, err = daemon.get("/api/v1/commands/does-not-exist")
    assert status == 404 and err["error"]["code"] == "unknown_command"
    status, err = daemon.get("/no/such/route")
    assert status == 404 and err["error"]["code"] == "not_found"


def test_duplicate_id_returns_the_original_and_never_runs_twice(daemon: Daemon) -> None:
    body = {"id": "order-42", "device": "pump1", "action": "set_speed", "params": {"percent": 10}}
    status, first, _ = daemon.post(body, wait=10)
    assert status == 200 and first["state"] == "succeeded"
    rows = _db_rows(daemon)
    for _ in range(3):
        status, again, headers = daemon.post(body, wait=5)
        assert status == 200 and headers.get("Idempotent-Replay") == "true"
        assert again["id"] == "order-42" and again["transitions"] == first["transitions"]
    assert daemon.executions("order-42") == 1
    # Same id, different command: a conflict, not a silent replay.
    status, err, _ = daemon.post({**body, "params": {"percent": 90}})
    assert status == 409 and err["error"]["code"] == "conflict"
    assert _db_rows(daemon) == rows


def test_expired_command_never_executes(make_daemon: Any) -> None:
    # The blocker takes 0.6 s; the reply timeout leaves room for a loaded machine (the default 1 s did not).
    slow = {"GATEWAYD_DEVICES__PUMP1__SIMULATOR__LATENCY_S": "0.6", "GATEWAYD_SERIAL__BUS0__RESPONSE_TIMEOUT_S": "3"}
    d: Daemon = make_daemon(slow)
    d.start()
    status, blocker, _ = d.post({"device": "pump1", "action": "start"})
    assert status == 202
    status, short, _ = d.post({"device": "pump1", "action": "set_speed", "params": {"percent": 5}, "ttl_s": 0.2})
    assert status == 202
    rec = d.wait_final(short["id"])
    assert rec["state"] == "expired" and rec["error"]["code"] == "expired"
    assert "dispatched" not in _states(rec)
    assert d.wait_final(blocker["id"])["state"] == "succeeded"
    assert d.executions(short["id"]) == 0


def test_sigterm_loses_nothing(make_daemon: Any) -> None:
    """Commands accepted before SIGTERM are either finished, or still queued and run after restart."""
    d: Daemon = make_daemon({"GATEWAYD_DEVICES__PUMP1__SIMULATOR__LATENCY_S": "0.3"})
    d.start()
    ids = []
    for i in range(6):
        status, rec, _ = d.post({"device": "pump1", "action": "set_speed", "params": {"percent": i}})
        assert status == 202
        ids.append(rec["id"])
    d.wait_state(ids[0], "dispatched")
    assert d.stop(signal.SIGTERM) == 0
    with sqlite3.connect(d.data_dir / "gatewayd.sqlite3") as conn:
        states = dict(conn.execute("SELECT id, state FROM commands"))
    assert set(states) == set(ids)
    assert set(states.values()) <= {"succeeded", "queued"}, states
    assert "queued" in states.values(), "the test should stop the daemon with work still queued"
    done_before = {i for i, s in states.items() if s == "succeeded"}
    assert {e["id"] for e in d.sim_log()} == done_before

    d.start()
    for command_id in ids:
        assert d.wait_final(command_id)["state"] == "succeeded"
        assert d.executions(command_id) == 1
    assert d.stop() == 0
    assert any(line["event"] == "gateway_stopped" for line in d.log_lines())


def test_kill_9_right_after_acceptance_then_restart_runs_it_exactly_once(make_daemon: Any) -> None:
    d: Daemon = make_daemon({"GATEWAYD_DEVICES__PUMP1__SIMULATOR__LATENCY_S": "0.2"})
    for round_ in range(3):
        d.start()
        command_id = f"kill9-{round_}-{uuid.uuid4().hex[:6]}"
        status, rec, _ = d.post(
            {"id": command_id, "device": "pump1", "action": "set_speed", "params": {"percent": 20 + round_}}
        )
        assert status == 202, rec
        d.kill9()
        d.start()
        assert d.wait_final(command_id)["state"] == "succeeded"
        assert d.executions(command_id) == 1
        d.kill9()


def test_kill_9_while_dispatched_is_resent_and_the_device_does_not_act_twice(make_daemon: Any) -> None:
    d: Daemon = make_daemon({"GATEWAYD_DEVICES__PUMP1__SIMULATOR__LATENCY_S": "0.5"})
    d.start()
    status, _, _ = d.post({"id": "inflight-1", "device": "pump1", "action": "start"})
    assert status == 202
    deadline = time.monotonic() + 5
    while d.command("inflight-1")["state"] != "dispatched":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    d.kill9()
    d.start()
    final = d.wait_final("inflight-1")
    assert final["state"] == "succeeded"
    assert "requeued after restart" in [t.get("detail") for t in final["transitions"]]
    assert d.executions("inflight-1") == 1


def test_priority_order_on_one_device(make_daemon: Any) -> None:
    d: Daemon = make_daemon({"GATEWAYD_DEVICES__PUMP1__SIMULATOR__LATENCY_S": "0.3"})
    d.start()
    d.post({"id": "first", "device": "pump1", "action": "start"})
    d.wait_state("first", "dispatched")  # "first" is on the device now; the rest queue behind it
    for cid, prio in [("low", "low"), ("normal", "normal"), ("high", "high"), ("critical", "critical")]:
        status, _, _ = d.post({"id": cid, "device": "pump1", "action": "read", "priority": prio})
        assert status == 202
    for cid in ("first", "low"):
        d.wait_final(cid)
    order = [e["id"] for e in d.sim_log()]
    assert order == ["first", "critical", "high", "normal", "low"]


def test_second_sigint_forces_exit_and_keeps_what_was_accepted(make_daemon: Any) -> None:
    d: Daemon = make_daemon(
        {
            "GATEWAYD_DEVICES__PUMP1__SIMULATOR__LATENCY_S": "3",
            "GATEWAYD_SERIAL__BUS0__RESPONSE_TIMEOUT_S": "10",
            "GATEWAYD_SHUTDOWN__GRACE_S": "30",
        }
    )
    d.start()
    d.post({"id": "slow", "device": "pump1", "action": "start"})
    d.post({"id": "behind", "device": "pump1", "action": "stop"})
    d.wait_state("slow", "dispatched")
    d.send_signal(signal.SIGINT)
    wait_until(lambda: any(e["event"] == "gateway_stopping" for e in d.log_lines()), 5, "gateway_stopping")
    assert d.proc is not None and d.proc.poll() is None, "first SIGINT waits for the executing command"
    started = time.monotonic()
    assert d.stop(signal.SIGINT, timeout=10) == 130
    assert time.monotonic() - started < 5
    d.env["GATEWAYD_DEVICES__PUMP1__SIMULATOR__LATENCY_S"] = "0"
    d.start()
    assert d.wait_final("slow")["state"] == "succeeded"
    assert d.wait_final("behind")["state"] == "succeeded"
    assert d.executions("slow") == 1 and d.executions("behind") == 1


def test_corrupt_or_unusable_database_gives_a_clear_startup_error(make_daemon: Any, tmp_path: Any) -> None:
    d: Daemon = make_daemon(name="corrupt")
    d.data_dir.mkdir()
    (d.data_dir / "gatewayd.sqlite3").write_bytes(b"this is not a database at all" * 200)
    d.start(wait=False)
    assert d.proc is not None
    assert d.proc.wait(10) == 2
    text = d.log_path.read_text()
    assert "cannot start" in text and "not a usable SQLite database" in text and "move it aside" in text
    assert "Traceback" not in text

    d2: Daemon = make_daemon(name="blocked")
    d2.data_dir.mkdir()
    (d2.data_dir / "gatewayd.sqlite3").mkdir()  # a directory where the file should be
    d2.start(wait=False)
    assert d2.proc is not None
    assert d2.proc.wait(10) != 0
    text = d2.log_path.read_text()
    assert "cannot start" in text and "gatewayd.sqlite3" in text and "Traceback" not in text


def test_invalid_environment_override_stops_startup_with_the_key(make_daemon: Any) -> None:
    d: Daemon = make_daemon({"GATEWAYD_HTTP__PORT": "not-a-port"})
    d.start(wait=False)
    assert d.proc is not None and d.proc.wait(10) == 2
    text = d.log_path.read_text()
    assert "GATEWAYD_HTTP__PORT" in text and "http.port" in text and "Traceback" not in text


def test_sighup_reloads_log_level_and_profiles(make_daemon: Any, tmp_path: Any) -> None:
    # A copy of the bundled config and profiles that the test can edit.
    cfg_dir = tmp_path / "cfg"
    (cfg_dir / "profiles").mkdir(parents=True)
    for p in (ROOT / "hardware" / "profiles").glob("*.toml"):
        (cfg_dir / "profiles" / p.name).write_text(p.read_text())
    text = CONFIG.read_text().replace('profiles_dir = "./hardware/profiles"', 'profiles_dir = "./profiles"')
    (cfg_dir / "config.toml").write_text(text)
    d: Daemon = make_daemon(config=cfg_dir / "config.toml")
    d.start()
    status, err, _ = d.post({"device": "pump1", "action": "set_speed", "params": {"percent": 80}})
    assert status == 202
    # Tighten the profile (max 50 %) and turn on debug logging, then SIGHUP.
    prof = cfg_dir / "profiles" / "sim_pump.toml"
    prof.write_text(prof.read_text().replace("min = 0, max = 100", "min = 0, max = 50"))
    (cfg_dir / "config.toml").write_text(text.replace('level = "info"', 'level = "debug"'))
    d.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while not any(line["event"] == "config_reloaded" for line in d.log_lines()):
        assert time.monotonic() < deadline, d.log_tail()
        time.sleep(0.05)
    status, err, _ = d.post({"device": "pump1", "action": "set_speed", "params": {"percent": 80}})
    assert status == 422 and "at most 50" in err["error"]["details"]["errors"][0]["message"]
    status, rec, _ = d.post({"device": "pump1", "action": "set_speed", "params": {"percent": 40}}, wait=5)
    assert rec["state"] == "succeeded"
    assert any(line["level"] == "debug" for line in d.log_lines()), "debug lines after the reload"
    # A broken file on SIGHUP is refused and the daemon keeps working.
    (cfg_dir / "config.toml").write_text(text + "\n[bogus]\n")
    d.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while not any(line["event"] == "reload_rejected" for line in d.log_lines()):
        assert time.monotonic() < deadline, d.log_tail()
        time.sleep(0.05)
    status, rec, _ = d.post({"device": "relay1", "action": "on"}, wait=5)
    assert rec["state"] == "succeeded"
    assert d.stop() == 0


def test_logs_are_json_lines_with_command_and_device(daemon: Daemon) -> None:
    _, rec, _ = daemon.post({"device": "pump1", "action": "start"}, wait=5)
    assert daemon.stop() == 0
    raw = [line for line in daemon.log_path.read_text().splitlines() if not line.startswith("--- start")]
    lines = [json.loads(line) for line in raw]  # every line is one JSON object
    for line in lines:
        assert {"event", "level", "timestamp"} <= set(line)
    about = [line for line in lines if line.get("command_id") == rec["id"]]
    assert {line["event"] for line in about} >= {"command_accepted", "command_dispatched", "command_finished"}
    assert all(line["device"] == "pump1" for line in about)


def test_a_queued_command_is_cancelled_from_the_cli_and_never_runs_one_on_the_wire_is_not(make_daemon: Any) -> None:
    slow = {"GATEWAYD_DEVICES__PUMP1__SIMULATOR__LATENCY_S": "3", "GATEWAYD_SERIAL__BUS0__RESPONSE_TIMEOUT_S": "5"}
    d: Daemon = make_daemon(slow)
    d.start()
    d.post({"id": "on-the-wire", "device": "pump1", "action": "start"})
    d.wait_state("on-the-wire", "dispatched")
    assert d.post({"id": "waiting", "device": "pump1", "action": "set_speed", "params": {"percent": 40}})[0] == 202

    def cancel(command_id: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "gatewayd", "cancel", command_id, "--url", d.url]
        return subprocess.run(argv, capture_output=True, text=True, timeout=30)

    done = cancel("waiting")
    assert done.returncode == 0 and "never sent" in done.stdout, done.stderr
    assert cancel("waiting").returncode == 0  # asking again changes nothing
    refused = cancel("on-the-wire")
    assert refused.returncode == 2 and "409" in refused.stderr and "may already have reached" in refused.stderr
    unknown = cancel("no-such-command")
    assert unknown.returncode == 2 and "404" in unknown.stderr
    assert d.wait_final("on-the-wire")["state"] == "succeeded"
    rec = d.wait_final("waiting")
    assert rec["state"] == "cancelled" and rec["error"]["code"] == "cancelled"
    assert d.executions("waiting") == 0
