"""Persistence of breaker states, limiter levels and adaptive rates across restarts.

Each tool gives a JSON-able ``snapshot()`` in which time is stored as remaining durations (an open breaker's
seconds until its probe, a window's entry ages), never as monotonic readings, which mean nothing after a reboot.
:class:`ResilienceState` saves every registered tool's snapshot in one store job (one transaction, one fsync)
and restores them with the downtime, when it can be known:

- same boot (the process restarted, the machine did not): the monotonic clock kept running, so the downtime is
  the difference of two monotonic readings, immune to the wall clock being stepped in between;
- another boot: the wall-clock difference, but only if the wall clock now reads later than at the save. A Pi
  without a real-time clock boots in the past until NTP answers; then the downtime is unknown.

Each tool decides what downtime means to it: an open breaker waits that much less (unknown: the full remainder,
the safe side for a target that was failing); a bucket refills by it, capped at capacity (unknown: no refill, the
safe side for the target); an adaptive rate keeps its rate either way (it is where the other side left us).

Loading never fails the daemon: rows for unknown keys or of another kind are skipped, and a row that does not
parse or restore is logged and skipped.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from gatewayd.clock import BOOT_ID
from gatewayd.errors import StoreUnavailable
from gatewayd.observability.metrics import RESILIENCE_STATE_SAVES, RESILIENCE_STATE_SKIPPED, counter
from gatewayd.resilience.clock import REAL_CLOCK, Clock
from gatewayd.store import resilience as sql

if TYPE_CHECKING:
    from gatewayd.store import Store

log = structlog.get_logger("gatewayd.resilience")


class Persistent(Protocol):
    @property
    def kind(self) -> str: ...

    def snapshot(self) -> dict[str, Any]: ...

    def restore(self, state: Mapping[str, Any], *, downtime_s: float | None = None) -> None: ...


class ResilienceState:
    """A registry of tools to persist under stable keys (``breaker:provider:openai``, ``limiter:api``)."""

    def __init__(
        self,
        *,
        clock: Clock = REAL_CLOCK,
        wall: Callable[[], float] = time.time,
        boot_id: str | None = None,
    ):
        self._clock = clock
        self._wall = wall
        self.boot_id = BOOT_ID if boot_id is None else boot_id
        self._tools: dict[str, Persistent] = {}

    def register(self, key: str, tool: Persistent) -> None:
        if key in self._tools:
            raise ValueError(f"{key!r} is already registered")
        self._tools[key] = tool

    def unregister(self, key: str) -> None:
        self._tools.pop(key, None)

    def tools(self) -> dict[str, Persistent]:
        return dict(self._tools)

    def __contains__(self, key: str) -> bool:
        return key in self._tools

    def __len__(self) -> int:
        return len(self._tools)

    def rows(self) -> list[tuple[str, str, str, float, str]]:
        """One row per tool, snapshotted now, on the loop, so all of them describe the same instant."""
        mono, wall = self._clock.monotonic(), self._wall()
        return [
            (key, tool.kind, json.dumps({"mono": mono, "snapshot": tool.snapshot()}), wall, self.boot_id)
            for key, tool in self._tools.items()
        ]

    async def save(self, store: Store) -> int:
        """Write every registered tool's state in one store job; returns the number of rows written."""
        rows = self.rows()

        try:
            written = await store.write(lambda c: sql.save(c, rows))
        except Exception:
            counter(RESILIENCE_STATE_SAVES, "failed").inc()
            raise
        counter(RESILIENCE_STATE_SAVES, "ok").inc()
        return written

    async def load(self, store: Store) -> int:
        """Restore every registered tool that has a sound row; returns how many were restored."""

        restored = 0
        for raw_key, raw_kind, text, saved_at, boot_id in await store.read(sql.load):
            key, kind = str(raw_key), str(raw_kind)
            tool = self._tools.get(key)
            if tool is None:
                self._skip("unknown_key", key, kind)
                continue
            if kind != tool.kind:
                self._skip("wrong_kind", key, kind, expected=tool.kind)
                continue
            try:
                envelope = json.loads(text)
                if not isinstance(envelope, dict) or not isinstance(envelope.get("snapshot"), dict):
                    raise ValueError("not a snapshot envelope")
                downtime = self._downtime(envelope.get("mono"), float(saved_at), str(boot_id))
                tool.restore(envelope["snapshot"], downtime_s=downtime)
            except Exception as err:
                # Not only ValueError, TypeError and KeyError: a 400-digit integer makes the tool's number check
                # raise OverflowError, deeply nested JSON RecursionError; one bad row must not stop the daemon.
                self._skip("corrupt", key, kind, error=f"{type(err).__name__}: {err}")
                continue
            log.info("resilience_state_restored", key=key, kind=kind, downtime_s=downtime)
            restored += 1
        return restored

    def _downtime(self, mono: object, saved_at: float, boot_id: str) -> float | None:
        if boot_id == self.boot_id and isinstance(mono, int | float) and math.isfinite(mono):
            elapsed = self._clock.monotonic() - mono
            return elapsed if elapsed >= 0 else None
        now = self._wall()
        return now - saved_at if now >= saved_at else None

    def _skip(self, reason: str, key: str, kind: str, **fields: Any) -> None:
        counter(RESILIENCE_STATE_SKIPPED, reason).inc()
        if reason == "corrupt":
            log.warning("resilience_state_skipped", key=key, kind=kind, reason=reason, **fields)
        else:  # a tool removed from the configuration leaves its row behind: expected, not worth a warning
            log.info("resilience_state_skipped", key=key, kind=kind, reason=reason, **fields)

    async def run_saver(self, store: Store, *, interval_s: float = 30.0) -> None:
        """Save every ``interval_s`` until cancelled; for the supervisor to run as an owned task. A failed save
        (disk full, store closing) is logged and tried again at the next interval."""
        if not interval_s > 0:
            raise ValueError("interval_s must be positive")
        while True:
            await self._clock.sleep(interval_s)
            try:
                await self.save(store)
            except StoreUnavailable as err:
                log.warning("resilience_state_save_failed", error=str(err))
