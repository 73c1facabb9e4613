"""The MQTT uplink against a real Mosquitto broker: offline start, ack after commit, idempotent commands, bad
payloads, the retained status and last will, fast link-loss detection, the byte budget, broker restarts under
load, kill -9 during a drain, and Home Assistant discovery."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from gatewayd.app.supervisor import Supervisor
from gatewayd.commands.service import CommandService
from gatewayd.config import load_config
from tests.conftest import CONFIG, Daemon
from tests.mqtt_broker import GW, Broker, Subscriber, daemon_env, publish, results_by_id, wait_until


def _uplink(daemon: Daemon) -> dict[str, Any]:
    status = daemon.get("/api/v1/stats")[1]["uplink"]
    assert isinstance(status, dict)
    return status


def test_starts_without_a_broker_works_and_publishes_every_result_once_it_is_up(
    broker: Broker, make_daemon: Any
) -> None:
    broker.start()
    with Subscriber(broker, f"{GW}/#") as sub:
        broker.stop()  # the subscriber's session (and what is queued for it) survives, as on a real broker
        d: Daemon = make_daemon(daemon_env(broker))
        d.start()
        assert _uplink(d)["connected"] is False
        ids = []
        for i in range(20):
            status, body, _ = d.post({"device": "pump1", "action": "set_speed", "params": {"percent": i}}, wait=5)
            assert status == 200 and body["state"] == "succeeded"
            ids.append(body["id"])
        assert d.get("/api/v1/outbox")[1]["by_kind"]["result"] == 20
        broker.start()
        sub.wait_for(lambda _m: set(ids) <= set(results_by_id(sub)), timeout=20)
        wait_until(lambda: _uplink(d)["connected"], what="connected")
        results = results_by_id(sub)
        assert [results[i][0]["params"]["percent"] for i in ids] == list(range(20))
        assert all(results[i][0]["state"] == "succeeded" and results[i][0]["id"] == i for i in ids)
        wait_until(lambda: d.get("/api/v1/outbox")[1]["by_kind"].get("result", 0) == 0, what="outbox drained")
        status_msgs = [p for t, p, _ in sub.snapshot() if t == f"{GW}/status"]
        assert status_msgs[-1] == b"online"


def test_a_command_over_mqtt_runs_once_and_a_redelivery_gets_its_result_again(broker: Broker, make_daemon: Any) -> None:
    broker.start()
    d: Daemon = make_daemon(daemon_env(broker))
    d.start()
    wait_until(lambda: _uplink(d)["connected"], what="connected")
    with Subscriber(broker, f"{GW}/result/#") as sub:
        command = json.dumps({"id": "mq-1", "device": "pump1", "action": "set_speed", "params": {"percent": 33}})
        publish(broker, f"{GW}/cmd", command)
        sub.wait_for(lambda _m: "mq-1" in results_by_id(sub))
        publish(broker, f"{GW}/cmd", command)  # the same id again (a client retrying after a lost PUBACK)
        sub.wait_for(lambda _m: len(results_by_id(sub)["mq-1"]) == 2)
        first, second = results_by_id(sub)["mq-1"]
    assert d.executions("mq-1") == 1
    assert first["state"] == second["state"] == "succeeded"
    assert first["result"] == second["result"] and first["result"]["speed"] == 33
    assert d.command("mq-1")["source"] == "mqtt"


def test_malformed_commands_are_rejected_with_an_error_event_and_change_nothing(
    broker: Broker, make_daemon: Any
) -> None:
    broker.start()
    d: Daemon = make_daemon(daemon_env(broker))
    d.start()
    wait_until(lambda: _uplink(d)["connected"], what="connected")
    before = d.get("/api/v1/stats")[1]["commands"]
    bad = [
        b"not json at all {",
        b"[1, 2, 3]",
        json.dumps({"id": "bad-types", "device": 5, "action": ["x"]}).encode(),
        json.dumps({"id": "bad-param", "device": "pump1", "action": "set_speed", "params": {"percent": 500}}).encode(),
        json.dumps({"id": "bad-device", "device": "nope", "action": "start"}).encode(),
        b'{"id": "huge", "device": "pump1", "action": "start", "pad": "' + b"x" * 1_000_000 + b'"}',
        b"\xff\xfe\x00garbage",
        b"",
    ]
    with Subscriber(broker, f"{GW}/events") as sub:
        for payload in bad:
            publish(broker, f"{GW}/cmd", payload)
        sub.wait_for(lambda _m: len([e for e in sub.json() if e.get("event") == "command_rejected"]) >= len(bad))
        rejected = [e for e in sub.json() if e.get("event") == "command_rejected"]
    codes = {e["data"]["id"]: e["data"]["code"] for e in rejected if e["data"]["id"]}
    assert codes["bad-param"] == "validation_failed"
    assert codes["bad-device"] in ("unknown_device", "validation_failed", "not_found")
    assert "huge" not in codes  # 1 MB is refused before it is parsed: no id to report
    assert "payload_too_large" in [e["data"]["code"] for e in rejected]
    assert codes["bad-types"] in ("bad_request", "validation_failed")
    assert all(e["severity"] == "warning" and e["data"]["message"] for e in rejected)
    assert d.get("/api/v1/stats")[1]["commands"] == before  # nothing half-accepted
    for command_id in ("bad-param", "bad-device", "huge", "bad-types"):
        assert d.get(f"/api/v1/commands/{command_id}")[0] == 404
    # Still serving after all of it.
    with Subscriber(broker, f"{GW}/result/#", client_id="after") as sub:
        publish(broker, f"{GW}/cmd", json.dumps({"id": "good", "device": "pump1", "action": "start"}))
        sub.wait_for(lambda _m: "good" in results_by_id(sub))


def test_retained_status_is_online_then_offline_on_a_clean_stop_and_by_the_will_after_kill_9(
    broker: Broker, make_daemon: Any
) -> None:
    broker.start()
    d: Daemon = make_daemon(daemon_env(broker))
    d.start()
    wait_until(lambda: _uplink(d)["connected"], what="connected")
    with Subscriber(broker, f"{GW}/status", client_id="s1") as sub:  # a late subscriber gets the retained value
        sub.wait_for(lambda m: (f"{GW}/status", b"online", True) in m)
        assert d.stop() == 0
        sub.wait_for(lambda m: m[-1][1] == b"offline")
    d.start()
    wait_until(lambda: _uplink(d)["connected"], what="connected again")
    with Subscriber(broker, f"{GW}/status", client_id="s2") as sub:
        sub.wait_for(lambda m: m and m[-1][1] == b"online")
        d.kill9()  # no goodbye: the broker publishes the will when the connection drops
        sub.wait_for(lambda m: m[-1][1] == b"offline", timeout=10)


def test_a_silent_broker_is_detected_by_a_missing_puback_and_the_link_comes_back(
    broker: Broker, make_daemon: Any
) -> None:
    broker.start()
    d: Daemon = make_daemon(daemon_env(broker))
    d.start()
    wait_until(lambda: _uplink(d)["connected"], what="connected")
    assert d.post({"device": "sensor1", "action": "set_interval", "params": {"seconds": 0.1}}, wait=5)[0] == 200
    broker.pause()  # the TCP connection stays up; nothing is acknowledged any more
    paused = time.monotonic()
    try:
        wait_until(lambda: not _uplink(d)["connected"], timeout=10, what="link loss detected")
        detected = time.monotonic() - paused
    finally:
        broker.resume()
    assert detected < 5  # puback_timeout_s = 1 (plus the next telemetry flush): not 1.5 x keepalive
    wait_until(lambda: _uplink(d)["connected"], timeout=10, what="reconnected")
    assert "publish failed" in (_uplink(d)["last_error"] or "") or _uplink(d)["connects"] >= 2


def test_with_a_small_byte_budget_an_outage_drops_only_old_telemetry_and_counts_it(
    broker: Broker, make_daemon: Any
) -> None:
    broker.start()
    with Subscriber(broker, f"{GW}/#") as sub:
        broker.stop()
        d: Daemon = make_daemon(daemon_env(broker, GATEWAYD_OUTBOX__MAX_BYTES="16384"))
        d.start()
        assert d.post({"device": "sensor1", "action": "set_interval", "params": {"seconds": 0.01}}, wait=5)[0] == 200
        ids = []
        for i in range(60):
            body = d.post({"device": "pump1", "action": "set_speed", "params": {"percent": i}}, wait=5)[1]
            ids.append(body["id"])
            time.sleep(0.02)
        # An event: the node's alarm threshold below the room temperature raises one at the next reading.
        assert d.post({"device": "sensor1", "action": "set_alarm", "params": {"above_c": -40}}, wait=5)[0] == 200
        wait_until(
            lambda: (o := d.get("/api/v1/outbox")[1])["telemetry_dropped"] > 100 and o["by_kind"].get("event", 0) >= 1,
            what="telemetry dropped and the alarm event written",  # the drops may come first: wait for both
        )
        outbox = d.get("/api/v1/outbox")[1]
        # Results alone outgrow this budget; they stay, and telemetry is what gives way.
        assert outbox["by_kind"]["result"] == 62  # every result kept: the 60, set_interval and set_alarm
        assert outbox["by_kind"].get("telemetry", 0) < 20
        assert outbox["by_kind"].get("event", 0) >= 1
        metrics = d.get("/metrics")[1]
        assert 'gatewayd_telemetry_dropped_total{reason="budget"}' in metrics
        broker.start()
        sub.wait_for(lambda _m: set(ids) <= set(results_by_id(sub)) and sub.json("/telemetry/sensor1"), timeout=20)
        events = [e for e in sub.json("/events") if e.get("event") == "temperature_alarm"]
        assert events and events[0]["severity"] == "warning"
        telemetry = sub.json("/telemetry/sensor1")
        assert telemetry  # the newest survived and went out
        # The backlog went out results first: every result before the first stored telemetry reading (one with a
        # seq). Live readings (no seq, from memory) may go ahead of both: they are not backlog.
        wait_until(lambda: d.get("/api/v1/outbox")[1]["rows"] == 0, what="the backlog sent")
        messages = [(t, json.loads(p)) for t, p, _ in sub.snapshot() if "/result/" in t or "/telemetry/" in t]
        last_result = max(i for i, (t, _) in enumerate(messages) if "/result/" in t)
        stored = [i for i, (t, m) in enumerate(messages) if "/telemetry/" in t and "seq" in m]
        assert all(last_result < i for i in stored)
        telemetry = sub.json("/telemetry/sensor1")
        # Each path keeps its order: the backlog's readings in order, the live ones in order.
        for stored in (True, False):
            numbers = [t["values"]["n"] for t in telemetry if ("seq" in t) is stored]
            assert numbers == sorted(numbers)


def test_kill_9_during_a_backlog_drain_then_restart_resumes_the_drain_and_loses_nothing(
    broker: Broker, make_daemon: Any
) -> None:
    broker.start()
    with Subscriber(broker, f"{GW}/result/#") as sub:
        broker.stop()
        d: Daemon = make_daemon(
            daemon_env(broker, GATEWAYD_MQTT__DRAIN_MESSAGES_PER_S="100", GATEWAYD_MQTT__DRAIN_BURST="10")
        )
        d.start()
        ids = []
        for i in range(300):
            status, body, _ = d.post(
                {"id": f"bk-{i:03d}", "device": "pump1", "action": "set_speed", "params": {"percent": i % 101}}
            )
            assert status == 202
            ids.append(body["id"])
        wait_until(lambda: d.get("/api/v1/outbox")[1]["by_kind"].get("result", 0) == 300, what="backlog recorded")
        broker.start()
        sub.wait_for(lambda _m: len(results_by_id(sub)) >= 60, timeout=20)  # mid-drain (100/s paced)
        d.kill9()
        got = len(results_by_id(sub))
        assert got < 300
        d.start()
        sub.wait_for(lambda _m: set(ids) <= set(results_by_id(sub)), timeout=30)
    assert all(d.executions(i) == 1 for i in ids)


def test_home_assistant_discovery_announces_each_device(broker: Broker, make_daemon: Any) -> None:
    broker.start()
    d: Daemon = make_daemon(daemon_env(broker, GATEWAYD_MQTT__HA_DISCOVERY="true"))
    d.start()
    wait_until(lambda: _uplink(d)["connected"], what="connected")
    with Subscriber(broker, "homeassistant/#", client_id="ha") as sub:
        sub.wait_for(lambda m: any("sensor1/temperature_c" in t for t, _, _ in m))
        # Retained when the subscriber came after them; live if it was there first: both are announcements.
        configs = {t: json.loads(p) for t, p, _ in sub.snapshot() if p}
    temperature = configs["homeassistant/sensor/gatewayd_gw-dev_sensor1/temperature_c/config"]
    assert temperature["state_topic"] == f"{GW}/telemetry/sensor1"
    assert temperature["unit_of_measurement"] == "°C"
    assert temperature["availability_topic"] == f"{GW}/status"
    start = configs["homeassistant/button/gatewayd_gw-dev_pump1/start/config"]
    assert start["command_topic"] == f"{GW}/cmd"
    # Pressing the button in Home Assistant publishes payload_press: it runs the action.
    with Subscriber(broker, f"{GW}/result/#", client_id="ha-results") as results:
        publish(broker, start["command_topic"], start["payload_press"])
        results.wait_for(lambda m: any(json.loads(p)["action"] == "start" for _, p, _ in m))


def test_a_command_queued_by_the_broker_while_the_daemon_was_down_runs_when_it_starts(
    broker: Broker, make_daemon: Any
) -> None:
    broker.start()
    d: Daemon = make_daemon(daemon_env(broker))
    d.start()
    wait_until(lambda: _uplink(d)["connected"], what="connected")
    assert d.stop() == 0
    # The daemon's persistent session holds its subscription: the broker queues this for it.
    publish(broker, f"{GW}/cmd", json.dumps({"id": "while-down", "device": "pump1", "action": "start"}))
    d.start()
    wait_until(lambda: d.get("/api/v1/commands/while-down")[0] == 200, what="queued command received")
    assert d.wait_final("while-down")["state"] == "succeeded"


def test_tls_with_a_client_certificate_connects_and_without_one_is_refused(tmp_path: Path, make_daemon: Any) -> None:
    broker = Broker(tmp_path / "tls-broker", tls=True)
    broker.start()
    try:
        certs = broker.certs
        tls = {
            "GATEWAYD_MQTT__TLS__CA_FILE": str(certs["ca.pem"]),
            "GATEWAYD_MQTT__TLS__CERT_FILE": str(certs["client.pem"]),
            "GATEWAYD_MQTT__TLS__KEY_FILE": str(certs["client.key"]),
        }
        with Subscriber(broker, f"{GW}/result/#") as sub:
            d: Daemon = make_daemon(daemon_env(broker, **tls))
            d.start()
            wait_until(lambda: _uplink(d)["connected"], what="connected over TLS")
            status, body, _ = d.post({"device": "pump1", "action": "start"}, wait=5)
            assert status == 200
            sub.wait_for(lambda _m: body["id"] in results_by_id(sub))
            assert d.stop() == 0
        # The broker requires a client certificate: with the CA alone the daemon is refused, and says so.
        no_cert = make_daemon(daemon_env(broker, GATEWAYD_MQTT__TLS__CA_FILE=str(certs["ca.pem"])), name="nocert")
        no_cert.start()
        wait_until(lambda: _uplink(no_cert)["last_error"], 10, "the refused connection")
        uplink = _uplink(no_cert)
        assert uplink["connected"] is False and uplink["connects"] == 0
        # Not "timed out": the broker hung up during the TLS handshake, and start-up did not wait that out.
        assert "closed the connection before accepting it" in uplink["last_error"], uplink["last_error"]
        assert no_cert.post({"device": "pump1", "action": "stop"}, wait=5)[0] == 200  # works offline meanwhile
    finally:
        broker.kill9()


async def test_a_bug_while_taking_one_mqtt_command_is_reported_and_the_uplink_goes_on(
    tmp_path: Path, broker: Broker, monkeypatch: Any
) -> None:
    """An exception nobody typed (a bug) while one MQTT command is taken: the sender gets ``command_rejected`` with
    ``internal_error``, the message is acknowledged (not delivered again to crash the next start), and the
    daemon and its uplink go on with the next command, as HTTP answers 500 and goes on."""
    broker.start()
    original = CommandService.submit

    async def buggy(self: CommandService, payload: Any, **kw: Any) -> Any:
        if isinstance(payload, dict) and payload.get("id") == "trips-a-bug":
            raise RuntimeError("a bug in the command path")
        return await original(self, payload, **kw)

    monkeypatch.setattr(CommandService, "submit", buggy)
    env = {"GATEWAYD_HTTP__PORT": "0", "GATEWAYD_GATEWAY__DATA_DIR": str(tmp_path / "data"), **daemon_env(broker)}
    sup = Supervisor(load_config(CONFIG, environ=env), environ={})
    run = asyncio.create_task(sup.run(install_signals=False))
    try:
        # Subscribed, not only connected: a command published between the CONNACK and the SUBACK reaches nobody.
        while not (sup.uplink is not None and sup.uplink.subscribed):
            assert not run.done(), "the daemon stopped while starting"
            await asyncio.sleep(0.05)
        with Subscriber(broker, f"{GW}/#") as sub:
            for cid in ("trips-a-bug", "after-the-bug"):
                body = {"id": cid, "device": "pump1", "action": "start"}
                await asyncio.to_thread(publish, broker, f"{GW}/cmd", json.dumps(body))
            deadline = time.monotonic() + 15
            while "after-the-bug" not in results_by_id(sub):
                assert not run.done(), f"the daemon stopped: {run.result() if not run.cancelled() else 'cancelled'}"
                assert time.monotonic() < deadline, "no result for the command after the bug"
                await asyncio.sleep(0.05)
            # A redelivery or a second rejection would be published before the result of a command sent after.
            marker = {"id": "marker", "device": "pump1", "action": "stop"}
            await asyncio.to_thread(publish, broker, f"{GW}/cmd", json.dumps(marker))
            while "marker" not in results_by_id(sub):
                assert time.monotonic() < deadline + 15, "no result for the marker"
                await asyncio.sleep(0.05)
            rejected = [
                e["data"]
                for e in sub.json()
                if e.get("event") == "command_rejected" and e["data"].get("id") == "trips-a-bug"
            ]
        assert len(rejected) == 1, rejected
        assert rejected[0]["code"] == "internal_error" and "look the command up" in rejected[0]["message"]
        assert results_by_id(sub)["after-the-bug"][0]["state"] == "succeeded"
        assert sup.uplink is not None and sup.uplink.connects == 1  # the same session throughout
        assert not run.done()
    finally:
        sup.request_stop("test")
        assert await asyncio.wait_for(run, 30) == 0
