"""Wall-clock timestamps that never run backwards, and whether the wall clock can be trusted yet.

A Pi has no real-time clock: it boots with the time it had when it shut down (fake-hwclock) or 1970, and NTP
steps the clock later, maybe hours later, maybe backwards. Telemetry must still be ordered and dated, so a
timestamp is built from the monotonic clock plus an offset to the wall clock: within one offset the timestamps
advance exactly as the monotonic clock does, whatever the wall clock does in between. The offset is taken again
on every sync check; a new offset never makes a timestamp smaller than the last one given out.

Each stamp says whether the wall clock was synchronised. When it becomes synchronised, records that were
stamped before and are still waiting in the outbox are re-stamped from their monotonic readings with the new
offset (see ``gatewayd.store.outbox.restamp``), so only records that already left carry the unsynchronised flag.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import time
from collections.abc import Callable
from typing import Literal

import structlog

log = structlog.get_logger("gatewayd.telemetry")

ClockSyncSource = Literal["kernel", "synced", "unsynced"]

_TIME_ERROR = 5  # adjtimex(2): the clock is not synchronised (STA_UNSYNC)
_TIMESYNCD_FLAG = "/run/systemd/timesync/synchronized"  # touched by systemd-timesyncd once it synchronised


def kernel_clock_synchronised() -> bool:
    """The kernel's own view (``adjtimex`` with no modes: read only, no privilege needed), which chrony, ntpd
    and systemd-timesyncd all keep up to date. Falls back to timesyncd's flag file where adjtimex is missing."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        timex = ctypes.create_string_buffer(512)  # struct timex is ~208 bytes; modes = 0 (first field) reads only
        state = libc.adjtimex(timex)
    except (OSError, AttributeError):
        return os.path.exists(_TIMESYNCD_FLAG)
    if state < 0:
        return os.path.exists(_TIMESYNCD_FLAG)
    return bool(state != _TIME_ERROR)


def sync_probe(source: ClockSyncSource) -> Callable[[], bool]:
    if source == "synced":
        return lambda: True
    if source == "unsynced":
        return lambda: False
    return kernel_clock_synchronised


class Stamper:
    """Turns monotonic readings into wall-clock timestamps (seconds since the epoch) that never decrease."""

    def __init__(
        self,
        synced: Callable[[], bool],
        *,
        wall: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.monotonic,
    ):
        self._probe = synced
        self._wall = wall
        self._mono = mono
        self._last = float("-inf")
        self.synced = False
        self.offset = 0.0
        self.check()

    def check(self) -> bool:
        """Take the offset again and ask whether the clock is synchronised. True when it just became so (the
        caller re-stamps what is still waiting)."""
        try:
            synced = bool(self._probe())
        except Exception:  # a probe that fails says nothing: keep the last answer
            log.warning("clock_sync_probe_failed", exc_info=True)
            synced = self.synced
        became = synced and not self.synced
        if synced != self.synced:
            log.info("clock_synchronised" if synced else "clock_unsynchronised", wall=self._wall())
        self.synced = synced
        self.offset = self._wall() - self._mono()
        if became:
            # Stamps from the unsynchronised epoch are re-stamped too, so the floor starts again from the
            # new, trustworthy offset.
            self._last = float("-inf")
        return became

    def now(self) -> float:
        """The current time on this clock, without moving the floor (for ages on the status page)."""
        return self._mono() + self.offset

    def stamp(self, mono: float) -> float:
        ts = max(mono + self.offset, self._last)
        self._last = ts
        return ts
