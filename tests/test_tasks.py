"""Stopping a component's tasks: a cancellation is never lost, whatever turn of a wake-up it arrives in.

On Python 3.11 ``asyncio.wait_for`` loses a cancellation that comes in the loop turn its inner wait finishes (cpython
gh-86296): a telemetry recorder stopped just after a reading woke it ran on, and its stop hung until the test's
timeout (seen once in a CI run). Here each long-lived loop is stopped at every turn of a wake-up, and TaskOwner's net
for code that still swallows a cancellation is shown to catch it without cutting short a clean-up that is merely slow.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import structlog

from gatewayd import tasks
from gatewayd.clock import SystemClock
from gatewayd.commands.scheduler import Scheduler
from gatewayd.store import Store
from gatewayd.tasks import TaskOwner, wait_set
from gatewayd.telemetry.sink import Record
from tests.test_dispatcher import core
from tests.test_telemetry import _recorder

# More loop turns than any of these wake-ups takes to reach the code after its wait.
TURNS = range(10)


async def _turns(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


# --- the primitive --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("woken_by", ["event", "timeout"])
async def test_wait_set_passes_on_every_cancellation_whatever_turn_of_its_wake_up_it_comes_in(woken_by: str) -> None:
    for turns in TURNS:
        event = asyncio.Event()
        task = asyncio.create_task(wait_set(event, 30 if woken_by == "event" else 0))
        await asyncio.sleep(0)  # it waits now
        if woken_by == "event":
            event.set()
        await _turns(turns)
        requested = task.cancel()  # False once it has finished: then nothing is cancelled, nothing is lost
        [outcome] = await asyncio.gather(task, return_exceptions=True)
        assert isinstance(outcome, asyncio.CancelledError) == requested, f"a cancellation lost after {turns} turns"
        if not requested:
            assert outcome is (woken_by == "event")


async def test_wait_set_says_whether_the_event_was_set() -> None:
    event = asyncio.Event()
    assert await wait_set(event, 0.01) is False
    asyncio.get_running_loop().call_soon(event.set)
    assert await wait_set(event, 30) is True
    assert await wait_set(event, 0) is True  # already set: no wait at all
    assert await wait_set(asyncio.Event(), 0) is False


# --- the components' loops -------------------------------------------------------------------------------------


async def _until_waiting(event: asyncio.Event) -> None:
    """Until a task waits on ``event`` (its loop has done its work and sleeps)."""
    async with asyncio.timeout(5):
        while not event._waiters:  # type: ignore[attr-defined]  # noqa: ASYNC110 - a waiter, not an event, to wait for
            await asyncio.sleep(0.001)


async def _stop_at_every_turn(
    start: Callable[[], Awaitable[Any]],
    wake: Callable[[Any], None],
    stop: Callable[[Any], Awaitable[None]],
    wake_event: Callable[[Any], asyncio.Event],
) -> None:
    """Start the component, wait until its loop sleeps on ``wake_event``, wake it, and stop it ``turns`` loop turns
    later, for every turn count: each stop ends without TaskOwner having to ask twice."""
    for turns in TURNS:
        component = await start()
        await _until_waiting(wake_event(component))
        with structlog.testing.capture_logs() as logs:
            wake(component)
            await _turns(turns)
            async with asyncio.timeout(tasks.RECANCEL_S * 3):
                await stop(component)
        ignored = [e for e in logs if e["event"] == "task_ignored_cancel"]
        assert not ignored, f"stopped {turns} turns after a wake-up, a task let its cancellation go: {ignored}"


async def test_the_telemetry_recorder_stops_at_once_whenever_a_reading_has_just_woken_it(tmp_path: Path) -> None:
    async with Store(tmp_path / "gw.sqlite3") as store:

        async def start() -> Any:
            return await _recorder(store, flush_interval_s=30).__aenter__()

        def wake(rec: Any) -> None:
            rec.put(Record.telemetry("pump1", {"reading": 1}))  # the first reading held wakes the writer

        async def stop(rec: Any) -> None:
            await rec.__aexit__(None, None, None)
            assert rec.pending == 0  # and what it held was written on the way out

        await _stop_at_every_turn(start, wake, stop, lambda rec: rec._wake)


async def test_the_scheduler_stops_at_once_whenever_it_has_just_been_woken(tmp_path: Path) -> None:
    async with core(tmp_path) as c:

        async def start() -> Any:
            return await Scheduler(c.store, c.service, SystemClock()).__aenter__()

        async def stop(scheduler: Any) -> None:
            await scheduler.__aexit__(None, None, None)

        await _stop_at_every_turn(start, lambda scheduler: scheduler.wake(), stop, lambda s: s._wake)


# --- TaskOwner's net --------------------------------------------------------------------------------------------


async def test_a_task_that_lets_its_cancellation_go_is_cancelled_again_and_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tasks, "RECANCEL_S", 0.05)
    owner = TaskOwner("test")
    await owner.open()

    async def swallows_one() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            pass  # what the 3.11 wait_for did, in effect: the loop goes on
        await asyncio.Event().wait()

    owner.spawn("stubborn", swallows_one())
    await asyncio.sleep(0)
    with structlog.testing.capture_logs() as logs:
        async with asyncio.timeout(5):
            await owner.close()
    assert owner.running == 0
    assert [(e["event"], e["task"]) for e in logs] == [("task_ignored_cancel", "gatewayd[test].stubborn")]


async def test_a_clean_up_on_cancellation_shorter_than_the_grace_is_left_to_finish() -> None:
    owner = TaskOwner("test")
    await owner.open()
    said_goodbye = asyncio.Event()

    async def polite() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await asyncio.sleep(0.3)  # the uplink's goodbye to the broker: at most 4 s
            said_goodbye.set()
            raise

    owner.spawn("polite", polite())
    await asyncio.sleep(0)
    with structlog.testing.capture_logs() as logs:
        await owner.close()
    assert said_goodbye.is_set()
    assert not [e for e in logs if e["event"] == "task_ignored_cancel"]
