"""A shared line (an RS-485 bus, a serial port with several devices): one transaction at a time, the most urgent
waiting command first, and no command put on the wire after its deadline.

The dispatcher runs each command inside a :class:`Call` (a context variable, so it travels with the task down
through a device's own layers to the bus without every function passing it on). What waits for the line takes
its turn by the call's priority (critical, high, normal, low, then a device's own background work such as
polling), oldest first within a priority; every wait on the way to the wire (the turn, the bus's transaction
bucket, the turnaround pause) is bounded by the call's deadline, and the deadline is checked once more the moment
before the bytes go out. A command whose deadline passes on the way is :class:`DeadlinePassed`: never sent, so
``expired``. A call can be preempted while it waits for its turn (a critical command arrived for the same device,
whose worker is busy with this one): it gives its place up (:class:`Preempted`), unsent, and goes back to the
queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from collections.abc import AsyncIterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from gatewayd.errors import GatewayError
from gatewayd.resilience.bucket import TokenBucket
from gatewayd.resilience.clock import REAL_CLOCK, Clock
from gatewayd.resilience.errors import RateLimited

BACKGROUND = 9  # a device's own work (polls): after every command, whatever its priority


class DeadlinePassed(GatewayError):
    """The command's deadline passed before its request could be put on the wire: it was not sent."""

    code = "expired"
    status = 504


class Preempted(Exception):
    """A more urgent command for the same device took this one's turn; this one was not sent."""


@dataclass
class Call:
    """The command a device acts for, as far as the way to the wire needs it."""

    command_id: str
    priority: int  # lower runs first (gatewayd.commands.model.Priority)
    deadline: float | None  # monotonic, on the line's clock; None: no deadline
    sent: bool = False  # set the moment its request goes out: from then on it may have acted
    preempt: asyncio.Event = field(default_factory=asyncio.Event)

    def check(self, now: float, waiting_for: str) -> None:
        if self.deadline is not None and now >= self.deadline:
            raise DeadlinePassed(
                f"the command's deadline passed while it waited for {waiting_for}; it was not sent",
                details={"command_id": self.command_id, "waiting_for": waiting_for},
            )


CALL: ContextVar[Call | None] = ContextVar("gatewayd_call", default=None)


def sending(clock: Clock = REAL_CLOCK) -> None:
    """For a device whose request needs no line (a GPIO pin): the last look at the current call's deadline
    (:class:`DeadlinePassed` if it has passed), then the call marked sent."""
    call = CALL.get()
    if call is not None:
        call.check(clock.monotonic(), "the device")
        call.sent = True


class Line:
    """One transaction at a time, most urgent first; see the module's doc."""

    def __init__(self, name: str, clock: Clock, bucket: TokenBucket | None = None):
        self.name = name
        self._clock = clock
        self._bucket = bucket
        self._held = False
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self.free_at = 0.0  # monotonic: the line is quiet until then (RS-485 turnaround, recovery after a timeout)

    @property
    def waiting(self) -> int:
        return sum(1 for _, _, fut in self._waiters if not fut.done())

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[Call | None]:
        """The line, for the current call (or for background work): yields once it may send. The caller marks
        the moment it sends with :meth:`sent`."""
        call = CALL.get()
        await self._acquire(call)
        try:
            if self._bucket is not None:
                try:
                    await self._bucket.acquire(deadline=call.deadline if call is not None else None)
                except RateLimited:  # no token before the deadline: raised only for a call that has one
                    raise DeadlinePassed(
                        "the command's deadline would pass before the bus's rate limit let it out; it was not sent",
                        details={"command_id": call.command_id if call is not None else None},
                    ) from None
            pause = self.free_at - self._clock.monotonic()
            if pause > 0:
                if call is not None:
                    call.check(self._clock.monotonic() + pause, "the line to go quiet")
                await self._clock.sleep(pause)
            yield call
        finally:
            self._release()

    def sent(self, call: Call | None) -> None:
        """The request goes out now: the last moment its deadline is looked at."""
        if call is not None:
            call.check(self._clock.monotonic(), "the bus")
            call.sent = True

    async def _acquire(self, call: Call | None) -> None:
        if not self._held and not any(not fut.done() for _, _, fut in self._waiters):
            if call is not None:
                call.check(self._clock.monotonic(), "the bus")
            self._held = True
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        priority = call.priority if call is not None else BACKGROUND
        heapq.heappush(self._waiters, (priority, next(self._seq), fut))
        preempt = asyncio.ensure_future(call.preempt.wait()) if call is not None else None
        try:
            timeout = None
            if call is not None and call.deadline is not None:
                timeout = max(0.0, call.deadline - self._clock.monotonic())
            waits: set[asyncio.Future[Any]] = {fut}
            if preempt is not None:
                waits.add(preempt)
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            self._abandon(fut)
            raise
        finally:
            if preempt is not None:
                preempt.cancel()
        if fut.done() and not fut.cancelled():
            return  # our turn (even if preempted at the same instant: it is one transaction)
        self._abandon(fut)
        assert call is not None
        if call.preempt.is_set():
            raise Preempted(f"{call.command_id} gave its turn on {self.name} to a more urgent command")
        call.check(self._clock.monotonic() + 1e-9, "its turn on the bus")
        raise DeadlinePassed("the command's deadline passed while it waited for the bus; it was not sent")

    def _abandon(self, fut: asyncio.Future[None]) -> None:
        """A waiter that leaves: if it was handed the line meanwhile, hand it on."""
        if fut.done() and not fut.cancelled():
            self._release()
        else:
            fut.cancel()

    def _release(self) -> None:
        while self._waiters:
            _, _, fut = heapq.heappop(self._waiters)
            if not fut.done():
                fut.set_result(None)  # the line passes to it: still held
                return
        self._held = False
