"""Simulated Modbus RTU units behind real pseudo-terminals, answered by pymodbus's own serial server.

pymodbus's server opens its port by path, so the simulator uses two pty pairs with a bridge between them:

    gateway ── pty (published as <sim_dir>/<bus>.tty) ── bridge ── pty ── pymodbus ModbusSerialServer

The gateway side is :class:`~gatewayd.devices.simulator.PtySimulator`'s line: a stable link to a new pty on each
:meth:`plug`, byte-at-a-time delivery, pacing to a baud rate, and :meth:`inject` for raw noise. :meth:`unplug`
removes the link, as udev removes a ``/dev/serial/by-id`` link when the adapter goes: a dangling one would point
at a pts number the kernel hands to the next pty anyone opens, and the gateway would open a stranger's terminal.

The bridge frames each request, drops it when its unit is not on the bus or is muted (on a real bus nobody
answers), hands it to the server, and carries the server's reply back after the unit's latency and through the
unit's :class:`~gatewayd.devices.simulator.Faults`: noise before it, cut short and never finished, lost, or with a
wrong CRC.

Each unit is a pymodbus ``SimDevice`` whose datastore calls back on every access. A write the unit's model accepts
is appended to the unit's execution log (``<sim_dir>/<device>.jsonl``, one JSON object per line, named after the
profile action it matches); the model may refuse it with an exception code, and ``busy_replies`` makes the unit
answer "busy" (exception 6) to the first attempts of each write. Reads let the model refresh what it measures: the
energy meter's voltage, current and power drift as a household circuit's would, and its energy counter follows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import struct
import time
import tty
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Protocol

import structlog
from pymodbus.client.mixin import ModbusClientMixin
from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusSerialServer
from pymodbus.simulator import DataType, SimData, SimDevice

from gatewayd.config.profiles import BIT_TABLES, Profile
from gatewayd.devices.linelog import LineLog
from gatewayd.devices.modbus_codec import encode_registers, frame_length, take_rtu_request
from gatewayd.devices.modbus_codec import to_raw as modbus_to_raw
from gatewayd.devices.simulator import NO_FAULTS, Faults, PtySimulator

log = structlog.get_logger("gatewayd.simulator")

Layout = dict[str, dict[int, int | bool]]  # table -> address -> raw value (bool for coils and discrete inputs)
_TABLES = ("coil", "discrete", "holding", "input")  # the order of pymodbus's non-shared blocks
_TABLE_OF_FUNCTION = {
    1: "coil",
    5: "coil",
    15: "coil",
    2: "discrete",
    3: "holding",
    6: "holding",
    16: "holding",
    4: "input",
}
_READS = (1, 2, 3, 4)
_FLOAT32 = ModbusClientMixin.DATATYPE.FLOAT32


class Block:
    """One of a unit's tables as pymodbus stores it (its live list, which the server answers from): registers one
    per entry from ``start``; bits packed 16 to an entry, from bit ``start * 16``."""

    def __init__(self, table: str, start: int, cells: list[int]):
        self.table, self.start, self.cells = table, start, cells

    def get(self, address: int) -> int | bool:
        if self.table in BIT_TABLES:
            return bool(self.cells[address // 16 - self.start] >> (address % 16) & 1)
        return self.cells[address - self.start]

    def set(self, address: int, value: int | bool) -> None:
        if self.table in BIT_TABLES:
            index, bit = address // 16 - self.start, address % 16
            self.cells[index] = self.cells[index] | (1 << bit) if value else self.cells[index] & ~(1 << bit)
        else:
            self.cells[address - self.start] = int(value) & 0xFFFF


class UnitModel(Protocol):
    """What a simulated unit holds and how it behaves."""

    def layout(self) -> Layout:
        """The unit's coils and registers, with their values at power-up. Anything else is an illegal address."""

    def on_read(self, block: Block, address: int, count: int) -> None:
        """A read is about to be answered from ``block``: refresh what the unit measures there."""

    def on_write(self, function: int, block: Block, address: int, values: Sequence[int | bool]) -> int | None:
        """A write is about to be stored: None to accept it (and do what else the unit does), or an exception code
        (1 illegal function, 2 illegal address, 3 illegal value, ...) to refuse it."""


class TableModel:
    """A unit that holds what it is given, changed by writes only."""

    def __init__(self, layout: Layout):
        self._layout = layout

    def layout(self) -> Layout:
        return self._layout

    def on_read(self, block: Block, address: int, count: int) -> None:
        return None

    def on_write(self, function: int, block: Block, address: int, values: Sequence[int | bool]) -> int | None:
        return None


def put_floats(block: Block, registers: Mapping[int, str], values: Mapping[str, float]) -> None:
    """Each named value into its two registers, as an IEEE 754 float32, high word first."""
    for register, name in registers.items():
        high, low = ModbusClientMixin.convert_to_registers(values[name], _FLOAT32)
        block.set(register, high)
        block.set(register + 1, low)


def float_written(values: Sequence[int | bool]) -> float | None:
    """The float32 two written registers hold (high word first), or None if they are not two."""
    if len(values) != 2:
        return None
    (value,) = struct.unpack(">f", struct.pack(">HH", int(values[0]), int(values[1])))
    return float(value)


def float_layout(*registers: Iterable[int]) -> dict[int, int | bool]:
    """Two registers, zero at power-up, for each float32 at these addresses."""
    return {a + i: 0 for addresses in registers for a in addresses for i in (0, 1)}


class Circuit:
    """One phase of a building's supply: mains voltage wandering around 230 V, a load switching between what
    appliances draw, its power factor; energy integrated over real time."""

    LOADS_W = (60.0, 400.0, 1200.0, 2000.0, 2800.0)

    def __init__(self, rng: random.Random):
        self._rng = rng
        self.voltage = 230.0
        self.load_w = 400.0
        self.power_factor = 0.95

    def step(self, elapsed_s: float) -> None:
        rng = self._rng
        self.voltage = min(245.0, max(215.0, self.voltage + rng.gauss(0, 0.4)))
        if rng.random() < min(1.0, elapsed_s / 30):  # an appliance switches every half minute or so
            self.load_w = rng.choice(self.LOADS_W) * rng.uniform(0.9, 1.1)
            self.power_factor = rng.uniform(0.85, 0.99)

    @property
    def apparent(self) -> float:
        return self.load_w / self.power_factor

    @property
    def current(self) -> float:
        return self.apparent / self.voltage

    @property
    def reactive(self) -> float:
        return math.sqrt(max(0.0, self.apparent**2 - self.load_w**2))


class EastronMeter:
    """What Eastron's meters share: measurements in float32 input registers, from a model of the circuit that
    :meth:`step` advances. Like the meter, which measures twice a second, the registers change at most every
    ``REFRESH_S``: the requests of one poll, a few milliseconds apart, see one measurement."""

    REGISTERS: dict[int, str]  # input register -> the measurement it holds
    REFRESH_S = 0.5

    def __init__(self) -> None:
        self._measured_at: float | None = None

    def step(self, elapsed_s: float) -> dict[str, float]:
        raise NotImplementedError

    def on_read(self, block: Block, address: int, count: int) -> None:
        if block.table != "input":
            return
        now = time.monotonic()
        if self._measured_at is not None and now - self._measured_at < self.REFRESH_S:
            return
        values = self.step(0.0 if self._measured_at is None else now - self._measured_at)
        self._measured_at = now
        put_floats(block, self.REGISTERS, values)


class Sdm120Model(EastronMeter):
    """Eastron SDM120-Modbus single-phase energy meter: float32 input registers (high word first), read with
    function 4. A household circuit (:class:`Circuit`), and the import energy counter integrating its power over
    real time. Its set-up parameters are float32 holding registers that, as on the meter, only function 16 writes
    (kept, not acted on)."""

    # Input register -> the measurement it holds (SDM120 Modbus protocol, 3X registers).
    REGISTERS = {
        0x0000: "voltage",
        0x0006: "current",
        0x000C: "active_power",
        0x0012: "apparent_power",
        0x0018: "reactive_power",
        0x001E: "power_factor",
        0x0024: "phase_angle",
        0x0046: "frequency",
        0x0048: "import_energy",
        0x004A: "export_energy",
        0x0156: "total_energy",
    }
    # Holding register -> set-up parameter, float32 (SDM120 Modbus protocol, 4X registers).
    PARAMETERS = {0x0012: "parity_stop", 0x0014: "address", 0x001C: "baud_rate"}

    def __init__(self, unit: int = 1, rng: random.Random | None = None):
        self._rng = rng or random.Random(unit)
        self.circuit = Circuit(self._rng)
        self.frequency = 50.0
        self.import_kwh = 1234.5
        super().__init__()

    def layout(self) -> Layout:
        return {"input": float_layout(self.REGISTERS), "holding": float_layout(self.PARAMETERS)}

    def step(self, elapsed_s: float) -> dict[str, float]:
        """Advance the circuit by ``elapsed_s`` and return every measurement."""
        circuit = self.circuit
        circuit.step(elapsed_s)
        self.frequency = min(50.1, max(49.9, self.frequency + self._rng.gauss(0, 0.005)))
        self.import_kwh += circuit.load_w * elapsed_s / 3_600_000
        return {
            "voltage": circuit.voltage,
            "current": circuit.current,
            "active_power": circuit.load_w,
            "apparent_power": circuit.apparent,
            "reactive_power": circuit.reactive,
            "power_factor": circuit.power_factor,
            "phase_angle": math.degrees(math.acos(circuit.power_factor)),
            "frequency": self.frequency,
            "import_energy": self.import_kwh,
            "export_energy": 0.0,
            "total_energy": self.import_kwh,
        }

    def on_write(self, function: int, block: Block, address: int, values: Sequence[int | bool]) -> int | None:
        return None if function == 16 else int(ExcCodes.ILLEGAL_FUNCTION)


class Sdm630Model(EastronMeter):
    """Eastron SDM630-Modbus V2 three-phase energy meter (SDM630 Modbus protocol): three household circuits, one
    per phase; float32 input registers read with function 4; the demand (power averaged over the demand period)
    and its maximum; set-up parameters as float32 holding registers that only function 16 writes, the demand
    period among 0, 5, 8, 10, 15, 20, 30 and 60 minutes (else exception 3); and 0xF010, whose 0 resets the maximum
    demand (a 16-bit word, function 16 too)."""

    PHASES = ("l1", "l2", "l3")
    REGISTERS = {
        **{0x0000 + 2 * i: f"voltage_{p}" for i, p in enumerate(PHASES)},
        **{0x0006 + 2 * i: f"current_{p}" for i, p in enumerate(PHASES)},
        **{0x000C + 2 * i: f"power_{p}" for i, p in enumerate(PHASES)},
        **{0x0012 + 2 * i: f"apparent_power_{p}" for i, p in enumerate(PHASES)},
        **{0x0018 + 2 * i: f"reactive_power_{p}" for i, p in enumerate(PHASES)},
        **{0x001E + 2 * i: f"power_factor_{p}" for i, p in enumerate(PHASES)},
        0x002A: "voltage_average",
        0x002E: "current_average",
        0x0030: "current_sum",
        0x0034: "total_power",
        0x0038: "total_apparent_power",
        0x003C: "total_reactive_power",
        0x003E: "total_power_factor",
        0x0046: "frequency",
        0x0048: "import_energy",
        0x004A: "export_energy",
        0x0054: "power_demand",
        0x0056: "max_power_demand",
        0x00C8: "voltage_l1_l2",
        0x00CA: "voltage_l2_l3",
        0x00CC: "voltage_l3_l1",
        0x00E0: "neutral_current",
        0x0156: "total_energy",
    }
    DEMAND_PERIOD = 0x0002
    PARAMETERS = {
        DEMAND_PERIOD: "demand_period",
        0x000A: "system_type",
        0x0012: "parity_stop",
        0x0014: "address",
        0x001C: "baud_rate",
    }
    RESET = 0xF010
    DEMAND_PERIODS = (0, 5, 8, 10, 15, 20, 30, 60)

    def __init__(self, unit: int = 1, rng: random.Random | None = None):
        self._rng = rng or random.Random(unit)
        self.phases = [Circuit(self._rng) for _ in self.PHASES]
        self.frequency = 50.0
        self.import_kwh = 48_213.6
        self.demand_period_min = 60
        self.demand_w = self.max_demand_w = sum(c.load_w for c in self.phases)
        super().__init__()

    def layout(self) -> Layout:
        holding = float_layout(self.PARAMETERS)
        holding |= {self.DEMAND_PERIOD: 0x4270, self.DEMAND_PERIOD + 1: 0, self.RESET: 0}  # 60.0 minutes
        return {"input": float_layout(self.REGISTERS), "holding": holding}

    def step(self, elapsed_s: float) -> dict[str, float]:
        for circuit in self.phases:
            circuit.step(elapsed_s)
        self.frequency = min(50.1, max(49.9, self.frequency + self._rng.gauss(0, 0.005)))
        total_w = sum(c.load_w for c in self.phases)
        self.import_kwh += total_w * elapsed_s / 3_600_000
        # The demand: the power averaged over the demand period (a sliding window, here an exponential one).
        period_s = self.demand_period_min * 60 or elapsed_s or 1.0
        self.demand_w += (total_w - self.demand_w) * min(1.0, elapsed_s / period_s)
        self.max_demand_w = max(self.max_demand_w, self.demand_w)
        total_va = sum(c.apparent for c in self.phases)
        v = [c.voltage for c in self.phases]
        a = [c.current for c in self.phases]
        values = {
            "voltage_average": sum(v) / 3,
            "current_average": sum(a) / 3,
            "current_sum": sum(a),
            "total_power": total_w,
            "total_apparent_power": total_va,
            "total_reactive_power": sum(c.reactive for c in self.phases),
            "total_power_factor": total_w / total_va,
            "frequency": self.frequency,
            "import_energy": self.import_kwh,
            "export_energy": 0.0,
            "power_demand": self.demand_w,
            "max_power_demand": self.max_demand_w,
            "total_energy": self.import_kwh,
            # Phases 120 degrees apart: the line-to-line voltage of two phases, and what returns on the neutral.
            "neutral_current": abs(complex(a[0]) + a[1] * _PHASOR[1] + a[2] * _PHASOR[2]),
        }
        for i, (p, circuit) in enumerate(zip(self.PHASES, self.phases, strict=True)):
            values |= {
                f"voltage_{p}": circuit.voltage,
                f"current_{p}": circuit.current,
                f"power_{p}": circuit.load_w,
                f"apparent_power_{p}": circuit.apparent,
                f"reactive_power_{p}": circuit.reactive,
                f"power_factor_{p}": circuit.power_factor,
                f"voltage_{p}_{self.PHASES[(i + 1) % 3]}": abs(
                    v[i] * _PHASOR[i] - v[(i + 1) % 3] * _PHASOR[(i + 1) % 3]
                ),
            }
        return values

    def on_write(self, function: int, block: Block, address: int, values: Sequence[int | bool]) -> int | None:
        if function != 16:
            return int(ExcCodes.ILLEGAL_FUNCTION)
        if address == self.DEMAND_PERIOD:
            minutes = float_written(values)
            if minutes not in self.DEMAND_PERIODS:
                return int(ExcCodes.ILLEGAL_VALUE)
            self.demand_period_min = int(minutes)
        elif address == self.RESET:
            if list(values) != [0]:
                return int(ExcCodes.ILLEGAL_VALUE)
            self.max_demand_w = self.demand_w
        return None


_PHASOR = [complex(math.cos(a), math.sin(a)) for a in (0.0, -2 * math.pi / 3, 2 * math.pi / 3)]


class Relay8Model:
    """Waveshare "Modbus RTU Relay", 8 channels: coils 0-7 are the relays (function 5 writes one, 15 several),
    coil 0x00FF switches all eight at once; holding register 0x4000 holds the unit's address and 0x8000 its
    firmware version (read-only here)."""

    ALL = 0x00FF
    VERSION = 0x0064  # 1.00

    def __init__(self, unit: int = 1, rng: random.Random | None = None):
        self.unit = unit

    def layout(self) -> Layout:
        coils: dict[int, int | bool] = dict.fromkeys(range(8), False)
        coils[self.ALL] = False
        return {"coil": coils, "holding": {0x4000: self.unit, 0x8000: self.VERSION}}

    def on_read(self, block: Block, address: int, count: int) -> None:
        return None

    def on_write(self, function: int, block: Block, address: int, values: Sequence[int | bool]) -> int | None:
        if block.table != "coil":
            return int(ExcCodes.ILLEGAL_ADDRESS)  # address and baud rate changes are not simulated
        if address == self.ALL:
            for channel in range(8):
                block.set(channel, bool(values[0]))
        return None


class FroniusSymoModel:
    """A Fronius Symo 8.2-3-M three-phase solar inverter as its Datamanager presents it over Modbus TCP with the
    SunSpec float map (Fronius, "Fronius Datamanager Modbus TCP & RTU"): common model 1 at 40000, inverter model
    113 at 40069, immediate controls model 123 at 40237 (addresses on the wire), all holding registers.

    The sun moves the DC power about (clouds come and go); the AC power is what the DC gives, less the losses,
    down to the power limit while it is enforced (state 5, throttled), nothing while disconnected from the grid
    (state 8, standby) or in the dark (2, sleeping). The lifetime energy counter integrates the AC power. With two
    MPPTs the DC current and voltage, and the temperatures, read NaN ("not implemented"), as on the inverter. The
    controls take function 6 or 16 and refuse a value out of range with exception 3; the measurements are read-only
    (exception 2). A limit written with a timeout (WMaxLimPct_RvrtTms) is lifted when it runs out."""

    RATED_W = 8200.0
    EFFICIENCY = 0.97
    NAN = (0x7FC0, 0x0000)
    INVERTER = 40069  # ID 113, L 60, then the float32 values
    FLOATS = {
        40071: "ac_current",
        40073: "current_l1",
        40075: "current_l2",
        40077: "current_l3",
        40079: "voltage_l1_l2",
        40081: "voltage_l2_l3",
        40083: "voltage_l3_l1",
        40085: "voltage_l1",
        40087: "voltage_l2",
        40089: "voltage_l3",
        40091: "ac_power",
        40093: "frequency",
        40095: "apparent_power",
        40097: "reactive_power",
        40099: "power_factor",
        40101: "energy",
        40107: "dc_power",
    }
    NOT_IMPLEMENTED = (40103, 40105, 40109, 40111, 40113, 40115)  # DC current and voltage, four temperatures
    STATE = 40117
    CONTROLS = 40237  # ID 123, L 24
    CONN, WMAXLIMPCT, WINTMS, RVRTTMS, RMPTMS, ENA = 40241, 40242, 40243, 40244, 40245, 40246
    LIMITS = {CONN: 1, WMAXLIMPCT: 10000, WINTMS: 300, RVRTTMS: 28800, RMPTMS: 65534, ENA: 1, 40239: 300, 40240: 28800}

    def __init__(self, unit: int = 1, rng: random.Random | None = None):
        self.unit = unit
        self._rng = rng or random.Random(unit)
        self.sun_w = 5200.0  # what the panels could give now
        self.grid = Circuit(self._rng)
        self.frequency = 50.0
        self.energy_wh = 12_345_678.0
        self._last = time.monotonic()
        self._limit_set_at = self._last

    def layout(self) -> Layout:
        common: dict[int, int | bool] = {40000: 0x5375, 40001: 0x6E53, 40002: 1, 40003: 65}  # "SunS", model 1
        for start, size, text in ((40004, 16, "Fronius"), (40020, 16, "Symo 8.2-3-M"), (40036, 8, "3.28.1-3")):
            common |= _text(start, size, text)
        common |= _text(40044, 8, "1.20.1-1") | _text(40052, 16, "34119102") | {40068: self.unit}
        inverter = {self.INVERTER: 113, self.INVERTER + 1: 60} | dict.fromkeys(range(40071, 40131), 0)
        for register in self.NOT_IMPLEMENTED:
            inverter |= {register: self.NAN[0], register + 1: self.NAN[1]}
        controls = {self.CONTROLS: 123, self.CONTROLS + 1: 24} | dict.fromkeys(range(40239, 40263), 0)
        controls |= {self.CONN: 1, self.WMAXLIMPCT: 10000, 40260: 0xFFFE, 40261: 0xFFFD}  # scale factors -2, -3
        return {"holding": {**common, **inverter, **controls}}

    def on_read(self, block: Block, address: int, count: int) -> None:
        if not self.INVERTER <= address < self.CONTROLS + 26:
            return
        now = time.monotonic()
        elapsed, self._last = now - self._last, now
        timeout = block.get(self.RVRTTMS)
        if block.get(self.ENA) and timeout and now - self._limit_set_at >= int(timeout):
            block.set(self.ENA, 0)  # the limit ran out: lifted, as the inverter does
        rng = self._rng
        if rng.random() < min(1.0, elapsed / 20):  # a cloud comes or goes
            self.sun_w = rng.choice((0.15, 0.4, 0.7, 0.95)) * self.RATED_W
        self.sun_w = min(self.RATED_W * 1.05, max(0.0, self.sun_w + rng.gauss(0, 40)))
        self.grid.step(elapsed)
        self.frequency = min(50.1, max(49.9, self.frequency + rng.gauss(0, 0.005)))
        ac_w, state = self.sun_w * self.EFFICIENCY, 4
        limit_w = int(block.get(self.WMAXLIMPCT)) / 10000 * self.RATED_W
        if not block.get(self.CONN):
            ac_w, state = 0.0, 8
        elif block.get(self.ENA) and ac_w > limit_w:
            ac_w, state = limit_w, 5
        elif ac_w < 20:
            ac_w, state = 0.0, 2
        self.energy_wh += ac_w * elapsed / 3600
        put_floats(block, self.FLOATS, self._measurements(ac_w, state))
        block.set(self.STATE, state)

    def _measurements(self, ac_w: float, state: int) -> dict[str, float]:
        v = self.grid.voltage
        phase_a = ac_w / 3 / v
        return {
            "ac_current": 3 * phase_a,
            **{f"current_l{n}": phase_a for n in (1, 2, 3)},
            **{name: v * math.sqrt(3) for name in ("voltage_l1_l2", "voltage_l2_l3", "voltage_l3_l1")},
            **{f"voltage_l{n}": v for n in (1, 2, 3)},
            "ac_power": ac_w,
            "frequency": self.frequency,
            "apparent_power": ac_w,
            "reactive_power": 0.0,
            "power_factor": 1.0,
            "energy": self.energy_wh,
            "dc_power": ac_w / self.EFFICIENCY if state in (4, 5) else 0.0,
        }

    def on_write(self, function: int, block: Block, address: int, values: Sequence[int | bool]) -> int | None:
        for register, value in enumerate(values, start=address):
            if register not in self.LIMITS:
                return int(ExcCodes.ILLEGAL_ADDRESS)  # the measurements and the models' headers are read-only
            if not 0 <= int(value) <= self.LIMITS[register]:
                return int(ExcCodes.ILLEGAL_VALUE)
        if address <= self.ENA < address + len(values) or address <= self.WMAXLIMPCT < address + len(values):
            self._limit_set_at = time.monotonic()
        return None


def _text(start: int, size: int, text: str) -> dict[int, int | bool]:
    """A SunSpec string: two ASCII characters a register, padded with NULs."""
    data = text.encode("ascii").ljust(2 * size, b"\0")
    return {start + i: int.from_bytes(data[2 * i : 2 * i + 2], "big") for i in range(size)}


class Adam6017Model:
    """Advantech ADAM-6017 remote I/O (ADAM-6000 Series User Manual, its Modbus mapping table): analog inputs 0-7
    as holding registers 0-7 (0-65535 across each channel's range), their input types at 200-207, digital outputs 0
    and 1 as coils 16 and 17. Channels 0-3 are 4-20 mA loops (a level, a pressure, a flow wandering about; channel 3
    has nothing connected and reads 0, the bottom of its range), 4-7 0-10 V signals. The inputs are read-only
    (exception 2); an input type takes one of the manual's range codes only (exception 3)."""

    FOUR_TO_20_MA, ZERO_TO_10_V = 0x0180, 0x0148
    RANGE_CODES = (
        0x0103,
        0x0104,
        0x0105,
        0x0106,
        0x0140,
        0x0142,
        0x0143,
        0x0145,
        0x0147,
        0x0148,
        0x0180,
        0x0181,
        0x0182,
    )
    DO = (16, 17)

    def __init__(self, unit: int = 1, rng: random.Random | None = None):
        self._rng = rng or random.Random(unit)
        # Where each signal sits, as a fraction of its range; nothing on channel 3.
        self.signal = [0.5, 0.25, 0.6, None, 0.3, 0.7, 0.1, 0.9]

    def layout(self) -> Layout:
        types = [self.FOUR_TO_20_MA] * 4 + [self.ZERO_TO_10_V] * 4
        return {
            "holding": {**dict.fromkeys(range(8), 0), **{200 + ch: code for ch, code in enumerate(types)}},
            "coil": dict.fromkeys(self.DO, False),
        }

    def on_read(self, block: Block, address: int, count: int) -> None:
        if block.table != "holding" or address >= 8:
            return
        for channel, level in enumerate(self.signal):
            if level is None:
                block.set(channel, 0)
                continue
            level = min(1.0, max(0.0, level + self._rng.gauss(0, 0.01)))
            self.signal[channel] = level
            block.set(channel, round(level * 65535))

    def on_write(self, function: int, block: Block, address: int, values: Sequence[int | bool]) -> int | None:
        if block.table == "coil":
            return None
        if address < 200:
            return int(ExcCodes.ILLEGAL_ADDRESS)
        if any(int(v) not in self.RANGE_CODES for v in values):
            return int(ExcCodes.ILLEGAL_VALUE)
        return None


ModelFactory = Callable[[int, random.Random], UnitModel]
MODELS: dict[str, ModelFactory] = {
    "eastron_sdm120": Sdm120Model,
    "eastron_sdm630": Sdm630Model,
    "waveshare_relay8": Relay8Model,
    "fronius_symo": FroniusSymoModel,
    "advantech_adam6017": Adam6017Model,
}


def make_model(name: str, unit: int, seed: int = 0) -> UnitModel:
    return MODELS[name](unit, random.Random(seed * 1000 + unit))


class WriteLog:
    """Append-only JSON lines, one per write a unit performed. Modbus carries no command id, so unlike the line
    protocol's execution log there is nothing to remember across restarts."""

    def __init__(self, path: Path):
        self.path = path
        self._lines = LineLog(path)

    def record(self, entry: dict[str, object]) -> None:
        self._lines.append(json.dumps({"ts": time.time(), **entry}).encode())  # one write() per line

    def close(self) -> None:
        self._lines.close()


class ModbusUnit:
    """One simulated unit (slave address) on the bus."""

    def __init__(
        self,
        name: str,
        unit: int,
        model: UnitModel,
        log_path: Path,
        *,
        latency_s: float = 0.0,
        mute: bool = False,
        busy_replies: int = 0,
        faults: Faults = NO_FAULTS,
        profile: Profile | None = None,
    ):
        if faults.telemetry_hz:
            raise ValueError("a Modbus unit speaks only when asked: telemetry_hz does not apply")
        if not 0 <= unit <= 255:  # RS-485 addresses are 1-247 (the bus's simulator checks); TCP unit ids 0-255
            raise ValueError("a Modbus unit id is 0 to 255")
        self.name = name
        self.unit = unit
        self.model = model
        self.log = WriteLog(log_path)
        self.latency_s = latency_s
        self.mute = mute
        self.busy_replies = busy_replies
        self.faults = faults
        self.profile = profile
        self.rng = random.Random(faults.seed)
        self.faulted: OrderedDict[str, int] = OrderedDict((k, 0) for k in ("garbage", "partial", "drop", "corrupt"))
        self.spoiled = 0  # replies dropped, cut or corrupted: each one a reply the gateway cannot use
        self.requests = 0  # reached the unit (not muted)
        self.refused: Counter[int] = Counter()  # exception code -> refusals by the unit (pymodbus refuses some too)
        self._layout = model.layout()
        self._busy_counts: OrderedDict[tuple[object, ...], int] = OrderedDict()

    def sim_device(self) -> SimDevice:
        """The pymodbus device: one block per table (a placeholder for each table the unit lacks, whose addresses
        :meth:`_on_access` refuses like every other), calling back on every access."""
        blocks: list[list[SimData]] = []
        for table in _TABLES:
            cells = self._layout.get(table, {})
            bits = table in BIT_TABLES
            kind = DataType.BITS if bits else DataType.REGISTERS
            if not cells:
                blocks.append([SimData(0, values=[False] * 16 if bits else [0], datatype=kind)])
                continue
            runs: list[SimData] = []
            run: list[int | bool] = []
            start = previous = -2
            for address in sorted(cells):
                if address != previous + 1 and run:
                    runs.append(_sim_data(start, run, bits))
                    run = []
                if not run:
                    start = address
                run.append(cells[address])
                previous = address
            runs.append(_sim_data(start, run, bits))
            blocks.append(runs)
        coils, discrete, holding, inputs = blocks
        return SimDevice(self.unit, simdata=(coils, discrete, holding, inputs), action=self._on_access)

    async def _on_access(
        self,
        function: int,
        start: int,
        address: int,
        count: int,
        registers: list[int],
        values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        """pymodbus's datastore callback, before it answers a read (``values`` None) or stores a write."""
        table = _TABLE_OF_FUNCTION.get(function)
        cells = self._layout.get(table or "")
        if table is None or not cells:  # pymodbus answers this for the addresses outside its placeholder block
            return self._refuse(ExcCodes.ILLEGAL_ADDRESS)
        block = Block(table, start, registers)
        if values is None:
            if address not in cells:  # pymodbus checks whole registers: a bit between coils is not one
                return self._refuse(ExcCodes.ILLEGAL_ADDRESS)
            if function in _READS:
                self.model.on_read(block, address, count)
            return None
        written = [bool(v) for v in values] if table in BIT_TABLES else [int(v) for v in values]
        if any(address + i not in cells for i in range(len(written))):
            return self._refuse(ExcCodes.ILLEGAL_ADDRESS)
        if self._still_busy((function, address, *written)):
            return self._refuse(ExcCodes.DEVICE_BUSY)
        refusal = self.model.on_write(function, block, address, written)
        if refusal is not None:
            return self._refuse(ExcCodes(refusal))
        self.log.record(
            {
                "unit": self.unit,
                "function": function,
                "table": table,
                "address": address,
                "values": written,
                "action": self.action_for(table, address, written),
            }
        )
        return None

    def _refuse(self, code: ExcCodes) -> ExcCodes:
        self.refused[int(code)] += 1
        return code

    def _still_busy(self, key: tuple[object, ...]) -> bool:
        """True for the first ``busy_replies`` attempts of each write (a unit still finishing the last one)."""
        if not self.busy_replies:
            return False
        seen = self._busy_counts.get(key, 0)
        if seen >= self.busy_replies:
            del self._busy_counts[key]  # performed now: the next such write is a new one
            return False
        self._busy_counts[key] = seen + 1
        while len(self._busy_counts) > 1024:
            self._busy_counts.popitem(last=False)
        return True

    def action_for(self, table: str, address: int, values: Sequence[int | bool]) -> str | None:
        """The profile action a write is, if it matches one: makes the execution log readable."""
        if self.profile is None:
            return None
        for name, spec in self.profile.actions.items():
            m = spec.modbus
            if m is None or m.write != table or m.address != address:
                continue
            if m.value is None:
                return name
            if table == "coil" and list(values) == [m.value]:
                return name
            if table == "holding" and not isinstance(m.value, bool):
                raw = modbus_to_raw(m.value, m.register_type, m.scale, m.offset)
                if list(values) == encode_registers(raw, m.register_type, m.word_order):
                    return name
        return None

    async def deliver(self, reply: bytes, *, mbap: bool = False) -> bytes:
        """After this unit's latency, the bytes that reach the line for ``reply`` (:meth:`on_wire`)."""
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        return self.on_wire(reply, mbap=mbap)

    def on_wire(self, reply: bytes, *, mbap: bool = False) -> bytes:
        """The bytes that reach the line for ``reply``, after this unit's faults (maybe none at all). The unit has
        acted before its reply is lost, cut or corrupted, as a real one whose answer was garbled on the way.
        Corruption hits what a master can check: an RTU frame's CRC, or a Modbus TCP frame's header (``mbap``:
        transaction id, protocol id, length, unit and function; TCP frames carry no CRC of their own)."""
        faults, rng = self.faults, self.rng
        if faults.drop and rng.random() < faults.drop:
            self.faulted["drop"] += 1
            self.spoiled += 1
            return b""
        data = reply
        if faults.corrupt and rng.random() < faults.corrupt:
            self.faulted["corrupt"] += 1
            at = rng.randrange(8) if mbap else len(data) - 1 - rng.randrange(2)
            data = data[:at] + bytes([data[at] ^ (1 << rng.randrange(8))]) + data[at + 1 :]
        if faults.partial and rng.random() < faults.partial:
            self.faulted["partial"] += 1
            data = data[: rng.randrange(1, len(data) - 1)]
        if data != reply:
            self.spoiled += 1
        if faults.garbage and rng.random() < faults.garbage:
            self.faulted["garbage"] += 1
            data = rng.randbytes(rng.randint(1, faults.garbage_max)) + data
        return data


def _sim_data(start: int, run: list[int | bool], bits: bool) -> SimData:
    if bits:
        return SimData(start, values=[bool(v) for v in run], datatype=DataType.BITS)
    return SimData(start, values=[int(v) for v in run], datatype=DataType.REGISTERS)


class ModbusSimulator(PtySimulator):
    """Modbus units on one simulated bus: pymodbus's server behind a bridge, the gateway on a pty of its own."""

    def __init__(
        self,
        bus: str,
        units: Mapping[int, ModbusUnit],
        link: Path | None = None,
        *,
        byte_at_a_time: bool = False,
        byte_pause_s: float = 0.0,
        baudrate: int | None = None,
        server_timeout_s: float = 1.0,
    ):
        super().__init__(bus, {}, link, byte_at_a_time=byte_at_a_time, byte_pause_s=byte_pause_s, baudrate=baudrate)
        for address, unit in units.items():
            if address != unit.unit:
                raise ValueError(f"unit {unit.name} has address {unit.unit}, listed under {address}")
            if not 1 <= address <= 247:
                raise ValueError(f"unit {unit.name}: an RS-485 address is 1 to 247")
        self.units = dict(units)
        self.requests = 0  # whole requests framed from the gateway's side
        self.server_timeout_s = server_timeout_s
        self._rx = bytearray()  # from the gateway, not yet a whole request
        self._pending: asyncio.Queue[bytes] = asyncio.Queue(maxsize=64)
        self._server_master = -1
        self._server_slave = -1
        self._server_rx = bytearray()
        self._replies: asyncio.Queue[bytes] = asyncio.Queue(maxsize=64)
        self._server: ModbusSerialServer | None = None

    async def __aenter__(self) -> ModbusSimulator:
        loop = asyncio.get_running_loop()
        try:
            self._server_master, self._server_slave = os.openpty()
            tty.setraw(self._server_master)
            tty.setraw(self._server_slave)
            os.set_blocking(self._server_master, False)
            server = ModbusSerialServer(
                [unit.sim_device() for unit in self.units.values()], port=os.ttyname(self._server_slave)
            )
            self._server = server
            await server.serve_forever(background=True)
            loop.add_reader(self._server_master, self._on_server_bytes)
            await super().__aenter__()
        except BaseException:
            await self._stop_server()
            for unit in self.units.values():
                unit.log.close()
            raise
        return self

    def device_names(self) -> list[str]:
        return [f"{u.name}@{u.unit}" for u in self.units.values()]

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            await super().__aexit__(et, e, tb)
        finally:
            await self._stop_server()
            for unit in self.units.values():
                unit.log.close()

    async def _stop_server(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.shutdown()  # type: ignore[no-untyped-call]
        if self._server_master >= 0:
            asyncio.get_running_loop().remove_reader(self._server_master)
            os.close(self._server_master)
            self._server_master = -1
        if self._server_slave >= 0:
            os.close(self._server_slave)
            self._server_slave = -1

    def unplug(self) -> None:
        super().unplug()
        self._unpublish()

    def _close_fds(self) -> None:
        super()._close_fds()
        self._rx.clear()  # a request cut by the unplug is gone with the line
        while not self._pending.empty():
            self._pending.get_nowait()

    def _on_readable(self) -> None:
        """Bytes from the gateway: frame them into requests (a unit ignores a frame whose CRC is wrong)."""
        self._rx += self._read_master()
        while (frame := take_rtu_request(self._rx)) is not None:
            self.requests += 1
            with contextlib.suppress(asyncio.QueueFull):  # a real unit drops what it cannot buffer too
                self._pending.put_nowait(frame)

    def _on_server_bytes(self) -> None:
        """Bytes from pymodbus's server: frame them into replies."""
        try:
            self._server_rx += os.read(self._server_master, 4096)
        except (BlockingIOError, InterruptedError):
            return
        while self._server_rx:
            length = frame_length(self._server_rx, request=False)
            if length is None or (length and len(self._server_rx) < length):
                return
            if not length:
                self._server_rx.clear()
                return
            with contextlib.suppress(asyncio.QueueFull):
                self._replies.put_nowait(bytes(self._server_rx[:length]))
            del self._server_rx[:length]

    async def _serve(self) -> None:
        """One request at a time, as a half-duplex line carries them: to the server, and its reply back."""
        while True:
            request = await self._pending.get()
            unit = self.units.get(request[0])
            if unit is None or unit.mute:
                continue
            unit.requests += 1
            while not self._replies.empty():  # a reply to a request we gave up on
                self._replies.get_nowait()
            os.write(self._server_master, request)
            try:
                async with asyncio.timeout(self.server_timeout_s):
                    reply = await self._replies.get()
            except TimeoutError:
                log.warning("modbus_simulator_server_silent", bus=self.bus, unit=unit.unit)
                continue
            self._write(await unit.deliver(reply))
