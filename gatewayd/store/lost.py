"""Whether the database file the store opened is still the file at its path, and still writable.

SQLite notices none of this by itself. A deleted database stays open: SQLite goes on committing to the unlinked
inode, which the kernel frees when the process exits, so every command acknowledged meanwhile is lost. A file moved
over it (``mv other.sqlite3 gatewayd.sqlite3``) is never looked at while the connections stay open. And a filesystem
that turns read-only shows up only as the next write's "disk I/O error". Hence these checks (all blocking, run in
the writer thread or another thread, never on the event loop):

- :func:`moved`: ``(st_dev, st_ino)`` of the database, its ``-wal`` and its ``-shm``, recorded when the store
  opened, against an ``os.stat`` of each path now. A path that is missing is a deleted file (or a moved one, or its
  directory gone); another inode is a replaced one. Three ``stat`` calls; the writer does it before and after every
  COMMIT (bench/store_check.py measures it).
- :func:`unwritable`: the mount's read-only flag (``statvfs``), the permissions (``access``), and opening the WAL
  for writing. Only the last sees ext4's emergency read-only: after a disk error with ``errors=remount-ro``,
  Linux 6.x marks the filesystem ``emergency_ro`` without the read-only mount flag, so ``statvfs`` and ``access``
  still say writable while every write fails with EROFS. The WAL is opened, never the database or the ``-shm``:
  closing any descriptor of a file drops every POSIX lock the process holds on it, and SQLite keeps its locks on
  those two (none on the WAL).

A :class:`StoreLoss` is final: the store refuses every write from then on, until the gateway restarts.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gatewayd.errors import StoreLost

Identity = tuple[int, int]  # (st_dev, st_ino)

SUFFIXES = ("", "-wal", "-shm")  # SQLite's files for one database in WAL mode, all open while the store is
_ROLE = {"": "database file", "-wal": "write-ahead log", "-shm": "shared-memory index"}

# A restart is the remedy when the file is gone or replaced: the next start opens a new one, or the one now at the
# path. It does not fix a read-only or failing disk, nor permissions: the next start would fail to open.
RESTART_HELPS = frozenset({"deleted", "replaced"})


@dataclass(frozen=True)
class StoreLoss:
    """Why the store stopped taking writes, for the error, /healthz, sd_notify STATUS and the log."""

    reason: str  # deleted | replaced | read_only | not_writable | io_error
    path: Path  # the file concerned: the database, its -wal or -shm, or the data directory
    message: str  # what happened and what to do, for a technician
    evidence: str  # what was observed: the errno, the inodes, SQLite's message
    since: float = field(default_factory=time.time)  # wall clock, for display

    @property
    def restart_helps(self) -> bool:
        return self.reason in RESTART_HELPS

    @property
    def summary(self) -> str:
        """A few words for the sd_notify STATUS line."""
        return f"{self.reason.replace('_', ' ')}: {self.path}"

    def error(self, *, maybe_stored: bool = False) -> StoreLost:
        """The error every refused write gets. ``maybe_stored``: the loss was found while the write's COMMIT was
        under way (its sync failed, or the check right after it found the file gone or the disk read-only), so the
        write may or may not have reached the disk: the caller is told it is not
        acknowledged, and how to find out once the disk is repaired."""
        if not maybe_stored:
            return StoreLost(self.message, details=self.to_api())
        return StoreLost(
            f"{self.message}. This write was being committed when it happened and may have been stored: after the "
            "repair, look the command up by its id before sending it again, or send it again with the same id "
            "(a known id is answered from the store and never runs twice)",
            details={**self.to_api(), "stored": "unknown"},
        )

    def to_api(self) -> dict[str, Any]:
        return {
            "reason": self.reason,
            "path": str(self.path),
            "message": self.message,
            "evidence": self.evidence,
            "since": self.since,
            "restart_helps": self.restart_helps,
        }


def identify(path: Path) -> dict[str, Identity]:
    """The identity of each of the database's files that exists now (all three do once SQLite has opened it)."""
    found: dict[str, Identity] = {}
    for suffix in SUFFIXES:
        try:
            st = os.stat(f"{path}{suffix}")
        except FileNotFoundError:
            continue
        found[suffix] = (st.st_dev, st.st_ino)
    return found


def moved(path: Path, known: Mapping[str, Identity]) -> StoreLoss | None:
    """The first of the files in ``known`` that is no longer at its path, or is another file now."""
    for suffix, identity in known.items():
        name = f"{path}{suffix}"  # a str, not a Path: this runs twice per commit, and building a Path costs more
        try:
            st = os.stat(name)
        except FileNotFoundError:
            return _gone(path, suffix)
        except OSError as err:  # EACCES: the directory's permissions changed, the path cannot be followed
            return _not_writable(path, Path(name), err)
        if (st.st_dev, st.st_ino) != identity:
            return _replaced(path, suffix, identity, (st.st_dev, st.st_ino))
    return None


def unwritable(path: Path) -> StoreLoss | None:
    """Whether the database cannot be written any more, although it is still in place."""
    try:
        flags = os.statvfs(path.parent).f_flag
    except OSError:
        flags = 0  # the directory is gone: moved() says so
    if flags & os.ST_RDONLY:
        return read_only(path, "the filesystem is mounted read-only (statvfs ST_RDONLY)")
    for name in (path, Path(f"{path}-wal")):
        if not os.access(name, os.W_OK) and name.exists():
            return _not_writable(path, name, OSError(errno.EACCES, os.strerror(errno.EACCES)))
    wal = f"{path}-wal"
    try:
        fd = os.open(wal, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None  # moved() says so
    except OSError as err:
        if err.errno == errno.EROFS:
            return read_only(path, f"opening {wal} for writing: {err.strerror}")
        if err.errno in (errno.EACCES, errno.EPERM):
            return _not_writable(path, Path(wal), err)
        return None  # an I/O error here is one more sign; the writer's failing commits decide (io_error)
    os.close(fd)
    return None


def inspect(path: Path, known: Mapping[str, Identity]) -> StoreLoss | None:
    return moved(path, known) or unwritable(path)


# --- what each one says ------------------------------------------------------------------------------------------

_REFUSED = "nothing written now would be durable, so new commands are refused"
_RESTART = "restart the gateway (systemctl restart gatewayd; under systemd its watchdog does it within WatchdogSec)"


def _gone(path: Path, suffix: str) -> StoreLoss:
    if not path.parent.exists():
        return StoreLoss(
            "deleted",
            path.parent,
            f"the data directory {path.parent} was deleted or moved away while the gateway ran, with the database "
            f"{path.name} in it; {_REFUSED} — {_RESTART} to start over with a new, empty one",
            f"{path.parent}: {os.strerror(errno.ENOENT)}",
        )
    name = Path(f"{path}{suffix}")
    if suffix == "":
        message = (
            f"the database file {path} was deleted (or moved away) while the gateway ran; {_REFUSED} — {_RESTART} "
            "to open a new, empty one"
        )
    else:
        message = (
            f"the database's {_ROLE[suffix]} {name} was deleted while the gateway ran; {_REFUSED} — {_RESTART}; "
            f"the database file {path.name} itself is still in place"
        )
    return StoreLoss("deleted", name, message, f"{name}: {os.strerror(errno.ENOENT)}")


def _replaced(path: Path, suffix: str, was: Identity, now: Identity) -> StoreLoss:
    name = Path(f"{path}{suffix}")
    opens = "the file now at that path" if suffix == "" else f"{path.name} with it"
    return StoreLoss(
        "replaced",
        name,
        f"the {_ROLE[suffix]} {name} was replaced by another file while the gateway ran; the gateway still has the "
        f"old one open and {_REFUSED} — {_RESTART} to open {opens}",
        f"{name}: device {was[0]} inode {was[1]} when opened, device {now[0]} inode {now[1]} now",
    )


def read_only(path: Path, evidence: str) -> StoreLoss:
    return StoreLoss(
        "read_only",
        path.parent,
        f"the filesystem holding {path} turned read-only (a disk error?); {_REFUSED}. Check dmesg, repair or replace "
        "the disk or SD card, then restart the gateway (systemctl restart gatewayd): a restart before that cannot "
        "open the database either",
        evidence,
    )


def _not_writable(path: Path, name: Path, err: OSError) -> StoreLoss:
    return StoreLoss(
        "not_writable",
        name,
        f"the gateway's user can no longer write {name} ({err.strerror}): its owner or permissions changed; "
        f"{_REFUSED}. Give the files back to the gateway (chown gatewayd:gatewayd {path.parent} {path}*; chmod 0750 "
        "the directory, 0640 the files), then restart the gateway (systemctl restart gatewayd)",
        f"{name}: {err.strerror}",
    )


def io_errors(path: Path, seconds: float, batches: int, evidence: str) -> StoreLoss:
    return StoreLoss(
        "io_error",
        path,
        f"every write to {path} has failed for {seconds:.0f} s ({batches} attempts: I/O errors, or pages that read "
        f"back damaged); the disk or SD card is failing and {_REFUSED}. Check dmesg, replace the card, then restart "
        "the gateway (systemctl restart gatewayd)",
        evidence,
    )


def sync_failed(path: Path, suffix: str, evidence: str) -> StoreLoss:
    name = Path(f"{path}{suffix}")
    return StoreLoss(
        "io_error",
        name,
        f"the disk failed to store a commit to {name} (its sync failed): what the kernel had not written may be "
        f"gone, and the disk or SD card is failing; {_REFUSED}. Check dmesg, replace the card, then restart the "
        "gateway (systemctl restart gatewayd)",
        evidence,
    )
