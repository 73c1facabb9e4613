"""What a device hands its telemetry and events to.

Devices do not know about SQLite or MQTT: they put :class:`Record` objects into a :class:`TelemetrySink`, which
must take them without blocking and without raising (a record that cannot be kept is dropped and counted by the
sink, never pushed back onto the device's receive path). The daemon's sink is the outbox recorder
(``gatewayd.telemetry.recorder``); :class:`MemorySink` keeps the latest records in memory.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

Severity = Literal["info", "warning", "critical"]


@dataclass(frozen=True)
class Record:
    """One observation. ``mono`` is ``time.monotonic()`` at the moment it was observed (as close to the wire or
    the pin as the code gets); the recorder turns it into a wall-clock timestamp that never runs backwards."""

    kind: Literal["telemetry", "event"]
    device: str
    data: dict[str, Any]
    mono: float = field(default_factory=time.monotonic)
    event: str | None = None  # the event's name (kind "event")
    severity: Severity = "info"  # critical events go ahead of old telemetry on the uplink

    @classmethod
    def telemetry(cls, device: str, values: dict[str, Any], *, mono: float | None = None) -> Record:
        return cls("telemetry", device, values, time.monotonic() if mono is None else mono)

    @classmethod
    def of_event(
        cls,
        device: str,
        event: str,
        data: dict[str, Any] | None = None,
        *,
        severity: Severity = "info",
        mono: float | None = None,
    ) -> Record:
        return cls("event", device, data or {}, time.monotonic() if mono is None else mono, event, severity)


class TelemetrySink(Protocol):
    def put(self, record: Record) -> None:
        """Take one record without blocking; never raises."""


class MemorySink:
    """The latest ``maxlen`` records, oldest dropped first (and counted)."""

    def __init__(self, maxlen: int = 1000):
        self.records: deque[Record] = deque(maxlen=maxlen)
        self.dropped = 0

    def put(self, record: Record) -> None:
        if len(self.records) == self.records.maxlen:
            self.dropped += 1
        self.records.append(record)

    def __iter__(self) -> Iterator[Record]:
        return iter(list(self.records))

    def __len__(self) -> int:
        return len(self.records)
