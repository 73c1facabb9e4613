"""Telemetry and events into the outbox: timestamps that never run backwards and say when the clock was not yet
synchronised, batching, the byte budget and the disk-free watermark (telemetry dropped oldest first, events
never), and the real sources: line-protocol T and E frames over a pseudo-terminal, GPIO edges through
MockFactory, and the daemon's own outbox over HTTP."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from gatewayd.clock import BOOT_ID
from gatewayd.config.loader import load_config
from gatewayd.config.models import OutboxSection, SerialBusConfig, TelemetrySection
from gatewayd.config.profiles import TelemetryPoint
from gatewayd.devices.framing import Frame, Kind
from gatewayd.devices.manager import DeviceManager
from gatewayd.devices.serial_bus import SerialBus
from gatewayd.devices.simulator import PtySimulator, SimulatedDevice
from gatewayd.errors import StoreUnavailable
from gatewayd.store import Store
from gatewayd.telemetry import MemorySink, Record
from gatewayd.telemetry.recorder import Recorder, shape_values
from gatewayd.telemetry.timestamps import Stamper
from gatewayd.uplink.outbox import Outbox
from tests.conftest import Daemon, wait_until

ROOT = Path(__file__).resolve().parent.parent


class ManualClocks:
    """A wall clock that a test steps (NTP arriving) next to a monotonic one that only runs forward."""

    def __init__(self, wall: float = 1_000_000.0, mono: float = 100.0):
        self.wall_value, self.mono_value = wall, mono
        self.synced = False

    def wall(self) -> float:
        return self.wall_value

    def mono(self) -> float:
        return self.mono_value

    def advance(self, seconds: float) -> None:
        self.wall_value += seconds
        self.mono_value += seconds

    def stamper(self) -> Stamper:
        return Stamper(lambda: self.synced, wall=self.wall, mono=self.mono)


# --- timestamps ---------------------------------------------------------------------------------------------


def test_stamps_follow_the_monotonic_clock_and_never_run_backwards_when_the_wall_clock_steps() -> None:
    clocks = ManualClocks()
    stamper = clocks.stamper()
    first = stamper.stamp(clocks.mono())
    assert first == pytest.approx(clocks.wall())
    clocks.advance(5)
    clocks.wall_value -= 3600  # the wall clock steps an hour back (a bad NTP server, an RTC reset)
    assert stamper.check() is False  # still not synchronised
    second = stamper.stamp(clocks.mono())
    assert second >= first  # held at the last stamp instead of going back an hour
    clocks.advance(3600 + 10)
    third = stamper.stamp(clocks.mono())
    assert third > second
    # A reading observed earlier than the last one stamped (another source was quicker) is not dated before it.
    assert stamper.stamp(clocks.mono() - 60) == third


def test_stamps_say_whether_the_clock_was_synchronised_and_the_sync_is_reported_once() -> None:
    clocks = ManualClocks()
    stamper = clocks.stamper()
    assert stamper.synced is False
    clocks.synced = True
    clocks.wall_value += 86_400 * 365  # NTP arrives on a Pi that booted with last year's date
    assert stamper.check() is True
    assert stamper.synced is True
    assert stamper.check() is False  # already synchronised: nothing to re-stamp again
    assert stamper.stamp(clocks.mono()) == pytest.approx(clocks.wall())


def test_declared_points_are_coerced_and_out_of_range_or_non_finite_readings_flagged() -> None:
    points = {
        "running": TelemetryPoint(type="bool"),
        "speed": TelemetryPoint(type="int", min=0, max=100),
        "temperature_c": TelemetryPoint(min=-40, max=85),
    }
    values, flagged = shape_values(
        {"running": 1, "speed": 40.0, "temperature_c": -127.0, "extra": "kept", "humidity": float("nan")}, points
    )
    assert values == {"running": True, "speed": 40, "temperature_c": -127.0, "extra": "kept", "humidity": None}
    assert isinstance(values["speed"], int)
    assert sorted(flagged) == ["humidity", "temperature_c"]


# --- the recorder and the outbox ------------------------------------------------------------------------------


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with Store(tmp_path / "gw.sqlite3") as s:
        yield s


def _recorder(
    store: Store,
    clocks: ManualClocks | None = None,
    free: Callable[[], int] | None = None,
    box: Outbox | None = None,
    **cfg: Any,
) -> Recorder:
    outbox = OutboxSection(**{"flush_interval_s": 0.05, **cfg})
    return Recorder(
        store,
        outbox,
        TelemetrySection(sync_check_s=0.05),
        boot_id=BOOT_ID,
        stamper=(clocks or ManualClocks()).stamper(),
        free_bytes=free or (lambda: 10**12),
        box=box,
    )


def _rows(path: Path) -> list[dict[str, Any]]:
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM outbox ORDER BY priority, id")]
    finally:
        conn.close()


async def test_records_reach_the_outbox_in_one_batch_with_topics_payloads_and_send_order(
    store: Store, tmp_path: Path
) -> None:
    async with _recorder(store, flush_interval_s=30) as rec:
        commits = store.commits
        for i in range(50):
            rec.put(Record.telemetry("pump1", {"speed": i}))
        rec.put(Record.of_event("pump1", "overtemp", {"temperature_c": 71.5}, severity="warning"))
        rec.put(Record.of_event("pump1", "leak", {}, severity="critical"))
        assert rec.pending == 52
        await rec.flush()
        assert store.commits == commits + 1  # 52 records, one transaction
    rows = _rows(store.path)
    assert [r["topic"] for r in rows[:2]] == ["events", "events"]
    assert json.loads(rows[0]["payload"])["event"] == "leak"  # critical first, then other events, then telemetry
    assert json.loads(rows[1]["payload"]) == {
        "device": "pump1",
        "event": "overtemp",
        "severity": "warning",
        "data": {"temperature_c": 71.5},
    }
    telemetry = rows[2:]
    assert [json.loads(r["payload"])["values"]["speed"] for r in telemetry] == list(range(50))
    assert {r["topic"] for r in telemetry} == {"telemetry/pump1"}
    assert [r["ts"] for r in telemetry] == sorted(r["ts"] for r in telemetry)
    assert all(r["clock_synced"] == 0 and r["boot_id"] == BOOT_ID for r in rows)


async def test_what_is_pending_at_a_clean_stop_is_written(store: Store, tmp_path: Path) -> None:
    async with _recorder(store, flush_interval_s=30) as rec:
        rec.put(Record.telemetry("pump1", {"speed": 1}))
    assert len(_rows(store.path)) == 1


async def test_unsynchronised_records_still_waiting_are_restamped_when_the_clock_syncs(
    store: Store, tmp_path: Path
) -> None:
    clocks = ManualClocks(wall=1_600_000_000.0)  # a Pi that booted with an old date
    async with _recorder(store, clocks) as rec:
        observed = clocks.mono()
        rec.put(Record.telemetry("sensor1", {"temperature_c": 20.0}, mono=observed))
        await rec.flush()
        clocks.advance(30)
        clocks.wall_value = 1_790_000_000.0  # NTP steps the clock to the real date
        clocks.synced = True
        assert rec.stamper.check() is True
        assert await rec.restamp() == 1
        rec.put(Record.telemetry("sensor1", {"temperature_c": 21.0}, mono=clocks.mono()))
        await rec.flush()
    first, second = _rows(store.path)
    assert first["clock_synced"] == 1 and second["clock_synced"] == 1
    # Re-dated from its monotonic reading: 30 s before the sync, on the corrected clock.
    assert first["ts"] == pytest.approx(1_790_000_000.0 - 30)
    assert second["ts"] == pytest.approx(1_790_000_000.0)


async def test_a_small_byte_budget_drops_the_oldest_telemetry_never_events_and_counts_across_restarts(
    store: Store, tmp_path: Path
) -> None:
    async with _recorder(store, max_bytes=16 * 1024) as rec:
        for i in range(400):
            rec.put(Record.telemetry("pump1", {"reading": i, "pad": "x" * 60}))
            if i % 50 == 0:
                rec.put(Record.of_event("pump1", "tick", {"i": i}))
        await rec.flush()
        assert rec.stats is not None
        assert rec.stats.bytes <= 16 * 1024
        dropped = rec.stats.telemetry_dropped
    assert dropped > 0
    rows = _rows(store.path)
    events = [json.loads(r["payload"])["data"]["i"] for r in rows if r["kind"] == "event"]
    assert events == list(range(0, 400, 50))  # every event kept
    kept = [json.loads(r["payload"])["values"]["reading"] for r in rows if r["kind"] == "telemetry"]
    assert kept == list(range(400 - len(kept), 400))  # the newest telemetry, in order: the oldest went first
    assert len(kept) + dropped == 400
    async with _recorder(store) as again:  # the count survives a restart
        assert again.stats is not None and again.stats.telemetry_dropped == dropped


async def test_below_the_disk_free_watermark_the_outbox_shrinks_by_dropping_old_telemetry(
    store: Store, tmp_path: Path
) -> None:
    free = [10**12]
    async with _recorder(store, free=lambda: free[0], min_free_bytes=1_000_000) as rec:
        for i in range(100):
            rec.put(Record.telemetry("pump1", {"reading": i, "pad": "y" * 80}))
        await rec.flush()
        assert rec.stats is not None
        before = rec.stats.bytes
        assert rec.stats.telemetry_dropped == 0
        free[0] = 1_000_000 - 4000  # the card is 4 kB short of the watermark
        rec.put(Record.of_event("pump1", "low_disk", {}))
        await rec.flush()
        assert rec.stats.telemetry_dropped > 0
        assert rec.stats.bytes <= before - 4000 + 200  # shrunk by the shortfall (plus the new event)
    assert any(r["kind"] == "event" for r in _rows(store.path))


async def test_between_flushes_memory_is_bounded_and_the_oldest_telemetry_goes_first(
    store: Store, tmp_path: Path
) -> None:
    async with _recorder(store, flush_interval_s=30, max_pending=100) as rec:
        # put() is called from the loop without yielding: the early flush cannot run in between.
        for i in range(1000):
            rec.put(Record.telemetry("pump1", {"reading": i}))
        assert rec.pending == 100
        assert rec.dropped_pending == 900
        await rec.flush()
    kept = [json.loads(r["payload"])["values"]["reading"] for r in _rows(store.path)]
    assert kept == list(range(900, 1000))


async def test_records_that_cannot_be_written_wait_and_are_written_once_the_store_is_back(tmp_path: Path) -> None:
    broken = Store(tmp_path / "gone.sqlite3")  # never opened: every write fails with StoreUnavailable
    rec = _recorder(broken, flush_interval_s=30)
    rec.put(Record.telemetry("pump1", {"reading": 1}))
    rec.put(Record.of_event("pump1", "ping", {}))
    with pytest.raises(StoreUnavailable, match="closed"):
        await rec.flush()
    assert rec.pending == 2  # nothing lost
    async with Store(tmp_path / "back.sqlite3") as store:
        rec.store = store
        await rec.flush()
        assert rec.pending == 0
    assert {r["kind"] for r in _rows(tmp_path / "back.sqlite3")} == {"event", "telemetry"}


async def test_bad_records_are_refused_without_disturbing_the_good_ones(store: Store, tmp_path: Path) -> None:
    async with _recorder(store) as rec:
        rec.put(Record("telemetry", "pump1", ["not", "an", "object"]))  # type: ignore[arg-type]
        rec.put(Record.telemetry("pump1", {"odd": object()}))  # kept, as text: the device said something
        rec.put(Record.telemetry("pump1", {"speed": 3}))
        await rec.flush()
        assert rec.invalid == 1
    payloads = [json.loads(r["payload"]) for r in _rows(store.path)]
    assert [p["values"].get("speed") for p in payloads] == [None, 3]


# --- real sources -------------------------------------------------------------------------------------------


async def test_line_protocol_telemetry_and_events_over_a_pty_become_records_of_the_right_device(
    tmp_path: Path,
) -> None:
    sink = MemorySink()
    node = SimulatedDevice("sensor1", "sensor_node", tmp_path / "sensor1.jsonl")
    node.model.report_hz = 50.0
    async with PtySimulator("bus0", {2: node}) as sim:
        cfg = SerialBusConfig(port=sim.port, response_timeout_s=0.5)
        bus = SerialBus("bus0", cfg, sim.port, sink=sink)
        bus.names[2] = "sensor1"
        async with bus:
            # The threshold sits just below the next reading: the node reports an alarm event on its own.
            await bus.transact(2, {"id": "a1", "action": "set_alarm", "params": {"above_c": 0}})
            sim.inject(Frame(9, 0, Kind.TELEMETRY, {"stray": 1}).to_bytes())  # an address nobody configured
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                kinds = {r.kind for r in sink}
                if {"telemetry", "event"} <= kinds and len(sink) >= 5:
                    break
                await asyncio.sleep(0.02)
    records = list(sink)
    assert {r.device for r in records} == {"sensor1"}
    telemetry = [r for r in records if r.kind == "telemetry"]
    assert len(telemetry) >= 4
    assert set(telemetry[0].data) >= {"temperature_c", "humidity_pct", "pressure_hpa", "battery_v"}
    monos = [r.mono for r in records]
    assert monos == sorted(monos)
    [alarm] = [r for r in records if r.kind == "event"]
    assert (alarm.event, alarm.severity) == ("temperature_alarm", "warning")
    assert alarm.data["above_c"] == 0


async def test_the_bundled_devices_report_into_the_outbox_in_mock_mode(tmp_path: Path) -> None:
    """The bundled config's sensor node on a pty and a GPIO button pressed through MockFactory, both through the
    recorder into the store's outbox."""
    config = tmp_path / "config.toml"
    config.write_text(
        f"""
[gateway]
data_dir = "{tmp_path / "data"}"
profiles_dir = "{ROOT / "hardware" / "profiles"}"
[serial.bus0]
port = "/dev/null"
[devices.sensor1]
profile = "mcu_sensor_node"
bus = "bus0"
address = 2
[devices.door]
profile = "gpio_button"
pin = 4
""",
        encoding="utf-8",
    )
    loaded = load_config(config)
    cfg = loaded.config
    async with Store(cfg.db_path) as store:
        recorder = Recorder(
            store,
            OutboxSection(flush_interval_s=0.05),
            TelemetrySection(clock_sync="unsynced"),
            boot_id=BOOT_ID,
            profiles=lambda: manager.profiles(),
        )
        manager = DeviceManager(loaded, sink=recorder)
        async with recorder, manager as devices:
            devices.simulators["bus0"].devices[2].model.report_hz = 40.0
            button = devices.devices["door"]
            pin = button._controller.factory.pin(4)  # type: ignore[attr-defined]
            pin.drive_low()  # pressed (pull-up wiring)
            await asyncio.sleep(0.1)
            pin.drive_high()
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                await asyncio.sleep(0.1)
                rows = _rows(cfg.db_path)
                if (
                    len([r for r in rows if r["device"] == "sensor1"]) >= 5
                    and len([r for r in rows if r["device"] == "door"]) >= 4
                ):
                    break
    rows = _rows(cfg.db_path)
    door_events = [json.loads(r["payload"]) for r in rows if r["device"] == "door" and r["kind"] == "event"]
    assert [e["event"] for e in door_events] == ["pressed", "released"]
    door_levels = [
        json.loads(r["payload"])["values"] for r in rows if r["device"] == "door" and r["kind"] == "telemetry"
    ]
    assert [v["active"] for v in door_levels] == [True, False]
    sensor = [json.loads(r["payload"]) for r in rows if r["device"] == "sensor1"]
    assert all(p["values"]["humidity_pct"] <= 100 for p in sensor)
    assert {r["topic"] for r in rows if r["device"] == "sensor1"} == {"telemetry/sensor1"}
    assert all(r["clock_synced"] == 0 for r in rows)


def test_the_daemon_shows_recent_telemetry_and_the_outbox(daemon: Daemon) -> None:
    status, body = daemon.post({"device": "sensor1", "action": "set_interval", "params": {"seconds": 0.05}}, wait=5)[:2]
    assert status == 200 and body["state"] == "succeeded", body
    deadline = time.monotonic() + 10
    readings: list[dict[str, Any]] = []
    while time.monotonic() < deadline and len(readings) < 5:
        time.sleep(0.2)
        readings = daemon.get("/api/v1/devices/sensor1/telemetry")[1]["readings"]
    assert len(readings) >= 5
    assert set(readings[-1]["values"]) >= {"temperature_c", "humidity_pct"}
    device = daemon.get("/api/v1/devices/sensor1")[1]
    assert set(device["telemetry"]["values"]) >= {"temperature_c", "battery_v"}
    assert device["telemetry"]["at"].endswith("Z")
    deadline = time.monotonic() + 5  # written in the next batch (flush_interval_s)
    while time.monotonic() < deadline:
        status, outbox = daemon.get("/api/v1/outbox")
        assert status == 200
        if outbox["by_kind"].get("telemetry", 0) >= 1:
            break
        time.sleep(0.1)
    assert outbox["by_kind"].get("telemetry", 0) >= 1 and outbox["bytes"] > 0
    stats = daemon.get("/api/v1/stats")[1]
    assert stats["outbox"]["rows"] >= 1
    assert stats["clock"]["synchronised"] in (True, False)
    assert daemon.get("/api/v1/devices/nope/telemetry")[0] == 404


def test_without_an_uplink_nothing_piles_up_in_the_outbox_and_the_page_still_shows_readings(make_daemon: Any) -> None:
    """``[mqtt] enabled = false``: results, events and telemetry have nowhere to go, so they are not queued for
    ever (results and events are never dropped from the outbox); commands and the page work as before."""
    d: Daemon = make_daemon({"GATEWAYD_MQTT__ENABLED": "false"})
    d.start()
    status, body = d.post({"device": "sensor1", "action": "set_interval", "params": {"seconds": 0.05}}, wait=5)[:2]
    assert status == 200 and body["state"] == "succeeded", body
    for i in range(20):
        assert d.post({"id": f"no-uplink-{i}", "device": "relay1", "action": "on" if i % 2 else "off"})[0] == 202
    assert d.wait_final("no-uplink-19")["state"] == "succeeded"
    # Readings reach the page through the recorder, which is where an outbox row would be made: none is.
    wait_until(lambda: len(d.get("/api/v1/devices/sensor1/telemetry")[1]["readings"]) >= 5, 10, "five readings")
    outbox = d.get("/api/v1/outbox")[1]
    assert outbox["rows"] == 0 and outbox["by_kind"] == {}, outbox
    assert d.stop() == 0
