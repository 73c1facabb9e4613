"""What the resilience kit needs of the gateway's clock (:mod:`gatewayd.clock`): a monotonic reading and a sleep.

Every interval and deadline in the kit is measured on it, never on ``time`` or the event loop directly, so tests
drive hours of backoff, refill and open-breaker time in microseconds with :class:`~gatewayd.clock.FakeClock`.
"""

from __future__ import annotations

from typing import Protocol

from gatewayd.clock import REAL_CLOCK, FakeClock

__all__ = ["REAL_CLOCK", "Clock", "FakeClock"]


class Clock(Protocol):
    def monotonic(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...
