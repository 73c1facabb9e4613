"""The outbox's one owner (gatewayd.uplink.outbox.Outbox): whichever component adds or removes rows (the recorder's
telemetry and events, the dispatcher's results in the transaction of their final state, a result sent again, the
uplink's deletes), the figures the page, /metrics and the budget read are those of the table after that commit, and
the uplink is woken by every row added. Before, a result committed by the dispatcher left the depth on the status
page where the last telemetry write had put it."""

from __future__ import annotations

import contextlib
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from gatewayd.clock import SystemClock
from gatewayd.observability.metrics import OUTBOX_BYTES, OUTBOX_ROWS
from gatewayd.store import outbox as sql
from gatewayd.telemetry.sink import Record
from tests.test_dispatcher import Core, core
from tests.test_telemetry import _recorder


class Rig:
    """The command core with an outbox (tests.test_dispatcher.core), counting the uplink's wake-ups."""

    def __init__(self, c: Core):
        assert c.box is not None
        self.store, self.box, self.service, self.final = c.store, c.box, c.service, c.final
        self.woken = 0
        self.box.listeners.append(self._woken)

    def _woken(self) -> None:
        self.woken += 1

    async def table(self) -> sql.OutboxStats:
        """The figures as the table has them now, read apart from the owner."""
        return await self.store.read(sql.stats)


@contextlib.asynccontextmanager
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    async with core(tmp_path, outbox=True) as c:
        yield Rig(c)


async def test_every_result_the_dispatcher_commits_is_in_the_figures_and_wakes_the_uplink(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        ids = [f"c{i}" for i in range(25)]
        for command_id in ids:
            await r.service.submit({"id": command_id, "device": "pump1", "action": "start"}, source="http")
        for command_id in ids:
            await r.final(command_id)
        table = await r.table()
        assert table.by_kind == {"result": 25}
        assert r.box.stats == table  # not the figures from before the results
        assert OUTBOX_ROWS._value.get() == 25 and OUTBOX_BYTES._value.get() == table.bytes
        assert r.woken >= 1  # coalesced when results commit together, but never missed


async def test_whoever_changes_the_outbox_the_figures_follow_the_table(tmp_path: Path) -> None:
    """Recorder, dispatcher, a result sent again and the uplink's deletes, interleaved at random: after each step
    the owner's figures are the table's."""
    rng = random.Random(21)
    async with rig(tmp_path) as r:
        async with _recorder(r.store, flush_interval_s=30, write_behind_s=0, box=r.box) as rec:
            n = 0

            async def telemetry() -> None:
                for i in range(rng.randint(1, 5)):
                    rec.put(Record.telemetry("pump1", {"speed": i}))
                rec.put(Record.of_event("pump1", "overtemp", {"temperature_c": 70}, severity="warning"))
                await rec.flush()

            async def command() -> None:
                nonlocal n
                n += 1
                await r.service.submit({"id": f"m{n}", "device": "pump1", "action": "start"}, source="http")
                await r.final(f"m{n}")

            async def again() -> None:
                stamp = SystemClock()
                finished = await r.service.get(f"m{n}") if n else None
                if finished is not None:
                    await r.box.add(
                        [sql.result_row(finished, mono=stamp.monotonic(), boot_id=stamp.boot_id, synced=True)]
                    )

            async def acknowledged() -> None:
                rows = await r.box.fetch(rng.randint(1, 6))
                await r.box.delete([row.key for row in rows])

            steps: list[Any] = [telemetry, command, again, acknowledged]
            for _ in range(60):
                await rng.choice(steps)()
                assert r.box.stats == await r.table()
                assert rec.stats == r.box.stats  # the recorder reads the same figures, for its budget and the page
