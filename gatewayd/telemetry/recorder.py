"""The daemon's telemetry sink: records from devices, shaped, dated, and on their way to the broker.

``put`` never blocks and never raises: a device's receive path (a serial frame, a GPIO edge on gpiozero's
thread, a Modbus poll) hands a record over and goes on.

Telemetry is written behind (DESIGN.md, durability contract). A reading is held in memory and handed to the uplink
(:meth:`Recorder.take_live`), which publishes it and says whether the broker acknowledged it
(:meth:`Recorder.settle_live`); acknowledged, it is done without ever touching the disk. A reading still not
acknowledged ``outbox.write_behind_s`` after it was observed (the link down, or the broker not keeping pace) is
written to the outbox then, in one transaction with every other reading held and not in flight, and from then on it
is backlog, sent by the uplink's drain. So while the link is down the outbox is written about once per
``write_behind_s``, in large batches, and a power loss costs at most the readings of the last ``write_behind_s``
(plus the commit under way). With ``write_behind_s = 0`` telemetry is durable: each reading is committed as it
comes, like an event, and sent from the outbox. Events are always committed at once (the group commit of the
moment): an event is never written behind. At most ``outbox.max_pending`` readings are held; past that the oldest
are dropped and counted.

After each write the outbox's byte budgets are enforced: when it holds more than ``outbox.max_bytes``, or its
telemetry more than ``outbox.telemetry_max_bytes``, or the data directory's filesystem has less than
``outbox.min_free_bytes`` free, the oldest telemetry is deleted (and counted, across restarts). Command results and
events are never deleted to make room. While the storage is full (below ``store.min_free_bytes``,
:mod:`gatewayd.store.space`) telemetry is not written at all: the reserve is for the commands already accepted.
Events still are.

The backlog is visible: ``gatewayd_outbox_backlog``, the status page, and one log line when telemetry first had
to be written (``telemetry_backlog_started``) and one when the outbox is empty again (``telemetry_backlog_caught_up``).
"""

from __future__ import annotations

import asyncio
import enum
import math
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import structlog

from gatewayd import strictjson
from gatewayd.config.models import OutboxSection, TelemetrySection
from gatewayd.config.profiles import Profile, TelemetryPoint
from gatewayd.errors import GatewayError
from gatewayd.observability.metrics import (
    CLOCK_SYNCED,
    OUTBOX_BACKLOG,
    TELEMETRY_DROPPED,
    TELEMETRY_HELD,
    TELEMETRY_PATH,
    TELEMETRY_RECORDS,
    counter,
)
from gatewayd.store import Store
from gatewayd.store import outbox as sql
from gatewayd.store.space import DiskSpace
from gatewayd.tasks import TaskOwner, wait_set
from gatewayd.telemetry.batching import BatchMode
from gatewayd.telemetry.sink import Record
from gatewayd.telemetry.timestamps import Stamper, sync_probe
from gatewayd.uplink.outbox import Outbox

log = structlog.get_logger("gatewayd.telemetry")

# Events are never dropped for telemetry's sake; this bound only stops a store that cannot write for hours
# from growing memory without end.
_EVENT_HARD_LIMIT_FACTOR = 4


class Hold(enum.Enum):
    WAITING = "waiting"  # in memory, not handed to the uplink (or handed back: the link went)
    SENDING = "sending"  # published, its PUBACK awaited
    DONE = "done"  # the broker acknowledged it: never written (or, written meanwhile, its row to be deleted)
    STORED = "stored"  # written to the outbox: backlog from now on, the drain's to send
    DROPPED = "dropped"  # pushed out of memory by newer readings (max_pending)


@dataclass(eq=False, slots=True)
class Held:
    """One reading held in memory (write-behind)."""

    row: sql.NewRow
    due: float  # monotonic: written to the outbox at this moment unless acknowledged before
    state: Hold = Hold.WAITING
    storing: bool = False  # in a write being committed
    key: sql.Key | None = None  # its outbox row, once written

    @property
    def resolved(self) -> bool:
        return self.state in (Hold.DONE, Hold.STORED, Hold.DROPPED) and not self.storing


@dataclass
class Backlog:
    """Since when telemetry has had to go through the outbox, and how much of it has."""

    since_mono: float
    since_ts: float
    reason: str
    stored: int = 0
    peak_rows: int = 0


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
        *,
        boot_id: str,
        stamper: Stamper | None = None,
        free_bytes: Callable[[], int | None] | None = None,
        space: DiskSpace | None = None,
        forward: bool = True,
        profiles: Callable[[], Mapping[str, Profile]] = dict,
        monotonic: Callable[[], float] = time.monotonic,
        box: Outbox | None = None,
    ):
        self._space = space
        # False without an uplink ([mqtt] enabled = false): records still feed the page (recent readings, last
        # events) but nothing is queued for an outbox nobody drains.
        self.forward = forward
        self.store = store
        self._cfg = outbox
        self._tcfg = telemetry
        self._boot_id = boot_id
        self._mono = monotonic
        self.stamper = stamper or Stamper(sync_probe(telemetry.clock_sync))
        # The free space: DiskSpace's last measurement (taken in a thread every [store] space_check_s); None while
        # unknown, and without a DiskSpace. The recorder never measures it itself: no statvfs on the event loop.
        self._free_bytes: Callable[[], int | None]
        if free_bytes is not None:
            self._free_bytes = free_bytes
        elif space is not None:
            self._free_bytes = lambda: space.free
        else:
            self._free_bytes = lambda: None
        self._profiles = profiles  # device name -> profile, as the device manager has them now (SIGHUP reloads)
        self.write_behind_s = outbox.write_behind_s
        self.batch: BatchMode = telemetry.batch  # how the uplink groups readings into messages
        self.batch_max = telemetry.batch_max
        self.batch_wait_s = telemetry.batch_wait_s
        self._held: deque[Held] = deque()  # telemetry written behind, in order of arrival, until resolved
        self._unsent: deque[Held] = deque()  # of those, the ones waiting for the uplink to take them
        self._durable: deque[sql.NewRow] = deque()  # telemetry when it is durable (write_behind_s = 0)
        self._events: deque[sql.NewRow] = deque()
        self.sending_stored: dict[sql.Key, Held] = {}  # written while in flight: the drain leaves them alone
        self._acked_stored: list[sql.Key] = []  # written, then acknowledged: rows for the uplink to delete
        self.live_ready = asyncio.Event()  # readings wait for the uplink
        self._wake = asyncio.Event()
        self._tasks = TaskOwner("telemetry")
        self._failing: str | None = None  # why the last write failed, while it keeps failing
        self._budget_dropping = 0  # telemetry rows dropped for the budget since the drops began (0: none now)
        self._link_up = False
        self.backlog: Backlog | None = None
        self.recent: dict[str, deque[Reading]] = {}
        self.last_event: dict[str, dict[str, Any]] = {}
        # The outbox's owner (one per gateway, shared with the dispatcher, the intake and the uplink); its own when
        # none is given (a recorder on its own, in tests).
        self.box = box if box is not None else Outbox(store, self.stamper.now)
        self.box.stats_listeners.append(self._outbox_changed)
        self.dropped_pending = 0
        self.invalid = 0
        self.live = 0  # readings acknowledged without being written
        self.stored = 0  # readings written to the outbox (written behind, or durable)
        self._counted = {kind: counter(TELEMETRY_RECORDS, kind) for kind in ("telemetry", "event")}
        self._live_counter = counter(TELEMETRY_PATH, "live")
        self._stored_counter = counter(TELEMETRY_PATH, "stored")

    async def __aenter__(self) -> Recorder:
        CLOCK_SYNCED.set(int(self.stamper.synced))
        if (await self.box.refresh()).rows:  # an outage's backlog from before the restart
            self.backlog = Backlog(self._mono(), self.stamper.now(), "left from before the restart")
            OUTBOX_BACKLOG.set(1)
        await self._tasks.open()
        self._tasks.spawn("flush", self._run())
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._tasks.close()
        try:
            await self.flush()  # what is held is not lost on a clean stop
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
        if row.kind != "telemetry":
            if len(self._events) >= self._cfg.max_pending * _EVENT_HARD_LIMIT_FACTOR:
                self._events.popleft()
                self.dropped_pending += 1
                counter(TELEMETRY_DROPPED, "pending_event").inc()
                log.error("telemetry_event_dropped", device=record.device, reason="store not writing")
            self._events.append(row)
            self._wake.set()  # an event is committed at once: never written behind
            return
        if not self.write_behind_s:
            if len(self._durable) >= self._cfg.max_pending:
                self._durable.popleft()
                self._dropped_pending(1)
            self._durable.append(row)
            self._wake.set()
            return
        self._make_room()
        held = Held(row, min(row.mono, self._mono()) + self.write_behind_s)
        self._held.append(held)
        self._unsent.append(held)
        self.live_ready.set()
        if len(self._held) == 1 and self.write_behind_s < self._cfg.flush_interval_s:
            self._wake.set()  # the writer may sleep past this reading's due: it looks again every flush_interval_s

    def _make_room(self) -> None:
        held = self._held
        while held and held[0].resolved:
            held.popleft()
        if len(held) < self._cfg.max_pending:
            return
        oldest = held.popleft()
        if not oldest.storing:
            oldest.state = Hold.DROPPED
            if self._unsent and self._unsent[0] is oldest:
                self._unsent.popleft()
            self._dropped_pending(1)

    def _dropped_pending(self, n: int) -> None:
        self.dropped_pending += n
        counter(TELEMETRY_DROPPED, "pending").inc(n)

    @property
    def pending(self) -> int:
        """Records in memory, not yet acknowledged nor committed."""
        held = sum(1 for h in self._held if not h.resolved)
        return held + len(self._durable) + len(self._events)

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

    # --- live telemetry, for the uplink ----------------------------------------------------------------------

    def link(self, up: bool) -> None:
        """The uplink's session began (True) or ended (False): only said in the backlog's log line."""
        self._link_up = up

    def take_live(self, limit: int) -> list[Held]:
        """Up to ``limit`` readings to publish now, oldest first; each is the caller's until it settles them."""
        out: list[Held] = []
        unsent = self._unsent
        while unsent and len(out) < limit:
            held = unsent.popleft()
            if held.state is not Hold.WAITING or held.storing:
                continue  # written, dropped, or being written meanwhile
            held.state = Hold.SENDING
            out.append(held)
        if not unsent:
            self.live_ready.clear()
        return out

    def settle_live(self, taken: Iterable[Held], acked: bool) -> None:
        """The broker acknowledged ``taken`` (``acked``), or their publication failed (the link went): failed ones
        are held again, and sent live again or written when due, whichever comes first."""
        requeue = False
        for held in taken:
            if held.key is not None:
                self.sending_stored.pop(held.key, None)
            if acked:
                if held.state is Hold.DROPPED and held.key is None:
                    continue
                if held.key is not None:
                    self._acked_stored.append(held.key)  # its row is no longer needed
                else:
                    self.live += 1
                    self._live_counter.inc()
                held.state = Hold.DONE
            elif held.state is Hold.SENDING:
                if held.key is not None:
                    held.state = Hold.STORED  # its row is there: the drain sends it
                else:
                    held.state = Hold.WAITING
                    requeue = requeue or not held.storing
        if requeue:
            self._unsent = deque(h for h in self._held if h.state is Hold.WAITING and not h.storing)
            if self._unsent:
                self.live_ready.set()
        held_deque = self._held
        while held_deque and held_deque[0].resolved:
            held_deque.popleft()

    def take_acked_stored(self) -> list[sql.Key]:
        """Rows written while their reading was in flight, then acknowledged: the uplink deletes them."""
        keys, self._acked_stored = self._acked_stored, []
        return keys

    # --- writing ---------------------------------------------------------------------------------------------

    def _next_due(self) -> float:
        """Seconds until something must be written: now for events and durable telemetry, else when the oldest
        reading held falls due, and at most flush_interval_s (clock checks)."""
        if self._events or self._durable:
            return 0.0
        for held in self._held:
            if not held.resolved and not held.storing:
                return max(0.0, min(self._cfg.flush_interval_s, held.due - self._mono()))
        return self._cfg.flush_interval_s

    async def _run(self) -> None:
        next_check = self._mono() + self._tcfg.sync_check_s
        while True:
            timeout = self._next_due()
            if timeout > 0:
                await wait_set(self._wake, timeout)
            self._wake.clear()
            became_synced = False
            if self._mono() >= next_check:
                next_check = self._mono() + self._tcfg.sync_check_s
                became_synced = self.stamper.check()
                CLOCK_SYNCED.set(int(self.stamper.synced))
            try:
                await self._write(everything=False)
                if became_synced:
                    await self.restamp()
            except GatewayError:
                await asyncio.sleep(min(1.0, self._cfg.flush_interval_s))  # flush() logged it; the records wait
            TELEMETRY_HELD.set(len(self._held))

    async def restamp(self) -> int:
        offset, boot_id = self.stamper.offset, self._boot_id
        n = await self.store.write(lambda conn: sql.restamp(conn, boot_id, offset))
        if n:
            log.info("outbox_restamped", rows=n)
            await self.box.refresh()  # the oldest row's time moved
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
        """Write everything waiting in one transaction (every reading held and not acknowledged too), then enforce
        the budgets. On failure the records stay where they were."""
        await self._write(everything=True)

    def _behind(self, everything: bool) -> list[Held]:
        """The readings to write now: when the oldest is due (or ``everything``), every one not acknowledged,
        except those in flight that are not due yet (they may well be acknowledged in a moment)."""
        now = self._mono()
        candidates = [h for h in self._held if not h.resolved and not h.storing]
        if not candidates or not (everything or candidates[0].due <= now):
            return []
        return [h for h in candidates if everything or h.state is Hold.WAITING or h.due <= now]

    async def _write(self, *, everything: bool) -> None:
        behind = self._behind(everything)
        if not (self._events or self._durable or behind):
            return
        if (behind or self._durable) and self._space is not None and self._space.full:
            n = len(behind) + len(self._durable)
            self.dropped_pending += n
            counter(TELEMETRY_DROPPED, "storage_full").inc(n)
            for held in behind:
                if held.state is Hold.WAITING:
                    held.state = Hold.DROPPED  # in flight ones stay the uplink's: sent, or dropped when they fail
            self._durable.clear()
            behind = []
            if not self._events:
                return
        events, durable = list(self._events), list(self._durable)
        self._events.clear()
        self._durable.clear()
        for held in behind:
            held.storing = True
        rows = [*events, *durable, *(h.row for h in behind)]
        current = self.stats.bytes if self.stats is not None else 0
        budget = self.budget(current + sum(len(r.payload) for r in rows))
        telemetry_budget = self._cfg.telemetry_max_bytes

        def job(conn: sqlite3.Connection) -> tuple[list[sql.Key], sql.OutboxStats, int]:
            ids = sql.insert(conn, rows)
            c = sql.counters(conn)
            over = c.get("bytes", 0) - budget
            if telemetry_budget is not None:
                over = max(over, c.get("bytes:telemetry", 0) - telemetry_budget)
            dropped = sql.drop_oldest_telemetry(conn, over)[0] if over > 0 else 0
            keys = [(r.priority, i) for r, i in zip(rows, ids, strict=True)]
            return keys, sql.stats(conn), dropped

        try:
            keys, stats, dropped = await self.store.write(job)
        except GatewayError as err:
            for held in behind:
                held.storing = False
            self._requeue(events, durable, behind)
            if self._failing is None:
                log.error("telemetry_write_failed", error=str(err), records=len(rows))
            self._failing = str(err)
            raise
        if self._failing is not None:
            log.info("telemetry_write_recovered", records=len(rows))
            self._failing = None
        self._stored(durable, behind, keys[len(events) :])
        if dropped:
            counter(TELEMETRY_DROPPED, "budget").inc(dropped)
            if not self._budget_dropping:  # logged when it begins and when it ends, not at every flush
                log.warning("outbox_telemetry_dropped", rows=dropped, budget_bytes=budget)
            self._budget_dropping += dropped
        elif self._budget_dropping:
            log.info("outbox_telemetry_drops_ended", rows=self._budget_dropping)
            self._budget_dropping = 0
        self.box.added(stats)

    def _stored(self, durable: list[sql.NewRow], behind: list[Held], keys: list[sql.Key]) -> None:
        """Readings committed: each held one is backlog now, or (acknowledged meanwhile) a row to delete."""
        for held, key in zip(behind, keys[len(durable) :], strict=True):
            held.storing = False
            held.key = key
            if held.state is Hold.DONE:
                self._acked_stored.append(key)
            elif held.state is Hold.SENDING:
                self.sending_stored[key] = held
            else:
                held.state = Hold.STORED
        n = len(durable) + len(behind)
        if n:
            self.stored += n
            self._stored_counter.inc(n)
        if behind:
            self._unsent = deque(h for h in self._unsent if h.state is Hold.WAITING and not h.storing)
            if not self._unsent:
                self.live_ready.clear()
            if self.backlog is None:
                in_flight = any(h.state is Hold.SENDING for h in behind)
                reason = "not acknowledged in time" if in_flight or self._link_up else "uplink down"
                self.backlog = Backlog(self._mono(), self.stamper.now(), reason)
                log.warning(
                    "telemetry_backlog_started",
                    reason=reason,
                    readings=len(behind),
                    write_behind_s=self.write_behind_s,
                )
            self.backlog.stored += len(behind)
        while self._held and self._held[0].resolved:
            self._held.popleft()

    def _requeue(self, events: list[sql.NewRow], durable: list[sql.NewRow], behind: list[Held]) -> None:
        self._events.extendleft(reversed(events))
        room = max(0, self._cfg.max_pending - len(self._durable))
        lost = max(0, len(durable) - room)
        if lost:
            self._dropped_pending(lost)
        self._durable.extendleft(reversed(durable[lost:]))
        if behind:  # held again, in order; sent live if the link takes them before the next attempt
            self._unsent = deque(h for h in self._held if h.state is Hold.WAITING and not h.storing)
            if self._unsent:
                self.live_ready.set()

    @property
    def stats(self) -> sql.OutboxStats | None:
        """The outbox's figures after its last change, whoever made it."""
        return self.box.stats

    def _outbox_changed(self, stats: sql.OutboxStats) -> None:
        """The outbox changed: the backlog has caught up once it is empty."""
        backlog = self.backlog
        if backlog is not None:
            backlog.peak_rows = max(backlog.peak_rows, stats.rows)
            if stats.rows == 0:
                log.info(
                    "telemetry_backlog_caught_up",
                    seconds=round(self._mono() - backlog.since_mono, 3),
                    readings_stored=backlog.stored,
                    peak_rows=backlog.peak_rows,
                )
                self.backlog = None
        OUTBOX_BACKLOG.set(0 if self.backlog is None else 1)

    def status(self) -> dict[str, Any]:
        """For the page and /api/v1/stats: how telemetry is going out, and the backlog if there is one."""
        backlog = self.backlog
        return {
            "write_behind_s": self.write_behind_s,
            "held": self.pending,
            "live": self.live,
            "stored": self.stored,
            "backlog": None
            if backlog is None
            else {
                "since_ts": backlog.since_ts,
                "age_s": round(self._mono() - backlog.since_mono, 3),
                "reason": backlog.reason,
                "readings_stored": backlog.stored,
                "peak_rows": backlog.peak_rows,
            },
        }
