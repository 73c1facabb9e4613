"""SQL for commands and their transitions. Each function takes a connection and runs inside a store job."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence

from gatewayd.commands.model import OPEN_STATES, CommandRecord, Priority, State, Transition, dumps

_COLUMNS = (
    "seq, id, device, action, params, priority, source, user, state, created_at, ttl_s, deadline_at, "
    "deadline_mono, boot_id, updated_at, result, error_code, error_message, interpretation"
)


def insert(conn: sqlite3.Connection, rec: CommandRecord, transitions: Sequence[Transition]) -> CommandRecord | None:
    """Insert a new command with its first transitions. Returns None if the id exists (idempotent replay)."""
    cur = conn.execute(
        "INSERT INTO commands (id, device, action, params, priority, source, user, state, created_at, ttl_s, "
        "deadline_at, deadline_mono, boot_id, updated_at, interpretation) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) "
        "ON CONFLICT (id) DO NOTHING",
        (
            rec.id,
            rec.device,
            rec.action,
            dumps(rec.params),
            int(rec.priority),
            rec.source,
            rec.user,
            rec.state.value,
            rec.created_at,
            rec.ttl_s,
            rec.deadline_at,
            rec.deadline_mono,
            rec.boot_id,
            rec.updated_at,
            dumps(rec.interpretation) if rec.interpretation is not None else None,
        ),
    )
    if cur.rowcount == 0:
        return None
    rec.seq = int(cur.lastrowid or 0)
    _add_transitions(conn, rec.seq, transitions)
    rec.transitions = list(transitions)
    return rec


def _add_transitions(conn: sqlite3.Connection, seq: int, transitions: Iterable[Transition]) -> None:
    conn.executemany(
        "INSERT INTO transitions (command_seq, state, at, mono, boot_id, detail) VALUES (?,?,?,?,?,?)",
        [(seq, t.state.value, t.at, t.mono, t.boot_id, t.detail) for t in transitions],
    )


def transition(
    conn: sqlite3.Connection,
    seq: int,
    t: Transition,
    *,
    result: dict[str, object] | None = None,
    error_code: str | None = None,
    error_message: str | None = None,
) -> bool:
    """Move a command to a new state. A command in a final state never moves again (False)."""
    cur = conn.execute(
        "UPDATE commands SET state = ?, updated_at = ?, result = coalesce(?, result), "
        "error_code = coalesce(?, error_code), error_message = coalesce(?, error_message) "
        f"WHERE seq = ? AND state NOT IN ({_final_placeholders()})",
        (
            t.state.value,
            t.at,
            dumps(result) if result is not None else None,
            error_code,
            error_message,
            seq,
            *_final_values(),
        ),
    )
    if cur.rowcount == 1:
        _add_transitions(conn, seq, [t])
        return True
    return False


def _final_values() -> list[str]:
    return [s.value for s in State if s.final]


def _final_placeholders() -> str:
    return ",".join("?" for _ in _final_values())


def _record(row: sqlite3.Row) -> CommandRecord:
    return CommandRecord(
        seq=row["seq"],
        id=row["id"],
        device=row["device"],
        action=row["action"],
        params=json.loads(row["params"]),
        priority=Priority(row["priority"]),
        source=row["source"],
        user=row["user"],
        state=State(row["state"]),
        created_at=row["created_at"],
        ttl_s=row["ttl_s"],
        deadline_at=row["deadline_at"],
        deadline_mono=row["deadline_mono"],
        boot_id=row["boot_id"],
        updated_at=row["updated_at"],
        result=json.loads(row["result"]) if row["result"] is not None else None,
        error_code=row["error_code"],
        error_message=row["error_message"],
        interpretation=json.loads(row["interpretation"]) if row["interpretation"] is not None else None,
    )


def _transitions(conn: sqlite3.Connection, seq: int) -> list[Transition]:
    rows = conn.execute(
        "SELECT state, at, mono, boot_id, detail FROM transitions WHERE command_seq = ? ORDER BY rowid", (seq,)
    )
    return [Transition(State(r[0]), r[1], r[2], r[3], r[4]) for r in rows]


def get(conn: sqlite3.Connection, command_id: str) -> CommandRecord | None:
    row = conn.execute(f"SELECT {_COLUMNS} FROM commands WHERE id = ?", (command_id,)).fetchone()
    if row is None:
        return None
    rec = _record(row)
    rec.transitions = _transitions(conn, rec.seq)
    return rec


def listing(
    conn: sqlite3.Connection, *, state: str | None = None, device: str | None = None, limit: int = 50
) -> list[CommandRecord]:
    where, args = [], []
    if state is not None:
        where.append("state = ?")
        args.append(state)
    if device is not None:
        where.append("device = ?")
        args.append(device)
    clause = f"WHERE {' AND '.join(where)}" if where else ""
    rows = conn.execute(f"SELECT {_COLUMNS} FROM commands {clause} ORDER BY seq DESC LIMIT ?", (*args, limit))
    return [_record(r) for r in rows]


def open_commands(conn: sqlite3.Connection) -> list[CommandRecord]:
    """Commands accepted but not finished, in dispatch order: what a restart must pick up again."""
    marks = ",".join("?" for _ in OPEN_STATES)
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM commands WHERE state IN ({marks}) ORDER BY priority, seq",
        [s.value for s in OPEN_STATES],
    )
    return [_record(r) for r in rows]


def open_ids(conn: sqlite3.Connection) -> list[str]:
    """Ids of the open commands (found through the partial index ``commands_open``)."""
    marks = ",".join("?" for _ in OPEN_STATES)
    rows = conn.execute(f"SELECT id FROM commands WHERE state IN ({marks})", [s.value for s in OPEN_STATES])
    return [r[0] for r in rows]


def open_ever_dispatched(conn: sqlite3.Connection) -> set[str]:
    """Ids of open commands that were dispatched at least once: their request may have reached the device."""
    marks = ",".join("?" for _ in OPEN_STATES)
    rows = conn.execute(
        f"SELECT c.id FROM commands c WHERE c.state IN ({marks}) AND EXISTS "
        "(SELECT 1 FROM transitions t WHERE t.command_seq = c.seq AND t.state = ?)",
        [*(s.value for s in OPEN_STATES), State.DISPATCHED.value],
    )
    return {r[0] for r in rows}


def counts(conn: sqlite3.Connection) -> dict[str, int]:
    return dict(conn.execute("SELECT state, count(*) FROM commands GROUP BY state").fetchall())


def prune(conn: sqlite3.Connection, *, older_than: float, keep_max: int, batch: int) -> int:
    """Delete up to ``batch`` finished commands (their transitions with them) that are past their keeping: final
    before ``older_than`` (wall clock), or older than the newest ``keep_max`` commands. Looks at the oldest
    ``batch`` finished commands only, so a pass costs about the same however large the table is; the caller
    repeats while it gets ``batch`` back. Never an open command, nor one whose interpreted follow-up ("off in 10
    minutes", a max on-time switch-off) is still to come. Returns how many were deleted."""
    row = conn.execute("SELECT seq FROM commands ORDER BY seq DESC LIMIT 1 OFFSET ?", (keep_max,)).fetchone()
    cap_seq = row[0] if row is not None else 0
    cur = conn.execute(
        "DELETE FROM commands WHERE seq IN ("
        " SELECT seq FROM (SELECT c.seq, c.updated_at FROM commands c"
        f"  WHERE c.state IN ({_final_placeholders()})"
        "   AND NOT EXISTS (SELECT 1 FROM scheduled_actions s WHERE s.after = c.id AND s.state IN ('waiting', 'armed'))"
        "  ORDER BY c.seq LIMIT ?)"
        " WHERE updated_at < ? OR seq <= ?)",
        (*_final_values(), batch, older_than, cap_seq),
    )
    return cur.rowcount
