"""Three broker restarts during 2,000 commands and 100 telemetry readings/s: nothing lost, nothing run twice, order
kept per device. Moved here from the quick suite (it takes about 40 s)."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from typing import Any

from tests.conftest import Daemon
from tests.mqtt_broker import GW, Broker, Subscriber, daemon_env, results_by_id, wait_until


def _uplink(daemon: Daemon) -> dict[str, Any]:
    status = daemon.get("/api/v1/stats")[1]["uplink"]
    assert isinstance(status, dict)
    return status


def test_three_broker_restarts_during_2000_commands_and_telemetry_lose_nothing(
    broker: Broker, make_daemon: Any
) -> None:
    broker.start()
    with Subscriber(broker, f"{GW}/#") as sub:
        d: Daemon = make_daemon(daemon_env(broker))
        d.start()
        wait_until(lambda: _uplink(d)["connected"], what="connected")
        # Telemetry at 100 messages/s from the sensor node, for the whole run.
        assert d.post({"device": "sensor1", "action": "set_interval", "params": {"seconds": 0.01}}, wait=5)[0] == 200
        ids: list[str] = []
        errors: list[Any] = []

        def load() -> None:
            for i in range(2000):
                device, body = ("pump1", {"action": "set_speed", "params": {"percent": i % 101}})
                if i % 4 == 3:
                    device, body = ("sensor1", {"action": "read"})
                status, rec, _ = d.post({"id": f"load-{i:04d}", "device": device, **body})
                if status != 202:
                    errors.append((status, rec))
                ids.append(f"load-{i:04d}")
                time.sleep(0.004)

        sender = threading.Thread(target=load)
        sender.start()
        for _ in range(3):
            time.sleep(2.0)
            broker.stop()
            time.sleep(1.0)
            broker.start()
        sender.join(timeout=60)
        assert not errors, errors[:3]
        assert len(ids) == 2000
        sub.wait_for(lambda _m: set(ids) <= set(results_by_id(sub)), timeout=60)
        results = results_by_id(sub)
        messages = sub.snapshot()
    assert _uplink(d)["connects"] >= 4
    # Each command executed once (the simulators' logs) and its result delivered, duplicates identical.
    pump_log = Counter(e["id"] for e in d.sim_log("pump1"))
    sensor_log = Counter(e["id"] for e in d.sim_log("sensor1"))
    for command_id in ids:
        assert pump_log[command_id] + sensor_log[command_id] == 1, command_id
        copies = results[command_id]
        assert all(c == copies[0] for c in copies) and copies[0]["id"] == command_id
        assert copies[0]["state"] == "succeeded"
    # Per-device order: each device's results arrive in the order they were recorded (first copies).
    for device in ("pump1", "sensor1"):
        seqs: list[int] = []
        seen: set[int] = set()
        for topic, payload, _ in messages:
            if topic.startswith(f"{GW}/result/"):
                body = json.loads(payload)
                if body["device"] == device and body["seq"] not in seen:
                    seen.add(body["seq"])
                    seqs.append(body["seq"])
        assert seqs == sorted(seqs), device
    telemetry = [json.loads(p) for t, p, _ in messages if t == f"{GW}/telemetry/sensor1"]
    # Two paths, each in order: readings from the outbox (written while the broker was away; a seq each) and live
    # ones from memory (no seq; in the order the node numbered them). Live goes ahead of backlog after a return.
    first_seen: list[int] = []
    for t in telemetry:
        if "seq" in t and t["seq"] not in first_seen[-50:]:
            first_seen.append(t["seq"])
    assert first_seen == sorted(first_seen)
    live: list[int] = []
    for t in telemetry:
        if "seq" not in t and t["values"]["n"] not in live[-50:]:
            live.append(t["values"]["n"])
    assert live == sorted(live)
    assert len(telemetry) > 500
