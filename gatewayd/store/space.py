"""Room on the disk: whether the gateway may take new work.

The data directory's filesystem holds the database, and every accepted command still has writes to make (its
``dispatched`` and final states, its result in the outbox). So new work is refused (503 ``storage_full``, an
MQTT ``command_rejected`` event) while the filesystem has less than ``[store] min_free_bytes`` free, and that
reserve is left to the commands already accepted. Critical commands (an emergency stop) may still use it.

The storage is full while either is true:

- the free space measured (``statvfs``, what an unprivileged user may use, in a thread, every
  ``[store] space_check_s``) is below the reserve; it counts as recovered once it is a margin above, so a
  filesystem hovering at the line does not flap;
- SQLite itself said the disk is full (:attr:`Store.full_reason`), until a write succeeds again. When nothing else
  writes, a small probe write finds out once the measured space is back.

Each change is logged once (``storage_full``, ``storage_recovered``) and shown by ``gatewayd_storage_full``.

The same watch asks the store whether its file is still there and writable (:meth:`Store.check`), so a database
deleted, replaced or on a filesystem turned read-only shows on /healthz within ``space_check_s`` even when nothing
is being written.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import structlog

from gatewayd.errors import StorageFull, StoreUnavailable
from gatewayd.observability.metrics import STORAGE_FREE_BYTES, STORAGE_FULL
from gatewayd.store.db import Store
from gatewayd.tasks import TaskOwner

log = structlog.get_logger("gatewayd.store")

RETRY_AFTER_S = 30.0  # what a refused client is told: freeing space takes someone's action, not a moment
_MARGIN_MAX = 8 * 1024 * 1024  # recovered at reserve + min(reserve / 8, 8 MiB)


def _measure(path: Path) -> int:
    return shutil.disk_usage(path).free  # f_bavail: what the daemon's own (unprivileged) user may still use


class DiskSpace:
    def __init__(
        self,
        store: Store,
        path: Path,
        *,
        min_free_bytes: int,
        check_s: float,
        free_bytes: Callable[[Path], int] = _measure,
    ):
        self.store = store
        self.path = path
        self.min_free_bytes = min_free_bytes
        self.check_s = check_s
        self._free_bytes = free_bytes
        self.free: int | None = None  # the last measurement; None until the first, or while it fails
        self._low = False
        self._full = False
        self._since: float | None = None  # wall clock, for display
        self._since_mono = 0.0
        self._measure_error: str | None = None
        self._tasks = TaskOwner("storage")

    async def __aenter__(self) -> DiskSpace:
        await self.check()
        await self._tasks.open()
        self._tasks.spawn("watch", self._watch())
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._tasks.close()

    @property
    def margin(self) -> int:
        return min(self.min_free_bytes // 8, _MARGIN_MAX)

    @property
    def full(self) -> bool:
        """New work is refused now. Read on every command, so it also notices SQLite's verdict between checks."""
        self._update()
        return self._full

    @property
    def reason(self) -> str | None:
        if self._low:
            return f"{size_text(self.free)} free on {self.path}, below the {size_text(self.min_free_bytes)} reserve"
        if self.store.full_reason is not None:
            return f"the database cannot grow ({self.store.full_reason})"
        return None

    def refusal(self) -> StorageFull:
        """The error a refused request gets."""
        return StorageFull(
            f"the gateway's storage is full ({self.reason}): new commands are refused until space is freed; "
            "commands already accepted still run",
            details={"free_bytes": self.free, "min_free_bytes": self.min_free_bytes},
            retry_after_s=RETRY_AFTER_S,
        )

    def status(self) -> dict[str, Any]:
        full = self.full
        return {
            "full": full,
            "reason": self.reason,
            "since": self._since if full else None,
            "free_bytes": self.free,
            "min_free_bytes": self.min_free_bytes,
            "path": str(self.path),
            "database_full": self.store.full_reason,  # SQLite's own word, while its writes fail for lack of room
            "measure_error": self._measure_error,
        }

    async def check(self) -> bool:
        """Measure now (in a thread: ``statvfs`` may wait on a sick card); probe the store if SQLite said full and
        the space looks back. Returns whether the storage is full."""
        await asyncio.to_thread(self.store.check)
        try:
            free = await asyncio.to_thread(self._free_bytes, self.path)
        except OSError as err:
            if self._measure_error is None:
                log.warning("storage_measure_failed", path=str(self.path), error=err.strerror or str(err))
            self._measure_error = err.strerror or str(err)
        else:
            self._measure_error = None
            self.free = free
            STORAGE_FREE_BYTES.set(free)
            if free < self.min_free_bytes:
                self._low = True
            elif free >= self.min_free_bytes + self.margin:
                self._low = False
        if self.store.full_reason is not None and not self._low:
            try:
                await self.store.probe()
            except StoreUnavailable:
                pass  # still full; the store logged it when the streak began
        return self.full

    def _update(self) -> None:
        full = self._low or self.store.full_reason is not None
        if full == self._full:
            return
        self._full = full
        STORAGE_FULL.set(int(full))
        if full:
            self._since, self._since_mono = time.time(), time.monotonic()
            log.error(
                "storage_full",
                reason=self.reason,
                free_bytes=self.free,
                min_free_bytes=self.min_free_bytes,
                path=str(self.path),
                effect="new commands refused (503 storage_full); accepted commands go on; telemetry not stored",
            )
        else:
            log.info(
                "storage_recovered",
                free_bytes=self.free,
                full_for_s=round(time.monotonic() - self._since_mono, 1),
            )
            self._since = None

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.check_s)
            await self.check()


def size_text(n: int | None) -> str:
    if n is None:
        return "unknown"
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
