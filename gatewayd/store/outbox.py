"""SQL for the outbox. Each function takes a connection and runs inside a store job.

Send order is (priority, id): command results and critical events first, then other events, then telemetry;
within one priority, the order of arrival, so the records of one device and one kind keep their order. The table is
clustered on that key (migration 0006), so sending, deleting what was acknowledged and dropping the oldest telemetry
walk it in order, and a batch dirties only the pages it fills or empties. The counters (rows and bytes per kind and in
all, telemetry dropped, the next id) are kept here, one update per batch, not per row.

The timestamp is kept out of the stored payload and added when a row is sent, so rows can be re-stamped when the
wall clock becomes trustworthy (:func:`restamp`).
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from gatewayd import strictjson
from gatewayd.timefmt import iso

if TYPE_CHECKING:
    from gatewayd.commands.model import CommandRecord

Kind = Literal["result", "event", "telemetry"]
KINDS: tuple[Kind, ...] = ("result", "event", "telemetry")

PRIORITY_URGENT = 0  # command results, critical events
PRIORITY_EVENT = 1
PRIORITY_TELEMETRY = 2
PRIORITIES = (PRIORITY_URGENT, PRIORITY_EVENT, PRIORITY_TELEMETRY)

Key = tuple[int, int]  # (priority, id): a row's place in the send order, and its primary key

_CHUNK = 500  # ids in one IN (...) list, well under SQLite's limit on host parameters


def _stamped(payload: str, seq: int | None, ts: float, synced: bool) -> bytes:
    """The stored object with ``seq`` (if any), ``ts`` and ``clock_synced`` appended. Spliced as text: a payload is a
    compact JSON object from :func:`strictjson.dumps`, so this is byte for byte what parsing it and dumping it again
    would give, without the parse (the uplink does this for every message)."""
    head = payload[:-1]  # the object without its closing brace
    sep = "" if head == "{" else ","
    seq_part = "" if seq is None else f'"seq":{seq},'
    synced_part = "true" if synced else "false"
    return f'{head}{sep}{seq_part}"ts":"{iso(ts)}","clock_synced":{synced_part}}}'.encode()


@dataclass(frozen=True)
class NewRow:
    kind: Kind
    priority: int
    device: str | None
    topic: str  # below gatewayd/{gateway_id}/
    payload: str  # compact JSON object
    ts: float
    mono: float
    boot_id: str
    clock_synced: bool

    def message(self) -> bytes:
        """The bytes published for a record sent without being stored (live telemetry, or when the disk has no room
        for it): as :meth:`OutboxRow.message`, without the outbox's ``seq``."""
        return _stamped(self.payload, None, self.ts, self.clock_synced)


@dataclass(frozen=True)
class OutboxRow:
    id: int
    kind: Kind
    device: str | None
    topic: str
    payload: str
    ts: float
    clock_synced: bool
    priority: int = PRIORITY_TELEMETRY

    @property
    def key(self) -> Key:
        return (self.priority, self.id)

    def message(self) -> bytes:
        """The bytes published: the stored object plus its sequence number and timestamp."""
        return _stamped(self.payload, self.id, self.ts, self.clock_synced)


def result_row(rec: CommandRecord, *, mono: float, boot_id: str, synced: bool) -> NewRow:
    """A command's final record, for ``result/{id}``: sent ahead of events and telemetry."""
    payload = strictjson.dumps(rec.to_api(transitions=False))
    return NewRow(
        "result", PRIORITY_URGENT, rec.device, f"result/{rec.id}", payload, rec.updated_at, mono, boot_id, synced
    )


def _account(conn: sqlite3.Connection, changes: Counter[str]) -> None:
    """Add ``changes`` (name -> delta) to the counters: one statement per name, whatever the number of rows."""
    conn.executemany(
        "INSERT INTO outbox_counters (name, value) VALUES (?, ?) "
        "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
        [(name, delta) for name, delta in changes.items() if delta],
    )


def _changes(kinds_and_bytes: Iterable[tuple[str, int]], sign: int) -> Counter[str]:
    changes: Counter[str] = Counter()
    for kind, size in kinds_and_bytes:
        changes["rows"] += sign
        changes["bytes"] += sign * size
        changes[f"rows:{kind}"] += sign
        changes[f"bytes:{kind}"] += sign * size
    return changes


def insert(conn: sqlite3.Connection, rows: Sequence[NewRow]) -> list[int]:
    """Add rows in the order given; their ids, in that order (consecutive: one counter update for the batch)."""
    if not rows:
        return []
    first = int(conn.execute("SELECT value FROM outbox_counters WHERE name = 'next_id'").fetchone()[0])
    ids = list(range(first, first + len(rows)))
    conn.executemany(
        "INSERT INTO outbox (priority, id, kind, device, topic, payload, bytes, ts, mono, boot_id, clock_synced) "
        "VALUES (?,?,?,?,?,?,?,?,?,?,?)",
        (
            (r.priority, i, r.kind, r.device, r.topic, r.payload, len(r.payload), r.ts, r.mono, r.boot_id,
             r.clock_synced)
            for i, r in zip(ids, rows, strict=True)
        ),
    )  # fmt: skip
    changes = _changes(((r.kind, len(r.payload)) for r in rows), +1)
    changes["next_id"] = len(rows)
    _account(conn, changes)
    return ids


def counters(conn: sqlite3.Connection) -> dict[str, int]:
    return dict(conn.execute("SELECT name, value FROM outbox_counters").fetchall())


def bump(conn: sqlite3.Connection, name: str, by: int) -> None:
    _account(conn, Counter({name: by}))


def drop_oldest_telemetry(conn: sqlite3.Connection, over_by: int) -> tuple[int, int]:
    """Delete the oldest telemetry until ``over_by`` bytes are freed (or no telemetry is left). Results and
    events are never deleted here. Returns (rows, bytes) dropped; the drop count is kept in the counters.
    The oldest telemetry is the start of its key range: each round deletes a prefix of it, in one statement."""
    rows = freed = 0
    while freed < over_by:
        chunk = conn.execute(
            "SELECT id, bytes FROM outbox WHERE priority = ? ORDER BY id LIMIT 256", (PRIORITY_TELEMETRY,)
        ).fetchall()
        if not chunk:
            break
        last = taken = 0
        for row_id, size in chunk:
            last, taken = row_id, taken + 1
            freed += size
            if freed >= over_by:
                break
        conn.execute("DELETE FROM outbox WHERE priority = ? AND id <= ?", (PRIORITY_TELEMETRY, last))
        rows += taken
    if rows:
        _account(
            conn,
            Counter(
                {
                    "rows": -rows,
                    "bytes": -freed,
                    "rows:telemetry": -rows,
                    "bytes:telemetry": -freed,
                    "telemetry_dropped": rows,
                }
            ),
        )
    return rows, freed


_COLUMNS = "id, kind, device, topic, payload, ts, clock_synced, priority"


def fetch(conn: sqlite3.Connection, limit: int, *, skip: Collection[Key] = ()) -> list[OutboxRow]:
    """The next ``limit`` rows to send, in send order, leaving out those in ``skip`` (in flight, or acknowledged
    and not deleted yet). From the start of the order each time: a result committed a moment ago goes ahead of
    the telemetry that waited."""
    cur = conn.execute(f"SELECT {_COLUMNS} FROM outbox ORDER BY priority, id LIMIT ?", (limit + len(skip),))
    out = []
    for i, k, d, t, p, ts, s, prio in cur:
        if (prio, i) in skip:
            continue
        out.append(OutboxRow(i, k, d, t, p, ts, bool(s), prio))
        if len(out) >= limit:
            break
    return out


def delete(conn: sqlite3.Connection, keys: Iterable[Key]) -> int:
    """Delete rows by key (what the broker acknowledged); the number deleted."""
    by_priority: dict[int, list[int]] = {}
    for priority, row_id in keys:
        by_priority.setdefault(priority, []).append(row_id)
    gone: list[tuple[str, int]] = []
    for priority, ids in by_priority.items():
        for start in range(0, len(ids), _CHUNK):
            part = ids[start : start + _CHUNK]
            gone += conn.execute(
                f"DELETE FROM outbox WHERE priority = ? AND id IN ({','.join('?' * len(part))}) RETURNING kind, bytes",
                (priority, *part),
            ).fetchall()
    if gone:
        _account(conn, _changes(gone, -1))
    return len(gone)


def restamp(conn: sqlite3.Connection, boot_id: str, offset: float) -> int:
    """The wall clock became trustworthy: re-date this boot's unsynchronised rows from their monotonic
    readings. Rows of an earlier boot keep their flag (their monotonic readings mean nothing now)."""
    return conn.execute(
        "UPDATE outbox SET ts = mono + ?, clock_synced = 1 WHERE boot_id = ? AND clock_synced = 0",
        (offset, boot_id),
    ).rowcount


@dataclass(frozen=True)
class OutboxStats:
    rows: int
    bytes: int
    telemetry_dropped: int
    oldest_ts: float | None
    by_kind: dict[str, int]
    bytes_by_kind: dict[str, int] = field(default_factory=dict)

    def to_api(self, now: float) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "bytes": self.bytes,
            "telemetry_dropped": self.telemetry_dropped,
            "oldest_age_s": None if self.oldest_ts is None else round(max(0.0, now - self.oldest_ts), 3),
            "by_kind": self.by_kind,
            "bytes_by_kind": self.bytes_by_kind,
        }


def stats(conn: sqlite3.Connection, *, by_kind: bool = True) -> OutboxStats:
    """Depth, bytes (in all and per kind) and the oldest record, from the counters and one look at the head of each
    priority: no scan, whatever the outbox holds. ``by_kind`` is kept for callers that asked for the counts by kind
    when they cost a scan; they are free now and always given."""
    c = counters(conn)
    oldest: tuple[int, float] | None = None
    for priority in PRIORITIES:
        head = conn.execute("SELECT id, ts FROM outbox WHERE priority = ? ORDER BY id LIMIT 1", (priority,)).fetchone()
        if head is not None and (oldest is None or head[0] < oldest[0]):
            oldest = (head[0], head[1])
    return OutboxStats(
        rows=c.get("rows", 0),
        bytes=c.get("bytes", 0),
        telemetry_dropped=c.get("telemetry_dropped", 0),
        oldest_ts=None if oldest is None else oldest[1],
        by_kind={k: c[f"rows:{k}"] for k in KINDS if c.get(f"rows:{k}", 0)},
        bytes_by_kind={k: c[f"bytes:{k}"] for k in KINDS if c.get(f"bytes:{k}", 0)},
    )
