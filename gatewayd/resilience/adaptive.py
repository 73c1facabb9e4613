"""An adaptive rate (AIMD) that steers a token bucket's refill rate from the outcomes of the calls it admits.

Additive increase, multiplicative decrease, as TCP does: over each window of ``window`` recent calls, a success
ratio above ``raise_above`` (0.9) adds ``increase`` tokens/s; below ``lower_below`` (0.7) multiplies the rate by
``decrease`` (0.5); in between the rate holds. A 429 (the other side telling us outright) cuts the rate at once,
but at most once per ``cooldown_s``: the requests already in flight when the first 429 came back would otherwise
cut it again for the same overload. After any change the window starts afresh, so the next change is judged on
calls made at the new rate. The rate stays within ``[min_rate, max_rate]``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import Any

import structlog

from gatewayd.observability.metrics import ADAPTIVE_RATE, gauge
from gatewayd.resilience.bucket import TokenBucket, finite_number
from gatewayd.resilience.clock import Clock

log = structlog.get_logger("gatewayd.resilience")


class AdaptiveRate:
    kind = "adaptive_rate"

    def __init__(
        self,
        bucket: TokenBucket,
        *,
        min_rate: float,
        max_rate: float,
        increase: float | None = None,
        decrease: float = 0.5,
        window: int = 20,
        raise_above: float = 0.9,
        lower_below: float = 0.7,
        cooldown_s: float = 1.0,
        clock: Clock | None = None,
    ):
        if not (0 < min_rate <= max_rate and math.isfinite(max_rate)):
            raise ValueError("need 0 < min_rate <= max_rate")
        if not 0 < decrease < 1:
            raise ValueError("decrease must be between 0 and 1")
        if window < 1:
            raise ValueError("window must be at least 1")
        if not 0 <= lower_below <= raise_above <= 1:
            raise ValueError("need 0 <= lower_below <= raise_above <= 1")
        self.bucket = bucket
        self.name = bucket.name
        self.min_rate = min_rate
        self.max_rate = max_rate
        self.increase = (max_rate - min_rate) / 10 if increase is None else increase
        self.decrease = decrease
        self.raise_above = raise_above
        self.lower_below = lower_below
        self.cooldown_s = cooldown_s
        self._clock = bucket.clock if clock is None else clock  # one time base for the bucket and its 429 cooldown
        self._outcomes: deque[bool] = deque(maxlen=window)
        self._last_throttle: float | None = None
        self._gauge = gauge(ADAPTIVE_RATE, self.name)
        self._apply(min(max_rate, max(min_rate, bucket.rate)), "start")

    @property
    def rate(self) -> float:
        return self.bucket.rate

    def _apply(self, rate: float, why: str) -> None:
        rate = min(self.max_rate, max(self.min_rate, rate))
        old = self.bucket.rate
        self.bucket.set_rate(rate)
        self._gauge.set(rate)
        self._outcomes.clear()
        if rate != old:
            log.info("adaptive_rate_changed", limiter=self.name, rate=round(rate, 6), previous=round(old, 6), why=why)

    def record(self, ok: bool, *, throttled: bool = False) -> None:
        """One call's outcome. ``throttled`` means the other side said 429 (or equivalent): ``ok`` is ignored."""
        if throttled:
            now = self._clock.monotonic()
            if self._last_throttle is not None and now - self._last_throttle < self.cooldown_s:
                return
            self._last_throttle = now
            self._apply(self.rate * self.decrease, "throttled")
            return
        self._outcomes.append(ok)
        if len(self._outcomes) < (self._outcomes.maxlen or 1):
            return
        ratio = sum(self._outcomes) / len(self._outcomes)
        if ratio > self.raise_above:
            self._apply(self.rate + self.increase, "success_ratio_high")
        elif ratio < self.lower_below:
            self._apply(self.rate * self.decrease, "success_ratio_low")

    # --- persistence -------------------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {"rate": self.rate}

    def restore(self, state: Mapping[str, Any], *, downtime_s: float | None = None) -> None:
        """The rate learned before the restart; it is where the other side last left us, downtime or not."""
        self._apply(finite_number(state["rate"], "rate"), "restored")
