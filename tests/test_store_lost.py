"""The store's file lost under it: deleted, moved (with its directory), replaced, its WAL or shared-memory index
deleted, its filesystem turned read-only or failing, its permissions taken away. Each time the store refuses every
write from then on (``store_lost``, 503), says why once, and nothing is committed after. The whole daemon (health,
sd_notify, HTTP, a restart) is tests/faults/test_store_lost.py."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from gatewayd.errors import StoreLost, StoreUnavailable
from gatewayd.observability.metrics import REGISTRY
from gatewayd.store import Store, open_database
from gatewayd.store import db as store_db
from gatewayd.store.space import DiskSpace
from tests.conftest import ROOT
from tests.loopfs import ext4

SCRATCH = "CREATE TABLE IF NOT EXISTS scratch (n INTEGER PRIMARY KEY)"


def _insert(n: int) -> Any:
    return lambda c: c.execute("INSERT INTO scratch (n) VALUES (?)", (n,)).rowcount


def _rows(path: Path) -> set[int]:
    """What a later start would find in the database at ``path`` (with its WAL, if any)."""
    conn = sqlite3.connect(path)
    try:
        return {r[0] for r in conn.execute("SELECT n FROM scratch")}
    finally:
        conn.close()


def _gauge() -> float | None:
    return REGISTRY.get_sample_value("gatewayd_store_lost")


async def _wait_for(predicate: Any, what: str) -> None:
    """Poll ``predicate`` (the writer thread or the watch makes it true), for at most 5 s."""
    try:
        async with asyncio.timeout(5.0):
            while not predicate():  # noqa: ASYNC110 - set by another thread, nothing to await
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def _refused(store: Store, n: int) -> StoreLost:
    with pytest.raises(StoreLost) as caught:
        await store.write(_insert(n))
    return caught.value


async def test_a_deleted_database_refuses_every_write_from_the_first_one_after(tmp_path: Path) -> None:
    path = tmp_path / "data" / "g.sqlite3"
    kept = tmp_path / "kept.sqlite3"  # the inode the store has open, kept reachable to see what reached it
    async with Store(path) as store:
        await store.write(lambda c: c.execute(SCRATCH))
        for n in range(5):
            await store.write(_insert(n))
        os.link(path, kept)
        with structlog.testing.capture_logs() as logs:
            path.unlink()
            err = await _refused(store, 100)
            for n in range(101, 110):  # and every one after: refused before it reaches the writer
                assert (await asyncio.gather(store.write(_insert(n)), return_exceptions=True))[0].code == "store_lost"
        assert (err.code, err.status, err.transient) == ("store_lost", 503, True)
        assert isinstance(err, StoreUnavailable)  # "not committed" to the MQTT uplink: no PUBACK
        assert f"the database file {path} was deleted" in err.message
        assert "new commands are refused" in err.message and "systemctl restart gatewayd" in err.message
        assert err.details["reason"] == "deleted" and err.details["path"] == str(path)
        lost = store.lost
        assert lost is not None and lost.reason == "deleted" and lost.restart_helps
        assert _gauge() == 1
        # Reads go on, from the file still open: the technician can still look commands up.
        assert await store.read(lambda c: c.execute("SELECT count(*) FROM scratch").fetchone()[0]) == 5
        commits = store.commits
    assert store.commits == commits
    lines = [e for e in logs if e["event"] == "store_lost"]
    assert len(lines) == 1, logs  # once, not per refused write
    assert lines[0]["log_level"] == "error" and lines[0]["reason"] == "deleted" and lines[0]["path"] == str(path)
    assert not [e for e in logs if e["event"] == "store_commit_failed"]
    assert _rows(kept) == set(range(5))  # nothing refused was written to it


async def test_under_concurrent_writes_nothing_is_acknowledged_that_is_not_in_the_file(tmp_path: Path) -> None:
    """Writes keep coming while the file is deleted: each one acknowledged is in the file the store had open, and
    none sent after the deletion is acknowledged."""
    path = tmp_path / "g.sqlite3"
    kept = tmp_path / "kept.sqlite3"
    async with Store(path) as store:
        await store.write(lambda c: c.execute(SCRATCH))
        os.link(path, kept)
        acknowledged: set[int] = set()
        refused: set[int] = set()
        after_unlink: set[int] = set()
        unlinked = False

        async def writer(base: int) -> None:
            # Until a few writes were sent after the deletion (bounded): on a loaded machine a fixed count of writes
            # could all be done before the deleting thread ran.
            after = 0
            for i in range(5000):
                n = base + i
                if unlinked:
                    after_unlink.add(n)
                    after += 1
                try:
                    await store.write(_insert(n))
                except StoreLost:
                    refused.add(n)
                else:
                    acknowledged.add(n)
                if after >= 5:
                    return

        async def deleter() -> None:
            nonlocal unlinked
            await _wait_for(lambda: len(acknowledged) >= 100, "100 writes acknowledged")
            await asyncio.to_thread(path.unlink)
            unlinked = True

        await asyncio.gather(deleter(), *(writer(100_000 * w) for w in range(8)))
        assert acknowledged and refused and after_unlink
        assert not after_unlink & acknowledged
    assert acknowledged <= _rows(kept)


async def test_a_replaced_database_is_left_alone_and_safe_to_open_after_a_kill(tmp_path: Path) -> None:
    """``mv other.sqlite3 gatewayd.sqlite3`` under the store: refused, and the replacement stays as it was, even
    if the process is then killed (as the watchdog does), which leaves the WAL at the path behind."""
    path = tmp_path / "g.sqlite3"
    other = tmp_path / "other.sqlite3"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE other (x)")
    conn.execute("INSERT INTO other VALUES ('the replacement')")
    conn.commit()
    conn.close()
    async with Store(path) as store:
        await store.write(lambda c: c.execute(SCRATCH))
        for n in range(200):  # enough that the WAL holds pages of the store's own database
            await store.write(_insert(n))
        assert (await asyncio.to_thread(os.stat, f"{path}-wal")).st_size > 0
        with structlog.testing.capture_logs() as logs:
            os.replace(other, path)
            err = await _refused(store, 1000)
            assert err.details["reason"] == "replaced" and "was replaced by another file" in err.message
            assert "inode" in err.details["evidence"]
            assert "to open the file now at that path" in err.message
            await _wait_for(lambda: any(e["event"] == "store_lost_checkpointed" for e in logs), "the WAL truncated")
        # What a kill -9 now leaves at the path: the replacement, and the store's WAL and shm.
        killed = tmp_path / "killed"
        killed.mkdir()
        for suffix in ("", "-wal", "-shm"):
            shutil.copyfile(f"{path}{suffix}", killed / f"g.sqlite3{suffix}")
    reopened = open_database(killed / "g.sqlite3")  # integrity_check: "database disk image is malformed" before
    try:
        assert [tuple(r) for r in reopened.execute("SELECT x FROM other")] == [("the replacement",)]
        assert reopened.execute("SELECT count(*) FROM sqlite_master WHERE name = 'scratch'").fetchone()[0] == 0
    finally:
        reopened.close()


async def test_a_deleted_wal_refuses_and_what_it_held_reaches_the_database(tmp_path: Path) -> None:
    """The commits acknowledged before the WAL was deleted, not yet checkpointed, live only in the deleted WAL:
    the store moves them into the database (still in place), so a kill does not lose them."""
    path = tmp_path / "g.sqlite3"
    async with Store(path) as store:
        await store.write(lambda c: c.execute(SCRATCH))
        for n in range(50):
            await store.write(_insert(n))
        with structlog.testing.capture_logs() as logs:
            os.unlink(f"{path}-wal")
            err = await _refused(store, 1000)
            assert err.details["reason"] == "deleted" and err.details["path"] == f"{path}-wal"
            assert "write-ahead log" in err.message and "itself is still in place" in err.message
            await _wait_for(lambda: any(e["event"] == "store_lost_checkpointed" for e in logs), "the checkpoint")
        killed = tmp_path / "killed.sqlite3"
        shutil.copyfile(path, killed)  # a kill leaves the database alone: the WAL is gone
    assert _rows(killed) == set(range(50))


async def test_a_deleted_shm_or_a_moved_directory_is_lost_too(tmp_path: Path) -> None:
    path = tmp_path / "a" / "g.sqlite3"
    async with Store(path) as store:
        await store.write(lambda c: c.execute(SCRATCH))
        os.unlink(f"{path}-shm")
        err = await _refused(store, 1)
        assert err.details["path"] == f"{path}-shm" and "shared-memory index" in err.message
    path = tmp_path / "b" / "g.sqlite3"
    async with Store(path) as store:
        await store.write(lambda c: c.execute(SCRATCH))
        path.parent.rename(tmp_path / "b-moved")
        err = await _refused(store, 1)
        assert err.details["path"] == str(path.parent)
        assert f"the data directory {path.parent} was deleted or moved away" in err.message


async def test_the_watch_finds_a_lost_file_without_any_write(tmp_path: Path) -> None:
    """Health must turn red while nothing is written: DiskSpace's periodic check asks the store."""
    path = tmp_path / "g.sqlite3"
    async with Store(path) as store, DiskSpace(store, tmp_path, min_free_bytes=0, check_s=0.05):
        await store.write(lambda c: c.execute(SCRATCH))
        commits = store.commits
        assert store.lost is None and _gauge() == 0
        path.unlink()
        await _wait_for(lambda: store.lost is not None, "the watch to find the file gone")
        assert store.lost is not None and store.lost.reason == "deleted"
        assert _gauge() == 1
        assert store.commits == commits
        await _refused(store, 1)


async def test_a_filesystem_turned_read_only_refuses_every_write(tmp_path: Path) -> None:
    """ext4 turns read-only after a disk error (errors=remount-ro). On Linux >= 6.x statvfs still says writable;
    the store finds out by the WAL refusing to open for writing (EROFS), and by SQLite's failing commit."""
    with ext4(tmp_path / "fs") as fs:
        path = fs.path / "g.sqlite3"
        async with Store(path) as store:
            await store.write(lambda c: c.execute(SCRATCH))
            await store.write(_insert(1))
            fs.fail()
            assert await asyncio.to_thread(store.check) is not None  # without a write
            err = await _refused(store, 2)
            assert err.details["reason"] == "read_only" and not err.details["restart_helps"]
            assert f"the filesystem holding {path} turned read-only" in err.message and "dmesg" in err.message
            assert "Read-only file system" in err.details["evidence"]
        fs.remount()
        assert _rows(path) == {1}

    with ext4(tmp_path / "fs2") as fs:  # the same, found by the writer itself: a commit that fails
        path = fs.path / "g.sqlite3"
        async with Store(path) as store:
            await store.write(lambda c: c.execute(SCRATCH))
            fs.fail()
            err = await _refused(store, 2)
            assert err.details["reason"] == "read_only"
            assert isinstance(err.__cause__, sqlite3.OperationalError)


async def test_writes_failing_with_io_errors_for_a_while_are_a_lost_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_db, "IO_LOST_AFTER_S", 0.3)
    with ext4(tmp_path / "fs") as fs:
        path = fs.path / "g.sqlite3"
        async with Store(path) as store:
            await store.write(lambda c: c.execute(SCRATCH))
            fs.shut_down()
            # A hiccup is not a lost disk: the first failures are plain store_unavailable, to be retried.
            with pytest.raises(StoreUnavailable) as first:
                await store.write(_insert(1))
            assert not isinstance(first.value, StoreLost) and store.lost is None

            async def until_lost() -> StoreLost:
                while True:
                    try:
                        await store.write(_insert(2))
                    except StoreLost as err:
                        return err
                    except StoreUnavailable:
                        await asyncio.sleep(0.05)

            err = await asyncio.wait_for(until_lost(), 5)
            assert err.details["reason"] == "io_error" and "I/O errors" in err.message
            assert err.message.startswith(f"every write to {path} has failed for")


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    """A directory the unprivileged user ``nobody`` owns (pytest's tmp_path is root's, mode 0700)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run a store as another user (root may write any file)")
    path = Path(tempfile.mkdtemp(prefix="gatewayd-nobody-"))
    os.chown(path, 65534, 65534)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


_AS_NOBODY = """
import asyncio, json, os, sys
from pathlib import Path
from gatewayd.errors import StoreLost
from gatewayd.store import Store

async def main():
    path = Path(sys.argv[1]) / "g.sqlite3"
    async with Store(path) as store:
        await store.write(lambda c: c.execute("CREATE TABLE scratch (n INTEGER PRIMARY KEY)"))
        os.chmod(path, 0)
        found = await asyncio.to_thread(store.check)
        try:
            await store.write(lambda c: c.execute("INSERT INTO scratch VALUES (1)"))
            refused = None
        except StoreLost as err:
            refused = err.to_dict()
        print(json.dumps({"found": found.to_api() if found else None, "refused": refused}))

asyncio.run(main())
"""


def test_a_database_the_gateway_user_can_no_longer_write_is_lost(nobody_dir: Path) -> None:
    """``chmod 000`` on the database: the open descriptors would still write, but the next start could not open it;
    the store says so now, while someone can still read why. Run as ``nobody``: for root, the mode changes nothing."""
    done = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", _AS_NOBODY, nobody_dir],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("{")))
    assert result["found"]["reason"] == "not_writable" and not result["found"]["restart_helps"]
    assert result["refused"]["code"] == "store_lost"
    message = result["refused"]["message"]
    assert "can no longer write" in message and "chown gatewayd:gatewayd" in message


# --- the journal look after a growing commit (Store._confirm) -------------------------------------------------------
# The real case (an ext4 journal aborted under the commit) is tests/faults/test_store_read_only.py, as root on a loop
# device; here the look's two answers are forced, to show what each does to the commit that grew the WAL.


def _growing_insert(n: int) -> Any:
    return lambda c: c.execute("INSERT INTO scratch (n, pad) VALUES (?, randomblob(8000))", (n,))


async def test_a_journal_that_refuses_the_look_after_a_growing_commit_is_the_store_lost_and_the_batch_maybe_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with Store(tmp_path / "g.sqlite3", wal_preallocate_frames=0) as store:
        await store.write(lambda c: c.execute("CREATE TABLE scratch (n INTEGER PRIMARY KEY, pad BLOB)"))
        for n in range(5):
            await store.write(_growing_insert(n))  # the look passes: acknowledged
        assert store.lost is None

        def refused(fd: int, **_: Any) -> None:
            raise OSError(30, "Read-only file system")  # EROFS: what ext4 answers with its journal aborted

        monkeypatch.setattr(store_db.os, "utime", refused)
        with pytest.raises(StoreLost) as lost:
            await store.write(_growing_insert(99))
        assert lost.value.details.get("stored") == "unknown"  # committed by SQLite, not confirmed by the disk
        assert store.lost is not None
        with pytest.raises(StoreLost):
            await store.write(_growing_insert(100))  # nothing more is written


async def test_a_file_the_daemon_may_write_but_does_not_own_keeps_the_fsync_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def not_owner(fd: int, **_: Any) -> None:
        raise PermissionError(1, "Operation not permitted")  # EPERM: only the owner sets a file's times

    async with Store(tmp_path / "g.sqlite3", wal_preallocate_frames=0) as store:
        monkeypatch.setattr(store_db.os, "utime", not_owner)
        await store.write(lambda c: c.execute("CREATE TABLE scratch (n INTEGER PRIMARY KEY, pad BLOB)"))
        for n in range(20):
            await store.write(_growing_insert(n))
        assert store.lost is None
        assert await store.read(lambda c: c.execute("SELECT count(*) FROM scratch").fetchone()[0]) == 20
