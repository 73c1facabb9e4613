"""The end of an on-period: "switch the irrigation pump on for 10 minutes" is the on command now and the device's
off action ``duration_s`` after the on command succeeded.

The pending off is a row in ``interpret_followups``, written right after the on command is accepted, so it
survives a restart: on start every row is picked up again and the remaining time is worked out from the on
command's ``succeeded`` transition (monotonic within the same boot, else wall clock; an unknown or negative
remainder sends the off at once, the safe side for an actuator). The off is an ordinary command of its own
(priority high, ``source: "interpret"``, id ``<on id>.off``): durable, visible, run once even if submitted twice.
An on command that does not succeed takes its pending off with it. A newer natural-language on or off for the
same device replaces the pending off (the newest instruction decides how long the device runs). The profile's
``max_on_s`` still applies on its own.
"""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import dataclass

import structlog

from gatewayd.commands.model import Clock, CommandRecord, State
from gatewayd.commands.service import CommandService
from gatewayd.errors import GatewayError, ShuttingDown, StoreUnavailable
from gatewayd.resilience import Clock as ResilienceClock
from gatewayd.store import Store
from gatewayd.tasks import TaskOwner

log = structlog.get_logger("gatewayd.interpret")


@dataclass(frozen=True)
class FollowUp:
    command_id: str
    device: str
    action: str
    after_s: float
    user: str | None
    created_at: float

    @property
    def off_id(self) -> str:
        return f"{self.command_id[:120]}.off"


class FollowUps:
    def __init__(self, store: Store, service: CommandService, tasks: TaskOwner, clock: Clock, sleeper: ResilienceClock):
        self._store = store
        self._service = service
        self._tasks = tasks
        self._clock = clock  # wall, monotonic and boot id: how long ago the on command succeeded
        self._sleeper = sleeper  # the wait itself
        self._pending: dict[str, tuple[FollowUp, asyncio.Task[None]]] = {}  # on command id -> its off

    @property
    def pending(self) -> list[FollowUp]:
        return [f for f, _ in self._pending.values()]

    async def resume(self) -> int:
        def job(conn: sqlite3.Connection) -> list[FollowUp]:
            rows = conn.execute(
                "SELECT command_id, device, action, after_s, user, created_at FROM interpret_followups ORDER BY rowid"
            )
            return [FollowUp(r[0], r[1], r[2], float(r[3]), r[4], float(r[5])) for r in rows]

        found = await self._store.read(job)
        for follow in found:
            self._start(follow)
        if found:
            log.info("followups_resumed", count=len(found))
        return len(found)

    async def schedule(self, rec: CommandRecord, off_action: str, after_s: float) -> FollowUp:
        follow = FollowUp(rec.id, rec.device, off_action, after_s, rec.user, self._clock.wall())
        await self._store.write(
            lambda c: c.execute(
                "INSERT OR REPLACE INTO interpret_followups (command_id, device, action, after_s, user, created_at) "
                "VALUES (?,?,?,?,?,?)",
                (follow.command_id, follow.device, follow.action, follow.after_s, follow.user, follow.created_at),
            )
        )
        self._start(follow)
        log.info("followup_scheduled", command_id=rec.id, device=rec.device, action=off_action, after_s=after_s)
        return follow

    async def supersede(self, device: str, by: str, only: str | None = None) -> None:
        """A newer on or off for ``device`` (command ``by``): pending offs for it are dropped; with ``only``, just
        those that would run that off action (one channel of a multi-channel device)."""
        for command_id, (follow, task) in list(self._pending.items()):
            if follow.device == device and command_id != by and (only is None or follow.action == only):
                task.cancel()
                del self._pending[command_id]
                await self._forget(command_id)
                log.info("followup_superseded", command_id=command_id, device=device, by=by)

    def _start(self, follow: FollowUp) -> None:
        task = self._tasks.spawn(f"followup.{follow.command_id[:32]}", self._run(follow))
        self._pending[follow.command_id] = (follow, task)

    async def _forget(self, command_id: str) -> None:
        try:
            await self._store.write(
                lambda c: c.execute("DELETE FROM interpret_followups WHERE command_id = ?", (command_id,))
            )
        except StoreUnavailable as err:
            log.warning("followup_not_removed", command_id=command_id, error=err.message)

    def _remaining(self, follow: FollowUp, rec: CommandRecord) -> float:
        done = next((t for t in reversed(rec.transitions) if t.state is State.SUCCEEDED), None)
        if done is None:
            return 0.0
        if done.boot_id == self._clock.boot_id:
            elapsed = self._clock.mono() - done.mono
        else:
            elapsed = self._clock.wall() - done.at
            if elapsed < 0:  # the wall clock reads before the on command finished: its age is unknown
                return 0.0
        return max(0.0, follow.after_s - elapsed)

    async def _run(self, follow: FollowUp) -> None:
        try:
            rec = await self._service.get(follow.command_id)
            while not rec.state.final:
                rec = await self._service.wait(follow.command_id, 3600.0)
            if rec.state is not State.SUCCEEDED:
                log.info("followup_dropped", command_id=follow.command_id, state=rec.state.value)
            else:
                await self._sleeper.sleep(self._remaining(follow, rec))
                payload = {"device": follow.device, "action": follow.action, "id": follow.off_id, "priority": "high"}
                off, _ = await self._service.submit(payload, source="interpret", user=follow.user)
                log.info("followup_sent", command_id=follow.command_id, off_id=off.id, device=follow.device)
        except (ShuttingDown, StoreUnavailable):
            return  # the row stays: the next start sends it
        except GatewayError as err:
            log.error("followup_failed", command_id=follow.command_id, code=err.code, error=err.message)
        self._pending.pop(follow.command_id, None)
        await self._forget(follow.command_id)
