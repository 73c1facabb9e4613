"""One retry policy for the whole daemon: capped exponential backoff with jitter, server hints, a deadline.

Why our own loop and not tenacity's ``AsyncRetrying``: tenacity can take our sleep (``sleep=``) and, since 9.0,
computes the wait before the stop check so a stop callable could see the next pause; but

- it keeps per-call state (``iter_state``, ``statistics``) in a ``threading.local`` on the retrying object, so
  one object cannot serve concurrent coroutines on one loop: a fresh object per call is required;
- per call it runs ``inspect.iscoroutinefunction`` on every action of every iteration: measured at about 50 us
  of overhead for a call that succeeds first time on a 2-core x86 VM (bench/resilience.py measures ours at about
  2 us), which on a Pi-class CPU is several times more, on every provider and device call;
- its own time bookkeeping (``stop_after_delay``, ``seconds_since_start``, ``idle_for``) reads ``time.monotonic``
  directly, so the deadline, the hint decisions and the jitter would all live in our callables anyway, with the
  give-up reason passed from ``wait`` to ``stop`` through a side channel.

What would be left of tenacity is the 20-line loop below, so we keep that loop and own its semantics outright.

Semantics, in one place:

- Pause before retry ``n`` (0 for the pause after the first failure) is drawn from ``[0, min(cap, base * m**n)]``
  (``jitter="full"``), ``min(cap, ceiling * uniform(0.75, 1.25))`` (``"proportional"``) or the ceiling itself.
- A server hint (``Retry-After``, ``retry-after-ms``, or our own ``RateLimited``/``CircuitOpenError``) replaces the
  computed pause. A hint above ``max_hint_s`` gives up at once: a server asking for 10 minutes means "not now".
- The deadline bounds the schedule: an attempt must start before it. If a pause would end at or past it, the
  policy gives up now instead of sleeping. An attempt already running is not interrupted (the callee owns its
  own I/O timeout).
- Permanent errors are re-raised as they are, after one call. Giving up raises :class:`RetryExhausted` with the
  last error as ``__cause__``. Cancellation is never caught: it propagates from the attempt or the sleep at once.
- A pause can be ended early by a ``wake`` event (a breaker that opened: waiting longer for that target is
  pointless); the next attempt then runs at once and meets whatever woke it.

:meth:`RetryPolicy.call` is the loop for one target. A caller that interleaves several targets (the interpreter's
failover chain: fail over first, retry later) keeps one :class:`RetrySchedule` per target instead, from
:meth:`RetryPolicy.schedule`: the same decisions, counters and logs, one failed attempt at a time, and it decides
itself what to do while a target's pause runs.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import structlog

from gatewayd.errors import GatewayError
from gatewayd.observability.metrics import RETRY_ATTEMPTS, RETRY_GAVE_UP, RETRY_HINTS, counter
from gatewayd.resilience.classify import Verdict, classify
from gatewayd.resilience.clock import REAL_CLOCK, Clock
from gatewayd.resilience.errors import DeadlineExceeded, RetryExhausted

T = TypeVar("T")
Jitter = Literal["full", "proportional", "none"]
Classifier = Callable[[BaseException], Verdict]

log = structlog.get_logger("gatewayd.resilience")
_RNG = random.Random()


def _error_code(err: BaseException) -> str:
    return err.code if isinstance(err, GatewayError) else type(err).__name__


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Configuration plus the loop. Immutable and shareable: one policy object may serve any number of
    concurrent calls. ``name`` labels metrics and logs; use names the configuration defines (``provider:openai``,
    ``bus:rs485``), never per-request values."""

    max_attempts: int = 4
    base_s: float = 0.5
    multiplier: float = 2.0
    cap_s: float = 30.0
    jitter: Jitter = "full"
    deadline_s: float | None = None
    max_hint_s: float | None = None
    name: str = "default"
    clock: Clock = field(default=REAL_CLOCK, compare=False, repr=False)
    rng: random.Random = field(default=_RNG, compare=False, repr=False)
    wall: Callable[[], float] = field(default=time.time, compare=False, repr=False)
    classifier: Classifier | None = field(default=None, compare=False, repr=False)
    # Retried failures are logged at debug instead of info: for loops that may run for days (reopening an
    # unplugged port), whose outage is already reported once by their owner. Metrics still count every attempt.
    quiet: bool = False

    def __post_init__(self) -> None:
        # Written as "not (x >= 0)" so that NaN, which fails every comparison, is refused too: a NaN deadline
        # would otherwise pass and silently never end the schedule.
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if not (self.base_s >= 0 and self.cap_s >= 0):
            raise ValueError("base_s and cap_s must not be negative")
        if not self.multiplier >= 1:
            raise ValueError("multiplier must be at least 1")
        if self.jitter not in ("full", "proportional", "none"):
            raise ValueError(f"unknown jitter {self.jitter!r}")
        if self.deadline_s is not None and not self.deadline_s > 0:
            raise ValueError("deadline_s must be positive")
        if self.max_hint_s is not None and not self.max_hint_s >= 0:
            raise ValueError("max_hint_s must not be negative")

    def ceiling(self, n: int) -> float:
        """The largest pause before retry ``n`` (0-based): ``min(cap, base * multiplier**n)``."""
        try:
            raw = self.base_s * self.multiplier**n
        except OverflowError:
            return self.cap_s if self.base_s > 0 else 0.0  # 0 * huge is still no pause
        return min(self.cap_s, raw)

    def backoff(self, n: int, rng: random.Random | None = None) -> float:
        """One draw of the pause before retry ``n`` (0-based)."""
        top = self.ceiling(n)
        draw = rng or self.rng
        if self.jitter == "full":
            return draw.uniform(0.0, top)
        if self.jitter == "proportional":
            return min(self.cap_s, top * draw.uniform(0.75, 1.25))
        return top

    def schedule(
        self, *, name: str | None = None, deadline: float | None = None, clock: Clock | None = None
    ) -> RetrySchedule:
        """A fresh schedule for one call made of attempts the caller runs itself. ``deadline`` is absolute, on
        ``clock`` (the policy's clock unless given); the earlier of it and ``deadline_s`` from now applies."""
        clock = self.clock if clock is None else clock
        start = clock.monotonic()
        end = deadline
        if self.deadline_s is not None:
            end = start + self.deadline_s if end is None else min(end, start + self.deadline_s)
        return RetrySchedule(self, self.name if name is None else name, clock, start, end)

    async def call(
        self,
        fn: Callable[[], Awaitable[T]],
        *,
        name: str | None = None,
        deadline: float | None = None,
        clock: Clock | None = None,
        wake: asyncio.Event | None = None,
    ) -> T:
        """Await ``fn()`` until it succeeds, a permanent error, or giving up.

        ``deadline`` is absolute, on ``clock`` (the policy's clock unless given); the earlier of it and
        ``deadline_s`` from now applies. Raises :class:`DeadlineExceeded` if it has already passed. ``wake``, when
        set, ends a pause at once (the attempt after it runs straight away).
        """
        schedule = self.schedule(name=name, deadline=deadline, clock=clock)
        if schedule.end is not None and schedule.start >= schedule.end:
            raise DeadlineExceeded(
                f"{schedule.label}: deadline passed before the first attempt", details={"policy": schedule.label}
            )
        while True:
            try:
                result = await fn()
            except Exception as err:  # BaseException (cancellation) is deliberately not caught
                step = schedule.failed(err)
                if not step.verdict.transient:
                    raise
                if step.give_up is not None:
                    raise schedule.exhausted(err, step) from err
                await schedule.pause(step.delay_s, wake)
            else:
                schedule.succeeded()
                return result

    def _pause(
        self, label: str, attempt: int, hint: float | None, now: float, end: float | None
    ) -> tuple[float, str | None]:
        """The pause before the next attempt, or the reason to give up instead."""
        if attempt >= self.max_attempts:
            return 0.0, "attempts"
        if hint is not None:
            # An infinite hint (a limiter that can never admit the call) is too long even without a cap: sleeping
            # on it would never end.
            if math.isinf(hint) or (self.max_hint_s is not None and hint > self.max_hint_s):
                counter(RETRY_HINTS, label, "refused").inc()
                return hint, "hint_too_long"
            if end is not None and now + hint >= end:
                counter(RETRY_HINTS, label, "refused").inc()
                return hint, "hint_past_deadline"
            counter(RETRY_HINTS, label, "used").inc()
            log.info("retry_hint_used", policy=label, attempt=attempt, hint_s=round(hint, 6))
            return hint, None
        delay = self.backoff(attempt - 1)
        if end is not None and now + delay >= end:
            return delay, "deadline"
        return delay, None


@dataclass(frozen=True, slots=True)
class Step:
    """What a failed attempt leads to: a pause of ``delay_s`` before the next, or ``give_up`` (``permanent``,
    ``attempts``, ``deadline``, ``hint_too_long``, ``hint_past_deadline``)."""

    verdict: Verdict
    delay_s: float
    give_up: str | None


class RetrySchedule:
    """One call's retries, one failed attempt at a time: :meth:`failed` says how long to pause or why to give up,
    counting and logging as :meth:`RetryPolicy.call` does (which is built on it)."""

    __slots__ = ("attempts", "clock", "end", "label", "policy", "start")

    def __init__(self, policy: RetryPolicy, label: str, clock: Clock, start: float, end: float | None):
        self.policy = policy
        self.label = label
        self.clock = clock
        self.start = start
        self.end = end
        self.attempts = 0  # failed attempts so far

    def failed(self, err: BaseException) -> Step:
        """Count one failed attempt: the pause before the next one, or why there is none."""
        policy, label = self.policy, self.label
        self.attempts += 1
        attempt = self.attempts
        verdict = policy.classifier(err) if policy.classifier is not None else classify(err, now=policy.wall)
        if not verdict.transient:
            counter(RETRY_ATTEMPTS, label, "permanent").inc()
            log.info(
                "retry_attempt_failed",
                policy=label,
                attempt=attempt,
                retryable=False,
                error=_error_code(err),
                reason=verdict.reason,
            )
            return Step(verdict, 0.0, "permanent")
        counter(RETRY_ATTEMPTS, label, "transient").inc()
        now = self.clock.monotonic()
        delay, give_up = policy._pause(label, attempt, verdict.hint_s, now, self.end)
        if give_up is not None:
            counter(RETRY_GAVE_UP, label, give_up).inc()
            log.warning(
                "retry_gave_up",
                policy=label,
                attempts=attempt,
                reason=give_up,
                error=_error_code(err),
                message=str(err),
                hint_s=verdict.hint_s,
                elapsed_s=round(now - self.start, 6),
            )
        else:
            (log.debug if policy.quiet else log.info)(
                "retry_attempt_failed",
                policy=label,
                attempt=attempt,
                retryable=True,
                error=_error_code(err),
                reason=verdict.reason,
                delay_s=round(delay, 6),
            )
        return Step(verdict, delay, give_up)

    def exhausted(self, err: BaseException, step: Step) -> RetryExhausted:
        """The error that says this schedule gave up after ``err`` (raise it ``from err``)."""
        assert step.give_up is not None
        return RetryExhausted(self.label, self.attempts, err, step.give_up, step.verdict.hint_s)

    def succeeded(self) -> None:
        counter(RETRY_ATTEMPTS, self.label, "success").inc()
        if self.attempts:
            log.info("retry_succeeded", policy=self.label, attempts=self.attempts + 1)

    async def pause(self, seconds: float, wake: asyncio.Event | None = None) -> bool:
        """Sleep ``seconds`` on the schedule's clock; False when ``wake`` was set first (then the sleep is cut
        short at once), True when the pause ran its course."""
        if wake is None:
            await self.clock.sleep(seconds)
            return True
        if wake.is_set():
            return False
        async with asyncio.TaskGroup() as tg:
            sleeper = tg.create_task(self.clock.sleep(seconds), name=f"gatewayd[{self.label}].pause")
            woken = tg.create_task(wake.wait(), name=f"gatewayd[{self.label}].wake")
            await asyncio.wait((sleeper, woken), return_when=asyncio.FIRST_COMPLETED)
            slept = sleeper.done()
            sleeper.cancel()
            woken.cancel()
        return slept and not wake.is_set()
