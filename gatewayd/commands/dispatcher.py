"""Runs accepted commands on their devices: one at a time per device, highest priority first, oldest first
within a priority, never after the deadline.

Every state change is committed before the next step: ``dispatched`` before the device is asked, the final
state before waiters hear of it. A command cut off by a crash or a forced stop stays ``dispatched`` in the store
and is sent again after restart with the same id; devices use the id to answer a repeat without acting twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import TracebackType
from typing import Any

import structlog

from gatewayd.commands.model import Clock, CommandRecord, State, Transition
from gatewayd.devices.base import Device
from gatewayd.errors import DeviceRejected, GatewayError, StoreUnavailable
from gatewayd.store import Store
from gatewayd.store import commands as sql
from gatewayd.tasks import TaskOwner

log = structlog.get_logger("gatewayd.dispatcher")

FinalCallback = Callable[[CommandRecord], None]
STORE_RETRY_S = 1.0


class Dispatcher:
    def __init__(
        self,
        store: Store,
        devices: dict[str, Device],
        *,
        clock: Clock,
        on_final: FinalCallback,
        sweep_interval_s: float = 1.0,
    ):
        self._store = store
        self._devices = devices
        self._clock = clock
        self._on_final = on_final
        self._sweep_interval_s = sweep_interval_s
        self._queues: dict[str, asyncio.PriorityQueue[tuple[int, int, str]]] = {}
        self._queued: dict[str, CommandRecord] = {}  # command id -> record, for everything waiting in a queue
        self._busy: dict[str, CommandRecord] = {}  # device -> command being executed
        self._idle = asyncio.Event()
        self._idle.set()
        self._draining = False
        self._tasks = TaskOwner("dispatcher")
        self.executed = 0

    async def __aenter__(self) -> Dispatcher:
        await self._tasks.open()
        try:
            recovered = await self._store.read(sql.open_commands)
            for rec in recovered:
                await self._recover(rec)
            for name in self._devices:
                self._queues.setdefault(name, asyncio.PriorityQueue())
                self._tasks.spawn(f"{name}.dispatch", self._work(name))
            self._tasks.spawn("sweep", self._sweep())
        except BaseException:
            await self._tasks.close()
            raise
        if recovered:
            log.info("commands_recovered", count=len(recovered))
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._tasks.close()

    async def _recover(self, rec: CommandRecord) -> None:
        if rec.device not in self._devices:
            await self._finish(
                rec, State.FAILED, code="unknown_device", message=f"device {rec.device!r} is no longer configured"
            )
            return
        if rec.state is not State.QUEUED:
            detail = "requeued after restart" if rec.state is State.DISPATCHED else "queued after restart"
            await self._store.write(lambda c: sql.transition(c, rec.seq, self._transition(State.QUEUED, detail)))
            rec.state = State.QUEUED
        self.push(rec)

    # --- queue ---------------------------------------------------------------------------------------------------

    def push(self, rec: CommandRecord) -> None:
        """Put an accepted (committed, state queued) command in its device's queue."""
        self._queued[rec.id] = rec
        self._queues.setdefault(rec.device, asyncio.PriorityQueue()).put_nowait((int(rec.priority), rec.seq, rec.id))

    def queued(self, device: str | None = None) -> int:
        if device is None:
            return len(self._queued)
        return sum(1 for rec in self._queued.values() if rec.device == device)

    def in_flight(self) -> int:
        return len(self._busy)

    def snapshot(self) -> dict[str, Any]:
        return {
            "queued": self.queued(),
            "in_flight": self.in_flight(),
            "per_device": {
                name: {"queued": self.queued(name), "executing": self._busy[name].id if name in self._busy else None}
                for name in self._devices
            },
        }

    async def drain(self, grace_s: float) -> int:
        """Stop starting commands; wait up to ``grace_s`` for those executing. Returns how many did not finish."""
        self._draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), grace_s)
        except TimeoutError:
            log.warning("drain_timeout", executing=[r.id for r in self._busy.values()], grace_s=grace_s)
        return len(self._busy)

    # --- workers -----------------------------------------------------------------------------------------------

    def _transition(self, state: State, detail: str | None = None) -> Transition:
        return Transition(state, self._clock.wall(), self._clock.mono(), self._clock.boot_id, detail)

    async def _work(self, name: str) -> None:
        queue = self._queues[name]
        device = self._devices[name]
        while not self._draining:
            _prio, _seq, command_id = await queue.get()
            rec = self._queued.pop(command_id, None)
            if rec is None:
                continue  # expired or cancelled while waiting
            if self._draining:
                self._queued[command_id] = rec  # stays queued in the store: it runs after restart
                return
            self._busy[name] = rec
            self._idle.clear()
            try:
                await self._run(device, rec)
            finally:
                del self._busy[name]
                if not self._busy:
                    self._idle.set()

    async def _run(self, device: Device, rec: CommandRecord) -> None:
        bound = structlog.contextvars.bound_contextvars(command_id=rec.id, device=rec.device)
        with bound:
            why = rec.expired(self._clock)
            if why is not None:
                await self._finish(rec, State.EXPIRED, code="expired", message=why)
                return
            try:
                await self._store.write(lambda c: sql.transition(c, rec.seq, self._transition(State.DISPATCHED)))
            except StoreUnavailable as err:
                log.error("dispatch_not_recorded", error=err.message)
                await asyncio.sleep(STORE_RETRY_S)
                self.push(rec)  # not dispatched: try again later, the store may recover
                return
            rec.state = State.DISPATCHED
            log.info("command_dispatched", action=rec.action)
            try:
                result = await device.execute(rec.id, rec.action, rec.params)
            except DeviceRejected as err:
                await self._finish(rec, State.REJECTED, code=err.code, message=err.message)
            except GatewayError as err:
                await self._finish(rec, State.FAILED, code=err.code, message=err.message)
            except Exception as err:  # a bug in one device's code must not stop every device
                log.exception("device_execute_crashed", action=rec.action)
                await self._finish(rec, State.FAILED, code="internal_error", message=f"{type(err).__name__}: {err}")
            else:
                self.executed += 1
                await self._finish(rec, State.SUCCEEDED, result=result)

    async def _finish(
        self,
        rec: CommandRecord,
        state: State,
        *,
        result: dict[str, Any] | None = None,
        code: str | None = None,
        message: str | None = None,
    ) -> None:
        t = self._transition(state, message)
        while True:
            try:
                await self._store.write(
                    lambda c: sql.transition(c, rec.seq, t, result=result, error_code=code, error_message=message)
                )
                break
            except StoreUnavailable as err:
                # The outcome must not be lost while we live; after a crash the device's memory of the id covers it.
                log.error("final_state_not_recorded", command_id=rec.id, state=state.value, error=err.message)
                await asyncio.sleep(STORE_RETRY_S)
        rec.state, rec.result, rec.error_code, rec.error_message = state, result, code, message
        rec.updated_at = t.at
        rec.transitions.append(t)
        emit = log.info if state is State.SUCCEEDED else log.warning
        emit("command_finished", command_id=rec.id, device=rec.device, state=state.value, error_code=code)
        self._on_final(rec)

    async def _sweep(self) -> None:
        """Expire queued commands whose deadline passed while they waited (a busy or absent device)."""
        while True:
            await asyncio.sleep(self._sweep_interval_s)
            for rec in [r for r in self._queued.values() if r.expired(self._clock) is not None]:
                if self._queued.pop(rec.id, None) is not None:
                    await self._finish(rec, State.EXPIRED, code="expired", message=rec.expired(self._clock))
