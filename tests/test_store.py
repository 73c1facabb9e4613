"""The SQLite store: migrations, integrity checks, and group commit off the event loop."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from gatewayd.errors import StoreCorrupt, StoreError, StoreUnavailable
from gatewayd.store import Store, open_database
from gatewayd.store.db import migrations


def test_migrations_are_numbered_files_and_set_user_version(tmp_path: Path) -> None:
    known = migrations()
    assert [v for v, _, _ in known] == list(range(1, len(known) + 1))
    conn = open_database(tmp_path / "g.db")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(known)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"commands", "transitions"} <= tables
    conn.close()
    open_database(tmp_path / "g.db").close()  # reopening migrates nothing and keeps the data


def test_database_from_a_newer_gatewayd_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "g.db"
    open_database(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(StoreError, match="newer than this gatewayd"):
        open_database(path)


def test_garbage_file_is_reported_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "g.db"
    path.write_bytes(b"\x00garbage" * 1000)
    with pytest.raises(StoreCorrupt, match="move it aside"):
        open_database(path)


def test_damaged_pages_fail_the_integrity_check(tmp_path: Path) -> None:
    path = tmp_path / "g.db"
    conn = open_database(path)
    conn.execute("CREATE TABLE scratch (n INTEGER PRIMARY KEY, text TEXT NOT NULL)")
    conn.execute("CREATE INDEX scratch_text ON scratch (text)")
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO scratch (n, text) VALUES (?, ?)", [(i, f"row {i}" * 5) for i in range(5000)])
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    data = bytearray(path.read_bytes())
    page = 4096
    for offset in range(3 * page + 100, 6 * page, 7):  # scribble over index and table pages, keep the header
        data[offset] = 0xA5
    path.write_bytes(bytes(data))
    with pytest.raises(StoreCorrupt):
        open_database(path)


SCRATCH = "CREATE TABLE IF NOT EXISTS scratch (n INTEGER PRIMARY KEY, text TEXT NOT NULL)"


async def test_concurrent_writes_are_group_committed(tmp_path: Path) -> None:
    async with Store(tmp_path / "g.db") as store:
        await store.write(lambda c: c.execute(SCRATCH))
        before = store.commits

        def job(i: int):  # type: ignore[no-untyped-def]
            return lambda c: c.execute("INSERT INTO scratch (n, text) VALUES (?, 'x')", (i,)).lastrowid

        rowids = await asyncio.gather(*(store.write(job(i)) for i in range(500)))
        commits = store.commits - before
        assert len(set(rowids)) == 500
        assert commits < 100, f"{commits} commits for 500 concurrent writes: group commit is not working"
        count = await store.read(lambda c: c.execute("SELECT count(*) FROM scratch").fetchone()[0])
        assert count == 500


async def test_one_failing_job_does_not_spoil_its_batch(tmp_path: Path) -> None:
    async with Store(tmp_path / "g.db") as store:
        await store.write(lambda c: c.execute(SCRATCH))

        def bad(c: sqlite3.Connection) -> None:
            c.execute("INSERT INTO scratch (text) VALUES ('half')")
            c.execute("INSERT INTO scratch (n) VALUES (1)")  # NOT NULL violated: the job's first row goes too

        def good(c: sqlite3.Connection) -> int:
            return int(c.execute("INSERT INTO scratch (text) VALUES ('whole')").lastrowid or 0)

        results = await asyncio.gather(store.write(good), store.write(bad), store.write(good), return_exceptions=True)
        assert isinstance(results[1], StoreUnavailable)
        assert isinstance(results[0], int) and isinstance(results[2], int)
        texts = await store.read(lambda c: [r[0] for r in c.execute("SELECT text FROM scratch")])
        assert texts == ["whole", "whole"]


async def test_the_event_loop_keeps_running_while_the_disk_is_slow(tmp_path: Path) -> None:
    """A commit that takes 300 ms must not stall the loop: ticks keep coming while the write is pending."""
    async with Store(tmp_path / "g.db") as store:
        release = threading.Event()

        def slow(c: sqlite3.Connection) -> None:
            release.wait(0.3)  # a stand-in for an SD card taking its time inside the transaction

        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        started = time.monotonic()
        await store.write(slow)
        task.cancel()
        assert time.monotonic() - started >= 0.3
        assert ticks >= 15
        assert store.stalled_for == 0.0


async def test_writes_after_close_are_refused(tmp_path: Path) -> None:
    store = Store(tmp_path / "g.db")
    async with store:
        pass
    with pytest.raises(StoreUnavailable):
        await store.write(lambda c: None)
