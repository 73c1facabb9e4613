"""The gatewayd line protocol, framing only: bytes in, frames out, no I/O (see hardware/PROTOCOL.md).

A frame is one ASCII line::

    :AASSK{json}*CCCC\\n

``AA`` device address (hex, 01-F7), ``SS`` sequence number (hex, 00-FF), ``K`` frame kind, ``{json}`` a
compact JSON object, ``CCCC`` the CRC-16/CCITT-FALSE (hex) of everything between ``:`` and ``*``. Bytes before
a ``:`` are line noise and are skipped; a line that fails its CRC or does not parse is dropped and counted, by
its reason (one of :data:`REASONS`, the ``reason`` in a :class:`ProtocolError`'s details).
"""

from __future__ import annotations

import binascii
import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from gatewayd import strictjson
from gatewayd.errors import ProtocolError

MAX_FRAME = 512  # bytes, start marker to newline included

# Why a line was dropped: a short fixed list, so it can label a metric and a log line.
NO_START = "no_start"  # no ':' followed by an address, a sequence number and a kind
NO_CHECKSUM = "no_checksum"  # nothing like '*CCCC' at the end
BAD_CHECKSUM = "bad_checksum"  # the CRC is not hex, or not the CRC of the body
MALFORMED = "malformed"  # CRC right, but the header or the JSON does not parse
NOT_OBJECT = "not_object"  # CRC right, JSON fine, but not an object
TOO_LONG = "too_long"  # longer than MAX_FRAME
REASONS = (NO_START, NO_CHECKSUM, BAD_CHECKSUM, MALFORMED, NOT_OBJECT, TOO_LONG)


def _bad(message: str, reason: str) -> ProtocolError:
    return ProtocolError(message, details={"reason": reason})


class Kind(StrEnum):
    REQUEST = "Q"  # gateway -> device
    REPLY = "R"  # device -> gateway: done, with a result
    NAK = "N"  # device -> gateway: refused, with a code and a message
    TELEMETRY = "T"  # device -> gateway, unsolicited
    EVENT = "E"  # device -> gateway, unsolicited


def crc16(data: bytes) -> int:
    """CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF): ``crc16(b"123456789") == 0x29B1``."""
    return binascii.crc_hqx(data, 0xFFFF)


@dataclass(frozen=True)
class Frame:
    address: int
    seq: int
    kind: Kind
    payload: dict[str, Any] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        if not 0 <= self.address <= 0xFF or not 0 <= self.seq <= 0xFF:
            raise ValueError("address and seq must fit in one byte")
        body = f"{self.address:02X}{self.seq:02X}{self.kind.value}".encode("ascii") + json.dumps(
            self.payload, separators=(",", ":"), ensure_ascii=True
        ).encode("ascii")
        line = b":" + body + b"*" + f"{crc16(body):04X}".encode("ascii") + b"\n"
        if len(line) > MAX_FRAME:
            raise ValueError(f"frame of {len(line)} bytes exceeds the {MAX_FRAME}-byte limit")
        return line

    @classmethod
    def from_line(cls, line: bytes) -> Frame:
        """Parse one line without its newline (a trailing ``\\r`` is tolerated)."""
        line = line.rstrip(b"\r")
        if not line.startswith(b":"):
            raise _bad("frame does not start with ':'", NO_START)
        star = line.rfind(b"*")
        if star < 6 or len(line) - star != 5:
            raise _bad("frame has no '*CCCC' checksum", NO_CHECKSUM)
        body, crc_text = line[1:star], line[star + 1 :]
        try:
            crc = int(crc_text, 16)
        except ValueError:
            raise _bad("checksum is not hex", BAD_CHECKSUM) from None
        if crc != crc16(body):
            raise _bad("checksum mismatch", BAD_CHECKSUM)
        try:
            address, seq = int(body[0:2], 16), int(body[2:4], 16)
            kind = Kind(body[4:5].decode("ascii"))
            payload = strictjson.loads(body[5:]) if len(body) > 5 else {}
        except (ValueError, UnicodeDecodeError) as err:
            raise _bad(f"malformed frame: {err}", MALFORMED) from err
        if not isinstance(payload, dict):
            raise _bad("payload is not a JSON object", NOT_OBJECT)
        return cls(address, seq, kind, payload)


_HEADER = re.compile(rb":[0-9A-Fa-f]{4}[QRNTE]")


@dataclass
class Decoder:
    """Incremental decoder with a bounded buffer. Feed it whatever the port returned; it returns whole frames.

    Lines end at ``\n``, which compact JSON never contains, so a newline is always a safe place to resynchronise.
    Noise before a frame on the same line is skipped; a line longer than ``max_frame`` is discarded up to its
    newline without being buffered. Every dropped line is counted by its reason and handed to ``on_drop``
    (reason, message), if set.
    """

    max_frame: int = MAX_FRAME
    frames: int = 0
    frame_bytes: int = 0  # bytes of the valid frames, ':' to '\n' inclusive (what a line-rate figure counts)
    dropped: int = 0
    last_error: str | None = None
    on_drop: Callable[[str, str], None] | None = None
    reasons: Counter[str] = field(default_factory=Counter)
    peak_buffered: int = 0  # most bytes ever held between two feeds: stays <= max_frame, whatever arrives
    _buf: bytearray = field(default_factory=bytearray)
    _discarding: bool = False

    def feed(self, data: bytes) -> list[Frame]:
        out: list[Frame] = []
        self._buf += data
        while True:
            end = self._buf.find(b"\n")
            if end < 0:
                if len(self._buf) > self.max_frame:
                    if not self._discarding:
                        self._drop(TOO_LONG, "frame too long")
                    self._discarding = True
                    self._buf.clear()
                if len(self._buf) > self.peak_buffered:
                    self.peak_buffered = len(self._buf)
                return out
            line = bytes(self._buf[:end])
            del self._buf[: end + 1]
            if self._discarding:
                self._discarding = False
                continue
            frame = self._parse(line)
            if frame is not None:
                out.append(frame)

    def _parse(self, line: bytes) -> Frame | None:
        if not line.strip(b"\r\x00 "):
            return None  # an empty line is idle noise, not an error
        if len(line) + 1 > self.max_frame:
            self._drop(TOO_LONG, "frame too long")
            return None
        reason, error = NO_START, "no frame start"
        # Usually the first candidate is the frame; later ones cover a frame cut off by a sender that restarted.
        for match in _HEADER.finditer(line):
            try:
                frame = Frame.from_line(line[match.start() :])
            except ProtocolError as err:
                reason, error = err.details["reason"], err.message
                continue
            self.frames += 1
            self.frame_bytes += len(line) - match.start() + 1
            return frame
        self._drop(reason, error)
        return None

    @property
    def buffered(self) -> int:
        """Bytes held now, waiting for the rest of their line."""
        return len(self._buf)

    def _drop(self, reason: str, why: str) -> None:
        self.dropped += 1
        self.reasons[reason] += 1
        self.last_error = why
        if self.on_drop is not None:
            self.on_drop(reason, why)
