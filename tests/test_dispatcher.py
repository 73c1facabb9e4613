"""The command core in-process: CommandService and Dispatcher on a real Store, with devices that record what they
were asked. The store and the dispatcher must never disagree: a command that was committed but never reached a
queue (its submitter cancelled between the COMMIT and the push, or any other gap) is found, counted and run."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gatewayd.clock import SystemClock
from gatewayd.commands.dispatcher import Dispatcher
from gatewayd.commands.model import CommandRecord, Priority, State, Transition
from gatewayd.commands.service import CommandService
from gatewayd.config import load_config
from gatewayd.config.models import CommandsSection
from gatewayd.config.profiles import Profile
from gatewayd.devices.base import Availability
from gatewayd.errors import QueueFull, ShuttingDown
from gatewayd.observability.metrics import DISPATCHER_GAPS
from gatewayd.store import Store
from gatewayd.store import commands as sql
from gatewayd.uplink.outbox import Outbox
from tests.conftest import CONFIG

PROFILES = load_config(CONFIG).profiles


class RecordingDevice:
    """A device that does what it is asked after ``latency_s`` (or when ``gate`` is set) and remembers it."""

    def __init__(self, name: str, profile: Profile, latency_s: float = 0.0):
        self.name = name
        self.profile = profile
        self.latency_s = latency_s
        self.gate: asyncio.Event | None = None
        self.executed: list[str] = []
        self._availability = Availability(name, available=True)

    @property
    def availability(self) -> Availability:
        return self._availability

    async def execute(self, command_id: str, action: str, params: dict[str, Any]) -> dict[str, Any]:
        if self.gate is not None:
            await self.gate.wait()
        await asyncio.sleep(self.latency_s)
        self.executed.append(command_id)
        return {"ok": True}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}


class Devices:
    """What CommandService needs of the DeviceManager."""

    def __init__(self, devices: dict[str, RecordingDevice]):
        self.devices = devices

    def profiles(self) -> dict[str, Profile]:
        return {name: d.profile for name, d in self.devices.items()}


class Core:
    def __init__(
        self,
        store: Store,
        pump: RecordingDevice,
        service: CommandService,
        dispatcher: Dispatcher,
        box: Outbox | None = None,
    ):
        self.store, self.pump, self.service, self.dispatcher, self.box = store, pump, service, dispatcher, box

    async def final(self, command_id: str, within_s: float = 5.0) -> CommandRecord:
        async with asyncio.timeout(within_s):
            while True:
                rec = await self.service.get(command_id)
                if rec.state.final:
                    return rec
                await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def core(tmp_path: Path, *, outbox: bool = False, **commands: Any) -> AsyncIterator[Core]:
    """The command core on a real store, one recording pump1; with ``outbox``, results go to an outbox (as with
    an uplink), readable as ``Core.box``."""
    clock = SystemClock()
    pump = RecordingDevice("pump1", PROFILES["sim_pump"])
    devices = Devices({"pump1": pump})
    async with Store(tmp_path / "g.db") as store:
        box = Outbox(store, clock.wall) if outbox else None
        if box is not None:
            await box.refresh()
        service: CommandService
        dispatcher = Dispatcher(
            store,
            devices.devices,  # type: ignore[arg-type]
            clock=clock,
            on_final=lambda rec: service.on_final(rec),
            reconcile_interval_s=commands.get("reconcile_interval_s", 10.0),
            outbox=box,
        )
        service = CommandService(
            store,
            devices,  # type: ignore[arg-type]
            CommandsSection(**commands),
            clock,
            dispatcher=dispatcher,
        )
        async with dispatcher:
            service.open_intake()
            yield Core(store, pump, service, dispatcher, box)


def gaps(found_by: str) -> float:
    return DISPATCHER_GAPS.labels(found_by)._value.get()


async def strand(store: Store, command_id: str, state: State = State.QUEUED) -> None:
    """A command committed as the service would, that never reached the dispatcher."""
    clock = SystemClock()
    now, mono = clock.wall(), clock.monotonic()
    rec = CommandRecord(
        id=command_id,
        device="pump1",
        action="read",
        params={},
        priority=Priority.NORMAL,
        source="mqtt",
        user=None,
        state=state,
        created_at=now,
        ttl_s=60,
        deadline_at=now + 60,
        deadline_mono=mono + 60,
        boot_id=clock.boot_id,
        updated_at=now,
    )
    steps = [State.RECEIVED, State.ACCEPTED, State.QUEUED] + ([State.DISPATCHED] if state is State.DISPATCHED else [])
    await store.write(lambda c: sql.insert(c, rec, [Transition(s, now, mono, clock.boot_id) for s in steps]))


async def test_a_stranded_command_is_found_by_the_reconciliation_counted_and_run_once(tmp_path: Path) -> None:
    async with core(tmp_path, reconcile_interval_s=0.05) as c:
        before = gaps("reconciliation")
        await strand(c.store, "stranded")
        rec = await c.final("stranded")
        assert rec.state is State.SUCCEEDED
        assert c.pump.executed == ["stranded"]
        assert gaps("reconciliation") == before + 1


async def test_a_replay_of_a_stranded_command_queues_it_at_once(tmp_path: Path) -> None:
    async with core(tmp_path) as c:  # the reconciliation would take 10 s: the replay must not wait for it
        before = gaps("replay")
        await strand(c.store, "redelivered")
        rec, created = await c.service.submit({"id": "redelivered", "device": "pump1", "action": "read"}, source="mqtt")
        assert not created and rec.state is State.QUEUED
        assert (await c.final("redelivered", within_s=2)).state is State.SUCCEEDED
        assert c.pump.executed == ["redelivered"] and gaps("replay") == before + 1
        # Replayed again once done: no gap, nothing run again.
        await c.service.submit({"id": "redelivered", "device": "pump1", "action": "read"}, source="mqtt")
        await asyncio.sleep(0.05)
        assert c.pump.executed == ["redelivered"] and gaps("replay") == before + 1


async def test_a_stranded_dispatched_command_is_requeued_as_possibly_sent(tmp_path: Path) -> None:
    async with core(tmp_path, reconcile_interval_s=0.05) as c:
        await strand(c.store, "was-dispatched", State.DISPATCHED)
        rec = await c.final("was-dispatched")
        assert rec.state is State.SUCCEEDED and c.pump.executed == ["was-dispatched"]
        details = [t.detail for t in rec.transitions if t.state is State.QUEUED]
        assert any(d and "requeued" in d for d in details), details


async def test_a_submitter_cancelled_during_its_commit_still_gets_its_command_run(tmp_path: Path) -> None:
    async with core(tmp_path) as c:
        for i in range(20):
            task = asyncio.create_task(
                c.service.submit({"id": f"cut-{i}", "device": "pump1", "action": "read"}, source="mqtt")
            )
            for _ in range(i % 4):  # cancelled at different points: before, during and after the commit
                await asyncio.sleep(0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.sleep(0.2)
        stored = {r.id: r for r in await c.store.read(lambda conn: sql.listing(conn, limit=100))}
        for command_id, rec in stored.items():
            assert (await c.final(command_id)).state is State.SUCCEEDED, rec
        assert sorted(c.pump.executed) == sorted(stored)  # each committed one ran, once
        assert c.dispatcher.queued() == 0


async def test_a_known_id_is_answered_before_queue_full_or_shutting_down(tmp_path: Path) -> None:
    async with core(tmp_path, max_queued_per_device=2, critical_reserve_per_device=1) as c:
        c.pump.gate = asyncio.Event()
        first = {"id": "busy", "device": "pump1", "action": "read"}
        await c.service.submit(first, source="http")
        for i in range(2):
            await c.service.submit({"id": f"wait-{i}", "device": "pump1", "action": "read"}, source="http")
        with pytest.raises(QueueFull):
            await c.service.submit({"id": "one-too-many", "device": "pump1", "action": "read"}, source="http")
        rec, created = await c.service.submit({"id": "wait-1", "device": "pump1", "action": "read"}, source="mqtt")
        assert not created and rec.id == "wait-1"  # not queue_full: it is the command already waiting
        # Critical commands have a reserve of their own, not an unbounded bypass.
        critical = {"device": "pump1", "action": "stop", "priority": "critical"}
        await c.service.submit({**critical, "id": "estop-1"}, source="http")
        with pytest.raises(QueueFull):
            await c.service.submit({**critical, "id": "estop-2"}, source="http")
        c.service.close_intake()
        rec, created = await c.service.submit({"id": "wait-0", "device": "pump1", "action": "read"}, source="mqtt")
        assert not created and rec.state is State.QUEUED
        with pytest.raises(ShuttingDown):
            await c.service.submit({"id": "new-one", "device": "pump1", "action": "read"}, source="mqtt")
        c.pump.gate.set()
