"""The daemon's telemetry sink: records from devices, shaped, dated and written to the outbox in batches.

``put`` never blocks and never raises: a device's receive path (a serial frame, a GPIO edge on gpiozero's
thread, a Modbus poll) hands a record over and goes on. Records wait in memory and are written every
``outbox.flush_interval_s`` in one transaction (one fsync for hundreds of readings spares the SD card), or at
once when many are waiting. Between two flushes at most ``outbox.max_pending`` telemetry records are held; past
that the oldest are dropped and counted. Events are kept (up to a hard bound well above it).

After each write the outbox's byte budget is enforced: when it holds more than ``outbox.max_bytes``, or the data
directory's filesystem has less than ``outbox.min_free_bytes`` free, the oldest telemetry is deleted (and
counted, across restarts). Command results and events are never deleted to make room. While the storage is full
(below ``store.min_free_bytes``, :mod:`gatewayd.store.space`) new telemetry is not written at all: the reserve
is for the commands already accepted. Events still are.
"""

from __future__ import annotations

import asyncio
import math
import shutil
import sqlite3
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import structlog

from gatewayd import strictjson
from gatewayd.config.models import OutboxSection, TelemetrySection
from gatewayd.config.profiles import Profile, TelemetryPoint
from gatewayd.errors import GatewayError
from gatewayd.observability.metrics import (
    CLOCK_SYNCED,
    OUTBOX_BYTES,
    OUTBOX_OLDEST_AGE,
    OUTBOX_ROWS,
    TELEMETRY_DROPPED,
    TELEMETRY_RECORDS,
    counter,
)
from gatewayd.store import Store
from gatewayd.store import outbox as sql
from gatewayd.store.space import DiskSpace
from gatewayd.tasks import TaskOwner
from gatewayd.telemetry.sink import Record
from gatewayd.telemetry.timestamps import Stamper, sync_probe

log = structlog.get_logger("gatewayd.telemetry")

# Events are never dropped for telemetry's sake; this bound only stops a store that cannot write for hours
# from growing memory without end.
_EVENT_HARD_LIMIT_FACTOR = 4
# A flush is started early once this many records wait (the interval is for quiet times).
_FLUSH_EARLY = 500


@dataclass(frozen=True)
class Reading:
    """A recent telemetry reading, kept in memory for the status page."""

    ts: float
    values: dict[str, Any]


def shape_values(values: Mapping[str, Any], points: Mapping[str, TelemetryPoint]) -> tuple[dict[str, Any], list[str]]:
    """Declared points are coerced to their type where that loses nothing (1 -> true for a bool point, 3.0 -> 3
    for an int); readings outside a point's range are kept and named in the second value; values that are not
    finite numbers become null and are named too. Undeclared values are kept as they came."""
    out: dict[str, Any] = {}
    flagged: list[str] = []
    for name, value in values.items():
        point = points.get(name)
        if isinstance(value, float) and not math.isfinite(value):
            out[name] = None
            flagged.append(name)
            continue
        if point is not None:
            if point.type == "bool" and isinstance(value, int) and value in (0, 1):
                value = bool(value)
            elif point.type == "int" and isinstance(value, float) and value.is_integer():
                value = int(value)
            if isinstance(value, int | float) and not isinstance(value, bool):
                if (point.min is not None and value < point.min) or (point.max is not None and value > point.max):
                    flagged.append(name)
        out[name] = value
    return out, flagged


class Recorder:
    def __init__(
        self,
        store: Store,
        outbox: OutboxSection,
        telemetry: TelemetrySection,
        data_dir: Path,
        *,
        boot_id: str,
        stamper: Stamper | None = None,
        free_bytes: Callable[[], int | None] | None = None,
        space: DiskSpace | None = None,
        forward: bool = True,
        profiles: Callable[[], Mapping[str, Profile]] = dict,
    ):
        self._space = space
        # False without an uplink ([mqtt] enabled = false): records still feed the page (recent readings, last
        # events) but nothing is queued for an outbox nobody drains.
        self.forward = forward
        self.store = store
        self._cfg = outbox
        self._tcfg = telemetry
        self._data_dir = data_dir
        self._boot_id = boot_id
        self.stamper = stamper or Stamper(sync_probe(telemetry.clock_sync))
        # The free space: DiskSpace's last measurement (taken in a thread every [store] space_check_s) when there
        # is one, rather than a statvfs on the event loop at every flush; None while unknown.
        self._free_bytes: Callable[[], int | None]
        if free_bytes is not None:
            self._free_bytes = free_bytes
        elif space is not None:
            self._free_bytes = lambda: space.free
        else:
            self._free_bytes = lambda: shutil.disk_usage(self._data_dir).free
        self._profiles = profiles  # device name -> profile, as the device manager has them now (SIGHUP reloads)
        self._telemetry: deque[sql.NewRow] = deque()
        self._events: deque[sql.NewRow] = deque()
        self._wake = asyncio.Event()
        self._tasks = TaskOwner("telemetry")
        self._failing: str | None = None  # why the last write failed, while it keeps failing
        self._budget_dropping = 0  # telemetry rows dropped for the budget since the drops began (0: none now)
        self.recent: dict[str, deque[Reading]] = {}
        self.last_event: dict[str, dict[str, Any]] = {}
        self.listeners: list[Callable[[], None]] = []  # told after rows were committed (the uplink drains)
        self.stats: sql.OutboxStats | None = None
        self.dropped_pending = 0
        self.invalid = 0
        self._counted = {kind: counter(TELEMETRY_RECORDS, kind) for kind in ("telemetry", "event")}

    async def __aenter__(self) -> Recorder:
        CLOCK_SYNCED.set(int(self.stamper.synced))
        self.stats = await self.store.read(lambda conn: sql.stats(conn, by_kind=False))  # no scan at start-up
        self._publish_stats()
        await self._tasks.open()
        self._tasks.spawn("flush", self._run())
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._tasks.close()
        try:
            await self.flush()  # what arrived since the last flush is not lost on a clean stop
        except GatewayError as err:
            log.error("telemetry_final_flush_failed", error=str(err), records=self.pending)

    # --- the sink --------------------------------------------------------------------------------------------

    def put(self, record: Record) -> None:
        try:
            row = self._row(record)
        except (TypeError, ValueError) as err:
            self.invalid += 1
            counter(TELEMETRY_DROPPED, "invalid").inc()
            log.debug("telemetry_invalid", device=record.device, error=str(err))
            return
        self._counted[record.kind].inc()
        if not self.forward:
            return
        if row.kind == "telemetry":
            if len(self._telemetry) >= self._cfg.max_pending:
                self._telemetry.popleft()
                self.dropped_pending += 1
                counter(TELEMETRY_DROPPED, "pending").inc()
            self._telemetry.append(row)
        else:
            if len(self._events) >= self._cfg.max_pending * _EVENT_HARD_LIMIT_FACTOR:
                self._events.popleft()
                self.dropped_pending += 1
                counter(TELEMETRY_DROPPED, "pending_event").inc()
                log.error("telemetry_event_dropped", device=record.device, reason="store not writing")
            self._events.append(row)
        if self.pending >= _FLUSH_EARLY:
            self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._telemetry) + len(self._events)

    def message_now(self, record: Record) -> tuple[str, bytes]:
        """(topic below the prefix, bytes) of a record to publish at once, not through the outbox: for when the
        disk has no room for it. Shaped as the outbox would send it, without the outbox's ``seq``."""
        row = self._row(record)
        return row.topic, row.message()

    def _row(self, r: Record) -> sql.NewRow:
        if not isinstance(r.data, dict):
            raise TypeError(f"a {r.kind} record carries an object, not {type(r.data).__name__}")
        ts = self.stamper.stamp(r.mono)
        if r.kind == "telemetry":
            profile = self._profiles().get(r.device)
            values, flagged = shape_values(r.data, profile.telemetry if profile is not None else {})
            body: dict[str, Any] = {"device": r.device, "values": values}
            if flagged:
                body["flagged"] = flagged
            ring = self.recent.get(r.device)
            if ring is None:
                ring = self.recent[r.device] = deque(maxlen=self._tcfg.recent_per_device)
            ring.append(Reading(ts, values))
            topic, priority = f"telemetry/{r.device}", sql.PRIORITY_TELEMETRY
        else:
            body = {"device": r.device, "event": r.event or "event", "severity": r.severity, "data": r.data}
            self.last_event[r.device] = {"ts": ts, **body}
            topic = "events"
            priority = sql.PRIORITY_URGENT if r.severity == "critical" else sql.PRIORITY_EVENT
        payload = strictjson.dumps(body)
        kind: sql.Kind = "telemetry" if r.kind == "telemetry" else "event"
        return sql.NewRow(kind, priority, r.device, topic, payload, ts, r.mono, self._boot_id, self.stamper.synced)

    # --- writing ---------------------------------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_check = loop.time() + self._tcfg.sync_check_s
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self._cfg.flush_interval_s)
            except TimeoutError:
                pass
            self._wake.clear()
            became_synced = False
            if loop.time() >= next_check:
                next_check = loop.time() + self._tcfg.sync_check_s
                became_synced = self.stamper.check()
                CLOCK_SYNCED.set(int(self.stamper.synced))
            try:
                await self.flush()
                if became_synced:
                    await self.restamp()
            except GatewayError:
                continue  # flush() logged it; the records wait for the next round

    async def restamp(self) -> int:
        offset, boot_id = self.stamper.offset, self._boot_id
        n = await self.store.write(lambda conn: sql.restamp(conn, boot_id, offset))
        if n:
            log.info("outbox_restamped", rows=n)
        return n

    def budget(self, current_bytes: int) -> int:
        """The outbox's byte budget now: max_bytes, less what the filesystem is short of its free watermark."""
        budget = self._cfg.max_bytes
        try:
            free = self._free_bytes()
        except OSError:
            free = None
        short = 0 if free is None else self._cfg.min_free_bytes - free
        if short > 0:
            budget = min(budget, max(0, current_bytes - short))
        return budget

    async def flush(self) -> None:
        """Write what waits in one transaction, then enforce the budget. On failure the records stay queued."""
        if not self._telemetry and not self._events:
            return
        if self._telemetry and self._space is not None and self._space.full:
            self.dropped_pending += len(self._telemetry)
            counter(TELEMETRY_DROPPED, "storage_full").inc(len(self._telemetry))
            self._telemetry.clear()
            if not self._events:
                return
        rows = [*self._events, *self._telemetry]
        self._events.clear()
        self._telemetry.clear()
        current = self.stats.bytes if self.stats is not None else 0
        budget = self.budget(current + sum(len(r.payload) for r in rows))

        def job(conn: sqlite3.Connection) -> tuple[sql.OutboxStats, int]:
            sql.insert(conn, rows)
            over = sql.counters(conn).get("bytes", 0) - budget
            dropped = sql.drop_oldest_telemetry(conn, over)[0] if over > 0 else 0
            return sql.stats(conn, by_kind=False), dropped

        try:
            self.stats, dropped = await self.store.write(job)
        except GatewayError as err:
            self._requeue(rows)
            if self._failing is None:
                log.error("telemetry_write_failed", error=str(err), records=len(rows))
            self._failing = str(err)
            raise
        if self._failing is not None:
            log.info("telemetry_write_recovered", records=len(rows))
            self._failing = None
        if dropped:
            counter(TELEMETRY_DROPPED, "budget").inc(dropped)
            if not self._budget_dropping:  # logged when it begins and when it ends, not at every flush
                log.warning("outbox_telemetry_dropped", rows=dropped, budget_bytes=budget)
            self._budget_dropping += dropped
        elif self._budget_dropping:
            log.info("outbox_telemetry_drops_ended", rows=self._budget_dropping)
            self._budget_dropping = 0
        self._publish_stats()
        for listener in list(self.listeners):
            listener()

    def _requeue(self, rows: list[sql.NewRow]) -> None:
        self._events.extendleft(reversed([r for r in rows if r.kind != "telemetry"]))
        telemetry = [r for r in rows if r.kind == "telemetry"]
        room = max(0, self._cfg.max_pending - len(self._telemetry))
        lost = max(0, len(telemetry) - room)
        if lost:
            self.dropped_pending += lost
            counter(TELEMETRY_DROPPED, "pending").inc(lost)
        self._telemetry.extendleft(reversed(telemetry[lost:]))

    def update_stats(self, stats: sql.OutboxStats) -> None:
        """The uplink deleted what the broker acknowledged: the depth, bytes and oldest age change."""
        self.stats = stats
        self._publish_stats()

    def _publish_stats(self) -> None:
        stats = self.stats
        if stats is None:
            return
        OUTBOX_ROWS.set(stats.rows)
        OUTBOX_BYTES.set(stats.bytes)
        OUTBOX_OLDEST_AGE.set(0 if stats.oldest_ts is None else max(0.0, self.stamper.now() - stats.oldest_ts))
