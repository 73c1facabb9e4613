"""The interpreter's tables: ``interpret_spend`` (what each billed provider call cost, by UTC day) and
``interpret_cache`` (a provider's answer to a text, by its cache key). Owned by :mod:`gatewayd.interpret.ledger`
and :mod:`gatewayd.interpret.cache`; every statement on them is here. Functions take a connection and run inside a
store job (:meth:`gatewayd.store.Store.read` / ``write``)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

# --- spend ---------------------------------------------------------------------------------------------------------

SpendValues = tuple[float, str, str, str, int, int, float, int]  # at, day, provider, model, in, out, cost, estimated


def spend_by_provider(conn: sqlite3.Connection, day: str) -> list[tuple[str, float]]:
    rows = conn.execute("SELECT provider, sum(cost) FROM interpret_spend WHERE day = ? GROUP BY provider", (day,))
    return [(str(r[0]), float(r[1])) for r in rows]


def prune_spend(conn: sqlite3.Connection, before_day: str) -> None:
    conn.execute("DELETE FROM interpret_spend WHERE day < ?", (before_day,))


def insert_spend(conn: sqlite3.Connection, rows: Iterable[SpendValues]) -> None:
    conn.executemany(
        "INSERT INTO interpret_spend (at, day, provider, model, tokens_in, tokens_out, cost, estimated) "
        "VALUES (?,?,?,?,?,?,?,?)",
        list(rows),
    )


def spend_totals(conn: sqlite3.Connection, day: str) -> dict[str, dict[str, Any]]:
    rows = conn.execute(
        "SELECT provider, count(*), sum(tokens_in), sum(tokens_out), sum(cost) FROM interpret_spend "
        "WHERE day = ? GROUP BY provider",
        (day,),
    )
    return {
        str(r[0]): {"calls": int(r[1]), "tokens_in": int(r[2]), "tokens_out": int(r[3]), "cost": float(r[4])}
        for r in rows
    }


# --- cache ---------------------------------------------------------------------------------------------------------

# key, registry, provider, model, text, command (JSON), cost, created_at, expires_at
CacheValues = tuple[str, str, str, str, str, str, float, float, float]


def cache_rows(conn: sqlite3.Connection, keys: Sequence[str], now: float) -> list[sqlite3.Row]:
    """The live rows among ``keys``: created no later than ``now`` (a clock stepped back is not trusted)."""
    marks = ",".join("?" for _ in keys)
    return conn.execute(
        f"SELECT key, provider, model, command, cost, created_at FROM interpret_cache "
        f"WHERE key IN ({marks}) AND created_at <= ? AND expires_at > ?",
        (*keys, now, now),
    ).fetchall()


def cache_put(conn: sqlite3.Connection, values: CacheValues, max_entries: int) -> None:
    """Insert or replace, then keep at most ``max_entries`` (the oldest go first)."""
    conn.execute(
        "INSERT OR REPLACE INTO interpret_cache (key, registry, provider, model, text, command, cost, created_at, "
        "expires_at) VALUES (?,?,?,?,?,?,?,?,?)",
        values,
    )
    excess = cache_count(conn) - max_entries
    if excess > 0:
        conn.execute(
            "DELETE FROM interpret_cache WHERE key IN (SELECT key FROM interpret_cache ORDER BY created_at LIMIT ?)",
            (excess,),
        )


def cache_keys(conn: sqlite3.Connection) -> list[str]:
    """Every key in the cache (at most ``[interpret] cache_max_entries``)."""
    return [key for (key,) in conn.execute("SELECT key FROM interpret_cache")]


def cache_drop(conn: sqlite3.Connection, key: str) -> None:
    conn.execute("DELETE FROM interpret_cache WHERE key = ?", (key,))


def cache_purge(conn: sqlite3.Connection, registry: str, now: float) -> int:
    """Delete rows of any other registry digest, expired rows and rows from the future; how many went."""
    cur = conn.execute(
        "DELETE FROM interpret_cache WHERE registry != ? OR expires_at <= ? OR created_at > ?", (registry, now, now)
    )
    return int(cur.rowcount)


def cache_count(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM interpret_cache").fetchone()[0])
