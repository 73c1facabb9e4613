"""Bad input at volume over MQTT: over a thousand generated payloads (bytes that are not JSON, invalid UTF-8, JSON of
the wrong shape, payloads over the size limit, nesting thousands deep, valid commands with one field wrong,
natural-language oddities, an id already used for another command) published on ``gatewayd/gw-dev/cmd`` to a real
Mosquitto, with valid commands in between, while the daemon is connected. The daemon stays up and connected (no
payload costs it a reconnect), each bad payload gets a ``command_rejected`` event with a typed code, in order,
nothing is stored for them, the valid commands run once each and their results arrive, and the commands accepted
before the barrage are unchanged."""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Daemon
from tests.faults.bad_input import (
    DEVICES,
    REJECTION_CODES,
    SIZE_LIMIT,
    VALID_ACTIONS,
    Payload,
    bad_payloads,
    conflicts,
    payload,
)
from tests.mqtt_broker import GW, Broker, Subscriber, daemon_env, results_by_id, wait_until

pytestmark = pytest.mark.timeout(300)

ENV = {
    "GATEWAYD_INTERPRET__USER_RATE_PER_MINUTE": "100000",  # see test_bad_input_http.py
    "GATEWAYD_INTERPRET__USER_BURST": "100000",
    "GATEWAYD_OUTBOX__FLUSH_INTERVAL_S": "0.05",  # rejection events are written in the recorder's batches
}


def _clip(text: str | None) -> str | None:
    """As gatewayd.uplink.mqtt clips what a rejection echoes back."""
    return text if text is None or len(text) <= 200 else text[:200] + "..."


@st.composite
def valid_commands(draw: st.DrawFn) -> Payload:
    device, action, params = draw(st.sampled_from(VALID_ACTIONS))
    return payload({"device": device, "action": action, "params": params}, "run", "valid")


batches = st.lists(
    st.one_of(
        bad_payloads(SIZE_LIMIT), bad_payloads(SIZE_LIMIT), bad_payloads(SIZE_LIMIT), conflicts(), valid_commands()
    ),
    min_size=15,
    max_size=30,
)


class Publisher:
    """One persistent QoS 1 publisher: each publish returns once the broker has acknowledged it."""

    def __init__(self, broker: Broker):
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bad-input-publisher")
        self.client.connect("127.0.0.1", broker.port, keepalive=30)
        self.client.loop_start()

    def publish(self, raw: bytes) -> None:
        info = self.client.publish(f"{GW}/cmd", raw, qos=1)
        info.wait_for_publish(timeout=10)
        assert info.is_published()

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def rejections(sub: Subscriber) -> list[dict[str, Any]]:
    return [e for e in sub.json() if e.get("event") == "command_rejected"]


def test_a_thousand_bad_mqtt_payloads_are_each_rejected_with_a_typed_event_and_change_nothing(
    broker: Broker, make_daemon: Any
) -> None:
    broker.start()
    d: Daemon = make_daemon({**daemon_env(broker), **ENV})
    d.start()
    wait_until(lambda: d.get("/api/v1/stats")[1]["uplink"]["connected"], what="connected")
    before = {}
    for i in range(10):
        status, rec, _ = d.post(
            {"id": f"before-{i}", "device": "pump1", "action": "set_speed", "params": {"percent": i}}, wait=5
        )
        assert status == 200 and rec["state"] == "succeeded", rec
        before[rec["id"]] = d.command(rec["id"])
    counts_before = sum(d.get("/api/v1/stats")[1]["commands"].values())
    kinds: Counter[str] = Counter()
    codes: Counter[str] = Counter()
    accepted: dict[str, str] = {}  # id -> device
    n = 0
    started = time.monotonic()

    with (
        Subscriber(broker, f"{GW}/events", client_id="events") as events,
        Subscriber(broker, f"{GW}/result/#", client_id="results") as results,
    ):
        publisher = Publisher(broker)
        try:

            @settings(
                max_examples=60,
                deadline=None,
                derandomize=True,
                database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
            )
            @given(batches)
            def barrage(batch: list[Payload]) -> None:
                nonlocal n
                seen = len(rejections(events))
                sent = []
                for p in batch:
                    n += 1
                    p = p.with_id(f"m{n}")
                    publisher.publish(p.raw)
                    sent.append(p)
                    kinds[p.kind] += 1
                # Valid commands get a result; natural language either a result or a rejection, the store says
                # which. Everything else must be rejected, in the order it was sent.
                expected = []
                for p in sent:
                    if p.expect == "run":
                        assert p.command_id is not None
                        results.wait_for(lambda _m, cid=p.command_id: cid in results_by_id(results))
                        accepted[p.command_id] = json.loads(p.raw)["device"]
                    elif p.expect == "either":
                        assert p.command_id is not None
                        wait_until(
                            lambda cid=p.command_id: (
                                len(rejections(events)) >= seen + len(expected) + 1
                                or d.get(f"/api/v1/commands/{cid}")[0] == 200
                            ),
                            what=f"an answer to {p.raw[:80]!r}",
                        )
                        if d.get(f"/api/v1/commands/{p.command_id}")[0] == 200:
                            accepted[p.command_id] = d.command(p.command_id)["device"]
                        else:
                            expected.append(p)
                    else:
                        expected.append(p)
                events.wait_for(lambda _m: len(rejections(events)) >= seen + len(expected), timeout=20)
                got = rejections(events)[seen:]
                assert len(got) == len(expected), ([e["data"] for e in got], expected)
                for p, event in zip(expected, got, strict=True):
                    data = event["data"]
                    assert data["code"] in REJECTION_CODES, (data, p)
                    if p.codes is not None:
                        assert data["code"] in p.codes, (data, p)
                    assert data["id"] == _clip(p.command_id), (data, p)
                    assert isinstance(data["message"], str) and data["message"], (data, p)
                    assert event["severity"] == "warning" and event["device"] in (*DEVICES, "gateway"), event
                    codes[data["code"]] += 1
                    if p.command_id is not None and re.fullmatch(r"m\d+", p.command_id):  # one this test gave
                        assert d.get(f"/api/v1/commands/{p.command_id}")[0] == 404, p  # nothing stored for it

            barrage()
        finally:
            publisher.close()
        took = time.monotonic() - started
        print(f"\nMQTT: {n} payloads in {took:.1f} s; by kind {dict(kinds)}; rejected by code {dict(codes)}")

        for command_id, device in accepted.items():
            final = d.wait_final(command_id, timeout=20)
            assert final["state"] == "succeeded" and final["source"] == "mqtt", final
            if device == "pump1":
                assert d.executions(command_id) == 1, command_id
            assert results_by_id(results)[command_id][0]["state"] == "succeeded"

    assert d.proc is not None and d.proc.poll() is None
    assert d.get("/healthz")[0] == 200
    uplink = d.get("/api/v1/stats")[1]["uplink"]
    assert uplink["connected"] and uplink["connects"] == 1, uplink  # no payload cost the session
    assert uplink["commands_received"] == n
    assert sum(d.get("/api/v1/stats")[1]["commands"].values()) == counts_before + len(accepted)
    for command_id, rec in before.items():
        assert d.command(command_id) == rec, command_id
    assert n >= 1000 and len(accepted) > 20
    assert {"bad_request", "validation_failed", "unknown_device", "payload_too_large", "conflict"} <= set(codes)
    assert not [e for e in d.log_lines() if e.get("level") == "error"], "nothing logged as an error"
