"""Telemetry written behind (issue 19): a reading the broker acknowledges in time never touches the disk, one it
does not is written in one batch with the others held, events are committed at once and ``write_behind_s = 0``
makes telemetry durable; the drain's window steered by acknowledgements; readings batched into messages. Then the
daemon: kill -9 loses at most the stated window of telemetry and no result or event, and after a broker outage the
live readings go out before the backlog."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from gatewayd.clock import BOOT_ID
from gatewayd.config.models import OutboxSection, TelemetrySection
from gatewayd.store import Store
from gatewayd.telemetry import Record, batching
from gatewayd.telemetry.recorder import Recorder
from gatewayd.uplink.pacing import AckWindow
from tests.conftest import Daemon, wait_until
from tests.mqtt_broker import Broker, Subscriber, daemon_env, results_by_id
from tests.test_telemetry import ManualClocks

GW = "gatewayd/gw-dev"


class Mono:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with Store(tmp_path / "gw.sqlite3") as s:
        yield s


def _recorder(store: Store, mono: Mono, **cfg: Any) -> Recorder:
    return Recorder(
        store,
        OutboxSection(**{"flush_interval_s": 0.02, **cfg}),
        TelemetrySection(sync_check_s=60),
        boot_id=BOOT_ID,
        stamper=ManualClocks().stamper(),
        free_bytes=lambda: 10**12,
        monotonic=mono,
    )


async def _outbox_rows(store: Store) -> list[tuple[str, dict[str, Any]]]:
    rows = await store.read(lambda c: c.execute("SELECT kind, payload FROM outbox ORDER BY priority, id").fetchall())
    return [(k, json.loads(p)) for k, p in rows]


async def test_a_reading_acknowledged_within_the_window_is_never_written(store: Store, tmp_path: Path) -> None:
    mono = Mono()
    async with _recorder(store, mono, write_behind_s=1.0) as rec:
        commits = store.commits
        for i in range(20):
            rec.put(Record.telemetry("pump1", {"i": i}, mono=mono.now))
        taken = rec.take_live(100)
        assert [h.row.payload for h in taken] == [sql_payload("pump1", i) for i in range(20)]
        mono.now += 0.5
        rec.settle_live(taken, True)
        mono.now += 5  # long past the window: nothing is held any more
        await rec._write(everything=False)
        assert store.commits == commits  # not one transaction
        assert rec.live == 20 and rec.stored == 0 and rec.pending == 0
    assert await _outbox_rows(store) == []


def sql_payload(device: str, i: int) -> str:
    return json.dumps({"device": device, "values": {"i": i}}, separators=(",", ":"))


async def test_readings_not_acknowledged_in_time_are_written_in_one_batch_and_become_backlog(
    store: Store, tmp_path: Path
) -> None:
    mono = Mono()
    async with _recorder(store, mono, write_behind_s=1.0) as rec:
        commits = store.commits
        for i in range(10):
            rec.put(Record.telemetry("pump1", {"i": i}, mono=mono.now))
        in_flight = rec.take_live(3)  # published, their PUBACKs awaited
        mono.now += 0.5
        await rec._write(everything=False)
        assert store.commits == commits  # nothing due yet
        for i in range(10, 15):
            rec.put(Record.telemetry("pump1", {"i": i}, mono=mono.now))
        mono.now += 0.6  # the first ten are due; the next five are not, and go with them (one batch)
        await rec._write(everything=False)
        assert store.commits == commits + 1
        rows = await _outbox_rows(store)
        assert [r["values"]["i"] for _, r in rows] == list(range(15))
        assert rec.backlog is not None and rec.backlog.stored == 15
        # Those in flight were written too (they were due); their PUBACK now comes: the rows go, not sent again.
        assert set(rec.sending_stored) == {h.key for h in in_flight}
        rec.settle_live(in_flight, True)
        assert sorted(rec.take_acked_stored()) == sorted(h.key for h in in_flight if h.key is not None)
        assert rec.take_live(100) == []  # the rest is the drain's now


async def test_events_are_committed_at_once_and_write_behind_0_makes_telemetry_durable(
    store: Store, tmp_path: Path
) -> None:
    mono = Mono()
    async with _recorder(store, mono, write_behind_s=0) as rec:
        rec.put(Record.telemetry("pump1", {"i": 1}, mono=mono.now))
        rec.put(Record.of_event("pump1", "leak", {}, severity="critical"))
        assert rec.take_live(10) == []  # nothing goes out from memory: it is sent from the outbox
        wait = time.monotonic() + 5
        # Until the recorder has counted it too: its own writer task may have committed the rows and not yet
        # resumed to count them (seen with tests in parallel).
        while (len(await _outbox_rows(store)) < 2 or rec.stored < 1) and time.monotonic() < wait:
            await rec._write(everything=False)
        kinds = [k for k, _ in await _outbox_rows(store)]
        assert kinds == ["event", "telemetry"]  # the clock did not move: both committed as they came
        assert rec.stored == 1


async def test_a_link_that_fails_gives_the_readings_back_in_order(store: Store, tmp_path: Path) -> None:
    mono = Mono()
    async with _recorder(store, mono, write_behind_s=1.0) as rec:
        for i in range(6):
            rec.put(Record.telemetry("pump1", {"i": i}, mono=mono.now))
        first = rec.take_live(4)
        rec.settle_live(first[2:], True)
        rec.settle_live(first[:2], False)  # the publish failed: the link went
        again = rec.take_live(10)
        assert [json.loads(h.row.payload)["values"]["i"] for h in again] == [0, 1, 4, 5]


# --- the drain's window and batches ------------------------------------------------------------------------------


def test_the_window_grows_with_prompt_acknowledgements_and_halves_once_per_round_trip_when_they_slow() -> None:
    clock = [0.0]
    window = AckWindow(50, minimum=5, initial=10, monotonic=lambda: clock[0])
    for _ in range(100):
        clock[0] += 0.002
        window.acked(0.002)
    assert 15 <= window.size < 20  # about one more per window's worth of acknowledgements
    for _ in range(2000):
        clock[0] += 0.002
        window.acked(0.002)
    assert window.size == 50
    clock[0] += 1
    window.acked(1.0)  # a queue somewhere: 500 times the base, far over the floor
    assert window.size == 25 and window.cuts == 1
    window.acked(1.0)  # the rest of the same round trip: not cut again
    assert window.size == 25
    clock[0] += 1.5
    for _ in range(10):
        window.acked(1.5)
        clock[0] += 1.5
    assert window.size == 5  # never below the minimum
    cuts = window.cuts
    clock[0] += 0.01
    window.acked(0.1)  # slower than the base but under the floor: a busy loop, not a queue
    assert window.size == 5 and window.cuts == cuts


class Row:
    def __init__(self, kind: str, topic: str, payload: bytes):
        self.kind, self.topic, self._payload = kind, topic, payload

    def message(self) -> bytes:
        return self._payload


def test_batches_keep_each_reading_as_it_would_be_alone_and_never_take_results() -> None:
    rows = [
        Row("telemetry", "telemetry/a", b'{"n":1}'),
        Row("telemetry", "telemetry/b", b'{"n":2}'),
        Row("result", "result/x", b'{"id":"x"}'),
        Row("telemetry", "telemetry/a", b'{"n":3}'),
        Row("telemetry", "telemetry/a", b'{"n":4}'),
    ]
    off = batching.messages(rows, "off", 10)
    assert [(m.topic, m.payload) for m in off] == [(r.topic, r.message()) for r in rows]
    device = batching.messages(rows, "device", 2)
    assert [(m.topic, json.loads(m.payload), m.items) for m in device] == [
        ("telemetry/a", {"samples": [{"n": 1}, {"n": 3}]}, (0, 3)),
        ("telemetry/b", {"samples": [{"n": 2}]}, (1,)),
        ("result/x", {"id": "x"}, (2,)),
        ("telemetry/a", {"samples": [{"n": 4}]}, (4,)),  # the limit: a new batch
    ]
    gateway = batching.messages(rows, "gateway", 10)
    assert [(m.topic, m.items) for m in gateway] == [("telemetry", (0, 1, 3, 4)), ("result/x", (2,))]


# --- the daemon ----------------------------------------------------------------------------------------------


def _ts(message: dict[str, Any]) -> float:
    return datetime.fromisoformat(message["ts"].replace("Z", "+00:00")).timestamp()


@pytest.mark.parametrize("broker_away", [False, True], ids=["live", "broker-away"])
def test_kill_9_loses_at_most_the_write_behind_window_of_telemetry_and_no_result_or_event(
    broker: Broker, make_daemon: Any, broker_away: bool
) -> None:
    """Live: readings go from memory to the broker, acknowledged within milliseconds. Broker away: readings are held
    up to write_behind_s, then written (the case where memory holds the most)."""
    window = 0.5
    broker.start()
    with Subscriber(broker, f"{GW}/#") as sub:
        if broker_away:
            broker.stop()
        d: Daemon = make_daemon(daemon_env(broker, GATEWAYD_OUTBOX__WRITE_BEHIND_S=str(window)))
        d.start()
        assert d.post({"device": "sensor1", "action": "set_interval", "params": {"seconds": 0.01}}, wait=5)[0] == 200
        ids = []
        for i in range(20):
            status, body, _ = d.post({"device": "pump1", "action": "set_speed", "params": {"percent": i}}, wait=5)
            assert status == 200, body
            ids.append(body["id"])
        assert d.post({"device": "sensor1", "action": "set_alarm", "params": {"above_c": -40}}, wait=5)[0] == 200
        if broker_away:
            wait_until(lambda: d.get("/api/v1/outbox")[1]["by_kind"].get("event", 0) >= 1, what="the event stored")
        started = time.monotonic()
        if broker_away:
            wait_until(lambda: d.get("/api/v1/outbox")[1]["by_kind"].get("telemetry", 0) >= 200, what="a backlog")
        else:
            wait_until(lambda: len(sub.json("/telemetry/sensor1")) >= 200, what="readings delivered live")
        readings = d.get("/api/v1/devices/sensor1/telemetry")[1]
        last = max(r["values"]["n"] for r in _recent(readings))
        killed_at = time.time()
        d.kill9()
        rate = last / (time.monotonic() - started + 1)  # readings a second, at most (the warm-up counted too)
        if broker_away:
            broker.start()
        d.start()
        wait_until(lambda: d.get("/api/v1/outbox")[1]["rows"] == 0, timeout=30, what="the backlog sent")
        sub.wait_for(lambda _m: set(ids) <= set(results_by_id(sub)), timeout=10)
        sub.wait_for(lambda _m: any(e.get("event") == "temperature_alarm" for e in sub.json("/events")), timeout=10)
    before = {m["values"]["n"] for m in sub.json("/telemetry/sensor1") if _ts(m) <= killed_at}
    assert before, "nothing of the first run arrived"
    missing = set(range(1, last + 1)) - before
    # Lost: only readings of the last write_behind_s before the kill (and those of the commit under way).
    assert all(n > last - rate * (window + 0.5) for n in missing), (sorted(missing)[:10], last, rate)


def _recent(body: Any) -> list[dict[str, Any]]:
    return body["readings"] if isinstance(body, dict) else body


def test_after_an_outage_live_readings_go_out_before_the_backlog(broker: Broker, make_daemon: Any) -> None:
    broker.start()
    d: Daemon = make_daemon(daemon_env(broker))  # write_behind_s as shipped: 1 s
    d.start()
    wait_until(lambda: d.get("/api/v1/stats")[1]["uplink"]["connected"], what="connected")
    assert d.post({"device": "sensor1", "action": "set_interval", "params": {"seconds": 0.01}}, wait=5)[0] == 200
    with Subscriber(broker, f"{GW}/#") as sub:
        wait_until(lambda: len(sub.json("/telemetry/sensor1")) > 20, what="live readings")
        assert all("seq" not in m for m in sub.json("/telemetry/sensor1"))  # live: never through the outbox
        broker.stop()
        for i in range(30):
            command = {"id": f"out-{i}", "device": "pump1", "action": "set_speed", "params": {"percent": i}}
            assert d.post(command)[0] == 202
        wait_until(
            lambda: d.get("/api/v1/outbox")[1]["by_kind"].get("telemetry", 0) >= 300, timeout=30, what="a backlog"
        )
        assert d.get("/api/v1/outbox")[1]["telemetry"]["backlog"] is not None  # shown while it lasts
        seen = len(sub.snapshot())
        broker.start()
        wait_until(lambda: d.get("/api/v1/outbox")[1]["rows"] == 0, timeout=30, what="the backlog sent")
        wait_until(lambda: d.get("/api/v1/outbox")[1]["telemetry"]["backlog"] is None, what="caught up")
        # The subscriber may come back after the daemon: the broker keeps its messages, in the order they came.
        sub.wait_for(lambda _m: {f"out-{i}" for i in range(30)} <= set(results_by_id(sub)), timeout=20)

        def since_return() -> list[tuple[str, dict[str, Any]]]:
            return [(t, json.loads(p)) for t, p, _ in sub.snapshot()[seen:] if "/telemetry/" in t or "/result/" in t]

        def paths() -> tuple[list[int], list[int]]:
            after = since_return()
            backlog = [i for i, (_, m) in enumerate(after) if "seq" in m]
            live = [i for i, (t, m) in enumerate(after) if "/telemetry/" in t and "seq" not in m]
            return backlog, live

        # Live readings go on once the backlog began (beside it, or after it when it drained within a few
        # readings' time): one after the backlog's first message comes.
        sub.wait_for(lambda _m: bool((bl := paths())[0]) and bool(bl[1]) and bl[1][-1] > bl[0][0], timeout=10)
        after = since_return()
    first = after[0]
    assert "/telemetry/" in first[0] and "seq" not in first[1], first  # a live reading first, ahead of all backlog
    assert {m["id"] for t, m in after if "/result/" in t} >= {f"out-{i}" for i in range(30)}
    # One line when the backlog began and one when it was caught up (a busy machine may have had a short one
    # before the outage too: each is opened and closed once).
    lines = [line["event"] for line in d.log_lines()]
    assert 1 <= lines.count("telemetry_backlog_started") == lines.count("telemetry_backlog_caught_up")


async def test_telemetry_has_a_byte_budget_of_its_own_that_drops_its_oldest_and_never_an_event(
    store: Store, tmp_path: Path
) -> None:
    mono = Mono()
    async with _recorder(store, mono, write_behind_s=0, telemetry_max_bytes=16 * 1024) as rec:
        for i in range(300):
            rec.put(Record.telemetry("pump1", {"i": i, "pad": "x" * 60}, mono=mono.now))
            if i % 30 == 0:
                rec.put(Record.of_event("pump1", "tick", {"i": i, "pad": "y" * 200}))
        await rec.flush()
        assert rec.stats is not None
        assert rec.stats.bytes_by_kind["telemetry"] <= 16 * 1024 < rec.stats.bytes  # the events are on top of it
    rows = await _outbox_rows(store)
    assert [m["data"]["i"] for k, m in rows if k == "event"] == list(range(0, 300, 30))
    kept = [m["values"]["i"] for k, m in rows if k == "telemetry"]
    assert 0 < len(kept) < 300 and kept == list(range(300 - len(kept), 300))  # the newest, in order
