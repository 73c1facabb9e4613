"""Safety limits from a device's profile, enforced just before an action reaches the device.

The limits protect hardware (a compressor that must not restart within 30 s, a valve rated for so many operations
per minute), so they hold for every command whatever its source or priority. Only ``safe`` actions (off, stop) are
exempt: nothing may keep a device from being switched off. A refused actuation ends ``rejected`` with code
``safety_limit`` and says which limit and when it would be allowed. An actuation that was let through counts even if
the device then failed: the relay may have moved.
"""

from __future__ import annotations

from collections import OrderedDict

from gatewayd.config.profiles import Profile
from gatewayd.errors import SafetyLimited
from gatewayd.resilience import SlidingWindowLimiter
from gatewayd.resilience.clock import Clock

_NO_BYPASS = -1  # priorities are >= 0: no command bypasses a safety limit


class SafetyGate:
    def __init__(self, device: str, profile: Profile, clock: Clock):
        self.device = device
        self._clock = clock
        self._last: float | None = None
        self._per_minute: SlidingWindowLimiter | None = None
        # Commands already let through: one that went back to the queue (its device vanished or its breaker
        # opened mid-retry) is the same actuation when it runs again, not a second one.
        self._admitted: OrderedDict[str, None] = OrderedDict()
        self.configure(profile)

    def configure(self, profile: Profile) -> None:
        """Take the limits of a (re-read) profile; what was counted so far still counts."""
        self.profile = profile
        limit = profile.safety.max_actuations_per_minute
        if limit is None:
            self._per_minute = None
        elif self._per_minute is None or self._per_minute.limit != limit:
            self._per_minute = SlidingWindowLimiter(
                limit, 60.0, name=f"safety:{self.device}", clock=self._clock, bypass_priority=_NO_BYPASS
            )

    def admit(self, command_id: str, action: str) -> None:
        """Count this actuation, or raise :class:`SafetyLimited` saying which limit refused it."""
        spec = self.profile.actions.get(action)
        if spec is None or not spec.actuates or spec.safe or command_id in self._admitted:
            return
        safety = self.profile.safety
        now = self._clock.monotonic()
        if safety.min_interval_s is not None and self._last is not None:
            since = now - self._last
            if since < safety.min_interval_s:
                wait = safety.min_interval_s - since
                raise SafetyLimited(
                    f"{self.device}: at most one actuation every {safety.min_interval_s:g} s "
                    f"(the last was {since:.2f} s ago; allowed again in {wait:.2f} s)",
                    details={"limit": "min_interval_s", "min_interval_s": safety.min_interval_s, "retry_after_s": wait},
                )
        if self._per_minute is not None:
            decision = self._per_minute.try_acquire()
            if not decision.allowed:
                raise SafetyLimited(
                    f"{self.device}: at most {self._per_minute.limit} actuations per minute "
                    f"(allowed again in {decision.wait_s:.2f} s)",
                    details={
                        "limit": "max_actuations_per_minute",
                        "max_actuations_per_minute": self._per_minute.limit,
                        "retry_after_s": decision.wait_s,
                    },
                )
        self._last = now
        self._admitted[command_id] = None
        while len(self._admitted) > 64:
            self._admitted.popitem(last=False)
