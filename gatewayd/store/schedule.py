"""The ``scheduled_actions`` table (migration 0005): what the gateway sends by itself later. Owned by the command
core: rows are written in the transaction that accepts the command asking for them (CommandService), armed in
the one that records its dispatch and settled in the one that records its end (Dispatcher), fired by the
Scheduler (gatewayd.commands.scheduler). All SQL for the table is here.

A row waits for its ``after`` command to be dispatched (from then on that command may act), is armed with a due
time ``delay_s`` later, and ends fired (the command it sent is ``fired_as``) or cancelled (``reason``).
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

WAITING, ARMED, FIRED, CANCELLED = "waiting", "armed", "fired", "cancelled"
OPEN = (WAITING, ARMED)
FIRE_PREFIX = "~"  # the command a row fires is "~<row id>": "~" is not in a client's id alphabet


@dataclass
class Scheduled:
    id: str
    kind: str  # max_on | on_period
    device: str
    action: str
    priority: int
    source: str
    after: str
    delay_s: float
    state: str
    created_at: float
    updated_at: float
    due_at: float | None = None
    due_mono: float | None = None
    boot_id: str | None = None
    user: str | None = None
    fired_as: str | None = None
    reason: str | None = None

    @property
    def command_id(self) -> str:
        """The id of the command this row sends when due: the same on every attempt, so it runs once."""
        return FIRE_PREFIX + self.id

    def to_api(self, iso: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "device": self.device,
            "action": self.action,
            "after": self.after,
            "delay_s": self.delay_s,
            "state": self.state,
            "due_at": iso(self.due_at) if self.due_at is not None else None,
            "fired_as": self.fired_as,
            "reason": self.reason,
        }


def new_id() -> str:
    return uuid.uuid4().hex


_COLUMNS = (
    "id, kind, device, action, priority, source, after, delay_s, state, created_at, updated_at, due_at, due_mono, "
    "boot_id, user, fired_as, reason"
)


def _row(r: sqlite3.Row | tuple[Any, ...]) -> Scheduled:
    return Scheduled(*r)


def insert(conn: sqlite3.Connection, rows: Iterable[Scheduled]) -> None:
    conn.executemany(
        f"INSERT INTO scheduled_actions ({_COLUMNS}) VALUES ({','.join('?' * 17)})",
        [
            (
                r.id,
                r.kind,
                r.device,
                r.action,
                r.priority,
                r.source,
                r.after,
                r.delay_s,
                r.state,
                r.created_at,
                r.updated_at,
                r.due_at,
                r.due_mono,
                r.boot_id,
                r.user,
                r.fired_as,
                r.reason,
            )
            for r in rows
        ],
    )


def dispatched(
    conn: sqlite3.Connection,
    command_id: str,
    device: str,
    action: str,
    *,
    ends_all: bool,
    wall: float,
    mono: float,
    boot_id: str,
) -> int:
    """``command_id`` (``action`` on ``device``) is being put on the wire: the rows waiting for it are armed (due
    ``delay_s`` from now), and the on-periods it overrides end, since the newest instruction decides how long a
    thing runs: those that would send this same action (an off sent by hand), those of an earlier command with
    this same action (a newer "on for an hour" for the same channel), and, when this is the device's own off for
    everything (``ends_all``), all of the device's. A max on-time is never superseded. Returns how many rows were
    armed."""
    conn.execute(
        "UPDATE scheduled_actions SET state = 'cancelled', reason = ?, updated_at = ? "
        "WHERE device = ? AND kind = 'on_period' AND state IN ('waiting', 'armed') AND after != ? "
        "AND (? OR action = ? OR after IN (SELECT id FROM commands WHERE device = ? AND action = ?))",
        (f"superseded by {command_id}", wall, device, command_id, ends_all, action, device, action),
    )
    cur = conn.execute(
        "UPDATE scheduled_actions SET state = 'armed', due_at = ? + delay_s, due_mono = ? + delay_s, boot_id = ?, "
        "updated_at = ? WHERE after = ? AND state = 'waiting'",
        (wall, mono, boot_id, wall, command_id),
    )
    return cur.rowcount


def settled(conn: sqlite3.Connection, command_id: str, *, acted: bool | None, wall: float, why: str) -> int:
    """``command_id`` reached its final state. Rows still waiting for it are cancelled (it never reached the wire);
    armed ones too when the device is known not to have acted (``acted`` False: it refused the command). Armed rows
    of a command that may have acted stay: switching off what may be on is the safe side. Returns the count."""
    states = ("waiting",) if acted is not False else ("waiting", "armed")
    cur = conn.execute(
        f"UPDATE scheduled_actions SET state = 'cancelled', reason = ?, updated_at = ? "
        f"WHERE after = ? AND state IN ({','.join('?' * len(states))})",
        (why, wall, command_id, *states),
    )
    return cur.rowcount


def done_by(conn: sqlite3.Connection, device: str, action: str, command_id: str, *, wall: float) -> int:
    """``action`` succeeded on ``device`` (a manual off): rows that would send that same action have nothing left
    to do. Returns how many were cancelled."""
    cur = conn.execute(
        "UPDATE scheduled_actions SET state = 'cancelled', reason = ?, updated_at = ? "
        "WHERE device = ? AND action = ? AND state IN ('waiting', 'armed') AND ('~' || id) != ?",
        (f"done by {command_id}", wall, device, action, command_id),
    )
    return cur.rowcount


def fired(conn: sqlite3.Connection, row_id: str, fired_as: str, *, wall: float, late_s: float) -> None:
    conn.execute(
        "UPDATE scheduled_actions SET state = 'fired', fired_as = ?, updated_at = ?, reason = ? "
        "WHERE id = ? AND state = 'armed'",
        (fired_as, wall, f"{late_s:.1f} s late (the gateway was not running)" if late_s >= 1.0 else None, row_id),
    )


def armed(conn: sqlite3.Connection) -> list[Scheduled]:
    rows = conn.execute(f"SELECT {_COLUMNS} FROM scheduled_actions WHERE state = 'armed' ORDER BY due_at")
    return [_row(r) for r in rows]


def listing(
    conn: sqlite3.Connection, *, open_only: bool = True, device: str | None = None, limit: int = 100
) -> list[Scheduled]:
    where, args = [], []
    if open_only:
        where.append("state IN ('waiting', 'armed')")
    if device is not None:
        where.append("device = ?")
        args.append(device)
    clause = f"WHERE {' AND '.join(where)}" if where else ""
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM scheduled_actions {clause} ORDER BY updated_at DESC LIMIT ?", (*args, limit)
    )
    return [_row(r) for r in rows]


def prune(conn: sqlite3.Connection, *, older_than: float) -> int:
    """Fired and cancelled rows last updated before ``older_than`` (wall clock), or whose command was pruned from
    the history (``keep_max``): history, kept as long as the commands'. Open rows are never deleted."""
    cur = conn.execute(
        "DELETE FROM scheduled_actions WHERE state IN ('fired', 'cancelled') "
        "AND (updated_at < ? OR NOT EXISTS (SELECT 1 FROM commands c WHERE c.id = scheduled_actions.after))",
        (older_than,),
    )
    return cur.rowcount
