"""The bulkhead: a cap on concurrent calls, a bounded FIFO queue, fast refusals, and no slot lost to a waiter
that gives up or is cancelled."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Awaitable, Callable

import pytest

from gatewayd.observability.metrics import REGISTRY
from gatewayd.resilience import Bulkhead, BulkheadFull, FakeClock, classify

_names = itertools.count()


def unique() -> str:
    """Metrics are process-global: every test gets bulkheads of its own."""
    return f"bh-{next(_names)}"


def sample(metric: str, **labels: str) -> float:
    value = REGISTRY.get_sample_value(metric, labels)
    return 0.0 if value is None else value


def gauges(b: Bulkhead) -> tuple[float, float]:
    return sample("gatewayd_bulkhead_active", bulkhead=b.name), sample("gatewayd_bulkhead_queued", bulkhead=b.name)


def rejected(b: Bulkhead, reason: str) -> float:
    return sample("gatewayd_bulkhead_rejected_total", bulkhead=b.name, reason=reason)


async def spin(steps: int = 10) -> None:
    """Let every runnable task take a few steps (no time passes)."""
    for _ in range(steps):
        await asyncio.sleep(0)


def held_until(gate: asyncio.Event, log: list[str] | None = None, name: str = "") -> Callable[[], Awaitable[str]]:
    async def fn() -> str:
        if log is not None:
            log.append(name)
        await gate.wait()
        return name

    return fn


async def test_concurrent_calls_never_exceed_max_concurrent() -> None:
    clock = FakeClock()
    b = Bulkhead(unique(), max_concurrent=3, max_queue=20, clock=clock)
    running = peak = 0

    async def work(i: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            await clock.sleep(1 + i % 3)
        finally:
            running -= 1
        return i

    results = await asyncio.gather(*(b.call(lambda i=i: work(i)) for i in range(12)))
    assert results == list(range(12))  # every call got through, in its turn
    assert peak == 3
    assert (b.active, b.queued) == (0, 0)


async def test_full_queue_refuses_at_once() -> None:
    clock = FakeClock()
    b = Bulkhead(unique(), max_concurrent=1, max_queue=2, clock=clock)
    gate = asyncio.Event()
    started: list[str] = []
    calls = [asyncio.create_task(b.call(held_until(gate, started, f"c{i}"))) for i in range(3)]
    await spin()
    assert (b.active, b.queued) == (1, 2)

    refused_call = b.enter()
    with pytest.raises(BulkheadFull) as refused:
        refused_call.send(None)  # the first step already raises: the caller is not made to wait at all
    err = refused.value
    assert err.reason == "queue_full" and err.code == "bulkhead_full" and err.status == 503
    assert classify(err).transient
    assert err.details == {"bulkhead": b.name, "reason": "queue_full", "max_concurrent": 1, "max_queue": 2}
    assert (b.active, b.queued) == (1, 2)  # the refusal took nothing
    assert rejected(b, "queue_full") == 1 and rejected(b, "wait_timeout") == 0

    gate.set()
    assert await asyncio.gather(*calls) == ["c0", "c1", "c2"]
    assert started == ["c0", "c1", "c2"]
    assert (b.active, b.queued) == (0, 0)


async def test_without_a_queue_a_busy_bulkhead_refuses() -> None:
    b = Bulkhead(unique(), max_concurrent=1, clock=FakeClock())
    assert b.try_enter()
    assert not b.try_enter()
    with pytest.raises(BulkheadFull, match="queue_full"):
        await b.enter()
    b.release()
    assert b.try_enter()  # the slot came back
    b.release()


async def test_a_waiter_gives_up_after_max_wait_s_on_the_clock() -> None:
    clock = FakeClock(100.0)
    b = Bulkhead(unique(), max_concurrent=1, max_queue=1, max_wait_s=5.0, clock=clock)
    await b.enter()  # the slot stays taken throughout
    ran: list[str] = []

    with pytest.raises(BulkheadFull) as refused:
        await b.call(held_until(asyncio.Event(), ran, "late"))
    assert refused.value.reason == "wait_timeout"
    assert clock.sleeps == [5.0] and clock.now == 105.0
    assert ran == []
    assert (b.active, b.queued) == (1, 0)
    assert rejected(b, "wait_timeout") == 1
    b.release()
    assert b.active == 0


async def test_a_slot_freed_in_time_goes_to_the_waiter_despite_max_wait_s() -> None:
    b = Bulkhead(unique(), max_concurrent=1, max_queue=1, max_wait_s=5.0, clock=FakeClock())
    await b.enter()
    waiter = asyncio.create_task(b.enter())
    await asyncio.sleep(0)  # queued, its timer armed
    assert b.queued == 1
    b.release()
    await waiter  # admitted, not refused
    assert (b.active, b.queued) == (1, 0)
    assert rejected(b, "wait_timeout") == 0
    b.release()
    assert b.active == 0


async def test_a_freed_slot_goes_to_the_first_waiter_not_a_newcomer() -> None:
    b = Bulkhead(unique(), max_concurrent=1, max_queue=10, clock=FakeClock())
    order: list[str] = []

    async def worker(name: str) -> None:
        async with b:
            order.append(name)
            await asyncio.sleep(0)  # holds the slot across a suspension

    await b.enter()
    tasks = []
    for name in ("w1", "w2", "w3"):
        tasks.append(asyncio.create_task(worker(name)))
        await asyncio.sleep(0)  # each joins the queue in turn
    assert b.queued == 3

    b.release()
    # The slot now belongs to w1, which has not run yet: a newcomer finds none free and queues behind w3.
    assert not b.try_enter()
    tasks.append(asyncio.create_task(worker("newcomer")))
    await asyncio.gather(*tasks)
    assert order == ["w1", "w2", "w3", "newcomer"]
    assert (b.active, b.queued) == (0, 0)


@pytest.mark.parametrize("handed_over", [False, True], ids=["while_waiting", "just_after_handover"])
async def test_a_cancelled_waiter_does_not_leak_a_slot(handed_over: bool) -> None:
    b = Bulkhead(unique(), max_concurrent=1, max_queue=5, clock=FakeClock())
    await b.enter()
    first = asyncio.create_task(b.enter())
    second = asyncio.create_task(b.call(held_until(asyncio.Event(), name="second")))
    await spin()
    assert b.queued == 2

    if handed_over:
        b.release()  # the slot is first's now, but first is cancelled before it can run
        first.cancel()
    else:
        first.cancel()
        await spin()
        assert b.queued == 1
        b.release()
    with pytest.raises(asyncio.CancelledError):
        await first
    await spin()
    assert b.active == 1 and b.queued == 0  # second holds the slot that first gave up
    second.cancel()  # cancelling a call that holds a slot gives it back too
    with pytest.raises(asyncio.CancelledError):
        await second
    assert (b.active, b.queued) == (0, 0)
    assert gauges(b) == (0, 0)


@pytest.mark.parametrize("max_wait_s", [None, 3.0])
@pytest.mark.parametrize("seed", range(4))
async def test_random_cancellations_and_timeouts_leave_nothing_behind(seed: int, max_wait_s: float | None) -> None:
    rng = random.Random(seed)
    clock = FakeClock()
    b = Bulkhead(unique(), max_concurrent=3, max_queue=8, max_wait_s=max_wait_s, clock=clock)
    running = peak = 0

    async def work() -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            await clock.sleep(rng.choice([0.0, 1.0, 2.0, 5.0]))
        finally:
            running -= 1

    tasks = [asyncio.create_task(b.call(work)) for _ in range(40)]
    for _ in range(60):
        await asyncio.sleep(0)
        if rng.random() < 0.3:
            rng.choice(tasks).cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)

    assert all(r is None or isinstance(r, BulkheadFull | asyncio.CancelledError) for r in results)
    assert peak <= 3
    assert (b.active, b.queued) == (0, 0)
    assert gauges(b) == (0, 0)


async def test_gauges_follow_active_and_queued_calls() -> None:
    b = Bulkhead(unique(), max_concurrent=2, max_queue=1, clock=FakeClock())
    gate = asyncio.Event()
    calls = [asyncio.create_task(b.call(held_until(gate))) for _ in range(3)]
    await spin()
    assert gauges(b) == (2, 1)
    for _ in range(4):
        with pytest.raises(BulkheadFull):
            await b.call(held_until(gate))
    assert rejected(b, "queue_full") == 4
    gate.set()
    await asyncio.gather(*calls)
    assert gauges(b) == (0, 0)


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError):
        Bulkhead("bh-bad", max_concurrent=0)
    with pytest.raises(ValueError):
        Bulkhead("bh-bad", max_concurrent=1, max_queue=-1)
    with pytest.raises(ValueError):
        Bulkhead("bh-bad", max_concurrent=1, max_wait_s=-1.0)
