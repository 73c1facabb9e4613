"""The bulkhead: at most ``max_concurrent`` calls to one target at a time, at most ``max_queue`` waiting.

A call that finds no free slot waits in a FIFO queue; when the queue is full it is refused at once with
:class:`BulkheadFull` (``reason="queue_full"``), so a stuck target costs a bounded number of waiting tasks and
a fast answer to the rest. With ``max_wait_s`` a waiter gives up after that long on the injected clock
(``reason="wait_timeout"``). A freed slot is handed straight to the first waiter, so a newcomer cannot overtake
the queue.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TypeVar

from gatewayd.observability.metrics import BULKHEAD_ACTIVE, BULKHEAD_QUEUED, BULKHEAD_REJECTED, counter, gauge
from gatewayd.resilience.clock import REAL_CLOCK, Clock
from gatewayd.resilience.errors import BulkheadFull

T = TypeVar("T")


class Bulkhead:
    kind = "bulkhead"

    def __init__(
        self,
        name: str,
        *,
        max_concurrent: int,
        max_queue: int = 0,
        max_wait_s: float | None = None,
        clock: Clock = REAL_CLOCK,
    ):
        if max_concurrent < 1 or max_queue < 0:
            raise ValueError("need max_concurrent >= 1 and max_queue >= 0")
        if max_wait_s is not None and max_wait_s < 0:
            raise ValueError("max_wait_s must not be negative")
        self.name = name
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self.max_wait_s = max_wait_s
        self._clock = clock
        self._active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._active_gauge = gauge(BULKHEAD_ACTIVE, name)
        self._queued_gauge = gauge(BULKHEAD_QUEUED, name)
        self._rejected = {r: counter(BULKHEAD_REJECTED, name, r) for r in ("queue_full", "wait_timeout")}

    @property
    def active(self) -> int:
        return self._active

    @property
    def queued(self) -> int:
        return len(self._waiters)

    async def __aenter__(self) -> Bulkhead:
        await self.enter()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        async with self:
            return await fn()

    def try_enter(self) -> bool:
        """Take a slot if one is free and nobody is queued for it; never waits."""
        if self._active < self.max_concurrent and not self._waiters:
            self._active += 1
            self._active_gauge.set(self._active)
            return True
        return False

    async def enter(self) -> None:
        """Take a slot, waiting in line for one if the queue has room. Pair with :meth:`release`."""
        if self.try_enter():
            return
        if len(self._waiters) >= self.max_queue:
            self._refuse("queue_full")
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._queued_gauge.set(len(self._waiters))
        try:
            if self.max_wait_s is None:
                await waiter
            else:
                await self._wait(waiter, self.max_wait_s)
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot was handed over just as we gave up: pass it on
            else:
                waiter.cancel()
            raise
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            self._queued_gauge.set(len(self._waiters))

    async def _wait(self, waiter: asyncio.Future[None], limit_s: float) -> None:
        # The timer runs on the injected clock, so asyncio.timeout (loop time) cannot serve. The timer task lives
        # only inside this call: it is cancelled and awaited before returning, whatever happens.
        timer = asyncio.ensure_future(self._clock.sleep(limit_s))
        try:
            await asyncio.wait((waiter, timer), return_when=asyncio.FIRST_COMPLETED)
        finally:
            timer.cancel()
            # asyncio.wait, unlike awaiting the timer, never raises the timer's own CancelledError, so a
            # cancellation of this task is not swallowed by mistake.
            await asyncio.wait((timer,))
        if not waiter.done():
            self._refuse("wait_timeout")

    def _refuse(self, reason: str) -> None:
        self._rejected[reason].inc()
        raise BulkheadFull(self.name, reason, max_concurrent=self.max_concurrent, max_queue=self.max_queue)

    def release(self) -> None:
        """Give a slot back: to the first live waiter, or to the pool."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot changes hands; the active count stays
                self._queued_gauge.set(len(self._waiters))
                return
        self._active -= 1
        self._active_gauge.set(self._active)
