"""A component's tasks: one TaskGroup of named tasks, cancelled and awaited when the component closes.

A task that crashes makes the TaskGroup cancel its siblings and the task that opened it (the supervisor), so a
broken component brings the daemon down in order instead of leaving it half alive; systemd restarts it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


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
        for task in list(self._tasks):
            task.cancel()
        await tg.__aexit__(None, None, None)
