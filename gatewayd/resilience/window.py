"""A sliding-window limiter: at most ``limit`` units in any ``window_s`` seconds.

Algorithm: a sliding log (one entry per admitted request, kept until it leaves the window). It is exact: no
burst of twice the limit across a window boundary, as a fixed window allows, and no estimate, as the two-window
approximation makes. The price is memory proportional to the limit (at most ``limit`` entries), which suits the
small per-minute and per-hour limits it is for; for large limits use a :class:`TokenBucket`.

Priorities behave as in the token bucket: a critical request is always admitted; it is logged (counted) while
there is room in the window, and never pushes the window over its limit.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import Any

from gatewayd.resilience.bucket import CRITICAL, EPS, Decision, Limiter, check_n, clock_slack, finite_number
from gatewayd.resilience.clock import REAL_CLOCK, Clock


class SlidingWindowLimiter(Limiter):
    kind = "sliding_window"

    def __init__(
        self,
        limit: int,
        window_s: float,
        *,
        name: str = "default",
        clock: Clock = REAL_CLOCK,
        bypass_priority: int = CRITICAL,
    ):
        if limit < 1:
            raise ValueError("limit must be at least 1")
        if not (window_s > 0 and math.isfinite(window_s)):
            raise ValueError("window_s must be a positive number")
        self._init_limiter(name, clock)
        self.limit = limit
        self.window_s = window_s
        self.bypass_priority = bypass_priority
        self._log: deque[tuple[float, float]] = deque()  # (admitted at, units), oldest first
        self._used = 0.0

    def _expire(self, now: float) -> None:
        # The same sum as the advertised wait (at + window_s - now), so a caller that slept exactly that wait finds
        # the entry gone; ``now - window_s`` rounds differently and could keep it, and then the wait is 0 forever.
        horizon = now + clock_slack(now)
        log = self._log
        while log and log[0][0] + self.window_s <= horizon:
            self._used -= log.popleft()[1]
        if not log:
            self._used = 0.0  # no float residue from many additions and subtractions

    def _decision(self, allowed: bool, n: float, now: float) -> Decision:
        remaining = self.limit - self._used
        if allowed or remaining + EPS >= n:
            wait = 0.0
        elif n > self.limit + EPS:
            wait = math.inf
        else:
            # Walk the log oldest first until enough units have left the window to make room for n.
            need = n - remaining
            freed = 0.0
            wait = 0.0
            for at, units in self._log:
                freed += units
                if freed + EPS >= need:
                    wait = at + self.window_s - now
                    break
        reset = self._log[-1][0] + self.window_s - now if self._log else 0.0
        return Decision(allowed, max(0.0, wait), float(self.limit), max(0.0, remaining), max(0.0, reset))

    def _take(self, n: float, priority: int) -> tuple[Decision, str]:
        check_n(n)
        now = self._clock.monotonic()
        self._expire(now)
        if self._used + n <= self.limit + EPS:
            self._log.append((now, n))
            self._used += n
            return self._decision(True, n, now), "allowed"
        if priority <= self.bypass_priority:
            room = self.limit - self._used  # counted as far as the window has room, as the bucket takes its tokens
            if room > EPS:
                self._log.append((now, room))
                self._used = float(self.limit)
            return self._decision(True, n, now), "bypassed"
        return self._decision(False, n, now), "limited"

    def peek(self, n: float = 1.0) -> Decision:
        check_n(n)
        now = self._clock.monotonic()
        self._expire(now)
        return self._decision(self._used + n <= self.limit + EPS, n, now)

    # --- persistence -------------------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Entries as ages (seconds before the save), since monotonic readings mean nothing after a reboot."""
        now = self._clock.monotonic()
        self._expire(now)
        return {"events": [[now - at, units] for at, units in self._log]}

    def restore(self, state: Mapping[str, Any], *, downtime_s: float | None = None) -> None:
        """Entries age by the downtime when it is known; with an unknown downtime they keep their saved ages."""
        events = state["events"]
        if not isinstance(events, list):
            raise ValueError("events is not a list")
        parsed = []
        for entry in events:
            if not isinstance(entry, list) or len(entry) != 2:
                raise ValueError(f"bad event {entry!r}")
            age = finite_number(entry[0], "age") + (downtime_s or 0.0)
            parsed.append((age, finite_number(entry[1], "units")))
        now = self._clock.monotonic()
        self._log = deque((now - age, units) for age, units in sorted(parsed, reverse=True) if age < self.window_s)
        self._used = sum(units for _, units in self._log)
