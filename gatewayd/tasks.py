"""A component's tasks: one TaskGroup of named tasks, cancelled and awaited when the component closes.

A task that crashes makes the TaskGroup cancel its siblings and the task that opened it (the supervisor), so a
broken component brings the daemon down in order instead of leaving it half alive; systemd restarts it.

Waiting with a timeout is :func:`wait_set` or ``asyncio.timeout``, never ``asyncio.wait_for``: on Python 3.11 (what
Raspberry Pi OS Bookworm ships) ``wait_for`` loses a cancellation that arrives in the loop turn its inner wait
finishes (cpython gh-86296, fixed in 3.12), and the task stopped at that moment runs on: a stop that hangs until
systemd kills the daemon. ``asyncio.timeout`` waits in the caller's own task, where a cancellation is never lost.
ruff bans ``asyncio.wait_for`` in the daemon (pyproject.toml, TID251).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import structlog

T = TypeVar("T")

log = structlog.get_logger("gatewayd.tasks")

# How long close() waits for cancelled tasks before it asks again and says which one let its cancellation go:
# longer than any clean-up a task does when cancelled (the uplink's goodbye: at most 4 s), far inside systemd's
# TimeoutStopSec (30 s).
RECANCEL_S = 5.0


async def wait_set(event: asyncio.Event, timeout_s: float | None) -> bool:
    """Wait until ``event`` is set, at most ``timeout_s`` seconds (None: no limit). True if it is set.

    A cancellation of the caller always propagates, even one that arrives in the turn the event is set."""
    if event.is_set():
        return True
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
    except TimeoutError:
        return event.is_set()
    return True


class TaskOwner:
    def __init__(self, owner: str):
        self.owner = owner
        self._tg: asyncio.TaskGroup | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def open(self) -> None:
        self._tg = asyncio.TaskGroup()
        await self._tg.__aenter__()

    def spawn(self, name: str, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        if self._tg is None:
            coro.close()
            raise RuntimeError(f"{self.owner}: tasks can only start while the component is open")
        task = self._tg.create_task(coro, name=f"gatewayd[{self.owner}].{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @property
    def running(self) -> int:
        return len(self._tasks)

    async def close(self) -> None:
        tg, self._tg = self._tg, None
        if tg is None:
            return
        pending = set(self._tasks)
        for task in pending:
            task.cancel()
        # A task that let its cancellation go (code that catches it, as asyncio.wait_for on 3.11 can) would hold the
        # stop for ever: it is asked again every RECANCEL_S, and named in the log.
        while pending:
            _done, pending = await asyncio.wait(pending, timeout=RECANCEL_S)
            for task in pending:
                log.warning("task_ignored_cancel", task=task.get_name(), effect="cancelled again")
                task.cancel()
        await tg.__aexit__(None, None, None)
