"""Modbus RTU values and frames as pure functions: no I/O, no clock, nothing from pymodbus's transport.

- Register values: the registers of a point to its engineering value (``raw * scale + offset``) and back, for
  uint16, int16, uint32, int32 and float32 in either word order. Scaling is decimal, so 2301 registers at scale
  0.1 read 230.1, not 230.10000000000002, and a float32 reads as the shortest decimal that is the same float32.
- Read planning: the fewest requests that cover a profile's telemetry points, never reading an address no point
  names (a device may refuse a register it does not have, and the whole request with it).
- RTU framing: the length of a frame from its first bytes, and :func:`find_reply`, which finds the reply a master
  is waiting for among whatever else the line delivered (noise, the stub of a reply cut short).
- Modbus TCP framing (the MBAP header): :func:`find_mbap_reply`, the same hunt for a reply that carries the
  request's transaction id, and :func:`mbap_length`, a frame's length from its header.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Literal

from pymodbus.framer.rtu import FramerRTU

from gatewayd.config.profiles import BIT_TABLES, INT_RANGES, ModbusType, TelemetryPoint

WordOrder = Literal["big", "little"]
Value = int | float | bool

# Function codes.
READ_FUNCTION = {"coil": 1, "discrete": 2, "holding": 3, "input": 4}
# The most one request may read (Modbus application protocol, section 6): 2000 bits or 125 registers.
MAX_READ = {"coil": 2000, "discrete": 2000, "holding": 125, "input": 125}
_STRUCT = {"uint16": "H", "int16": "h", "uint32": "I", "int32": "i", "float32": "f"}
FLOAT32_MAX = 3.4028234663852886e38


# --- register values ---------------------------------------------------------------------------------------------


def decode_registers(registers: Sequence[int], type_: ModbusType, word_order: WordOrder = "big") -> int | float:
    """The raw value held in ``registers`` (one for 16-bit types, two for 32-bit ones)."""
    fmt = _STRUCT[type_]
    words = list(registers)
    if len(words) != struct.calcsize(fmt) // 2:
        raise ValueError(f"a {type_} is {struct.calcsize(fmt) // 2} register(s), got {len(words)}")
    if word_order == "little":
        words.reverse()
    (raw,) = struct.unpack(f">{fmt}", struct.pack(f">{len(words)}H", *words))
    if type_ == "float32":
        return shortest_float32(raw)
    return int(raw)


def encode_registers(raw: int | float, type_: ModbusType, word_order: WordOrder = "big") -> list[int]:
    """The registers that hold ``raw``; ValueError if it does not fit the type."""
    fmt = _STRUCT[type_]
    if type_ == "float32":
        if not abs(raw) <= FLOAT32_MAX:  # also refuses NaN
            raise ValueError(f"{raw!r} does not fit a float32")
    else:
        lo, hi = INT_RANGES[type_]
        if not isinstance(raw, int) or not lo <= raw <= hi:
            raise ValueError(f"{raw!r} does not fit a {type_} ({lo}..{hi})")
    data = struct.pack(f">{fmt}", raw)
    words = list(struct.unpack(f">{len(data) // 2}H", data))
    if word_order == "little":
        words.reverse()
    return words


def shortest_float32(value: float) -> float:
    """The shortest decimal that is still the same float32: 230.1, not 230.10000610351562."""
    exact = struct.pack(">f", value)
    for digits in range(6, 10):
        short = float(f"{value:.{digits}g}")
        if struct.pack(">f", short) == exact:
            return short
    return value


def _decimal(x: float) -> Decimal:
    return Decimal(repr(x)) if isinstance(x, float) else Decimal(x)


def to_engineering(raw: int | float, scale: float, offset: float, kind: Literal["int", "float"]) -> int | float:
    """``raw * scale + offset``, in decimal arithmetic."""
    if scale == 1 and offset == 0:  # most points, every poll: the decimal arithmetic would give raw itself
        return int(raw) if kind == "int" else float(raw)
    value = _decimal(raw) * _decimal(scale) + _decimal(offset)
    return int(value) if kind == "int" else float(value)


def to_raw(value: float, type_: ModbusType, scale: float, offset: float) -> int | float:
    """``(value - offset) / scale`` for a register of ``type_``: rounded to a whole number for integer types;
    ValueError if the result does not fit the type."""
    raw = (_decimal(value) - _decimal(offset)) / _decimal(scale)
    if type_ == "float32":
        result: int | float = float(raw)
    else:
        result = int(raw.to_integral_value(rounding=ROUND_HALF_EVEN))
    encode_registers(result, type_)  # the range check
    return result


# --- read planning -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReadBlock:
    """One read request: ``count`` bits or registers of ``table`` from ``address``, holding ``points``."""

    table: str
    address: int
    count: int
    points: tuple[tuple[str, TelemetryPoint], ...]

    @property
    def function(self) -> int:
        return READ_FUNCTION[self.table]

    def values(self, data: Sequence[int] | Sequence[bool]) -> dict[str, Value]:
        """The engineering value of each point, from what the request read (``count`` bits or registers)."""
        out: dict[str, Value] = {}
        for name, point in self.points:
            m = point.modbus
            assert m is not None  # plan_reads takes mapped points only
            start = m.address - self.address
            if m.table in BIT_TABLES:
                out[name] = bool(data[start])
                continue
            raw = decode_registers([int(w) for w in data[start : start + m.size]], m.register_type, m.word_order)
            out[name] = to_engineering(raw, m.scale, m.offset, "int" if point.type == "int" else "float")
        return out


def plan_reads(points: Mapping[str, TelemetryPoint]) -> tuple[ReadBlock, ...]:
    """The requests that read ``points`` (all mapped): points of one table whose addresses touch or overlap share
    a request, up to the most one request may read."""
    order = {table: i for i, table in enumerate(READ_FUNCTION)}
    mapped = []
    for name, point in points.items():
        if point.modbus is None:
            raise ValueError(f"point {name!r} has no modbus mapping")
        mapped.append((order[point.modbus.table], point.modbus.address, name, point))
    blocks: list[ReadBlock] = []
    for _, address, name, point in sorted(mapped, key=lambda item: item[:3]):
        m = point.modbus
        assert m is not None
        end = address + m.size
        last = blocks[-1] if blocks else None
        if (
            last is not None
            and last.table == m.table
            and address <= last.address + last.count
            and max(end, last.address + last.count) - last.address <= MAX_READ[m.table]
        ):
            count = max(end, last.address + last.count) - last.address
            blocks[-1] = ReadBlock(last.table, last.address, count, (*last.points, (name, point)))
        else:
            blocks.append(ReadBlock(m.table, address, m.size, ((name, point),)))
    return tuple(blocks)


# --- RTU frames ---------------------------------------------------------------------------------------------------

EXCEPTION_FLAG = 0x80
_FIXED_LENGTH = {1: 8, 2: 8, 3: 8, 4: 8, 5: 8, 6: 8}  # requests: unit, function, address, count or value, CRC
_REPLY_FIXED = {5: 8, 6: 8, 15: 8, 16: 8}  # replies echo address and value or count


def frame_length(frame: bytes | bytearray, *, request: bool) -> int | None:
    """The length of the RTU frame that starts ``frame`` (a request from the master if ``request``, else a reply),
    from its header: None while too few bytes have arrived to tell, 0 for a function this module cannot frame."""
    if len(frame) < 2:
        return None
    function = frame[1]
    if request:
        if function in _FIXED_LENGTH:
            return _FIXED_LENGTH[function]
        if function in (15, 16):  # unit, function, address, count, byte count, data, CRC
            return None if len(frame) < 7 else 9 + frame[6]
        return 0
    if function & EXCEPTION_FLAG:
        return 5  # unit, function | 0x80, exception code, CRC
    if function in _REPLY_FIXED:
        return _REPLY_FIXED[function]
    if function in READ_FUNCTION.values():  # unit, function, byte count, data, CRC
        return None if len(frame) < 3 else 5 + frame[2]
    return 0


def crc_ok(frame: bytes | bytearray) -> bool:
    """The last two bytes are the Modbus CRC-16 of the rest (low byte first on the wire)."""
    if len(frame) < 4:
        return False
    return FramerRTU.check_CRC(bytes(frame[:-2]), (frame[-2] << 8) | frame[-1])


def with_crc(body: bytes) -> bytes:
    return body + FramerRTU.compute_CRC(body).to_bytes(2, "big")


def reply_prefix(request: bytes | bytearray) -> bytes:
    """How a normal reply to ``request`` must begin: its unit and function, then what the request fixes (the byte
    count of a read; the address and value a single write echoes; the address and count of a multiple write)."""
    head = bytes(request[:2])
    function = request[1]
    if function in (1, 2):
        count = int.from_bytes(request[4:6], "big")
        return head + bytes([(count + 7) // 8])
    if function in (3, 4):
        return head + bytes([2 * int.from_bytes(request[4:6], "big") & 0xFF])
    if function in (5, 6):
        return head + bytes(request[2:6])
    if function in (15, 16):
        return head + bytes(request[2:6])
    return head


def take_rtu_request(buffer: bytearray) -> bytes | None:
    """The first whole request with a good CRC at the front of ``buffer``, removed from it; None (and the buffer
    kept) while more bytes are needed. Noise before it, and frames whose CRC is wrong, are dropped a byte at a time
    until a frame start lines up, as a unit on the line ignores what it cannot read."""
    while buffer:
        length = frame_length(buffer, request=True)
        if length is None or (length and len(buffer) < length):
            return None  # more to come
        if not length or not crc_ok(buffer[:length]):
            del buffer[:1]  # noise, or we are out of step: find the next frame start
            continue
        frame = bytes(buffer[:length])
        del buffer[:length]
        return frame
    return None


def find_reply(data: bytes | bytearray, request: bytes | bytearray) -> tuple[int, int] | None:
    """Where the reply to ``request`` (or its exception reply) lies in ``data``, as ``(start, end)``; None until a
    complete one with a good CRC has arrived.

    RTU marks frames by silence on the line, which no serial driver reports faithfully; so this hunts instead:
    every offset where the reply's expected start appears is tried, and the first candidate whose CRC checks wins.
    Noise before the reply, or the stub of an earlier reply cut short, costs nothing; a late reply to an earlier
    request of another shape (another count, another address) is passed over; a random match needs the right
    start and a 16-bit CRC by chance."""
    prefix = reply_prefix(request)
    refused = bytes([request[0], request[1] | EXCEPTION_FLAG])
    for start in range(len(data) - 1):
        if data[start] != request[0]:
            continue
        if data[start : start + len(prefix)] != prefix and data[start : start + 2] != refused:
            continue
        length = frame_length(data[start:], request=False)
        if not length or start + length > len(data):
            continue  # incomplete: maybe the reply, maybe noise that looks like its start; look further
        if crc_ok(data[start : start + length]):
            return start, start + length
    return None


# --- Modbus TCP frames (MBAP) -------------------------------------------------------------------------------------

MBAP_HEADER = 7  # transaction id (2), protocol id (2, always 0), length (2: unit id and PDU), unit id (1)
MBAP_MAX_LENGTH = 254  # unit id and the longest PDU (Modbus messaging on TCP/IP implementation guide, 3.1.3)


def mbap_length(frame: bytes | bytearray) -> int | None:
    """The length of the MBAP frame that starts ``frame``: None while its header is incomplete, 0 when the header
    cannot start one (a protocol id other than 0, a length no frame has)."""
    if len(frame) < 6:
        return None
    length = int.from_bytes(frame[4:6], "big")
    if frame[2:4] != b"\x00\x00" or not 2 <= length <= MBAP_MAX_LENGTH:
        return 0
    return 6 + length


def find_mbap_reply(data: bytes | bytearray, request: bytes | bytearray) -> tuple[int, int] | None:
    """Where the reply to the MBAP ``request`` (or its exception reply) lies in ``data``, as ``(start, end)``; None
    until a complete one has arrived.

    A reply starts with the request's transaction id and protocol id, then a length that must agree with what the
    request fixes: the unit and function (or the function with the exception flag), the byte count of a read, the
    echo of a write, exactly as :func:`reply_prefix` says for RTU. TCP delivers bytes intact, but a device or a
    gateway may still send noise, a reply cut short or a header that is wrong; none of these passes for the reply,
    and a late reply to an earlier request carries another transaction id. Without a CRC, a garbled register value
    in an otherwise well-formed reply cannot be told from a good one."""
    body = request[6:]  # unit id and PDU: an RTU request without its CRC
    prefix = reply_prefix(body)
    refused = bytes([body[0], body[1] | EXCEPTION_FLAG])
    for start in range(len(data) - MBAP_HEADER):
        if data[start : start + 4] != request[:4]:
            continue
        pdu = data[start + 6 :]
        if pdu[: len(prefix)] != prefix and pdu[:2] != refused:
            continue
        length = frame_length(pdu, request=False)  # an RTU frame's length counts its two CRC bytes
        if not length or int.from_bytes(data[start + 4 : start + 6], "big") != length - 2:
            continue
        end = start + 6 + length - 2
        if end <= len(data):
            return start, end
    return None
