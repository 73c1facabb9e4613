"""The one SQLite file: opening, integrity check, migrations, and durable writes off the event loop.

Writes go to one writer thread that commits whatever has queued up in one transaction (group commit), so a
burst of commands costs one fsync, and the event loop never waits on the disk: it awaits a future that the
writer resolves after COMMIT. Each job runs in its own savepoint, so one failing job does not spoil the batch.
Reads run on a second thread with its own connection (WAL lets it read while the writer commits).

A full disk is an error like any other, not the writer's end: SQLite answers SQLITE_FULL ("database or disk is
full") and rolls the whole transaction back, every job of the batch is told :class:`StorageFull`, and the
writer goes on with the next batch. ``full_reason`` says why the last write failed for lack of space until a
write succeeds again; a failing streak is logged once, and once more when commits succeed again.

A lost file is the end of writing (:mod:`gatewayd.store.lost`): when the database, its WAL or its shared-memory
index is deleted or replaced, or the filesystem turns read-only, the files unwritable, or every write fails with an
I/O error for a while, ``lost`` says why, from then on every write fails with :class:`StoreLost` (reads go on, from
the file still open), and it stays so until the gateway restarts: it never reopens a file by itself. The writer
compares the files' identity with the one recorded at open before and after each COMMIT, so no job is acknowledged
once the store can know its file is gone: a batch found moved before COMMIT is rolled back, one found moved after
it (the file went while it was being committed) is reported failed, not acknowledged, and so is a batch whose
sync failed or after which the filesystem turned read-only: those are told they *may* have been stored
(``StoreLoss.error(maybe_stored=True)``), since SQLite had written them to the WAL. A durable commit that made the
WAL longer gets a full ``fsync`` before it is acknowledged (see ``Store._confirm``: ext4's ``fdatasync`` does not
always cover the new length). ``check()`` looks at
everything, the writability too; DiskSpace calls it every ``[store] space_check_s``, so health turns red without
any write.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import queue
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import structlog

from gatewayd.errors import GatewayError, StorageFull, StoreCorrupt, StoreError, StoreLost, StoreUnavailable
from gatewayd.observability.metrics import STORE_LOST
from gatewayd.store import lost as lost_file
from gatewayd.store.lost import StoreLoss

T = TypeVar("T")
Job = Callable[[sqlite3.Connection], Any]
log = structlog.get_logger("gatewayd.store")

_STOP = object()
_SECURE = object()  # wakes the writer to make the store safe to kill, once it is lost (see Store._secure)

# Every write failing with an I/O error (not for lack of space) for this long, this many batches in a row, is a
# failing disk, not a hiccup: the store is lost (io_error). A single failure is retried like any other.
IO_LOST_AFTER_S = 5.0
IO_LOST_AFTER_BATCHES = 3
# The WAL is made this many frames long at open (_preallocate_wal): SQLite's auto-checkpoint at 1,000 pages, and
# room for the commit that crosses it.
WAL_PREALLOCATE_FRAMES = 1_200
WAL_HEADER, WAL_FRAME_HEADER = 32, 24
SYNC_LOSS_LOOKS = 10  # after a failed sync, look this many times, 10 ms apart, for the filesystem turned read-only


def migrations() -> list[tuple[int, str, str]]:
    """(version, file name, SQL) for every file in ``migrations/``, in version order."""
    found = []
    for entry in resources.files("gatewayd.store").joinpath("migrations").iterdir():
        if entry.name.endswith(".sql"):
            found.append((int(entry.name.split("_", 1)[0]), entry.name, entry.read_text(encoding="utf-8")))
    found.sort()
    for expected, (version, name, _) in enumerate(found, start=1):
        if version != expected:
            raise StoreError(f"migration {name} is out of sequence (expected version {expected})")
    return found


def _connect(path: Path, synchronous: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5.0)
    try:
        _configure(conn, synchronous)
    except sqlite3.Error:
        conn.close()
        raise
    return conn


def _configure(conn: sqlite3.Connection, synchronous: str) -> None:
    """Per-connection settings; the first statement that reads the file, so a corrupt header fails here."""
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")


def open_database(path: Path, synchronous: str = "full") -> sqlite3.Connection:
    """Open (creating if needed), check and migrate. Blocking: call it from a thread.

    Raises :class:`StoreCorrupt` for a file that is not a sound SQLite database and :class:`StoreError` for one
    that cannot be opened at all, each with a message a technician can act on.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    except OSError as err:
        raise StoreError(f"cannot create data directory {path.parent}: {err.strerror}") from err
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5.0)
    except sqlite3.Error as err:
        raise StoreError(f"cannot open database {path}: {err}") from err
    try:
        _configure(conn, synchronous)
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise StoreError(f"database {path} cannot use WAL journaling (got {mode!r})")
        problems = [row[0] for row in conn.execute("PRAGMA integrity_check(20)")]
        if problems != ["ok"]:
            raise StoreCorrupt(
                f"database {path} is corrupt ({problems[0]}); move it aside to start with an empty one",
                details={"path": str(path), "problems": problems},
            )
        _migrate(conn, path)
    except sqlite3.DatabaseError as err:
        conn.close()
        if isinstance(err, sqlite3.OperationalError) and "unable to open" in str(err):
            raise StoreError(f"cannot open database {path}: {err}") from err
        if _io_failure(err):
            # Not a verdict on the file: telling someone to move a sound database aside would lose its commands.
            if is_full(err) or _free_bytes(path.parent) < _OPEN_ROOM:
                raise StorageFull(
                    f"cannot open database {path}: no room left on its filesystem ({err}); free some space, "
                    "the database itself is not damaged",
                    details={"path": str(path)},
                ) from err
            raise StoreError(f"cannot open database {path}: {err}", details={"path": str(path)}) from err
        raise StoreCorrupt(
            f"database {path} is not a usable SQLite database ({err}); move it aside to start with an empty one",
            details={"path": str(path)},
        ) from err
    except GatewayError:
        conn.close()
        raise
    return conn


_OPEN_ROOM = 1024 * 1024  # less free than this, an I/O error on open is most likely the disk being full
_IO_CODES = {sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_BUSY}
# Errors that may mean the file went away or cannot be written: each makes the writer look (Store.check).
_FILE_CODES = {sqlite3.SQLITE_READONLY, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_CORRUPT}
# A disk that fails: SQLite says "disk I/O error", then "database disk image is malformed" once its reads fail too.
# COMMIT failing with these: the commit is in the WAL, its sync failed, and whether the disk has it is unknown.
_SYNC_CODES = {sqlite3.SQLITE_IOERR_FSYNC, sqlite3.SQLITE_IOERR_DIR_FSYNC}
_DISK_CODES = {sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CORRUPT}


def _io_failure(err: sqlite3.Error) -> bool:
    """The disk or the lock failed us, as opposed to the file's content being wrong (corrupt, not a database)."""
    code = getattr(err, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in _IO_CODES


def _primary_code(err: BaseException) -> int | None:
    code = getattr(err, "sqlite_errorcode", None)
    return None if code is None else int(code) & 0xFF


def _free_bytes(directory: Path) -> int:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return _OPEN_ROOM  # unknown: do not claim the disk is full


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    current = conn.execute("PRAGMA user_version").fetchone()[0]
    known = migrations()
    if current > len(known):
        raise StoreError(
            f"database {path} has schema version {current}, newer than this gatewayd knows ({len(known)}); "
            "upgrade gatewayd or restore an older database"
        )
    for version, name, sql in known[current:]:
        try:
            conn.executescript(f"BEGIN IMMEDIATE;\n{sql}\nPRAGMA user_version = {version};\nCOMMIT;")
        except sqlite3.Error as err:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise StoreError(f"migration {name} failed on {path}: {err}") from err
        log.info("store_migrated", version=version, migration=name)
    if current == 0 and conn.execute("PRAGMA freelist_count").fetchone()[0]:
        # A new database went through every migration: the tables a later one replaced (0006's outbox) left their
        # pages free. Compacted now, while it is empty, so a new file holds no free pages.
        conn.execute("VACUUM")


class Store:
    """Async context manager around the SQLite file. ``write`` is durable when it returns."""

    def __init__(
        self,
        path: Path,
        *,
        synchronous: str = "full",
        max_batch: int = 512,
        wal_preallocate_frames: int | None = None,
    ):
        self.path = path
        # None: WAL_PREALLOCATE_FRAMES, read at open ([store] wal_preallocate_frames in the daemon)
        self._wal_frames = wal_preallocate_frames
        self._synchronous = synchronous
        self._max_batch = max_batch
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._reader: ThreadPoolExecutor | None = None
        self._read_conn: sqlite3.Connection | None = None
        self._closed = True
        # Observability: how the group commit behaves, and whether the writer is stuck.
        self.commits = 0
        self.jobs_committed = 0
        self.durable_commits = 0  # batches committed as [store] synchronous says (FULL: an fsync each)
        self.lazy_commits = 0  # batches of non-durable jobs only, committed with synchronous = NORMAL (no fsync)
        self._sync_level = synchronous.upper()
        self.last_commit_s = 0.0
        self._busy_since: float | None = None
        # An operator's slow-disk test: each batch waits this long before it commits, as a failing SD card does.
        self.write_delay_s = 0.0
        # Why the last write failed for lack of space (SQLITE_FULL, ENOSPC); None once a write succeeds again.
        self.full_reason: str | None = None
        self.failed_batches = 0
        self._failing: str | None = None  # the error of the current streak of failed batches, logged once
        # Why the store stopped taking writes, for good (until a restart); None while it takes them.
        self.lost: StoreLoss | None = None
        self._identity: dict[str, lost_file.Identity] = {}  # (st_dev, st_ino) of each file, recorded at open
        self._lost_lock = threading.Lock()
        self._secured = False
        self._io_since: float | None = None  # the current streak of batches failing with I/O errors
        self._io_batches = 0
        # Descriptors of the database and its WAL (read-only, held open while the store is: see _confirm) and the
        # size each had at its last fsync.
        self._sync_fds: dict[str, int] = {}
        self._synced_size: dict[str, int] = {}

    async def __aenter__(self) -> Store:
        conn = await asyncio.to_thread(open_database, self.path, self._synchronous)
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gatewayd-store-read")
        try:
            self._read_conn = await asyncio.get_running_loop().run_in_executor(
                self._reader, _connect, self.path, self._synchronous
            )
        except sqlite3.Error as err:
            conn.close()
            self._reader.shutdown()
            raise StoreError(f"cannot open database {self.path} for reading: {err}") from err
        # Both connections are open, so the -wal and -shm exist: this is the identity every check compares with.
        self._identity = await asyncio.to_thread(lost_file.identify, self.path)
        await asyncio.to_thread(self._open_sync_fds)
        STORE_LOST.set(0)
        self._writer = threading.Thread(target=self._write_loop, args=(conn,), name="gatewayd-store-write", daemon=True)
        self._closed = False
        self._writer.start()
        log.info("store_opened", path=str(self.path))
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._jobs.put(_STOP)
        assert self._writer is not None and self._reader is not None
        await asyncio.to_thread(self._writer.join)
        read_conn = self._read_conn
        if read_conn is not None:
            await asyncio.get_running_loop().run_in_executor(self._reader, read_conn.close)
        self._reader.shutdown(wait=True)
        # Only now: closing a descriptor of the database drops every POSIX lock this process holds on it, SQLite's too.
        for fd in self._sync_fds.values():
            os.close(fd)
        self._sync_fds = {}
        log.info("store_closed", path=str(self.path), commits=self.commits, jobs=self.jobs_committed)

    @property
    def stalled_for(self) -> float:
        """Seconds the writer has been inside one batch (0 when idle): a disk that hangs shows here."""
        since = self._busy_since
        return 0.0 if since is None else time.monotonic() - since

    async def write(self, job: Callable[[sqlite3.Connection], T], *, durable: bool = True) -> T:
        """Run ``job`` in the writer thread; return its result once the transaction holding it is committed.

        ``durable=False`` is for a job whose loss on power failure costs nothing but repeated work, such as
        deleting outbox rows the broker acknowledged (lost, they are sent again): a batch of only such jobs is
        committed with ``synchronous = NORMAL``, no fsync; the next durable commit or checkpoint syncs it along with
        everything before it (the WAL is written in order). A batch with any durable job is committed as
        ``[store] synchronous`` says. Within the process (kill -9) both are equally safe."""
        return await self.submit(job, durable=durable)

    def submit(self, job: Callable[[sqlite3.Connection], T], *, durable: bool = True) -> asyncio.Future[T]:
        """Queue ``job`` for the writer thread now; the future is done once its transaction is committed (or it
        failed). Jobs commit in the order they were queued: a job submitted and not awaited is committed no later
        than any job queued after it. Raises at once when the store is closed or lost."""
        if self._closed:
            raise StoreUnavailable("the store is closed")
        lost = self.lost
        if lost is not None:
            raise lost.error()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._jobs.put((job, fut, loop, durable))
        return fut

    async def probe(self) -> None:
        """One small real write (the header page, rewritten with the value it has): whether SQLite can commit
        again after it said the disk was full, when nothing else is writing."""
        await self.write(_rewrite_header)

    async def read(self, job: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed or self._reader is None or self._read_conn is None:
            raise StoreUnavailable("the store is closed")
        conn = self._read_conn

        def run() -> T:
            try:
                return job(conn)
            finally:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")

        try:
            return await asyncio.get_running_loop().run_in_executor(self._reader, run)
        except sqlite3.Error as err:
            raise StoreUnavailable(f"database read failed: {err}") from err

    def check(self) -> StoreLoss | None:
        """Whether the database is still the file at its path and still writable (:func:`lost.inspect`); if not,
        the store is lost from now on. Blocking (``stat``, ``statvfs``, ``open``): call it from a thread."""
        if self.lost is None and self._identity:
            loss = lost_file.inspect(self.path, self._identity)
            if loss is not None:
                self._lose(loss)
        return self.lost

    def _lose(self, loss: StoreLoss) -> StoreLoss:
        """Record the first loss (any thread), say so once, and wake the writer to make the files safe."""
        with self._lost_lock:
            if self.lost is not None:
                return self.lost
            self.lost = loss
        STORE_LOST.set(1)
        log.error(
            "store_lost",
            reason=loss.reason,
            path=str(loss.path),
            database=str(self.path),
            error=loss.message,
            evidence=loss.evidence,
            restart_helps=loss.restart_helps,
            effect="every write refused (503 store_lost) until the gateway restarts; reads go on",
        )
        self._jobs.put(_SECURE)
        return loss

    # --- writer thread ---------------------------------------------------------------------------------------

    def _write_loop(self, conn: sqlite3.Connection) -> None:
        try:
            stop = False
            while not stop:
                batch = [self._jobs.get()]
                while len(batch) < self._max_batch:
                    try:
                        batch.append(self._jobs.get_nowait())
                    except queue.Empty:
                        break
                if batch[-1] is _STOP or _STOP in batch:
                    stop = True
                batch = [item for item in batch if item is not _STOP and item is not _SECURE]
                if batch:
                    self._busy_since = time.monotonic()
                    self._commit_batch(conn, batch)
                    self._busy_since = None
                if self.lost is not None and not self._secured:
                    self._secure(conn)
        finally:
            try:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass  # a checkpoint is an optimisation; the WAL is replayed on next open
            conn.close()

    def _commit_batch(self, conn: sqlite3.Connection, batch: list[Any]) -> None:
        outcomes: list[tuple[bool, Any]] = []
        started = time.monotonic()
        if self.lost is not None:  # jobs queued before it was lost: refused like the ones after
            self._tell(batch, [(False, self.lost.error())] * len(batch))
            return
        if self.write_delay_s:
            time.sleep(self.write_delay_s)  # the writer thread, never the event loop
        try:
            self._sync_for(conn, any(durable for _job, _fut, _loop, durable in batch))
            conn.execute("BEGIN IMMEDIATE")
            for job, _fut, _loop, _durable in batch:
                conn.execute("SAVEPOINT job")
                try:
                    outcomes.append((True, job(conn)))
                    conn.execute("RELEASE job")
                except Exception as err:  # the job's own error goes back to its caller, the batch goes on
                    if not conn.in_transaction:
                        # SQLite rolled the whole transaction back (it does on SQLITE_FULL and on some I/O
                        # errors): the jobs before this one are undone too, and the savepoint is gone.
                        raise _TransactionLost(err) from err
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    outcomes.append((False, _translate(err)))
            # The file may have gone while the jobs ran: then the batch is rolled back, and nothing of it reaches
            # a file that nobody will open again (or, if someone restores it, a file that says it ran).
            gone = self._moved()
            if gone is not None:
                raise _Moved(gone)
            try:
                conn.execute("COMMIT")
            except sqlite3.Error as err:
                if getattr(err, "sqlite_errorcode", None) in _SYNC_CODES:
                    raise _SyncFailed(err) from err
                raise
        except (sqlite3.Error, _TransactionLost, _Moved, _SyncFailed) as exc:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            failure: StoreUnavailable
            if isinstance(exc, _Moved):
                failure = exc.loss.error()
            elif isinstance(exc, _SyncFailed):
                # SQLite wrote the commit to the WAL and then its sync failed: what the disk kept of it is unknown
                # (a disk that turned read-only had often written it already; measured: tests/faults/
                # test_store_read_only.py). After a failed sync the kernel may have dropped what it had not
                # written, so nothing more is written: the store is lost, and this batch is told it may be stored.
                evidence = f"SQLite: {exc.cause} ({getattr(exc.cause, 'sqlite_errorname', '?')})"
                failure = self._sync_loss("-wal", evidence).error(maybe_stored=True)
                failure.__cause__ = exc.cause
            else:
                failure = self._write_failure(exc)
            self._failed(failure, len(batch))
            outcomes = [(False, failure)] * len(batch)
        else:
            gone = self._moved()
            if gone is None and self._sync_level in ("FULL", "EXTRA"):
                gone = self._confirm()
            if gone is not None:
                # It went while the batch was being committed: the commit is in a file that is gone or no longer
                # the one at the path, or on a disk that failed or turned read-only under it. Nobody is told it is
                # durable; each is told it may have been stored, and how to find out.
                failure = gone.error(maybe_stored=True)
                self._failed(failure, len(batch))
                self._tell(batch, [(False, failure)] * len(batch))
                return
            self.commits += 1
            if self._sync_level == "NORMAL" and self._synchronous.upper() != "NORMAL":
                self.lazy_commits += 1
            else:
                self.durable_commits += 1
            self.jobs_committed += len(batch)
            self.last_commit_s = time.monotonic() - started
            full = next((v for ok, v in outcomes if not ok and isinstance(v, StorageFull)), None)
            if full is not None:
                self._failed(full, 1)
            else:
                self._succeeded()
        self._tell(batch, outcomes)

    def _sync_for(self, conn: sqlite3.Connection, durable: bool) -> None:
        """``PRAGMA synchronous`` for the next commit: as configured for a durable batch, NORMAL for the rest."""
        level = self._synchronous.upper() if durable else "NORMAL"
        if level != self._sync_level:
            conn.execute(f"PRAGMA synchronous = {level}")
            self._sync_level = level

    def _tell(self, batch: list[Any], outcomes: list[tuple[bool, Any]]) -> None:
        # Not stalled any more before anyone hears of it: a caller woken by its result must not see a stall.
        self._busy_since = None
        for (_job, fut, loop, _durable), (ok, value) in zip(batch, outcomes, strict=True):
            try:
                loop.call_soon_threadsafe(_settle, fut, ok, value)
            except RuntimeError:
                pass  # the caller's loop is closed: nobody is left to tell, the commit stands

    def _moved(self) -> StoreLoss | None:
        """The identity check the writer makes around every COMMIT: three ``stat`` calls."""
        if self.lost is not None:
            return self.lost
        loss = lost_file.moved(self.path, self._identity)
        return None if loss is None else self._lose(loss)

    def _open_sync_fds(self) -> None:
        for suffix in ("", "-wal"):
            fd = os.open(f"{self.path}{suffix}", os.O_RDONLY | os.O_CLOEXEC)
            self._sync_fds[suffix] = fd
            self._synced_size[suffix] = os.fstat(fd).st_size
        self._preallocate_wal()

    def _preallocate_wal(self) -> None:
        """Make the WAL its working size now, zeros after what it holds, written and synced once.

        A commit that makes the WAL longer is the one ext4 can lose after acknowledging it: the new length and the
        new blocks' "written" state are journal entries of their own, which a disk error right after can throw
        away ("failed to convert unwritten extents to written extents -- potential data loss" in dmesg; see
        _confirm). A WAL already that long is overwritten in place, which SQLite's fdatasync covers. SQLite ignores
        the zeros (a frame is valid only with the header's salt and a running checksum), and after a checkpoint
        it starts again from the WAL's beginning. This is PostgreSQL's practice too (its WAL segments are
        zero-filled before use). Costs that many frames of writes at each start ([store] wal_preallocate_frames);
        skipped, with a warning, when the disk has no room (commits then make it grow, each confirmed by a full
        fsync)."""
        wal = Path(f"{self.path}-wal")
        fd_db = self._sync_fds[""]
        raw = os.pread(fd_db, 2, 16)
        page_size = 65536 if raw == b"\x00\x01" else int.from_bytes(raw, "big") or 4096
        frames = WAL_PREALLOCATE_FRAMES if self._wal_frames is None else self._wal_frames
        target = WAL_HEADER + frames * (WAL_FRAME_HEADER + page_size) if frames else 0
        size = self._synced_size["-wal"]
        if size >= target:
            return
        chunk = bytes(1 << 20)
        try:
            fd = os.open(wal, os.O_WRONLY | os.O_CLOEXEC)
            try:
                offset = size
                while offset < target:
                    offset += os.pwrite(fd, chunk[: min(len(chunk), target - offset)], offset)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as err:
            log.warning("store_wal_preallocate_failed", path=str(wal), error=err.strerror, size=size, wanted=target)
            return
        self._synced_size["-wal"] = target

    def _confirm(self) -> StoreLoss | None:
        """After a durable COMMIT: make sure it is on the disk, and that the disk is still writable.

        SQLite syncs the WAL with ``fdatasync``. When a commit makes the WAL longer, ext4 does not always wait in
        ``fdatasync`` for the journal transaction that records the new length: a disk error that turns the
        filesystem read-only a moment later (errors=remount-ro) throws that transaction away, and after the repair
        the WAL ends before the commit (measured on a loop-mounted ext4 with a standalone script: 5 acknowledged
        commits lost in 40 trials; tests/faults/test_store_read_only.py is the test that keeps it so). So whenever
        the WAL, or the database file after a checkpoint, is longer than at its last sync, it gets a full ``fsync``
        here, and then a journal handle (see below), whose failure is the store lost. Once the WAL has grown to its
        working size and is reused from the start after each checkpoint, a commit overwrites it
        and costs nothing more. Then the read-only flag is looked at: a filesystem that turned read-only under the
        COMMIT may have returned from its sync without writing."""
        for suffix, fd in self._sync_fds.items():
            step = "fsync"
            try:
                st = os.fstat(fd)
                if st.st_size > self._synced_size[suffix]:
                    os.fsync(fd)
                    # ext4 answers an fsync with success when the journal was aborted before it (a disk error) and
                    # the transaction holding the new length was thrown away with it: it only waits for a
                    # transaction still running or committing. Setting the file's times (to what they are) needs a
                    # journal handle, which an aborted journal refuses (EROFS), before the filesystem is marked
                    # read-only. If the journal was not aborted when the fsync returned, its commit is on the disk.
                    # Only the file's owner may set its times: a file the daemon may write but does not own (a group
                    # write bit) keeps the fsync alone, as before, rather than reading EPERM as a lost disk.
                    step = "the journal after fsync of"
                    with contextlib.suppress(PermissionError):
                        os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
            except OSError as err:
                return self._sync_loss(suffix, f"{step} {self.path}{suffix}: {err.strerror}")
            self._synced_size[suffix] = st.st_size
        loss = lost_file.unwritable(self.path)
        return None if loss is None else self._lose(loss)

    def _sync_loss(self, suffix: str, evidence: str) -> StoreLoss:
        """A sync that failed is the store lost: read-only when the filesystem says so within a moment (ext4 aborts
        its journal, which fails the sync, just before it marks itself read-only), a failing disk otherwise."""
        for _ in range(SYNC_LOSS_LOOKS):
            loss = lost_file.unwritable(self.path)
            if loss is not None:
                return self._lose(loss)
            time.sleep(0.01)
        return self._lose(lost_file.sync_failed(self.path, suffix, evidence))

    def _write_failure(self, exc: BaseException) -> StoreUnavailable:
        """A batch's failure as the daemon's error. An error that may come from the file itself (read-only, I/O,
        cannot open) makes the writer look at the file: gone, replaced or unwritable is :class:`StoreLost`, and so
        is a streak of I/O errors that lasts (a failing disk)."""
        cause = exc.cause if isinstance(exc, _TransactionLost) else exc
        code = _primary_code(cause)
        if is_full(cause) or code not in _FILE_CODES:
            return write_error(cause)
        loss = self.check()
        if loss is None and code == sqlite3.SQLITE_READONLY:
            loss = self._lose(lost_file.read_only(self.path, f"SQLite: {cause}"))
        if loss is None and code in _DISK_CODES:
            now = time.monotonic()
            if self._io_since is None:
                self._io_since, self._io_batches = now, 0
            self._io_batches += 1
            lasted = now - self._io_since
            # Near a full disk an I/O error is most likely the lack of room (the WAL index cannot grow): not lost.
            if (
                self._io_batches >= IO_LOST_AFTER_BATCHES
                and lasted >= IO_LOST_AFTER_S
                and _free_bytes(self.path.parent) >= _OPEN_ROOM
            ):
                loss = self._lose(lost_file.io_errors(self.path, lasted, self._io_batches, f"SQLite: {cause}"))
        if loss is None:
            return write_error(cause)
        failure = loss.error()
        failure.__cause__ = cause
        return failure

    def _secure(self, conn: sqlite3.Connection) -> None:
        """Once the file is gone or replaced: move the WAL's pages into the database file this connection has
        open and truncate the WAL, so the process can be killed safely (the watchdog's SIGABRT, kill -9).

        Left as it is, the WAL at the path is still ours, full of pages of our database; the next start would
        replay them into whatever file is at the path now, and a replacement would read as "database disk image
        is malformed". Truncated, it is ignored. When it is the WAL that was deleted, this also copies what it held
        (commits acknowledged before, not yet checkpointed) into the database, which is still in place.
        Nothing to do for a read-only or unwritable filesystem: no checkpoint could be written there."""
        self._secured = True
        loss = self.lost
        if loss is None or not loss.restart_helps:
            return
        try:
            busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        except sqlite3.Error as err:
            log.warning("store_lost_checkpoint_failed", error=str(err))
            return
        if busy:  # a read held it past the busy timeout: the WAL is not truncated
            log.warning("store_lost_checkpoint_failed", error="busy")
        else:
            log.info("store_lost_checkpointed", wal=f"{self.path}-wal")

    def _failed(self, failure: StoreUnavailable, jobs: int) -> None:
        self.failed_batches += 1
        if isinstance(failure, StoreLost):
            return  # said once, as store_lost, when it was found
        if isinstance(failure, StorageFull):
            self.full_reason = str(failure.__cause__ or failure.message)
        if self._failing is None:
            log.error("store_commit_failed", error=failure.message, code=failure.code, jobs=jobs)
            self._failing = failure.message

    def _succeeded(self) -> None:
        self.full_reason = None
        self._io_since = None
        if self._failing is not None:
            log.info("store_commit_recovered", failed_batches=self.failed_batches)
            self._failing = None
            self.failed_batches = 0


class _SyncFailed(Exception):
    def __init__(self, cause: sqlite3.Error):
        super().__init__(str(cause))
        self.cause = cause


class _TransactionLost(Exception):
    def __init__(self, cause: Exception):
        super().__init__(str(cause))
        self.cause = cause


class _Moved(Exception):
    def __init__(self, loss: StoreLoss):
        super().__init__(loss.message)
        self.loss = loss


def _rewrite_header(conn: sqlite3.Connection) -> None:
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    conn.execute(f"PRAGMA user_version = {version}")


def is_full(err: BaseException) -> bool:
    """SQLite's SQLITE_FULL (the disk, or max_page_count), or ENOSPC / EDQUOT from the OS."""
    if isinstance(err, sqlite3.Error):
        code = getattr(err, "sqlite_errorcode", None)
        return code is not None and code & 0xFF == sqlite3.SQLITE_FULL
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)


def write_error(err: BaseException) -> StoreUnavailable:
    """A failed write as the daemon's error: :class:`StorageFull` when there was no room for it."""
    failure: StoreUnavailable
    if is_full(err):
        failure = StorageFull(f"the database cannot grow: {err}")
    else:
        failure = StoreUnavailable(f"database write failed: {err}")
    failure.__cause__ = err
    return failure


def _translate(err: Exception) -> Exception:
    if isinstance(err, GatewayError):
        return err
    if isinstance(err, sqlite3.Error) or is_full(err):
        return write_error(err)
    return err


def _settle(fut: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if fut.done():  # the caller gave up waiting; the write itself still happened
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)
