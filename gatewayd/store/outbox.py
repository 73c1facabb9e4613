"""SQL for the outbox. Each function takes a connection and runs inside a store job.

Send order is (priority, id): command results and critical events first, then other events, then telemetry;
within one priority, the order of arrival, so the records of one device and one kind keep their order. The
timestamp is kept out of the stored payload and added when a row is sent, so rows can be re-stamped when the
wall clock becomes trustworthy (:func:`restamp`).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from gatewayd import strictjson
from gatewayd.timefmt import iso

if TYPE_CHECKING:
    from gatewayd.commands.model import CommandRecord

Kind = Literal["result", "event", "telemetry"]

PRIORITY_URGENT = 0  # command results, critical events
PRIORITY_EVENT = 1
PRIORITY_TELEMETRY = 2


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
        """The bytes published for a record sent at once, never stored (the disk has no room for it): as
        :meth:`OutboxRow.message`, without the outbox's ``seq``."""
        body: dict[str, Any] = json.loads(self.payload)
        body["ts"] = iso(self.ts)
        body["clock_synced"] = self.clock_synced
        return json.dumps(body, separators=(",", ":")).encode()


@dataclass(frozen=True)
class OutboxRow:
    id: int
    kind: Kind
    device: str | None
    topic: str
    payload: str
    ts: float
    clock_synced: bool

    def message(self) -> bytes:
        """The bytes published: the stored object plus its sequence number and timestamp."""
        body: dict[str, Any] = json.loads(self.payload)
        body["seq"] = self.id
        body["ts"] = iso(self.ts)
        body["clock_synced"] = self.clock_synced
        return json.dumps(body, separators=(",", ":")).encode()


def result_row(rec: CommandRecord, *, mono: float, boot_id: str, synced: bool) -> NewRow:
    """A command's final record, for ``result/{id}``: sent ahead of events and telemetry."""
    payload = strictjson.dumps(rec.to_api(transitions=False))
    return NewRow(
        "result", PRIORITY_URGENT, rec.device, f"result/{rec.id}", payload, rec.updated_at, mono, boot_id, synced
    )


def insert(conn: sqlite3.Connection, rows: Iterable[NewRow]) -> int:
    cur = conn.executemany(
        "INSERT INTO outbox (kind, priority, device, topic, payload, bytes, ts, mono, boot_id, clock_synced) "
        "VALUES (?,?,?,?,?,?,?,?,?,?)",
        (
            (r.kind, r.priority, r.device, r.topic, r.payload, len(r.payload), r.ts, r.mono, r.boot_id, r.clock_synced)
            for r in rows
        ),
    )
    return cur.rowcount


def counters(conn: sqlite3.Connection) -> dict[str, int]:
    return {name: value for name, value in conn.execute("SELECT name, value FROM outbox_counters")}


def bump(conn: sqlite3.Connection, name: str, by: int) -> None:
    conn.execute(
        "INSERT INTO outbox_counters (name, value) VALUES (?, ?) "
        "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
        (name, by),
    )


def drop_oldest_telemetry(conn: sqlite3.Connection, over_by: int) -> tuple[int, int]:
    """Delete the oldest telemetry until ``over_by`` bytes are freed (or no telemetry is left). Results and
    events are never deleted here. Returns (rows, bytes) dropped; the drop count is kept in the counters."""
    rows = freed = 0
    while freed < over_by:
        chunk = conn.execute("SELECT id, bytes FROM outbox WHERE kind = 'telemetry' ORDER BY id LIMIT 256").fetchall()
        if not chunk:
            break
        ids = []
        for row_id, size in chunk:
            ids.append(row_id)
            freed += size
            if freed >= over_by:
                break
        conn.execute(f"DELETE FROM outbox WHERE id IN ({','.join('?' * len(ids))})", ids)
        rows += len(ids)
    if rows:
        bump(conn, "telemetry_dropped", rows)
    return rows, freed


def fetch(conn: sqlite3.Connection, limit: int, *, after: tuple[int, int] | None = None) -> list[OutboxRow]:
    """The next rows to send, in send order; ``after`` = (priority, id) of the last row already taken."""
    if after is None:
        cur = conn.execute(
            "SELECT id, kind, device, topic, payload, ts, clock_synced FROM outbox ORDER BY priority, id LIMIT ?",
            (limit,),
        )
    else:
        cur = conn.execute(
            "SELECT id, kind, device, topic, payload, ts, clock_synced FROM outbox "
            "WHERE (priority, id) > (?, ?) ORDER BY priority, id LIMIT ?",
            (*after, limit),
        )
    return [OutboxRow(i, k, d, t, p, ts, bool(s)) for i, k, d, t, p, ts, s in cur]


def delete(conn: sqlite3.Connection, ids: Sequence[int]) -> int:
    deleted = 0
    for start in range(0, len(ids), 500):
        part = ids[start : start + 500]
        deleted += conn.execute(f"DELETE FROM outbox WHERE id IN ({','.join('?' * len(part))})", part).rowcount
    return deleted


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

    def to_api(self, now: float) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "bytes": self.bytes,
            "telemetry_dropped": self.telemetry_dropped,
            "oldest_age_s": None if self.oldest_ts is None else round(max(0.0, now - self.oldest_ts), 3),
            "by_kind": self.by_kind,
        }


def stats(conn: sqlite3.Connection, *, by_kind: bool = True) -> OutboxStats:
    """Depth, bytes and the oldest record from the counters (cheap); the count per kind scans the outbox."""
    c = counters(conn)
    oldest = conn.execute("SELECT ts FROM outbox ORDER BY id LIMIT 1").fetchone()
    kinds = {k: n for k, n in conn.execute("SELECT kind, COUNT(*) FROM outbox GROUP BY kind")} if by_kind else {}
    return OutboxStats(
        rows=c.get("rows", 0),
        bytes=c.get("bytes", 0),
        telemetry_dropped=c.get("telemetry_dropped", 0),
        oldest_ts=None if oldest is None else oldest[0],
        by_kind=kinds,
    )
