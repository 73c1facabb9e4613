"""The MQTT command intake under the faults black-box testing found, driven as a client would: a real Mosquitto,
publishers and a persistent subscriber, signals to the daemon, the simulator's execution log.

- one payload with NaN or 1e999 is answered (a typed ``command_rejected``) and acknowledged, with the disk below
  its reserve too, and never comes back after a restart;
- SIGTERM under MQTT load: exit 0 within ``grace_s`` plus a second, no reconnect loop, nothing lost; a second
  signal forces exit 130 at once;
- SIGSTOP past the keepalive with commands arriving, then SIGCONT: every command the broker acknowledged ends
  final and runs once, nothing is stranded in ``queued``;
- a retained command never runs, however often the daemon restarts or reconnects;
- a command published the moment a fresh gateway says it is ready is not lost;
- an emergency stop published behind natural-language requests waiting on a hanging provider runs at once;
- a flood is refused past the rate (``rate_limited``) while critical commands still get through.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections import Counter
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from gatewayd.interpret.simulator import Fault
from tests.conftest import Daemon, http
from tests.faults.mixed_load import ProviderThread, daemon_overrides
from tests.mqtt_broker import GW, Broker, Subscriber, daemon_env, publish, results_by_id, wait_until

pytestmark = pytest.mark.timeout(300)


def rejections(sub: Subscriber) -> dict[str, list[str]]:
    """command_rejected events by the id they name: their codes, in order. An event the broker delivered twice
    (the outbox sends at least once: a PUBACK lost to a stop sends it again) is counted once, by its seq."""
    out: dict[str, list[str]] = {}
    seen: set[Any] = set()
    for event in sub.json("/events"):
        if event.get("event") == "command_rejected":
            key = event.get("seq"), event.get("ts")
            if key[0] is not None and key in seen:
                continue
            seen.add(key)
            out.setdefault(str(event["data"].get("id")), []).append(event["data"]["code"])
    return out


def started(d: Daemon, timeout: float = 15.0, *, ready: bool = True) -> None:
    """Started and connected; ``ready=False`` for a gateway that is up but not ready (its storage full)."""
    d.start(wait=ready, timeout=timeout)

    def connected() -> bool:
        try:
            return bool(d.get("/api/v1/stats")[1]["uplink"]["connected"])
        except OSError:
            return False

    wait_until(connected, timeout, "the uplink connected")


class Publisher:
    """A client publishing commands with ids at a steady pace from its own thread; ``acked`` are the ids the
    broker acknowledged (QoS 1): those the gateway must not lose."""

    def __init__(self, broker: Broker, name: str, per_s: float, body: Any = None):
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name, clean_session=True)
        self.client.max_queued_messages_set(0)
        self.client.on_publish = lambda _c, _u, mid, _rc, _p: self._pubacked.add(mid)
        self.client.connect("127.0.0.1", broker.port, keepalive=30)
        self.client.loop_start()
        self.name, self.per_s = name, per_s
        self.body = body or (lambda n: {"device": "pump1", "action": "set_speed", "params": {"percent": n % 101}})
        self.sent: dict[int, str] = {}  # mid -> command id
        self._pubacked: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Publisher:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _run(self) -> None:
        n = 0
        while not self._stop.wait(1 / self.per_s):
            n += 1
            command_id = f"{self.name}-{n:05d}"
            info = self.client.publish(f"{GW}/cmd", json.dumps({"id": command_id, **self.body(n)}), qos=1)
            self.sent[info.mid] = command_id

    def stop(self, settle_s: float = 10.0) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(10)
        deadline = time.monotonic() + settle_s
        while time.monotonic() < deadline and not set(self.sent) <= self._pubacked:
            time.sleep(0.05)
        self.client.loop_stop()
        self.client.disconnect()

    @property
    def acked(self) -> list[str]:
        return [cid for mid, cid in self.sent.items() if mid in self._pubacked]


def all_final_and_run_once(d: Daemon, ids: list[str], timeout: float = 60.0) -> dict[str, dict[str, Any]]:
    final: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while len(final) < len(ids):
        for cid in [i for i in ids if i not in final]:
            status, rec = d.get(f"/api/v1/commands/{cid}")
            if status == 200 and rec["state"] in ("succeeded", "failed", "expired", "rejected", "cancelled"):
                final[cid] = rec
        if time.monotonic() > deadline:
            missing = [i for i in ids if i not in final]
            states = {i: d.get(f"/api/v1/commands/{i}") for i in missing[:5]}
            raise AssertionError(f"{len(missing)} of {len(ids)} acknowledged commands not final: {states}")
        time.sleep(0.2)
    runs = Counter(e["id"] for e in d.sim_log("pump1"))
    assert {cid: n for cid, n in runs.items() if n > 1} == {}, "executed twice"
    wrong = {cid: rec["state"] for cid, rec in final.items() if rec["state"] != "succeeded" or runs[cid] != 1}
    assert wrong == {}, wrong
    return final


# --- 1. one payload never becomes fatal -------------------------------------------------------------------------------

NON_FINITE = [
    b'{"device":"pump1","action":"set_speed","params":{"percent":NaN},"id":"nan-1"}',
    b'{"device":"pump1","action":"set_speed","params":{"percent":Infinity},"id":"inf-1"}',
    b'{"device":"pump1","action":"set_speed","params":{"percent":-Infinity},"id":"ninf-1"}',
    b'{"device":"pump1","action":"set_speed","params":{"percent":1e999},"id":"big-1"}',
    b'{"device":"pump1","action":"set_speed","params":{"percent":50},"ttl_s":NaN,"id":"ttl-1"}',
    b'{"device":"pump1","action":"set_speed","params":{"percent":50},"id":"sur-1","x":"\\ud800"}',
]


@pytest.mark.parametrize("storage", ["normal", "below_reserve"])
def test_non_finite_payloads_are_answered_acknowledged_and_never_redelivered(
    broker: Broker, make_daemon: Any, storage: str
) -> None:
    broker.start()
    env = daemon_env(broker)
    if storage == "below_reserve":  # the reserve larger than any disk: the storage is full from the start
        env["GATEWAYD_STORE__MIN_FREE_BYTES"] = str(2**40)  # 1 TiB, the most it takes
    d: Daemon = make_daemon(env)
    ready = storage == "normal"  # with the storage full, /readyz says not ready (and why)
    with Subscriber(broker, f"{GW}/#", client_id=f"nan-sub-{storage}") as sub:
        started(d, ready=ready)
        for raw in NON_FINITE:
            publish(broker, f"{GW}/cmd", raw)
        ids = ["nan-1", "inf-1", "ninf-1", "big-1", "ttl-1", "sur-1"]
        sub.wait_for(lambda _m: set(ids) <= set(rejections(sub)), timeout=15)
        assert {i: rejections(sub)[i] for i in ids} == {i: ["bad_request"] for i in ids}
        # Alive and taking commands: a critical stop goes through (the reserve is for it when the disk is full).
        estop = {"id": "estop", "device": "pump1", "action": "stop", "priority": "critical"}
        publish(broker, f"{GW}/cmd", json.dumps(estop))
        sub.wait_for(lambda _m: "estop" in results_by_id(sub), timeout=15)
        assert results_by_id(sub)["estop"][0]["state"] == "succeeded"
        assert d.proc is not None and d.proc.poll() is None
        assert d.stop() == 0
        # Acknowledged: the broker does not deliver them again to the next start.
        started(d, ready=ready)
        marker = {"id": "marker", "device": "pump1", "action": "read", "priority": "critical"}  # room for it
        publish(broker, f"{GW}/cmd", json.dumps(marker))
        sub.wait_for(lambda _m: "marker" in results_by_id(sub), timeout=15)
        assert {i: len(rejections(sub)[i]) for i in ids} == dict.fromkeys(ids, 1)
        assert d.stop() == 0
    assert not set(ids) & {e["id"] for e in d.sim_log("pump1")}


def test_non_finite_bodies_over_http_are_400_and_nothing_is_stored(make_daemon: Any) -> None:
    d: Daemon = make_daemon()
    d.start()
    for raw in NON_FINITE:
        status, body, _ = http("POST", f"{d.url}/api/v1/commands", raw=raw)
        assert status == 400 and body["error"]["code"] == "bad_request", (raw, body)
    for cid in ("nan-1", "inf-1", "ninf-1", "big-1", "ttl-1", "sur-1"):
        assert d.get(f"/api/v1/commands/{cid}")[0] == 404
    assert d.stop() == 0


# --- 2. SIGTERM under MQTT load ---------------------------------------------------------------------------------------

GRACE_S = 3.0


@pytest.mark.parametrize("trial", range(4))
def test_sigterm_under_mqtt_load_exits_0_within_grace_and_loses_nothing(
    broker: Broker, make_daemon: Any, trial: int
) -> None:
    broker.start()
    env = daemon_env(
        broker,
        GATEWAYD_SHUTDOWN__GRACE_S=str(GRACE_S),
        GATEWAYD_DEVICES__PUMP1__SIMULATOR__LATENCY_S="0.02",
        GATEWAYD_MQTT__COMMANDS_PER_S="100000",
        GATEWAYD_MQTT__COMMANDS_BURST="100000",
    )
    d: Daemon = make_daemon(env)
    started(d)
    with Publisher(broker, f"term{trial}", per_s=150) as pub:
        wait_until(lambda: len(pub.sent) > 100 + 50 * trial, 10, "load under way")
        sent_at = time.monotonic()
        d.send_signal(signal.SIGTERM)
        code = d.wait_exit(timeout=GRACE_S + 20)
        took = time.monotonic() - sent_at
        time.sleep(0.5)  # the publisher goes on while the gateway is away: the broker keeps those
    assert code == 0, d.log_tail()
    assert took <= GRACE_S + 1.0, f"stopped after {took:.2f} s"
    lines = d.log_lines()
    stopping = next(i for i, e in enumerate(lines) if e["event"] == "gateway_stopping")
    after = [e["event"] for e in lines[stopping:]]
    assert after.count("mqtt_connected") == 0, Counter(after)  # no reconnect loop
    assert "mqtt_command_not_committed" not in after
    # Everything the broker acknowledged runs once, those the gateway left unacknowledged after the next start.
    started(d)
    all_final_and_run_once(d, pub.acked)
    assert d.stop() == 0


def test_a_second_sigterm_forces_exit_130_at_once_under_mqtt_load(broker: Broker, make_daemon: Any) -> None:
    broker.start()
    env = daemon_env(
        broker,
        GATEWAYD_SHUTDOWN__GRACE_S="30",
        GATEWAYD_DEVICES__PUMP1__SIMULATOR__LATENCY_S="3",
        GATEWAYD_SERIAL__BUS0__RESPONSE_TIMEOUT_S="10",
    )
    d: Daemon = make_daemon(env)
    started(d)
    publish(broker, f"{GW}/cmd", json.dumps({"id": "slow", "device": "pump1", "action": "start", "confirm": True}))
    d.wait_state("slow", "dispatched")
    with Publisher(broker, "force", per_s=100):
        time.sleep(0.3)
        d.send_signal(signal.SIGTERM)
        wait_until(lambda: any(e["event"] == "gateway_stopping" for e in d.log_lines()), 5, "stopping")
        assert d.proc is not None and d.proc.poll() is None, "the first signal waits for the executing command"
        sent_at = time.monotonic()
        d.send_signal(signal.SIGTERM)
        code = d.wait_exit(timeout=10)
        took = time.monotonic() - sent_at
    assert code == 130 and took < 1.5, (code, took)
    d.env["GATEWAYD_DEVICES__PUMP1__SIMULATOR__LATENCY_S"] = "0"
    started(d)
    assert d.wait_final("slow")["state"] == "succeeded" and d.executions("slow") == 1
    assert d.stop() == 0


# --- 3. SIGSTOP past the keepalive ------------------------------------------------------------------------------------


def test_sigstop_past_the_keepalive_strands_nothing(broker: Broker, make_daemon: Any) -> None:
    broker.start()
    env = daemon_env(broker, GATEWAYD_MQTT__KEEPALIVE_S="5", GATEWAYD_COMMANDS__RECONCILE_INTERVAL_S="1")
    d: Daemon = make_daemon(env)
    started(d)
    with Publisher(broker, "stopped", per_s=60) as pub:
        wait_until(lambda: len(pub.sent) > 60, 10, "load under way")
        d.send_signal(signal.SIGSTOP)
        time.sleep(9)  # the broker drops the session after 1.5 keepalives (7.5 s): the gateway knows nothing of it
        d.send_signal(signal.SIGCONT)
        wait_until(lambda: len(pub.sent) > 60 * 14, 20, "load after the stop")
    final = all_final_and_run_once(d, pub.acked, timeout=60)
    assert len(final) == len(pub.acked) > 600
    assert d.get("/api/v1/queue")[1]["queued"] == 0
    metrics = http("GET", f"{d.url}/metrics")[1]
    gaps = [line for line in str(metrics).splitlines() if line.startswith("gatewayd_dispatcher_gaps_total")]
    assert all(line.endswith(" 0.0") for line in gaps), gaps
    assert d.stop() == 0


# --- 4. retained commands ---------------------------------------------------------------------------------------------


def test_a_retained_command_runs_once_live_and_never_again_across_restarts_and_reconnects(
    broker: Broker, make_daemon: Any
) -> None:
    """A command published with retain=true while the gateway listens arrives as a live message (MQTT 3.1.1
    forwards it without the retain flag) and runs once. At every later subscription (a restart, a reconnect) the
    broker replays it with the flag, and the gateway refuses it (``retained_command``): with an id or without."""
    broker.start()
    d: Daemon = make_daemon(daemon_env(broker))
    with Subscriber(broker, f"{GW}/events", client_id="retained-sub") as sub:
        started(d)
        publish(broker, f"{GW}/cmd", json.dumps({"device": "pump1", "action": "set_speed", "params": {"percent": 7}}))
        # A topic holds one retained message: first one without an id, replaced later by one with an id.
        for key, body in (
            ("None", {"device": "pump1", "action": "read"}),
            ("ret-id", {"id": "ret-id", "action": "start", "device": "pump1", "confirm": True}),
        ):
            runs = len(d.sim_log("pump1"))
            publish(broker, f"{GW}/cmd", json.dumps(body), retain=True)
            wait_until(lambda n=runs: len(d.sim_log("pump1")) == n + 1, 10, "the live delivery run")
            for restart in range(2):  # each start subscribes again, and the broker replays the retained message
                d.stop()
                started(d)
                sub.wait_for(lambda _m, k=key, n=restart: len(rejections(sub).get(k, [])) >= n + 1, timeout=15)
        broker.stop()  # and a broker restart: the reconnect subscribes again too
        broker.start()
        wait_until(lambda: d.get("/api/v1/stats")[1]["uplink"]["connects"] >= 2, 20, "the reconnect")
        sub.wait_for(lambda _m: len(rejections(sub).get("ret-id", [])) >= 3, timeout=15)
        assert d.stop() == 0
    assert [e["action"] for e in d.sim_log("pump1")] == ["set_speed", "read", "start"]  # once each, live
    codes = rejections(sub)
    assert codes["None"] == ["retained_command"] * 2 and codes["ret-id"] == ["retained_command"] * 3, codes


# --- 5. readiness means subscribed ------------------------------------------------------------------------------------


@pytest.mark.parametrize("trial", range(6))
def test_a_command_published_once_a_fresh_gateway_is_ready_is_not_lost(
    broker: Broker, make_daemon: Any, trial: int
) -> None:
    broker.start()
    gateway = f"fresh-{trial}-{time.monotonic_ns()}"  # no session at the broker: nothing kept for it before
    d: Daemon = make_daemon(daemon_env(broker, GATEWAYD_GATEWAY__ID=gateway))
    d.start(timeout=15)  # returns at the first 200 from /readyz
    first = {"id": f"first-{trial}", "device": "pump1", "action": "read"}
    publish(broker, f"gatewayd/{gateway}/cmd", json.dumps(first))
    assert d.wait_final(f"first-{trial}", timeout=10)["state"] == "succeeded"
    assert d.stop() == 0


# --- 8. concurrency and the ingress limit -----------------------------------------------------------------------------


def test_an_emergency_stop_behind_texts_on_a_hanging_provider_runs_at_once(broker: Broker, make_daemon: Any) -> None:
    broker.start()
    with ProviderThread() as provider, Subscriber(broker, f"{GW}/result/#", client_id="estop-sub") as sub:
        d: Daemon = make_daemon(
            daemon_env(
                broker,
                **{
                    **daemon_overrides(provider.base_url),
                    "GATEWAYD_INTERPRET__PROVIDERS__OPENAI__TIMEOUT_S": "4",
                    "GATEWAYD_INTERPRET__DEADLINE_S": "5",
                },
            )
        )
        started(d)
        provider.fail(Fault.hang(10))
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="texter", clean_session=True)
        client.connect("127.0.0.1", broker.port)
        client.loop_start()
        try:
            for i in range(10):
                text = {"id": f"text-{i}", "text": f"set the pump to {10 + i} percent"}
                client.publish(f"{GW}/cmd", json.dumps(text), qos=1).wait_for_publish(5)
            wait_until(lambda: d.get("/api/v1/stats")[1]["uplink"]["commands_taking"] == 10, 5, "ten texts taken")
            stop = {"id": "estop", "device": "pump1", "action": "stop", "priority": "critical"}
            published = time.monotonic()
            client.publish(f"{GW}/cmd", json.dumps(stop), qos=1)
            sub.wait_for(lambda _m: "estop" in results_by_id(sub), timeout=10)
            took = time.monotonic() - published
        finally:
            client.loop_stop()
            client.disconnect()
        assert results_by_id(sub)["estop"][0]["state"] == "succeeded"
        assert took < 0.5, f"the emergency stop's result came {took:.2f} s after it was published"
        assert d.get("/api/v1/stats")[1]["uplink"]["commands_taking"] == 10  # the texts still wait on the provider
        provider.heal()
        assert d.stop() == 0


@pytest.mark.parametrize("qos", [1, 0])
def test_a_flood_is_paced_a_runaway_refused_and_an_emergency_stop_still_runs_at_once(
    broker: Broker, make_daemon: Any, qos: int
) -> None:
    """QoS 1: a batch far past the rate is taken in full, paced. QoS 0 (nothing holds the publisher back): what
    would wait longer than max_wait_s is refused, and the refusals' own events are bounded too."""
    broker.start()
    # QoS 1: 1,500 at once, which Mosquitto hands over without waiting for acknowledgements; QoS 0: 300.
    count, rate, burst, max_wait = (1500, 500, 100, 10) if qos == 1 else (300, 20, 10, 1)
    env = daemon_env(
        broker,
        GATEWAYD_MQTT__COMMANDS_PER_S=str(rate),
        GATEWAYD_MQTT__COMMANDS_BURST=str(burst),
        GATEWAYD_MQTT__MAX_WAIT_S=str(max_wait),
    )
    d: Daemon = make_daemon(env)
    with Subscriber(broker, f"{GW}/#", client_id=f"flood-sub-{qos}") as sub:
        started(d)
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"flooder-{qos}", clean_session=True)
        client.max_queued_messages_set(0)
        client.connect("127.0.0.1", broker.port)
        client.loop_start()
        try:
            bodies = [{"id": f"f{i:04d}", "device": "sensor1", "action": "read"} for i in range(count)]
            infos = [client.publish(f"{GW}/cmd", json.dumps(body), qos=qos) for body in bodies]
            stop = {"id": "estop", "device": "pump1", "action": "stop", "priority": "critical"}
            infos.append(client.publish(f"{GW}/cmd", json.dumps(stop), qos=1))
            infos[-1].wait_for_publish(10)
            published = time.monotonic()
            sub.wait_for(lambda _m: "estop" in results_by_id(sub), timeout=10)
            took = time.monotonic() - published
            for info in infos:
                info.wait_for_publish(30)
        finally:
            client.loop_stop()
            client.disconnect()
        assert results_by_id(sub)["estop"][0]["state"] == "succeeded"
        assert took < 1.0, f"the emergency stop took {took:.2f} s behind the flood"

        def counts() -> tuple[int, int, int, int]:
            ran = sum(1 for cid in results_by_id(sub) if cid.startswith("f"))
            refused = rejections(sub).values()
            limited = sum(1 for codes in refused if codes == ["rate_limited"])
            full = sum(1 for codes in refused if codes == ["queue_full"])
            unannounced = d.get("/api/v1/stats")[1]["uplink"]["commands_refused_unannounced"]
            return ran, limited, unannounced, full

        if qos == 1:
            # 1,500 reads of sensor1 over its pty, taken at 500/s. A device slower than that (a loaded machine makes
            # the simulator so) fills its queue to the cap of 1,000: the rest are refused queue_full, each with its
            # event, which is the bound doing its job. Every command is accounted for: run, or refused so.
            wait_until(lambda: sum(counts()[i] for i in (0, 3)) == count, 90, "every command run or refused")
        else:
            wait_until(lambda: d.get("/api/v1/stats")[1]["uplink"]["commands_taking"] == 0, 30, "the intake idle")
            time.sleep(1.0)  # the last results and events on their way to the subscriber
        ran, limited, unannounced, full = counts()
        if qos == 1:
            assert limited == 0 and unannounced == 0, (limited, unannounced)  # paced, never refused for the rate
            assert ran >= 1000, (ran, full)  # at least the queue's worth ran
        accepted = [
            _seconds(e["timestamp"])
            for e in d.log_lines()
            if e["event"] == "command_accepted" and e["command_id"].startswith("f")
        ]
        span = accepted[-1] - accepted[0]
        assert span >= (ran - burst) / rate * 0.8, (ran, span)  # never faster than the rate allows
        if qos == 0:
            assert limited + unannounced >= 200 and ran + limited + unannounced <= 300, (ran, limited, unannounced)
            assert unannounced > 0 and limited <= burst + rate * 5, (limited, unannounced)
        assert d.stop() == 0


def _seconds(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
