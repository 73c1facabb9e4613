"""The gateway's one clock: a monotonic reading, a sleep, the wall clock and the boot it counts in.

Every interval and deadline is measured on the monotonic reading, never on ``time`` or the event loop directly; the
wall clock is for display and for what must survive a reboot (a command's deadline on another boot, a breaker's
open-until). A monotonic reading is only comparable within one boot, so every stored one carries ``boot_id``.

One clock is injected into every component that reads or waits on time (the dispatcher, the command service, the
scheduler, the interpreter, the resilience kit, the page's history), so a test moves all of them together:
:class:`FakeClock` drives hours of backoff, refill and open-breaker time in microseconds. The telemetry stamper
builds timestamps from the same two readings (``gatewayd.telemetry.timestamps``).
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from dataclasses import dataclass
from typing import Protocol


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        # Without a boot id, monotonic readings are only trusted within this process.
        return f"process-{os.getpid()}-{uuid.uuid4().hex[:8]}"


BOOT_ID = _boot_id()


class Clock(Protocol):
    @property
    def boot_id(self) -> str: ...

    def monotonic(self) -> float: ...

    def wall(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


@dataclass(frozen=True)
class SystemClock:
    """The real clock: ``time.monotonic``, ``time.time`` and ``asyncio.sleep``."""

    boot_id: str = BOOT_ID

    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


REAL_CLOCK = SystemClock()


class FakeClock:
    """A clock whose ``sleep`` jumps time forward at once, then yields to the loop once.

    Time never goes backwards: a sleeper moves the clock to its own wake-up time unless another sleeper already
    moved it further, so concurrent sleeps overlap instead of adding up (a sleeper may wake "late", as on a busy
    loop). ``sleeps`` records every requested duration, for tests that check a schedule. The wall clock moves with
    the monotonic one, from ``wall_start``.
    """

    def __init__(self, start: float = 0.0, *, wall_start: float = 1_700_000_000.0, boot_id: str = "fake-boot"):
        self.now = start
        self.sleeps: list[float] = []
        self._wall_offset = wall_start - start
        self.boot_id = boot_id

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return self.now + self._wall_offset

    async def sleep(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        self.sleeps.append(seconds)
        wake = self.now + seconds
        # One real yield, so a fake sleep is still a suspension point: other tasks run (and may start their own
        # sleeps from the same instant), and cancellation lands here.
        await asyncio.sleep(0)
        self.now = max(self.now, wake)

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock does not run backwards")
        self.now += seconds
