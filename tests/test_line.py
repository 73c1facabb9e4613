"""The shared line in-process: the most urgent waiter first, no request after its deadline, preemption while
waiting, and every wait on the way to the wire bounded by the deadline."""

from __future__ import annotations

import asyncio
import time

import pytest

from gatewayd.devices.line import BACKGROUND, CALL, Call, DeadlinePassed, Line, Preempted
from gatewayd.resilience.bucket import TokenBucket
from gatewayd.resilience.clock import REAL_CLOCK


async def transact(line: Line, log: list[str], name: str, call: Call | None, hold_s: float = 0.0) -> None:
    """One transaction: the line's turn, the last deadline check, the "bytes", a reply time."""
    token = CALL.set(call)
    try:
        async with line.turn() as turn:
            line.sent(turn)
            log.append(name)
            await asyncio.sleep(hold_s)
    finally:
        CALL.reset(token)


def call(name: str, priority: int, within_s: float | None = None) -> Call:
    return Call(name, priority, None if within_s is None else time.monotonic() + within_s)


async def test_the_line_goes_to_the_most_urgent_waiter_then_the_oldest() -> None:
    line = Line("bus0", REAL_CLOCK)
    log: list[str] = []
    first = asyncio.create_task(transact(line, log, "busy", call("busy", 2), hold_s=0.05))
    await asyncio.sleep(0.01)  # it holds the line; the rest queue behind it
    waiting = [
        asyncio.create_task(transact(line, log, name, None if prio == BACKGROUND else call(name, prio)))
        for name, prio in [("poll", BACKGROUND), ("low", 3), ("normal-1", 2), ("high", 1), ("normal-2", 2)]
    ]
    await asyncio.sleep(0.01)
    estop = asyncio.create_task(transact(line, log, "critical", call("critical", 0)))
    await asyncio.gather(first, estop, *waiting)
    assert log == ["busy", "critical", "high", "normal-1", "normal-2", "low", "poll"]


async def test_a_deadline_passing_while_waiting_for_the_line_means_never_sent() -> None:
    line = Line("bus0", REAL_CLOCK)
    log: list[str] = []
    busy = asyncio.create_task(transact(line, log, "busy", call("busy", 2), hold_s=0.3))
    await asyncio.sleep(0.01)
    stale = call("stale", 2, within_s=0.1)
    began = time.monotonic()
    with pytest.raises(DeadlinePassed):
        await transact(line, log, "stale", stale)
    assert time.monotonic() - began < 0.25  # refused at its deadline, not when the line came free
    assert not stale.sent
    await busy
    await transact(line, log, "after", call("after", 2))
    assert log == ["busy", "after"]  # the stale one left its place: it never got the line


async def test_a_waiter_preempted_gives_its_place_up_unsent() -> None:
    line = Line("bus0", REAL_CLOCK)
    log: list[str] = []
    busy = asyncio.create_task(transact(line, log, "busy", call("busy", 2), hold_s=0.1))
    await asyncio.sleep(0.01)
    normal = call("normal", 2)
    waiting = asyncio.create_task(transact(line, log, "normal", normal))
    await asyncio.sleep(0.01)
    normal.preempt.set()
    with pytest.raises(Preempted):
        await waiting
    assert not normal.sent
    await busy
    assert log == ["busy"]


async def test_the_rate_limit_and_the_turnaround_are_bounded_by_the_deadline() -> None:
    bucket = TokenBucket(1, 2.0, name="bus0.transactions")  # one token, then one every 0.5 s
    line = Line("bus0", REAL_CLOCK, bucket)
    log: list[str] = []
    await transact(line, log, "first", call("first", 2))
    with pytest.raises(DeadlinePassed):
        await transact(line, log, "no-token-in-time", call("no-token-in-time", 2, within_s=0.2))
    await transact(line, log, "waits-for-its-token", call("waits-for-its-token", 2, within_s=2.0))
    line.free_at = time.monotonic() + 0.5  # the line must stay quiet for half a second
    with pytest.raises(DeadlinePassed):
        await transact(line, log, "quiet-too-long", call("quiet-too-long", 0, within_s=0.2))
    assert log == ["first", "waits-for-its-token"]


async def test_a_deadline_already_passed_is_not_sent_even_with_the_line_free() -> None:
    line = Line("bus0", REAL_CLOCK)
    log: list[str] = []
    late = call("late", 0, within_s=-0.001)
    with pytest.raises(DeadlinePassed):
        await transact(line, log, "late", late)
    assert log == [] and not late.sent
    await transact(line, log, "next", None)  # and the line is free for the next one
    assert log == ["next"]


async def test_a_cancelled_waiter_does_not_keep_the_line() -> None:
    line = Line("bus0", REAL_CLOCK)
    log: list[str] = []
    busy = asyncio.create_task(transact(line, log, "busy", call("busy", 2), hold_s=0.05))
    await asyncio.sleep(0.01)
    gone = asyncio.create_task(transact(line, log, "gone", call("gone", 0)))
    await asyncio.sleep(0.01)
    gone.cancel()
    await busy
    await asyncio.wait_for(transact(line, log, "next", call("next", 2)), 1.0)
    assert log == ["busy", "next"]
