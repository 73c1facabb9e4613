"""The ``resilience_state`` table: one row per breaker, limiter or budget whose state survives a restart. Owned by
:class:`gatewayd.resilience.state.StateRegistry`; every statement on it is here."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

StateRow = tuple[str, str, str, float, str]  # key, kind, state (JSON), saved_at, boot_id


def save(conn: sqlite3.Connection, rows: Sequence[StateRow]) -> int:
    conn.executemany(
        "INSERT INTO resilience_state (key, kind, state, saved_at, boot_id) VALUES (?, ?, ?, ?, ?) "
        "ON CONFLICT (key) DO UPDATE SET kind = excluded.kind, state = excluded.state, "
        "saved_at = excluded.saved_at, boot_id = excluded.boot_id",
        rows,
    )
    return len(rows)


def load(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
    """Raw values: converting here would let one bad row (saved_at stored as text) fail the whole load."""
    return [tuple(r) for r in conn.execute("SELECT key, kind, state, saved_at, boot_id FROM resilience_state")]
