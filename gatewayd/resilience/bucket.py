"""The token bucket: a burst of ``capacity`` tokens, refilled continuously at ``rate`` tokens per second.

Refill is computed on demand from the injected monotonic clock (no timer task): each decision first adds
``elapsed * rate`` tokens, capped at capacity. Decisions say exactly how long the caller would have to wait.

Priorities: a request at or above ``bypass_priority`` (critical, by default) is never refused and never waits.
It still takes its tokens while there are any, so it is counted against normal traffic, but it never drives the
level below zero: a burst of emergency stops cannot lock normal traffic out for longer than one refill of the
bucket. Priorities are plain ints ordered like ``gatewayd.commands.model.Priority`` (0 = critical, lower first),
so the kit does not import the command layer above it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter

from gatewayd.observability.metrics import RATE_LIMIT_DECISIONS, counter
from gatewayd.resilience.clock import REAL_CLOCK, Clock
from gatewayd.resilience.errors import RateLimited, remaining_header, retry_after_header

CRITICAL = 0  # gatewayd.commands.model.Priority.CRITICAL
NORMAL = 2  # gatewayd.commands.model.Priority.NORMAL

# Float refill arithmetic lands a hair below a whole token (10 s * 1/6 per s = 1.666...); without a tolerance a
# caller that slept exactly the advertised wait could be refused again.
EPS = 1e-9


def clock_slack(now: float) -> float:
    """Two ticks of a float clock reading ``now``: ``now + wait`` is rounded, so a caller that slept exactly an
    advertised wait may wake up to this much early. At months of uptime a tick is nanoseconds, and at a high rate
    (LLM tokens per second) what a tick refills is more than EPS; without this slack such a caller is refused
    again, and a fake clock, which cannot advance by less than a tick, would keep it waiting forever."""
    return 2 * math.ulp(now)


@dataclass(frozen=True, slots=True)
class Decision:
    """A limiter's answer, with what the HTTP rate-limit headers need.

    ``wait_s``: 0 when allowed, else the exact wait until the request would be allowed (``inf`` if never, e.g.
    more tokens than the capacity). ``remaining``: what is left after this decision. ``reset_s``: seconds until
    the limiter is back to its full allowance.
    """

    allowed: bool
    wait_s: float
    limit: float
    remaining: float
    reset_s: float

    def headers(self) -> dict[str, str]:
        """``X-RateLimit-Limit``, ``X-RateLimit-Remaining``, ``X-RateLimit-Reset``, and ``Retry-After`` if refused."""
        out = {
            "X-RateLimit-Limit": str(int(self.limit)),
            "X-RateLimit-Remaining": remaining_header(self.remaining),
            "X-RateLimit-Reset": retry_after_header(self.reset_s),
        }
        if not self.allowed:
            out["Retry-After"] = retry_after_header(self.wait_s)
        return out

    def refusal(self, name: str) -> RateLimited:
        return RateLimited(name, self.wait_s, limit=self.limit, remaining=self.remaining, reset_s=self.reset_s)


@dataclass(frozen=True, slots=True)
class BucketSpec:
    capacity: float
    rate: float  # tokens per second

    def __post_init__(self) -> None:
        if not (self.capacity > 0 and math.isfinite(self.capacity)):
            raise ValueError("capacity must be a positive number")
        if not (self.rate >= 0 and math.isfinite(self.rate)):
            raise ValueError("rate must be a non-negative number")


def check_n(n: float) -> None:
    if not n > 0:
        raise ValueError("a request takes a positive number of tokens")


class Limiter:
    """What the token bucket and the sliding window share: the decision counters, ``try_acquire`` and the waiting
    ``acquire``. A subclass provides ``_take`` (decide, and take what is allowed) and ``peek``."""

    name: str
    _clock: Clock
    _outcomes: dict[str, Counter]

    def _init_limiter(self, name: str, clock: Clock) -> None:
        self.name = name
        self._clock = clock
        self._outcomes = {o: counter(RATE_LIMIT_DECISIONS, name, o) for o in ("allowed", "limited", "bypassed")}

    def _take(self, n: float, priority: int) -> tuple[Decision, str]:
        raise NotImplementedError

    def try_acquire(self, n: float = 1.0, *, priority: int = NORMAL) -> Decision:
        """Take ``n`` units if they are there (or if ``priority`` bypasses the limit); never waits."""
        decision, outcome = self._take(n, priority)
        self._outcomes[outcome].inc()
        return decision

    async def acquire(self, n: float = 1.0, *, deadline: float | None = None, priority: int = NORMAL) -> Decision:
        """Take ``n`` units, sleeping on the clock until they are there.

        Raises :class:`RateLimited` (with ``retry_after_s``) at once when they cannot be there by ``deadline``
        (absolute, monotonic) or ever. Waiters are not queued: after a sleep each one tries again.
        """
        while True:
            decision, outcome = self._take(n, priority)
            if decision.allowed:
                self._outcomes[outcome].inc()
                return decision
            if math.isinf(decision.wait_s) or (
                deadline is not None and self._clock.monotonic() + decision.wait_s > deadline
            ):
                self._outcomes["limited"].inc()
                raise decision.refusal(self.name)
            await self._clock.sleep(decision.wait_s)


class TokenBucket(Limiter):
    kind = "token_bucket"

    def __init__(
        self,
        capacity: float,
        rate: float,
        *,
        name: str = "default",
        clock: Clock = REAL_CLOCK,
        tokens: float | None = None,
        bypass_priority: int = CRITICAL,
    ):
        spec = BucketSpec(capacity, rate)  # validates
        self._init_limiter(name, clock)
        self._capacity = spec.capacity
        self._rate = spec.rate
        self._tokens = spec.capacity if tokens is None else min(spec.capacity, max(0.0, tokens))
        self._updated = clock.monotonic()
        self.bypass_priority = bypass_priority

    @property
    def capacity(self) -> float:
        return self._capacity

    @property
    def rate(self) -> float:
        return self._rate

    @property
    def clock(self) -> Clock:
        return self._clock

    @property
    def spec(self) -> BucketSpec:
        return BucketSpec(self._capacity, self._rate)

    @property
    def touched_at(self) -> float:
        """Monotonic time of the last decision or look at this bucket."""
        return self._updated

    def set_rate(self, rate: float) -> None:
        """Change the refill rate from now on (tokens earned so far are kept at the old rate)."""
        self.reconfigure(self._capacity, rate)

    def reconfigure(self, capacity: float, rate: float) -> None:
        spec = BucketSpec(capacity, rate)
        self._refill(self._clock.monotonic())
        self._capacity, self._rate = spec.capacity, spec.rate
        self._tokens = min(self._tokens, spec.capacity)

    def level(self) -> float:
        """Tokens available now."""
        self._refill(self._clock.monotonic())
        return self._tokens

    def is_full(self, now: float) -> bool:
        """Full at ``now`` (without touching the bucket): forgetting it would lose nothing."""
        return self._tokens + max(0.0, now - self._updated) * self._rate >= self._capacity - EPS

    def _refill(self, now: float) -> None:
        elapsed = now - self._updated
        if elapsed > 0:
            self._tokens = min(self._capacity, self._tokens + elapsed * self._rate)
            self._updated = now

    def _decision(self, allowed: bool, n: float) -> Decision:
        tokens, rate = self._tokens, self._rate
        if allowed or tokens + EPS >= n:
            wait = 0.0
        elif n > self._capacity + EPS or rate == 0:
            wait = math.inf
        else:
            wait = (n - tokens) / rate
        missing = self._capacity - tokens
        reset = 0.0 if missing <= EPS else (missing / rate if rate > 0 else math.inf)
        return Decision(allowed, wait, self._capacity, tokens, reset)

    def _has(self, n: float, now: float) -> bool:
        return self._tokens + EPS + clock_slack(now) * self._rate >= n

    def _take(self, n: float, priority: int) -> tuple[Decision, str]:
        check_n(n)
        now = self._clock.monotonic()
        self._refill(now)
        if self._has(n, now):
            outcome = "allowed"
        elif priority <= self.bypass_priority:
            outcome = "bypassed"
        else:
            return self._decision(False, n), "limited"
        self._tokens = max(0.0, self._tokens - n)
        return self._decision(True, n), outcome

    def peek(self, n: float = 1.0) -> Decision:
        """What ``try_acquire(n)`` would answer now, without taking anything: for status headers and pages."""
        check_n(n)
        now = self._clock.monotonic()
        self._refill(now)
        return self._decision(self._has(n, now), n)

    # --- persistence -------------------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        # Computed without refilling: a refill marks the bucket touched, and periodic saves would then keep a
        # keyed limiter's unused keys from ever reaching idle_s.
        elapsed = max(0.0, self._clock.monotonic() - self._updated)
        tokens = min(self._capacity, self._tokens + elapsed * self._rate)
        return {"tokens": tokens, "capacity": self._capacity, "rate": self._rate}

    def restore(self, state: Mapping[str, Any], *, downtime_s: float | None = None) -> None:
        """Restore the level. Capacity and rate come from the configuration, not from the snapshot. A known
        downtime refills at the current rate (capped at capacity); an unknown one refills nothing."""
        tokens = finite_number(state["tokens"], "tokens")
        if downtime_s is not None:
            tokens += downtime_s * self._rate
        self._tokens = min(self._capacity, max(0.0, tokens))
        self._updated = self._clock.monotonic()


def finite_number(value: object, what: str) -> float:
    """A finite, non-negative number from a snapshot, or ValueError (the loader then skips the row)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{what} is not a number: {value!r}")
    try:
        number = float(value)  # an int too large for a float raises OverflowError here
    except OverflowError:
        raise ValueError(f"{what} is out of range: {value!r}") from None
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{what} is not a finite non-negative number: {value!r}")
    return number
