"""Injected time for the resilience kit: a monotonic reading and a sleep, real or fake.

Every interval and deadline in the kit is measured on a :class:`Clock`, never on ``time`` or the event loop
directly, so tests drive hours of backoff, refill and open-breaker time in microseconds with :class:`FakeClock`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class RealClock:
    __slots__ = ()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


REAL_CLOCK = RealClock()


class FakeClock:
    """A clock whose ``sleep`` jumps time forward at once, then yields to the loop once.

    Time never goes backwards: a sleeper moves the clock to its own wake-up time unless another sleeper already
    moved it further, so concurrent sleeps overlap instead of adding up (a sleeper may wake "late", as on a busy
    loop). ``sleeps`` records every requested duration, for tests that check a schedule.
    """

    def __init__(self, start: float = 0.0):
        self.now = start
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

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
