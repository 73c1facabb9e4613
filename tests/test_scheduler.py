"""Scheduled actions in-process (CommandService, Dispatcher and Scheduler on a real Store): the max on-time
switch-off and the end of an on-period are written with the on command, armed when it reaches the device, fired
with a gateway-made id, cancelled by a manual off or by an on that never ran, and resumed after a restart, late
rather than never."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from gatewayd.clock import SystemClock
from gatewayd.commands.dispatcher import Dispatcher
from gatewayd.commands.model import Priority, State
from gatewayd.commands.scheduler import Scheduler
from gatewayd.commands.service import CommandService, Then
from gatewayd.config.models import CommandsSection
from gatewayd.store import Store, schedule
from tests.test_dispatcher import PROFILES, Devices, RecordingDevice


def timed_relay(max_on_s: float) -> Any:
    relay = PROFILES["gpio_relay"]
    return relay.model_copy(update={"safety": relay.safety.model_copy(update={"max_on_s": max_on_s})})


class Rig:
    def __init__(self, store: Store, relay: RecordingDevice, service: CommandService, scheduler: Scheduler):
        self.store, self.relay, self.service, self.scheduler = store, relay, service, scheduler

    async def final(self, command_id: str, within_s: float = 5.0) -> Any:
        async with asyncio.timeout(within_s):
            while True:
                with contextlib.suppress(Exception):
                    rec = await self.service.get(command_id)
                    if rec.state.final:
                        return rec
                await asyncio.sleep(0.01)

    async def rows(self) -> list[schedule.Scheduled]:
        return await self.store.read(lambda c: schedule.listing(c, open_only=False))


@contextlib.asynccontextmanager
async def rig(db: Path, max_on_s: float = 0.3, clock: SystemClock | None = None) -> AsyncIterator[Rig]:
    clock = clock or SystemClock()
    relay = RecordingDevice("relay1", timed_relay(max_on_s))
    devices = Devices({"relay1": relay})
    async with Store(db) as store:
        service: CommandService
        scheduler: Scheduler
        dispatcher = Dispatcher(
            store,
            devices.devices,  # type: ignore[arg-type]
            clock=clock,
            on_final=lambda rec: service.on_final(rec),
            on_armed=lambda: scheduler.wake(),
        )
        service = CommandService(store, devices, CommandsSection(), clock, dispatcher=dispatcher)  # type: ignore[arg-type]
        scheduler = Scheduler(store, service, clock)
        async with dispatcher:
            service.open_intake()
            async with scheduler:
                yield Rig(store, relay, service, scheduler)


async def test_an_on_is_followed_by_its_switch_off_with_a_gateway_made_id(tmp_path: Path) -> None:
    async with rig(tmp_path / "g.db") as r:
        await r.service.submit({"id": "on-1", "device": "relay1", "action": "on"}, source="http")
        assert (await r.final("on-1")).state is State.SUCCEEDED
        [row] = await r.rows()
        assert (row.kind, row.action, row.after, row.priority) == ("max_on", "off", "on-1", Priority.CRITICAL)
        off = await r.final(row.command_id)
        assert off.state is State.SUCCEEDED and off.source == "safety" and off.id.startswith("~")
        assert r.relay.executed == ["on-1", row.command_id]
        assert (await r.rows())[0].state == schedule.FIRED


async def test_the_switch_off_is_written_before_the_on_is_acknowledged(tmp_path: Path) -> None:
    async with rig(tmp_path / "g.db") as r:
        r.relay.gate = asyncio.Event()  # the relay does not act yet
        await r.service.submit({"id": "on-1", "device": "relay1", "action": "on"}, source="http")
        [row] = await r.rows()  # committed with the command
        assert row.state in (schedule.WAITING, schedule.ARMED)
        r.relay.gate.set()


async def test_a_manual_off_cancels_it_and_an_on_that_never_ran_takes_it_away(tmp_path: Path) -> None:
    async with rig(tmp_path / "g.db", max_on_s=30) as r:
        await r.service.submit({"id": "on-1", "device": "relay1", "action": "on"}, source="http")
        await r.final("on-1")
        await r.service.submit({"id": "off-1", "device": "relay1", "action": "off"}, source="http")
        await r.final("off-1")
        [row] = await r.rows()
        assert (row.state, row.reason) == (schedule.CANCELLED, "done by off-1")
        # An on whose deadline passes before it reaches the relay: its switch-off is cancelled, never armed.
        r.relay.gate = asyncio.Event()
        await r.service.submit({"id": "busy", "device": "relay1", "action": "off"}, source="http")
        await r.service.submit({"id": "late-on", "device": "relay1", "action": "on", "ttl_s": 0.2}, source="http")
        await asyncio.sleep(0.3)
        r.relay.gate.set()
        assert (await r.final("late-on")).state is State.EXPIRED
        rows = {x.after: x for x in await r.rows()}
        assert rows["late-on"].state == schedule.CANCELLED and rows["late-on"].due_at is None


async def test_after_a_restart_an_armed_switch_off_fires_and_an_overdue_one_at_once(tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    async with rig(db, max_on_s=30) as r:
        await r.service.submit({"id": "on-1", "device": "relay1", "action": "on"}, source="http")
        await r.final("on-1")
        [row] = await r.rows()
        assert row.state == schedule.ARMED
    # The gateway was away past the due time (another boot: only the wall clock is left, and it says overdue).
    await_row = row

    class Later(SystemClock):
        def wall(self) -> float:
            return super().wall() + 60

    async with rig(db, max_on_s=30, clock=Later(boot_id="another-boot")) as r:
        off = await r.final(await_row.command_id, within_s=3)
        assert off.state is State.SUCCEEDED
        [again] = await r.rows()
        assert again.state == schedule.FIRED and again.reason is not None and "late" in again.reason


async def test_a_switch_off_fired_twice_runs_once(tmp_path: Path) -> None:
    async with rig(tmp_path / "g.db", max_on_s=30) as r:
        await r.service.submit({"id": "on-1", "device": "relay1", "action": "on"}, source="http")
        await r.final("on-1")
        [row] = await r.rows()
        payload = {"device": "relay1", "action": "off", "priority": "critical"}
        for _ in range(3):  # a crash between the send and its record sends it again at the next start
            await r.service.submit(payload, source="safety", command_id=row.command_id)
        await r.final(row.command_id)
        assert r.relay.executed.count(row.command_id) == 1


async def test_the_end_of_an_on_period_is_superseded_by_a_newer_instruction(tmp_path: Path) -> None:
    async with rig(tmp_path / "g.db", max_on_s=300) as r:
        period = [Then("on_period", "off", 30.0, Priority.HIGH, "interpret")]
        await r.service.submit({"id": "on-a", "device": "relay1", "action": "on"}, source="nl", then=period)
        await r.final("on-a")
        await r.service.submit({"id": "on-b", "device": "relay1", "action": "on"}, source="nl", then=period)
        await r.final("on-b")
        rows = {(x.after, x.kind): x for x in await r.rows()}
        assert rows[("on-a", "on_period")].state == schedule.CANCELLED  # the newest instruction decides
        assert rows[("on-b", "on_period")].state == schedule.ARMED
        assert rows[("on-a", "max_on")].state == schedule.ARMED  # the limit is never superseded
