"""Modbus RTU over real pseudo-terminals, with pymodbus's own server as the peer (behind the simulator's bridge):
writes and reads through ModbusDevice, exception replies as typed errors, silent units, hot-plug, a hostile line,
slow and late replies, the transaction rate, the poller, and the daemon with its bundled config."""

from __future__ import annotations

import asyncio
import json
import re
import struct
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import serial
import structlog
from pymodbus.client.mixin import ModbusClientMixin

from gatewayd.config import load_config
from gatewayd.config.models import SerialBusConfig
from gatewayd.config.profiles import Profile
from gatewayd.devices.manager import DeviceManager
from gatewayd.devices.modbus import ModbusBus, ModbusDevice
from gatewayd.devices.modbus_link import SerialLink
from gatewayd.devices.modbus_sim import Block, Layout, ModbusSimulator, ModbusUnit, Sdm120Model, TableModel
from gatewayd.devices.simulator import Faults
from gatewayd.errors import DeviceBusy, DeviceRejected, DeviceTimeout, DeviceUnavailable
from gatewayd.resilience.clock import REAL_CLOCK, Clock, FakeClock
from gatewayd.telemetry import MemorySink, Record
from tests.conftest import CONFIG, ROOT, Daemon
from tests.test_bus_limits import most_in_any_window
from tests.test_serial_hotplug import _availability_events, _becomes

READ = {"actuates": False}
PLANT = Profile.model_validate(
    {
        "name": "plant",
        "kind": "modbus_rtu",
        "actions": {
            "start": {"modbus": {"write": "coil", "address": 0, "value": True}},
            "stop": {"safe": True, "modbus": {"write": "coil", "address": 0, "value": False}},
            "set_speed": {
                "params": {"percent": {"type": "float", "min": 0, "max": 100}},
                "modbus": {"write": "holding", "address": 10, "param": "percent", "scale": 0.1},
            },
            "set_setpoint": {
                "params": {"celsius": {"type": "float", "min": -50, "max": 150}},
                "modbus": {
                    "write": "holding",
                    "address": 20,
                    "param": "celsius",
                    "type": "float32",
                    "word_order": "little",
                },
            },
            "set_counter": {
                "params": {"n": {"type": "int", "min": 0, "max": 4_000_000}},
                "modbus": {"write": "holding", "address": 30, "param": "n", "type": "uint32"},
            },
            "read": {**READ, "modbus": {"read": "telemetry"}},
            "read_speed": {**READ, "modbus": {"read": ["speed"]}},
            "read_mode": {**READ, "modbus": {"read": ["mode"]}},
            "read_setpoint": {**READ, "modbus": {"read": ["setpoint"]}},
        },
        "telemetry": {
            "running": {"type": "bool", "modbus": {"table": "coil", "address": 0}},
            "alarm": {"type": "bool", "modbus": {"table": "discrete", "address": 3}},
            "speed": {"unit": "%", "modbus": {"table": "holding", "address": 10, "scale": 0.1}},
            "mode": {"type": "int", "modbus": {"table": "holding", "address": 12}},
            "setpoint": {
                "unit": "°C",
                "modbus": {"table": "holding", "address": 20, "type": "float32", "word_order": "little"},
            },
            "counter": {"type": "int", "modbus": {"table": "holding", "address": 30, "type": "uint32"}},
            "temperature": {"unit": "°C", "modbus": {"table": "input", "address": 0, "type": "int16", "scale": 0.1}},
            "pressure": {"unit": "bar", "modbus": {"table": "input", "address": 1, "scale": 0.01, "offset": -1}},
            "flow": {"unit": "m³/h", "modbus": {"table": "input", "address": 2, "type": "float32"}},
            "energy": {
                "unit": "kWh",
                "modbus": {"table": "input", "address": 4, "type": "uint32", "word_order": "little", "scale": 0.1},
            },
            "delta": {"type": "int", "modbus": {"table": "input", "address": 6, "type": "int32"}},
        },
    }
)


METER_SETUP = Profile.model_validate(
    {
        "name": "meter_setup",
        "kind": "modbus_rtu",
        "actions": {
            "set_address": {"modbus": {"write": "holding", "address": 0x14, "value": 2.0, "type": "float32"}},
            "set_address_fc6": {"modbus": {"write": "holding", "address": 0x14, "value": 2, "function": 6}},
            "coil": {"modbus": {"write": "coil", "address": 0x14, "value": True}},
        },
    }
)
GHOST = Profile.model_validate(
    {
        "name": "ghost",
        "kind": "modbus_rtu",
        "actions": {"read": {**READ, "modbus": {"read": "telemetry"}}},
        "telemetry": {"ghost": {"type": "int", "modbus": {"table": "holding", "address": 99}}},
    }
)


def _words(fmt: str, value: float, *, little: bool = False) -> list[int]:
    """Registers holding ``value`` packed big-endian as ``fmt``: built here with struct, not with the code under
    test, so a word-order mistake there cannot cancel out."""
    data = struct.pack(f">{fmt}", value)
    words = [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]
    return words[::-1] if little else words


def plant_layout() -> Layout:
    inputs = [
        *_words("h", -123),  # temperature -12.3 °C
        *_words("H", 250),  # pressure 250 * 0.01 - 1 = 1.5 bar
        *_words("f", 12.5),  # flow
        *_words("I", 1_234_567, little=True),  # energy 123456.7 kWh
        *_words("i", -70_000),  # delta
    ]
    setpoint = _words("f", 21.5, little=True)
    return {
        "coil": {0: False, 1: False},
        "discrete": {3: True, 4: False},
        "holding": {10: 0, 12: 7, 20: setpoint[0], 21: setpoint[1], 30: 0, 31: 0},
        "input": dict(enumerate(inputs)),
    }


# What plant_layout holds, read through PLANT's points (scaled, offset, in both word orders).
PLANT_AT_POWER_UP = {
    "running": False,
    "alarm": True,
    "speed": 0.0,
    "mode": 7,
    "setpoint": 21.5,
    "counter": 0,
    "temperature": -12.3,
    "pressure": 1.5,
    "flow": 12.5,
    "energy": 123456.7,
    "delta": -70_000,
}


class PlantModel(TableModel):
    """The plant's registers, refusing some register values with the exception code a test asks for, and telling
    the test when the unit served a read."""

    def __init__(self, refuse: dict[int, int] | None = None):
        super().__init__(plant_layout())
        self.refuse = refuse or {}
        self.served = asyncio.Event()

    def on_read(self, block: Block, address: int, count: int) -> None:
        self.served.set()

    def on_write(self, function: int, block: Block, address: int, values: Sequence[int | bool]) -> int | None:
        return self.refuse.get(int(values[0])) if block.table == "holding" else None


def _plant(tmp_path: Path, unit: int = 1, model: TableModel | None = None, **kw: Any) -> ModbusUnit:
    return ModbusUnit(f"plant{unit}", unit, model or PlantModel(), tmp_path / f"plant{unit}.jsonl", profile=PLANT, **kw)


def _cfg(**overrides: Any) -> SerialBusConfig:
    settings: dict[str, Any] = {
        "port": "set-at-open",
        "protocol": "modbus_rtu",
        "baudrate": 9600,
        "response_timeout_s": 0.4,  # a reply takes a few ms; a loaded CI machine has been seen past 0.15 s
        "reconnect_base_s": 0.01,
        "reconnect_cap_s": 0.05,
        **overrides,
    }
    return SerialBusConfig(**settings)


@asynccontextmanager
async def _line(
    tmp_path: Path,
    units: dict[int, ModbusUnit],
    cfg: SerialBusConfig | None = None,
    *,
    clock: Clock = REAL_CLOCK,
    **line: Any,
) -> AsyncIterator[tuple[ModbusSimulator, ModbusBus]]:
    cfg = cfg or _cfg()
    async with ModbusSimulator("rtu", units, **line) as sim:
        async with ModbusBus("rtu", cfg, SerialLink(sim.port, cfg), clock=clock) as bus:
            assert bus.availability.available
            yield sim, bus


def _device(bus: ModbusBus, unit: int = 1, profile: Profile = PLANT, **kw: Any) -> ModbusDevice:
    return ModbusDevice(f"plant{unit}", profile, bus, unit, kw.pop("sink", MemorySink()), **kw)


def _log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- the mapping, end to end -----------------------------------------------------------------------------------


async def test_writes_reach_the_unit_scaled_encoded_and_logged_once(tmp_path: Path) -> None:
    async with _line(tmp_path, {1: _plant(tmp_path)}) as (_, bus), _device(bus) as dev:
        assert await dev.execute("c1", "start", {}) == {"table": "coil", "address": 0, "value": True}
        assert await dev.execute("c2", "set_speed", {"percent": 55.5}) == {
            "table": "holding",
            "address": 10,
            "value": 55.5,
            "raw": 555,
        }
        await dev.execute("c3", "set_setpoint", {"celsius": -12.25})
        await dev.execute("c4", "set_counter", {"n": 70_000})
        state = await dev.execute("c5", "read", {})
        assert (state["running"], state["speed"], state["setpoint"], state["counter"]) == (True, 55.5, -12.25, 70_000)
    little_float = ModbusClientMixin.convert_to_registers(
        -12.25, ModbusClientMixin.DATATYPE.FLOAT32, word_order="little"
    )
    writes = [
        (e["function"], e["table"], e["address"], e["values"], e["action"]) for e in _log(tmp_path / "plant1.jsonl")
    ]
    assert writes == [
        (5, "coil", 0, [True], "start"),
        (6, "holding", 10, [555], "set_speed"),
        (16, "holding", 20, little_float, "set_setpoint"),
        (16, "holding", 30, [1, 70_000 - 65_536], "set_counter"),
    ]


async def test_telemetry_with_scale_offset_units_and_both_word_orders(tmp_path: Path) -> None:
    async with _line(tmp_path, {1: _plant(tmp_path)}) as (_, bus), _device(bus) as dev:
        before = bus.transactions
        values = await dev.execute("r1", "read", {})
        assert bus.transactions - before == 7, "coils, discrete inputs, holding 10, 12, 20-21, 30-31, inputs 0-7"
        assert values == PLANT_AT_POWER_UP
        assert isinstance(values["mode"], int) and isinstance(values["speed"], float)
        described = dev.describe()
        assert described["points"]["temperature"] == {"value": -12.3, "unit": "°C"}
        assert described["points"]["pressure"] == {"value": 1.5, "unit": "bar"}
        assert described["kind"] == "modbus" and described["address"] == 1 and described["state"]["flow"] == 12.5


async def test_exception_replies_become_typed_errors(tmp_path: Path) -> None:
    refuse = {950: 3, 960: 11, 970: 4}  # raw register value -> the exception code the unit answers
    units = {
        1: _plant(tmp_path, model=PlantModel(refuse)),
        2: _plant(tmp_path, 2, busy_replies=2),
        3: ModbusUnit("meter3", 3, Sdm120Model(3), tmp_path / "meter3.jsonl"),
    }
    async with _line(tmp_path, units) as (_, bus), _device(bus) as dev, _device(bus, 2) as busy:
        with pytest.raises(DeviceRejected) as rejected:
            await dev.execute("v", "set_speed", {"percent": 95})
        assert rejected.value.details["exception_code"] == 3 and rejected.value.details["exception"] == "illegal_value"
        assert not rejected.value.transient
        with pytest.raises(DeviceRejected) as failed:
            await dev.execute("f", "set_speed", {"percent": 97})
        assert failed.value.details["exception_code"] == 4
        with pytest.raises(DeviceTimeout) as behind_gateway:
            await dev.execute("g", "set_speed", {"percent": 96})
        assert behind_gateway.value.details["exception_code"] == 11
        with pytest.raises(DeviceRejected) as illegal_address:
            await _device(bus, profile=GHOST).execute("a", "read", {})
        assert illegal_address.value.details["exception_code"] == 2

        meter = _device(bus, 3, profile=METER_SETUP)
        with pytest.raises(DeviceRejected) as illegal_function:
            await meter.execute("m", "set_address_fc6", {})  # the meter takes function 16 only
        assert illegal_function.value.details["exception_code"] == 1
        assert (await meter.execute("m", "set_address", {}))["raw"] == 2.0
        with pytest.raises(DeviceRejected) as no_coils:
            await meter.execute("m", "coil", {})
        assert no_coils.value.details["exception_code"] == 2

        for attempt in range(2):  # "busy": transient, the dispatcher asks again
            with pytest.raises(DeviceBusy) as busy_error:
                await busy.execute(f"b{attempt}", "start", {})
            assert busy_error.value.transient and busy_error.value.details["exception_code"] == 6
        assert await busy.execute("b2", "start", {}) == {"table": "coil", "address": 0, "value": True}
        assert bus.availability.available
    assert [e["values"] for e in _log(tmp_path / "plant1.jsonl")] == [], "refused writes are not performed"
    # The meter's "no coils" came from pymodbus itself: the address is outside even its placeholder block.
    assert units[1].refused == {3: 1, 4: 1, 11: 1} and units[2].refused == {6: 2} and units[3].refused == {1: 1}
    assert [e["action"] for e in _log(tmp_path / "plant2.jsonl")] == ["start"], "performed once, after the busy"


async def test_a_silent_or_absent_unit_times_out_while_its_neighbour_answers(tmp_path: Path) -> None:
    units = {1: _plant(tmp_path, mute=True), 2: _plant(tmp_path, 2)}
    async with _line(tmp_path, units) as (_, bus), _device(bus) as mute, _device(bus, 2) as neighbour:
        with pytest.raises(DeviceTimeout) as silent:
            await mute.execute("m", "read_speed", {})
        assert silent.value.details == {"bus": "rtu", "unit": 1, "function": 3}
        assert await neighbour.execute("n", "read_mode", {}) == {"mode": 7}
        with pytest.raises(DeviceTimeout):
            await _device(bus, 9).execute("x", "start", {})  # nobody at address 9
        assert bus.timeouts == 2 and bus.availability.available, "a silent unit is not a missing port"
    assert units[1].requests == 0 and units[2].requests == 1


# --- hot-plug ----------------------------------------------------------------------------------------------------


async def _in_flight(dev: ModbusDevice, unit: ModbusUnit, model: PlantModel) -> asyncio.Task[dict[str, Any]]:
    """A read the unit has received, its reply held back by half a second of latency."""
    unit.latency_s = 0.5
    model.served.clear()
    pending = asyncio.create_task(dev.execute("inflight", "read_speed", {}))
    async with asyncio.timeout(2):
        await model.served.wait()
    return pending


async def test_twelve_unplugs_and_replugs_each_back_within_two_seconds(tmp_path: Path) -> None:
    cycles = 12
    link = tmp_path / "sim" / "rtu.tty"
    model = PlantModel()
    unit = _plant(tmp_path, model=model)
    cfg = _cfg(response_timeout_s=1.0, reconnect_base_s=0.01, reconnect_cap_s=0.2)
    back: list[float] = []
    with structlog.testing.capture_logs() as logs:
        async with (
            ModbusSimulator("rtu", {1: unit}, link=link) as sim,
            ModbusBus("rtu", cfg, SerialLink(str(link), cfg)) as bus,
            _device(bus) as dev,
        ):
            await dev.execute("first", "set_speed", {"percent": 1})
            # A request in flight when the port goes fails at once as unavailable, not after the 1 s timeout.
            pending = await _in_flight(dev, unit, model)
            unplugged_at = time.monotonic()
            sim.unplug()
            with pytest.raises(DeviceUnavailable):
                await pending
            assert time.monotonic() - unplugged_at < 0.5
            unit.latency_s = 0.0
            for cycle in range(cycles):
                if cycle:
                    sim.unplug()
                await _becomes(bus.availability, False)
                with pytest.raises(DeviceUnavailable):
                    await dev.execute(f"down{cycle}", "read_speed", {})
                sim.plug()
                plugged_at = time.monotonic()
                await _becomes(bus.availability, True)
                assert await dev.execute(f"up{cycle}", "set_speed", {"percent": cycle}) == {
                    "table": "holding",
                    "address": 10,
                    "value": cycle,
                    "raw": cycle * 10,
                }
                back.append(time.monotonic() - plugged_at)
            assert bus.opens == cycles + 1
            assert not [t for t in asyncio.all_tasks() if t.get_name() == "transport reconnect"], "pymodbus's own"
    assert _availability_events(logs, "bus:rtu") == [
        "device_available",
        *["device_unavailable", "device_available"] * cycles,
    ]
    assert max(back) < 2.0, back
    print(f"\nback after replug: worst {max(back):.3f} s, mean {sum(back) / len(back):.3f} s over {cycles} cycles")


async def test_a_bus_that_starts_without_its_port_opens_it_when_it_appears(tmp_path: Path) -> None:
    link = tmp_path / "sim" / "rtu.tty"
    async with ModbusBus("rtu", _cfg(), SerialLink(str(link), _cfg())) as bus:
        assert not bus.availability.available
        assert bus.availability.last_error == f"cannot open {link}: No such file or directory"
        async with ModbusSimulator("rtu", {1: _plant(tmp_path)}, link=link), _device(bus) as dev:
            await _becomes(bus.availability, True)
            assert await dev.execute("m", "read_mode", {}) == {"mode": 7}


# --- a hostile line ----------------------------------------------------------------------------------------------


async def _exchange(dev: ModbusDevice, n: int) -> tuple[int, int]:
    """``n`` writes, each followed by a read of what was written; every transaction gets its own correct answer or
    DeviceTimeout (a unit that acted and whose reply was lost still holds the value). (answered, timed out)"""
    answered = timed_out = 0
    for i in range(n):
        try:
            assert (await dev.execute(f"w{i}", "set_speed", {"percent": i}))["raw"] == i * 10
            answered += 1
        except DeviceTimeout:
            timed_out += 1
        try:
            assert await dev.execute(f"r{i}", "read_speed", {}) == {"speed": i}
            answered += 1
        except DeviceTimeout:
            timed_out += 1
    return answered, timed_out


async def test_noise_before_every_reply_costs_nothing(tmp_path: Path) -> None:
    unit = _plant(tmp_path, faults=Faults(garbage=1.0, garbage_max=64, seed=3))
    async with _line(tmp_path, {1: unit}) as (_, bus), _device(bus) as dev:
        assert await _exchange(dev, 20) == (40, 0)
        assert bus.timeouts == 0
    assert unit.faulted["garbage"] == 40


async def test_byte_at_a_time_with_noise(tmp_path: Path) -> None:
    unit = _plant(tmp_path, faults=Faults(garbage=0.5, garbage_max=16, seed=4))
    received: list[int] = []
    # A pause after each byte (far below the 0.5 s reply timeout) so that the reads really are small ones on a
    # loaded machine too: with none, a slow reader found whole replies waiting and the test tested nothing.
    async with ModbusSimulator("rtu", {1: unit}, byte_at_a_time=True, byte_pause_s=0.002) as sim:
        cfg = _cfg(response_timeout_s=0.5)
        bus = ModbusBus("rtu", cfg, SerialLink(sim.port, cfg))
        hunt = bus._filter_reply

        def counting(sending: bool, data: bytes) -> bytes:
            if not sending:
                received.append(len(data))
            return hunt(sending, data)

        bus._filter_reply = counting  # type: ignore[method-assign]
        async with bus, _device(bus) as dev:
            assert await _exchange(dev, 10) == (20, 0)
    # pymodbus hands over everything received since the request each time: a few bytes more per call.
    steps = [b - a if b > a else b for a, b in zip([0, *received], received, strict=False)]
    assert len(received) >= 3 * 20 and sum(steps) / len(steps) < 4, "each reply arrived in several small reads"


@pytest.mark.parametrize("fault", ["partial", "corrupt"])
async def test_replies_cut_short_or_corrupted_end_in_timeouts_never_in_wrong_values(tmp_path: Path, fault: str) -> None:
    unit = _plant(tmp_path, faults=Faults(**{fault: 0.3}, seed=5))  # type: ignore[arg-type]
    async with _line(tmp_path, {1: unit}) as (_, bus), _device(bus) as dev:
        answered, timed_out = await _exchange(dev, 15)
    assert 0 < unit.faulted[fault] < 30
    assert (answered, timed_out) == (30 - unit.spoiled, unit.spoiled)


async def test_lost_replies_are_asked_again_and_a_repeated_write_is_harmless(tmp_path: Path) -> None:
    unit = _plant(tmp_path, faults=Faults(drop=0.3, seed=2))
    async with _line(tmp_path, {1: unit}) as (_, bus), _device(bus) as dev:
        sent = 0
        for i in range(15):
            while True:  # the same write again, as the dispatcher's retry sends it
                sent += 1
                try:
                    await dev.execute(f"d{i}", "set_speed", {"percent": i})
                    break
                except DeviceTimeout:
                    continue
        while True:
            try:
                final = await dev.execute("final", "read_speed", {})
                break
            except DeviceTimeout:
                continue
        assert final == {"speed": 14}
    writes = [e["values"][0] for e in _log(tmp_path / "plant1.jsonl")]
    assert len(writes) == sent > 15, "every write reached the unit and was performed; only replies were lost"
    deduplicated = [w for k, w in enumerate(writes) if k == 0 or writes[k - 1] != w]
    assert deduplicated == [i * 10 for i in range(15)], "a repeat wrote the same value again, nothing else"


async def test_every_fault_at_once_byte_by_byte(tmp_path: Path) -> None:
    faults = Faults(garbage=0.3, garbage_max=32, partial=0.1, drop=0.1, corrupt=0.1, seed=9)
    unit = _plant(tmp_path, faults=faults)
    async with _line(tmp_path, {1: unit}, byte_at_a_time=True) as (_, bus), _device(bus) as dev:
        answered, timed_out = await _exchange(dev, 15)
        assert bus.availability.available and bus.opens == 1
    assert timed_out == unit.spoiled > 0 and answered == 30 - timed_out
    assert unit.faulted["garbage"] > 0


async def _replies_lost_after_noise(dev: ModbusDevice) -> int:
    """How many reads time out before one is answered (correctly); the next one is answered too."""
    lost = 0
    while True:
        try:
            assert await dev.execute("after", "read_mode", {}) == {"mode": 7}
            break
        except DeviceTimeout:
            lost += 1
    assert await dev.execute("next", "read_mode", {}) == {"mode": 7}
    return lost


async def test_a_burst_of_noise_between_requests_costs_at_most_one_reply(tmp_path: Path) -> None:
    async with _line(tmp_path, {1: _plant(tmp_path)}) as (sim, bus), _device(bus) as dev:
        sim.inject(bytes(range(256)) * 16)  # 4 KiB, with every unit address and function code in it
        assert await _replies_lost_after_noise(dev) <= 1


# --- slow and late replies -------------------------------------------------------------------------------------


async def test_slow_replies_within_the_timeout_are_answers(tmp_path: Path) -> None:
    unit = _plant(tmp_path, latency_s=0.1)
    async with _line(tmp_path, {1: unit}, _cfg(response_timeout_s=0.5)) as (_, bus), _device(bus) as dev:
        started = time.monotonic()
        assert await dev.execute("s", "read_mode", {}) == {"mode": 7}
        assert time.monotonic() - started >= 0.1


async def test_a_late_reply_is_never_taken_for_the_next_requests(tmp_path: Path) -> None:
    timeout = 0.3
    unit = _plant(tmp_path)
    async with _line(tmp_path, {1: unit}, _cfg(response_timeout_s=timeout)) as (_, bus), _device(bus) as dev:
        # The same shape (one holding register): the late reply comes while the line is kept quiet, and is dropped.
        await dev.execute("w", "set_speed", {"percent": 11.1})
        unit.latency_s = timeout + 0.1
        with pytest.raises(DeviceTimeout):
            await dev.execute("late", "read_speed", {})
        unit.latency_s = 0.0
        assert await dev.execute("next", "read_mode", {}) == {"mode": 7}, "not 111, the late speed"
        # Another shape (two registers), later than the quiet: it arrives while the next request waits, and is
        # passed over because it cannot be the answer to a read of one register.
        unit.latency_s = 2 * timeout + 0.1
        with pytest.raises(DeviceTimeout):
            await dev.execute("late2", "read_setpoint", {})
        unit.latency_s = 0.0
        assert await dev.execute("next2", "read_mode", {}) == {"mode": 7}
        assert bus.timeouts == 2


# --- the line's pace -------------------------------------------------------------------------------------------


async def test_the_modbus_bus_keeps_to_its_transaction_rate(tmp_path: Path) -> None:
    rate, burst, n = 10.0, 3, 23
    clock = FakeClock(start=500.0)
    cfg = _cfg(transactions_per_s=rate, transactions_burst=burst)
    sent: list[float] = []
    async with _line(tmp_path, {1: _plant(tmp_path)}, cfg, clock=clock) as (_, bus), _device(bus) as dev:
        for i in range(n):
            assert await dev.execute(f"r{i}", "read_mode", {}) == {"mode": 7}
            sent.append(clock.monotonic())  # the fake clock moves only while the bucket makes a request wait
    assert sent[:burst] == [500.0] * burst
    assert sent[-1] - sent[0] == pytest.approx((n - burst) / rate, abs=1e-9)
    assert most_in_any_window(sent, 1.0) <= burst + rate


async def test_turnaround_between_requests_and_a_quiet_line_after_a_lost_reply(tmp_path: Path) -> None:
    clock = FakeClock()
    cfg = _cfg(turnaround_s=0.05, response_timeout_s=0.2)
    units = {1: _plant(tmp_path), 2: _plant(tmp_path, 2, mute=True)}
    async with _line(tmp_path, units, cfg, clock=clock) as (_, bus), _device(bus) as dev, _device(bus, 2) as mute:
        for i in range(4):
            await dev.execute(f"r{i}", "read_mode", {})
        assert clock.sleeps == pytest.approx([0.05] * 3)
        with pytest.raises(DeviceTimeout):
            await mute.execute("m", "read_mode", {})
        await dev.execute("after", "read_mode", {})
        assert clock.sleeps[-2:] == pytest.approx([0.05, 0.2]), "turnaround, then a timeout's quiet after it"


async def test_the_modbus_bus_opens_its_port_with_the_configured_framing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As for the line-protocol bus: stop bits on a real pty, parity through a watched open (a pty refuses it)."""
    async with _line(tmp_path, {1: _plant(tmp_path)}, _cfg(stopbits=2)) as (_, bus):
        assert bus._client is not None
        port = bus._client.ctx.transport.sync_serial  # type: ignore[attr-defined]
        assert (port.baudrate, port.bytesize, port.parity, port.stopbits) == (9600, 8, "N", 2)
    opened: dict[str, dict[str, Any]] = {}
    real_open = serial.serial_for_url

    def watched_open(url: str, *args: Any, **kwargs: Any) -> Any:
        opened[url] = kwargs
        return real_open(url, *args, **{**kwargs, "parity": "N"})

    monkeypatch.setattr(serial, "serial_for_url", watched_open)
    async with _line(tmp_path, {1: _plant(tmp_path)}, _cfg(baudrate=19200, parity="E")) as (sim, bus):
        assert bus.availability.available
        gateway_side = opened[sim.port]  # the simulator's server opens a pty of its own too
    framing = (gateway_side["baudrate"], gateway_side["bytesize"], gateway_side["parity"], gateway_side["stopbits"])
    assert framing == (19200, 8, "E", 1)


# --- polling -----------------------------------------------------------------------------------------------------


class EventSink(MemorySink):
    """The in-memory sink, also telling a test when records arrive."""

    def __init__(self) -> None:
        super().__init__()
        self._arrived = asyncio.Event()

    def put(self, record: Record) -> None:
        super().put(record)
        self._arrived.set()

    async def until(self, done: Callable[[list[Record]], bool], within_s: float = 5.0) -> list[Record]:
        async with asyncio.timeout(within_s):
            while True:
                self._arrived.clear()
                records = list(self)
                if done(records):
                    return records
                await self._arrived.wait()


class ManualClock(FakeClock):
    """A fake clock whose sleepers wait for the test: each pause is handed to the test, which lets it pass."""

    def __init__(self) -> None:
        super().__init__()
        self._asked: asyncio.Queue[tuple[float, asyncio.Future[None]]] = asyncio.Queue()

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        passed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await self._asked.put((seconds, passed))
        await passed

    async def next_pause(self, within_s: float = 5.0) -> tuple[float, asyncio.Future[None]]:
        async with asyncio.timeout(within_s):
            return await self._asked.get()


async def test_the_poller_records_every_point_once_per_poll_and_backs_off_from_a_silent_unit(tmp_path: Path) -> None:
    polled = PLANT.model_copy(update={"poll_interval_s": 5.0})
    unit = _plant(tmp_path)
    clock, sink = ManualClock(), EventSink()
    pauses: list[float] = []

    async def next_poll(before: Callable[[], None] = lambda: None) -> None:
        seconds, passed = await clock.next_pause()
        pauses.append(seconds)
        before()
        clock.advance(seconds)
        passed.set_result(None)

    with structlog.testing.capture_logs() as logs:
        async with _line(tmp_path, {1: unit}) as (_, bus), _device(bus, profile=polled, sink=sink, clock=clock) as dev:
            await next_poll()  # after poll 1
            await next_poll(lambda: setattr(unit, "mute", True))  # after poll 2; the unit goes silent
            for _ in range(4):
                await next_poll()  # after polls 3 to 6, unanswered
            await next_poll(lambda: setattr(unit, "mute", False))  # after poll 7, unanswered; the unit is back
            await next_poll()  # after poll 8
            records = await sink.until(lambda r: len(r) == 3)
            assert dev.polls == 3 and dev.poll_failures == 0
    assert pauses == [5.0, 5.0, 5.0, 10.0, 20.0, 40.0, 60.0, 5.0], "one miss costs nothing, then doubling to the cap"
    for record in records:
        assert record.kind == "telemetry" and record.device == "plant1"
        assert set(record.data) == set(PLANT.telemetry) and record.data["temperature"] == -12.3
    events = [(e["event"], e.get("failed_polls")) for e in logs if e["event"].startswith("modbus_poll")]
    assert events == [("modbus_poll_failing", None), ("modbus_poll_recovered", 5)]


# --- the daemon ----------------------------------------------------------------------------------------------------


def _quick_profiles(tmp_path: Path) -> Path:
    """The shipped profiles, polling every 0.2 s instead of every 5 or 10: a test then sees several polls."""
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    for path in (ROOT / "hardware" / "profiles").glob("*.toml"):
        text = re.sub(r"(?m)^poll_interval_s = [0-9.]+", "poll_interval_s = 0.2", path.read_text())
        (profiles / path.name).write_text(text)
    return profiles


async def test_the_bundled_config_polls_its_modbus_units_into_the_managers_sink(tmp_path: Path) -> None:
    # Parity E, as many RS-485 devices ship: in mock mode the simulator's pty still opens (it has no framing).
    environ = {
        "GATEWAYD_GATEWAY__DATA_DIR": str(tmp_path),
        "GATEWAYD_GATEWAY__PROFILES_DIR": str(_quick_profiles(tmp_path)),
        "GATEWAYD_SERIAL__BUS1__PARITY": "E",
    }
    loaded = load_config(CONFIG, environ=environ)
    sink = EventSink()
    async with DeviceManager(loaded, sink=sink) as manager:
        records = await sink.until(lambda r: {"meter1", "relays1"} <= {rec.device for rec in r})
        meter = next(r for r in records if r.device == "meter1").data
        assert set(meter) == set(loaded.profiles["eastron_sdm120"].telemetry)
        assert 215 <= meter["voltage"] <= 245 and 49.9 <= meter["frequency"] <= 50.1 and meter["import_energy"] > 0
        assert next(r for r in records if r.device == "relays1").data == {f"relay{i}": False for i in range(1, 9)}
        relays = manager.devices["relays1"]
        await relays.execute("c1", "on2", {})
        assert (await relays.execute("c2", "read", {}))["relay2"] is True
        await relays.execute("c3", "all_off", {})
        assert not any((await relays.execute("c4", "read", {})).values())
        polled = await sink.until(lambda r: sum(1 for rec in r if rec.device == "meter1") >= 3)
        assert all(set(rec.data) == set(meter) for rec in polled if rec.device == "meter1"), "every point, every poll"
    assert [e["action"] for e in _log(tmp_path / "sim" / "relays1.jsonl")] == ["on2", "all_off"]


def test_the_daemon_runs_a_modbus_command_from_http_once(make_daemon: Any, tmp_path: Path) -> None:
    daemon: Daemon = make_daemon({"GATEWAYD_GATEWAY__PROFILES_DIR": str(_quick_profiles(tmp_path))})
    daemon.start()
    status, rec, _ = daemon.post({"id": "valve-3-open", "device": "relays1", "action": "on3"}, wait=5)
    assert status == 200 and rec["state"] == "succeeded", rec
    assert rec["result"] == {"table": "coil", "address": 2, "value": True}
    executed = [e for e in daemon.sim_log("relays1") if e["action"] == "on3"]
    assert len(executed) == 1 and executed[0]["values"] == [True] and executed[0]["unit"] == 2
    assert daemon.post({"id": "valve-3-open", "device": "relays1", "action": "on3"})[0] in (200, 202)
    assert len([e for e in daemon.sim_log("relays1") if e["action"] == "on3"]) == 1, "the same id never runs twice"
    deadline = time.monotonic() + 5
    while True:
        status, meter = daemon.get("/api/v1/devices/meter1")
        assert status == 200
        if meter["poll"]["polls"] >= 2:
            break
        assert time.monotonic() < deadline, meter
        time.sleep(0.05)
    assert meter["available"] and meter["kind"] == "modbus" and meter["points"]["voltage"]["unit"] == "V"
    assert 215 <= meter["points"]["voltage"]["value"] <= 245
    # The polls are telemetry records too: the latest reading as the other devices show theirs.
    assert 215 <= meter["telemetry"]["values"]["voltage"] <= 245


def test_a_silent_modbus_unit_fails_its_commands_and_opens_its_breaker(make_daemon: Any) -> None:
    d: Daemon = make_daemon(
        {
            "GATEWAYD_DEVICES__METER1__SIMULATOR__MUTE": "true",
            "GATEWAYD_SERIAL__BUS1__RESPONSE_TIMEOUT_S": "0.1",
            "GATEWAYD_RESILIENCE__DEVICE_RETRY__BASE_S": "0.01",
        }
    )
    d.start()
    status, rec, _ = d.post({"device": "meter1", "action": "read"}, wait=10)
    assert status == 200 and rec["state"] == "failed", rec
    assert rec["error"]["code"] == "device_timeout" and "gave up after 3 attempt(s)" in rec["error"]["message"]
    status, held, _ = d.post({"device": "meter1", "action": "read", "ttl_s": 60})
    assert status == 202
    deadline = time.monotonic() + 10
    while True:  # its retries meet the breaker, which opens on the fifth failure: it goes back to the queue
        _, meter = d.get("/api/v1/devices/meter1")
        state = d.command(held["id"])["state"]
        if meter["breaker"]["state"] == "open" and state == "queued":
            break
        assert time.monotonic() < deadline, (meter, state)
        time.sleep(0.05)
    assert meter["available"], "the bus is up: only the unit is silent"
    status, rec, _ = d.post({"device": "relays1", "action": "on1"}, wait=5)
    assert rec["state"] == "succeeded", "the neighbour on the same bus still answers"
    failing = [e for e in d.log_lines() if e.get("event") == "modbus_poll_failing" and e["device"] == "meter1"]
    assert len(failing) == 1, "a silent unit's failing polls are reported once, not once per poll"
