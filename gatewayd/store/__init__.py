import sqlite3

from gatewayd.store.db import Store, open_database

__all__ = ["Store", "open_database", "ping"]


def ping(conn: sqlite3.Connection) -> None:
    """The cheapest statement: a store job that only proves the store answers (health checks, probes)."""
    conn.execute("SELECT 1").fetchone()
