"""Fires the scheduled actions (``scheduled_actions``, gatewayd.store.schedule) when they come due.

What a command asks for later is written with it, before it is acknowledged (CommandService), armed when it
reaches the wire and settled when it ends (Dispatcher); this component only waits for due times and sends. Each
row sends one ordinary command: durable, visible, with the row's priority (critical for a max on-time) and a
gateway-made id (``~<row id>``) that no client can use, so a switch-off is never answered by someone else's
command, and sending it again after a crash runs it once.

Due times survive restarts: within the boot that armed a row its monotonic due time decides (a wall clock stepped
by NTP cannot stretch it); after a reboot the wall clock does, and a wall clock that reads earlier than the row
was armed (a Pi without a real-time clock, before NTP) makes it due at once. A row overdue at start fires at once:
late rather than never, the safe side for an actuator. While the gateway stops, what is due stays armed for the
next start.
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any

import structlog

from gatewayd.clock import Clock
from gatewayd.commands.model import Priority
from gatewayd.commands.service import CommandService
from gatewayd.errors import GatewayError, ShuttingDown, StoreUnavailable
from gatewayd.store import Store, schedule
from gatewayd.tasks import TaskOwner, wait_set
from gatewayd.timefmt import iso

log = structlog.get_logger("gatewayd.scheduler")

_RETRY_S = 1.0  # a send the store or the gateway could not take now (not the row's fault) is tried again
_IDLE_S = 60.0  # armed rows are read again this often even when nothing woke us (belt and braces)


class Scheduler:
    def __init__(self, store: Store, service: CommandService, clock: Clock):
        self._store = store
        self._service = service
        self._clock = clock
        self._wake = asyncio.Event()
        self._tasks = TaskOwner("scheduler")
        self.fired = 0
        self.open: list[schedule.Scheduled] = []  # waiting and armed, as last read: for the API and the page

    def wake(self) -> None:
        """Something was armed (or cancelled): look at the due times again."""
        self._wake.set()

    async def __aenter__(self) -> Scheduler:
        await self._tasks.open()
        self._tasks.spawn("run", self._run())
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._tasks.close()

    def left_s(self, row: schedule.Scheduled) -> float:
        """Seconds until ``row`` is due (0 when overdue, or when its due time cannot be trusted)."""
        if row.boot_id == self._clock.boot_id and row.due_mono is not None:
            return max(0.0, row.due_mono - self._clock.monotonic())
        if row.due_at is None:
            return 0.0
        now = self._clock.wall()
        if now < row.updated_at:  # the wall clock reads before the row was armed: its age is unknown
            return 0.0
        return max(0.0, row.due_at - now)

    async def listing(self, *, open_only: bool = True, device: str | None = None) -> list[dict[str, Any]]:
        rows = await self._store.read(lambda c: schedule.listing(c, open_only=open_only, device=device))
        return [{**r.to_api(iso), "due_in_s": round(self.left_s(r), 1) if r.state == "armed" else None} for r in rows]

    async def _run(self) -> None:
        first = True
        while True:
            self._wake.clear()
            try:
                armed = await self._store.read(schedule.armed)
                self.open = await self._store.read(schedule.listing)
            except StoreUnavailable:
                await asyncio.sleep(_RETRY_S)
                continue
            if first and armed:
                log.info("scheduled_actions_resumed", armed=len(armed))
            first = False
            due = [r for r in armed if self.left_s(r) <= 0]
            for row in due:
                if not await self._fire(row):
                    await asyncio.sleep(_RETRY_S)
                    break
            if due:
                continue  # read again: firing changed the table
            wait = min((self.left_s(r) for r in armed), default=_IDLE_S)
            await wait_set(self._wake, min(wait, _IDLE_S))

    async def _fire(self, row: schedule.Scheduled) -> bool:
        """Send the row's command; False when it must be tried again later (the gateway stopping, the store)."""
        late_s = self._late_by(row)
        payload = {"device": row.device, "action": row.action, "priority": Priority(row.priority).label}
        try:
            rec, created = await self._service.submit(
                payload, source=row.source, user=row.user, command_id=row.command_id
            )
        except (ShuttingDown, StoreUnavailable) as err:
            log.info("scheduled_action_postponed", id=row.id, device=row.device, reason=err.message)
            return False
        except GatewayError as err:  # refused for good (the device gone from the configuration, say)
            log.error("scheduled_action_refused", id=row.id, device=row.device, code=err.code, error=err.message)
            rec = None
        wall = self._clock.wall()
        fired_as = rec.id if rec is not None else f"refused: {row.command_id}"
        try:
            await self._store.write(lambda c: schedule.fired(c, row.id, fired_as, wall=wall, late_s=late_s))
        except StoreUnavailable:
            return False  # sent (or refused) but not recorded: the next look sends it again, a replay
        self.fired += 1
        emit = log.warning if row.kind == "max_on" else log.info
        emit(
            "scheduled_action_fired",
            id=row.id,
            kind=row.kind,
            device=row.device,
            action=row.action,
            command_id=row.command_id,
            after=row.after,
            late_s=round(late_s, 3),
            created=created if rec is not None else None,
        )
        return True

    def _late_by(self, row: schedule.Scheduled) -> float:
        if row.boot_id == self._clock.boot_id and row.due_mono is not None:
            return max(0.0, self._clock.monotonic() - row.due_mono)
        if row.due_at is None:
            return 0.0
        return max(0.0, self._clock.wall() - row.due_at)
