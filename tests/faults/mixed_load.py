"""Mixed load for the fault suite, and the checks that follow it.

From threads in the test, against one daemon (which the test may kill and restart underneath it):

- structured commands over HTTP: pump1 ``set_speed`` (some with a deadline of 1.5 s), sensor1 ``read``, relay1
  ``on``/``off``. A client that gets no answer, or a 503 while the daemon starts, sends the same id again, as a
  client with an idempotency key does; a command is acknowledged by a 202 (or the 200 of a replay).
- the same commands published QoS 1 on ``gatewayd/gw-dev/cmd`` by one paho client; acknowledged once the broker
  PUBACKed it (the daemon's persistent session must then deliver it, even if the daemon was down meanwhile).
- natural-language requests (``{"text": ...}``) over HTTP and over MQTT, interpreted by a fake OpenAI-compatible
  provider on loopback or by the local rules.
- telemetry: sensor1's simulator reports at ``TELEMETRY_HZ`` (set in the daemon's environment, so it survives
  restarts).

Every command has its own id. :func:`verify` then checks, with the daemon up, what a user relies on: every
acknowledged command reached its final state, none ran twice (the simulators' execution logs), and its result
reached a subscriber on the broker (duplicates identical but for the outbox ``seq``).
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from http.client import HTTPException
from typing import Any

import paho.mqtt.client as mqtt

from gatewayd.interpret.simulator import FakeProvider, Fault
from tests.conftest import Daemon, http
from tests.mqtt_broker import GW, Broker, Subscriber, results_by_id

FINAL = ("succeeded", "failed", "expired", "rejected", "cancelled")
KEY = "sk-test-faults-0123456789"
TELEMETRY_HZ = 20
SHORT_TTL_S = 1.5
LOGGED = ("pump1", "sensor1")  # devices whose simulator logs every execution with its command id

# What the fake provider answers for each text (the local rules understand every one of them the same way).
TEXTS: dict[str, dict[str, Any]] = {
    "turn on the pump": {"device": "pump1", "action": "start", "params": {}},
    "turn off the pump": {"device": "pump1", "action": "stop", "params": {}},
    "set the pump speed to 40 percent": {"device": "pump1", "action": "set_speed", "params": {"percent": 40}},
    "turn on the valve": {"device": "relay1", "action": "on", "params": {}},
    "turn off the valve": {"device": "relay1", "action": "off", "params": {}},
    "read sensor 1": {"device": "sensor1", "action": "read", "params": {}},
}


def daemon_overrides(provider_url: str, **extra: str) -> dict[str, str]:
    """The daemon's environment for the mixed load: the fake provider as ``openai``, limits that a load from one
    client would otherwise hit (they have tests of their own), sensor1 reporting at TELEMETRY_HZ."""
    return {
        "OPENAI_API_KEY": KEY,
        "ANTHROPIC_API_KEY": "",
        "GATEWAYD_INTERPRET__PROVIDERS__OPENAI__BASE_URL": provider_url,
        "GATEWAYD_INTERPRET__PROVIDERS__OPENAI__MODEL": "fake-model",
        "GATEWAYD_INTERPRET__PROVIDERS__OPENAI__TIMEOUT_S": "1",
        "GATEWAYD_INTERPRET__PROVIDERS__OPENAI__CONNECT_TIMEOUT_S": "0.5",
        "GATEWAYD_INTERPRET__PROVIDERS__OPENAI__RPM": "100000",
        "GATEWAYD_INTERPRET__PROVIDERS__OPENAI__TPM": "100000000",
        "GATEWAYD_INTERPRET__USER_RATE_PER_MINUTE": "100000",
        "GATEWAYD_INTERPRET__USER_BURST": "100000",
        "GATEWAYD_INTERPRET__DAILY_BUDGET": "1000",
        "GATEWAYD_INTERPRET__RETRY__BASE_S": "0.01",
        "GATEWAYD_INTERPRET__RETRY__CAP_S": "0.05",
        "GATEWAYD_DEVICES__SENSOR1__SIMULATOR__TELEMETRY_HZ": str(TELEMETRY_HZ),
        # A pump controller takes a moment to answer: commands queue behind each other, so an outage or a kill
        # finds some waiting and one in flight.
        "GATEWAYD_DEVICES__PUMP1__SIMULATOR__LATENCY_S": "0.1",
        **extra,
    }


class ProviderThread:
    """A :class:`FakeProvider` (OpenAI wire format) served from its own thread and event loop, so the test's
    threads can fail it: ``refuse()`` (connections refused), ``fail(Fault.http(500))`` / ``fail(Fault.hang(5))``
    for every request until ``heal()``."""

    def __init__(self) -> None:
        self.fake = FakeProvider("openai", api_key=KEY, answers=dict(TEXTS))
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-provider", daemon=True)

    def __enter__(self) -> ProviderThread:
        self._thread.start()
        self._run(self.fake.__aenter__())
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self._run(self.fake.__aexit__(None, None, None))
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()

    @property
    def base_url(self) -> str:
        return self.fake.base_url

    def _run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(15)

    def _call(self, fn: Callable[[], None]) -> None:
        async def call() -> None:
            fn()

        self._run(call())

    def refuse(self) -> None:
        self._run(self.fake.down())

    def fail(self, fault: Fault) -> None:
        """Every request from now on meets ``fault`` (its health checks too, when the fault is an HTTP status)."""

        def script() -> None:
            self.fake.always = fault
            if fault.kind == "status":
                self.fake.health_faults.clear()
                self.fake.health_faults.extend([fault] * 100_000)  # health checks take scripted faults only

        self._call(script)

    def heal(self) -> None:
        def mend() -> None:
            self.fake.always = None
            self.fake.health_faults.clear()

        self._call(mend)
        self._run(self.fake.up())

    def completions(self) -> int:
        return len(self.fake.completions())


@dataclass
class Sent:
    id: str
    via: str  # http | mqtt | http-text | mqtt-text
    body: dict[str, Any]
    started: float  # time.monotonic() of the first attempt
    finished: float | None = None  # of the answer that acknowledged it (HTTP)
    attempts: int = 0
    acked: bool = False
    mid: int | None = None  # MQTT: the publish's message id, to match the broker's PUBACK

    @property
    def short_ttl(self) -> bool:
        return self.body.get("ttl_s") == SHORT_TTL_S

    @property
    def text(self) -> str | None:
        return self.body.get("text")


def _structured(rng: random.Random, n: int) -> dict[str, Any]:
    """One structured command; about one in ten pump commands has a deadline short enough to pass during an
    outage."""
    draw = rng.random()
    if draw < 0.45:
        body: dict[str, Any] = {"device": "pump1", "action": "set_speed", "params": {"percent": n % 101}}
        if rng.random() < 0.2:
            body["ttl_s"] = SHORT_TTL_S
        return body
    if draw < 0.75:
        return {"device": "sensor1", "action": "read", "params": {}}
    return {"device": "relay1", "action": rng.choice(("on", "off")), "params": {}}


class MixedLoad:
    """The load's threads. ``start()``, then ``stop()`` when the faults are over; ``sent`` has every command."""

    def __init__(
        self,
        daemon: Daemon,
        broker: Broker,
        seed: int,
        *,
        http_per_s: float = 8.0,
        mqtt_per_s: float = 4.0,
        texts_per_s: float = 1.0,
    ):
        self.daemon = daemon
        self.broker = broker
        self.seed = seed
        self.http_per_s = http_per_s
        self.mqtt_per_s = mqtt_per_s
        self.texts_per_s = texts_per_s
        self.sent: list[Sent] = []
        self.errors: list[str] = []  # answers no correct daemon gives to these requests
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"load-{seed}", clean_session=True)
        self._client.reconnect_delay_set(0.05, 0.5)
        self._client.max_queued_messages_set(0)
        self._pubacked: set[int] = set()  # mids the broker acknowledged (paho's MessageInfo cannot tell, after a
        self._client.on_publish = self._on_puback  # publish made while disconnected, whether it was sent later)

    def _on_puback(self, client: mqtt.Client, userdata: Any, mid: int, rc: Any, props: Any) -> None:
        self._pubacked.add(mid)

    def start(self) -> None:
        self._client.connect("127.0.0.1", self.broker.port, keepalive=5)
        self._client.loop_start()
        for name, target in (("http", self._http), ("http-text", self._http_text), ("mqtt", self._mqtt)):
            thread = threading.Thread(target=target, name=f"load-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, settle_s: float = 15.0) -> None:
        """Stop sending; give MQTT publishes still waiting for their PUBACK ``settle_s`` to get it."""
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
            assert not thread.is_alive(), f"{thread.name} did not stop"
        deadline = time.monotonic() + settle_s
        published = [s for s in self.sent if s.mid is not None]
        while time.monotonic() < deadline and not all(s.mid in self._pubacked for s in published):
            time.sleep(0.05)
        self._client.loop_stop()
        self._client.disconnect()
        assert len({s.mid for s in published}) == len(published), "MQTT message ids wrapped: send fewer"
        for s in published:
            s.acked = s.mid in self._pubacked

    def _add(self, sent: Sent) -> None:
        with self._lock:
            self.sent.append(sent)

    def _pace(self, per_s: float, rng: random.Random) -> None:
        self._stop.wait(rng.expovariate(per_s))

    # --- HTTP -------------------------------------------------------------------------------------------------

    def _post(self, sent: Sent) -> None:
        """Send until acknowledged; a refused connection, a reset or a 503 (starting) is tried again, same id."""
        for _ in range(8):
            sent.attempts += 1
            try:
                status, body, _ = http("POST", f"{self.daemon.url}/api/v1/commands", sent.body, timeout=15)
            except (OSError, HTTPException, ValueError):
                status, body = None, None
            if status in (200, 202):
                sent.acked, sent.finished = True, time.monotonic()
                if body.get("id") != sent.id:
                    self.errors.append(f"{sent.id}: answered for {body.get('id')!r}")
                return
            if status is not None and status != 503:
                self.errors.append(f"{sent.id} {sent.body}: HTTP {status} {body}")
                return
            if self._stop.wait(0.25):
                return

    def _http(self) -> None:
        rng = random.Random(f"{self.seed}:http")
        n = 0
        while not self._stop.is_set():
            n += 1
            sent = Sent(f"h{n:05d}", "http", {}, time.monotonic())
            sent.body = {"id": sent.id, **_structured(rng, n)}
            self._add(sent)
            self._post(sent)
            self._pace(self.http_per_s, rng)

    def _http_text(self) -> None:
        rng = random.Random(f"{self.seed}:http-text")
        n = 0
        while not self._stop.is_set():
            n += 1
            sent = Sent(f"t{n:05d}", "http-text", {}, time.monotonic())
            sent.body = {"id": sent.id, "text": rng.choice(list(TEXTS))}
            self._add(sent)
            self._post(sent)
            self._pace(self.texts_per_s, rng)

    # --- MQTT -------------------------------------------------------------------------------------------------

    def _mqtt(self) -> None:
        """Structured commands and, one in five, texts, over one client. A publish not PUBACKed now may still be
        later (paho sends it after a reconnect): ``stop()`` decides which were acknowledged."""
        rng = random.Random(f"{self.seed}:mqtt")
        n = 0
        while not self._stop.is_set():
            n += 1
            if rng.random() < 0.2:
                sent = Sent(f"mt{n:05d}", "mqtt-text", {}, time.monotonic())
                sent.body = {"id": sent.id, "text": rng.choice(list(TEXTS))}
            else:
                sent = Sent(f"m{n:05d}", "mqtt", {}, time.monotonic())
                sent.body = {"id": sent.id, **_structured(rng, n)}
            sent.attempts = 1
            info = self._client.publish(f"{GW}/cmd", json.dumps(sent.body), qos=1)
            sent.mid = info.mid
            self._add(sent)
            try:
                info.wait_for_publish(2)
            except (RuntimeError, ValueError):
                pass  # not connected now: paho keeps it and sends it after reconnecting
            self._pace(self.mqtt_per_s, rng)


@dataclass
class Summary:
    sent: Counter[str] = field(default_factory=Counter)
    acked: Counter[str] = field(default_factory=Counter)
    states: Counter[str] = field(default_factory=Counter)
    executions: Counter[str] = field(default_factory=Counter)  # execution-log lines per device
    result_messages: int = 0
    duplicate_results: int = 0
    republished: int = 0  # duplicates with a new outbox seq: a redelivered MQTT command's result sent again
    telemetry_messages: int = 0
    answered_by: Counter[str] = field(default_factory=Counter)  # texts: who interpreted them
    requeued: Counter[str] = field(default_factory=Counter)  # transitions back to queued, by their detail
    unknown_ran: Counter[int] = field(default_factory=Counter)  # outcome_unknown commands by executions (0 or 1)
    records: dict[str, dict[str, Any]] = field(default_factory=dict)


def wait_final(daemon: Daemon, ids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
    """Every id's record once final. A command acknowledged by the broker may not have reached the daemon yet
    (404 until it has)."""
    final: dict[str, dict[str, Any]] = {}
    last: dict[str, Any] = {}
    deadline = time.monotonic() + timeout
    while True:
        for command_id in [i for i in ids if i not in final]:
            status, rec, _ = http("GET", f"{daemon.url}/api/v1/commands/{command_id}", timeout=10)
            last[command_id] = (status, rec.get("state") if isinstance(rec, dict) and status == 200 else rec)
            if status == 200 and rec["state"] in FINAL:
                final[command_id] = rec
        missing = [i for i in ids if i not in final]
        if not missing:
            return final
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{len(missing)} acknowledged commands not final after {timeout} s: "
                + ", ".join(f"{i} {last.get(i)}" for i in missing[:10])
            )
        time.sleep(0.5)


def _without_seq(message: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in message.items() if k != "seq"}


def verify(daemon: Daemon, sub: Subscriber, load: MixedLoad, *, seed: int, timeout: float = 60.0) -> Summary:
    """The checks after the faults, with the daemon up. Returns what was counted."""
    assert not load.errors, f"seed {seed}: unexpected answers: {load.errors[:5]}"
    summary = Summary()
    acked = [s for s in load.sent if s.acked]
    summary.sent.update(s.via for s in load.sent)
    summary.acked.update(s.via for s in acked)
    for via in ("http", "mqtt", "http-text", "mqtt-text"):
        assert summary.acked[via] > 0, f"seed {seed}: no {via} command was acknowledged: {summary.sent}"

    # 1. Every acknowledged command reached a final state: succeeded. Every command here is valid and every device
    # answers, so the only other outcomes are those of a command with a short deadline that passed before it
    # could run: expired (never sent), or failed "outcome_unknown" when its request had gone out before a kill or
    # an unplug cut it off (the gateway cannot know whether the device acted, and does not send it late).
    final = wait_final(daemon, [s.id for s in acked], timeout)
    summary.records = final
    wrong = []
    for s in acked:
        rec = final[s.id]
        code = (rec.get("error") or {}).get("code")
        summary.states[rec["state"] if code in (None, "expired") else f"{rec['state']}:{code}"] += 1
        for t in rec["transitions"]:
            if t["state"] == "queued" and t.get("detail"):
                summary.requeued[t["detail"].split(":")[0]] += 1
        allowed = {("succeeded", None)}
        if s.short_ttl:
            allowed |= {("expired", "expired"), ("failed", "outcome_unknown")}
        if (rec["state"], code) not in allowed:
            wrong.append((s.id, s.via, rec["state"], rec.get("error")))
        if s.text is None:
            assert (rec["device"], rec["action"]) == (s.body["device"], s.body["action"]), (s.id, rec)
            assert s.body["params"].items() <= rec["params"].items(), (s.id, rec)
        else:
            how = rec["interpretation"]
            expected = TEXTS[s.text]
            assert how["text"] == s.text and (rec["device"], rec["action"]) == (
                expected["device"],
                expected["action"],
            ), (s.id, rec)
            summary.answered_by["cache" if how["cached"] else how["provider"]] += 1
    assert not wrong, f"seed {seed}: acknowledged commands in the wrong final state: {wrong[:10]}"

    # 2. None executed twice: every id in the execution logs once, acknowledged or not; each acknowledged command
    # on a logging device ran once if it succeeded, never if it expired, at most once if its outcome is unknown.
    runs: dict[str, Counter[str]] = {device: Counter(e["id"] for e in daemon.sim_log(device)) for device in LOGGED}
    for device, counts in runs.items():
        summary.executions[device] = sum(counts.values())
        twice = {i: n for i, n in counts.items() if n > 1}
        assert not twice, f"seed {seed}: executed more than once on {device}: {twice}"
    for s in acked:
        rec = final[s.id]
        if rec["device"] in runs:
            ran = runs[rec["device"]][s.id]
            expected = {"succeeded": (1,), "expired": (0,), "failed": (0, 1)}[rec["state"]]
            if rec["state"] == "failed":
                summary.unknown_ran[ran] += 1
            assert ran in expected, (
                f"seed {seed}: {s.id} is {rec['state']} and ran {ran} times on {rec['device']}: {rec}"
            )

    # 3. Every acknowledged command's result reached the broker; copies are the same message.
    ids = {s.id for s in acked}
    try:
        sub.wait_for(lambda _m: ids <= set(results_by_id(sub)), timeout=timeout)
    except AssertionError:
        missing = sorted(ids - set(results_by_id(sub)))
        raise AssertionError(f"seed {seed}: {len(missing)} results never reached the broker: {missing[:10]}") from None
    results = results_by_id(sub)
    for s in acked:
        copies = results[s.id]
        summary.result_messages += len(copies)
        summary.duplicate_results += len(copies) - 1
        summary.republished += len({c["seq"] for c in copies}) - 1
        first = _without_seq(copies[0])
        assert all(_without_seq(c) == first for c in copies), f"seed {seed}: {s.id} results differ: {copies}"
        rec = final[s.id]
        assert (first["id"], first["state"], first["result"]) == (s.id, rec["state"], rec["result"]), (first, rec)
    summary.telemetry_messages = sum(1 for t, _, _ in sub.snapshot() if t == f"{GW}/telemetry/sensor1")
    return summary


def report(title: str, seed: int, summary: Summary, **extra: Any) -> str:
    lines = [
        f"{title} (seed {seed}; rerun with GATEWAYD_FAULT_SEED={seed})",
        f"  sent:         {dict(summary.sent)}",
        f"  acknowledged: {dict(summary.acked)} = {sum(summary.acked.values())}",
        f"  final states: {dict(summary.states)}",
        f"  executions:   {dict(summary.executions)} (execution-log lines)",
        f"  results:      {summary.result_messages} messages, {summary.duplicate_results} duplicates "
        f"({summary.republished} republished with a new seq)",
        f"  texts:        {dict(summary.answered_by)} (interpreted by)",
        f"  requeued:     {dict(summary.requeued)}",
        f"  unknown:      {dict(summary.unknown_ran)} (outcome_unknown commands by how often the device ran them)",
        f"  telemetry:    {summary.telemetry_messages} sensor1 messages",
        *(f"  {k}: {v}" for k, v in extra.items()),
    ]
    return "\n".join(lines)


def seed_from(environ: dict[str, str] | Any) -> int:
    raw = environ.get("GATEWAYD_FAULT_SEED")
    return int(raw) if raw else random.SystemRandom().randrange(2**31)


__all__ = ["Fault", "MixedLoad", "ProviderThread", "Sent", "Summary", "daemon_overrides", "report", "verify"]
