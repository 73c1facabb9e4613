"""The circuit breaker: stop calling a target that keeps failing, probe it now and then, resume when it answers.

States: ``closed`` (calls pass; outcomes go into a sliding window), ``open`` (calls are refused with
:class:`CircuitOpenError` until ``open_s`` has passed), ``half_open`` (at most ``half_open_max_calls`` probes in
flight; ``half_open_successes`` successful probes close the breaker, one failed probe reopens it).

The window is count-based (the last ``window_size`` calls) or time-based (the calls of the last ``window_s``
seconds, kept as 20 per-slot counters, so memory does not grow with the call rate and the window edge is
accurate to ``window_s / 20``). The breaker opens when at least ``minimum_calls`` are in the window and the
failure ratio reaches ``failure_rate``.

What counts: an exception for which ``is_ignored`` is true is neither success nor failure (by default, refusals
by our own limiters, bulkheads and other breakers: they say nothing about the target). Otherwise ``is_failure``
decides (by default: transient errors are failures; permanent ones, a 404 or a validation error, mean the target
answered, so they count as successes). A call that returned normally is a failure when ``failure_result`` says its
result is unusable, or when it took ``slow_call_s`` or longer (when set), measured on the injected clock.
Cancellation is never an outcome by itself; a caller that gave up on a call for taking too long (its deadline cut
it, or a faster target answered first) says so with :meth:`Permit.slow`, a failure counted as slow.

Time is read from the injected clock; ``open`` becomes ``half_open`` when a call (or a look at :attr:`state`)
finds the wait over, so there is no timer task. Each state change is logged once, counted, set on the state
gauge and passed to the listeners.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType
from typing import Any, Literal, TypeVar

import structlog

from gatewayd.observability.metrics import BREAKER_CALLS, BREAKER_STATE, BREAKER_TRANSITIONS, counter, gauge
from gatewayd.resilience.bucket import finite_number
from gatewayd.resilience.classify import classify
from gatewayd.resilience.clock import REAL_CLOCK, Clock
from gatewayd.resilience.errors import BulkheadFull, CircuitOpenError, RateLimited

T = TypeVar("T")
log = structlog.get_logger("gatewayd.resilience")


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


_GAUGE_VALUE = {CircuitState.CLOSED: 0, CircuitState.OPEN: 1, CircuitState.HALF_OPEN: 2}
_TIME_SLOTS = 20


@dataclass(frozen=True, slots=True)
class StateChange:
    breaker: str
    old: CircuitState
    new: CircuitState
    reason: str
    at: float  # monotonic, on the breaker's clock
    retry_at: float | None  # when the next probe is allowed, if the new state is open


Listener = Callable[[StateChange], None]


def transient_is_failure(exc: BaseException) -> bool:
    return classify(exc).transient


def local_refusal_is_ignored(exc: BaseException) -> bool:
    return isinstance(exc, RateLimited | BulkheadFull | CircuitOpenError)


class _CountWindow:
    def __init__(self, size: int):
        self._ring: deque[bool] = deque(maxlen=size)
        self._failures = 0

    def add(self, failed: bool, now: float) -> None:
        ring = self._ring
        if len(ring) == ring.maxlen:
            self._failures -= ring[0]
        ring.append(failed)
        self._failures += failed

    def totals(self, now: float) -> tuple[int, int]:
        return len(self._ring), self._failures

    def clear(self) -> None:
        self._ring.clear()
        self._failures = 0


class _TimeWindow:
    def __init__(self, window_s: float):
        self._window_s = window_s
        self._width = window_s / _TIME_SLOTS
        self._slots: deque[list[float]] = deque()  # [slot start, calls, failures], oldest first
        self._calls = 0
        self._failures = 0

    def _expire(self, now: float) -> None:
        horizon = now - self._window_s
        slots = self._slots
        while slots and slots[0][0] <= horizon:
            _, calls, failures = slots.popleft()
            self._calls -= int(calls)
            self._failures -= int(failures)

    def add(self, failed: bool, now: float) -> None:
        self._expire(now)
        start = math.floor(now / self._width) * self._width
        if self._slots and self._slots[-1][0] == start:
            slot = self._slots[-1]
        else:
            slot = [start, 0, 0]
            self._slots.append(slot)
        slot[1] += 1
        slot[2] += failed
        self._calls += 1
        self._failures += failed

    def totals(self, now: float) -> tuple[int, int]:
        self._expire(now)
        return self._calls, self._failures

    def clear(self) -> None:
        self._slots.clear()
        self._calls = self._failures = 0


class Permit:
    """One admitted call. Settle it exactly once (``success``, ``failure``, ``ignore``, ``record_exception`` or
    ``record_result``), or use it as ``async with breaker.permit():``, which settles it on exit. A permit never
    settled would hold a half-open probe slot until the breaker next changes state."""

    __slots__ = ("_breaker", "_settled", "generation", "probe", "started")

    def __init__(self, breaker: CircuitBreaker, generation: int, started: float, probe: bool):
        self._breaker = breaker
        self.generation = generation
        self.started = started
        self.probe = probe
        self._settled = False

    @property
    def settled(self) -> bool:
        return self._settled

    def _settle(self, failed: bool | None) -> None:
        if self._settled:
            raise RuntimeError("a breaker permit is settled once")
        self._settled = True
        self._breaker._finish(self, failed)

    def success(self) -> None:
        self._settle(False)

    def failure(self) -> None:
        self._settle(True)

    def ignore(self) -> None:
        self._settle(None)

    def slow(self) -> None:
        """A failure by slowness: the call was cut off (a deadline, a hedge that won) before it could answer."""
        if self._settled:
            raise RuntimeError("a breaker permit is settled once")
        self._settled = True
        self._breaker._finish(self, True, slow=True)

    def record_exception(self, exc: BaseException) -> None:
        try:
            verdict = self._breaker._verdict(exc)
        except Exception:
            self._settle(True)  # a predicate that raises must not leave the permit (a probe slot) unsettled
            raise
        self._settle(verdict)

    def record_result(self, value: Any) -> None:
        predicate = self._breaker.failure_result
        try:
            failed = predicate is not None and bool(predicate(value))
        except Exception:
            # A body the predicate cannot even read (KeyError on a missing field) is unusable; and the permit, a
            # probe slot when half-open, must be settled or the breaker would refuse every call from then on.
            self._settle(True)
            raise
        self._settle(failed)

    async def __aenter__(self) -> Permit:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._settled:
            return
        if e is None:
            self.success()
        else:
            self.record_exception(e)


class CircuitBreaker:
    kind = "circuit_breaker"

    def __init__(
        self,
        name: str,
        *,
        window: Literal["count", "time"] = "count",
        window_size: int = 20,
        window_s: float = 60.0,
        failure_rate: float = 0.5,
        minimum_calls: int = 10,
        slow_call_s: float | None = None,
        open_s: float = 30.0,
        half_open_max_calls: int = 1,
        half_open_successes: int = 1,
        is_failure: Callable[[BaseException], bool] = transient_is_failure,
        is_ignored: Callable[[BaseException], bool] = local_refusal_is_ignored,
        failure_result: Callable[[Any], bool] | None = None,
        clock: Clock = REAL_CLOCK,
    ):
        if not 0 < failure_rate <= 1:
            raise ValueError("failure_rate must be in (0, 1]")
        if minimum_calls < 1:
            raise ValueError("minimum_calls must be at least 1")
        if window == "count":
            if minimum_calls > window_size:
                raise ValueError("minimum_calls cannot exceed window_size: the breaker could never open")
            self._window: _CountWindow | _TimeWindow = _CountWindow(window_size)
        elif window == "time":
            if not window_s > 0:
                raise ValueError("window_s must be positive")
            self._window = _TimeWindow(window_s)
        else:
            raise ValueError(f"unknown window {window!r}")
        if open_s < 0 or half_open_max_calls < 1 or half_open_successes < 1:
            raise ValueError("need open_s >= 0, half_open_max_calls >= 1 and half_open_successes >= 1")
        self.name = name
        self.failure_rate = failure_rate
        self.minimum_calls = minimum_calls
        self.slow_call_s = slow_call_s
        self.open_s = open_s
        self.half_open_max_calls = half_open_max_calls
        self.half_open_successes = half_open_successes
        self.is_failure = is_failure
        self.is_ignored = is_ignored
        self.failure_result = failure_result
        self._clock = clock
        self._state = CircuitState.CLOSED
        self._generation = 0  # bumped on every change, so late outcomes of an earlier state are not miscounted
        self._retry_at = 0.0
        self._probes = 0  # probes in flight (half-open)
        self._probe_successes = 0
        self._listeners: list[Listener] = []
        self._gauge = gauge(BREAKER_STATE, name)
        self._gauge.set(_GAUGE_VALUE[self._state])
        self._calls = {
            o: counter(BREAKER_CALLS, name, o) for o in ("success", "failure", "slow", "ignored", "rejected")
        }

    # --- state -------------------------------------------------------------------------------------------------

    @property
    def state(self) -> CircuitState:
        self._poll(self._clock.monotonic())
        return self._state

    @property
    def retry_at(self) -> float | None:
        """Monotonic time from which a probe may go through, while open."""
        return self._retry_at if self._state is CircuitState.OPEN else None

    @property
    def probes_in_flight(self) -> int:
        return self._probes

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        self._listeners.remove(listener)

    def force_open(self, reason: str = "forced") -> None:
        """Open now (an operator, or a supervisor that knows the target is down), for ``open_s``."""
        self._transition(CircuitState.OPEN, reason, self._clock.monotonic())

    def reset(self, reason: str = "reset") -> None:
        """Close now, with an empty window."""
        self._transition(CircuitState.CLOSED, reason, self._clock.monotonic())
        self._window.clear()  # the transition clears it only on a change: a closed breaker keeps its failures

    def _poll(self, now: float) -> None:
        if self._state is CircuitState.OPEN and now >= self._retry_at:
            self._transition(CircuitState.HALF_OPEN, "open_time_elapsed", now)

    def _transition(self, new: CircuitState, reason: str, now: float, *, retry_at: float | None = None) -> None:
        old = self._state
        if new is CircuitState.OPEN:
            self._retry_at = now + self.open_s if retry_at is None else retry_at
        if new is old:
            return
        self._state = new
        self._generation += 1
        self._probes = 0
        self._probe_successes = 0
        if new is CircuitState.CLOSED:
            self._window.clear()
        self._gauge.set(_GAUGE_VALUE[new])
        counter(BREAKER_TRANSITIONS, self.name, old.value, new.value).inc()
        change = StateChange(self.name, old, new, reason, now, self._retry_at if new is CircuitState.OPEN else None)
        if new is CircuitState.OPEN:
            log.warning(
                "breaker_opened",
                breaker=self.name,
                previous=old.value,
                reason=reason,
                retry_after_s=round(self._retry_at - now, 3),
            )
        elif new is CircuitState.HALF_OPEN:
            log.info("breaker_half_open", breaker=self.name, previous=old.value, reason=reason)
        else:
            log.info("breaker_closed", breaker=self.name, previous=old.value, reason=reason)
        for listener in list(self._listeners):
            try:
                listener(change)
            except Exception:  # a listener's bug must not turn the call that changed the state into a failure
                log.exception("breaker_listener_failed", breaker=self.name)

    # --- calls -------------------------------------------------------------------------------------------------

    def permit(self) -> Permit:
        """Admit one call now, or raise :class:`CircuitOpenError` with the time of the next allowed probe."""
        now = self._clock.monotonic()
        self._poll(now)
        state = self._state
        if state is CircuitState.CLOSED:
            return Permit(self, self._generation, now, False)
        if state is CircuitState.HALF_OPEN and self._probes < self.half_open_max_calls:
            self._probes += 1
            return Permit(self, self._generation, now, True)
        self._calls["rejected"].inc()
        if state is CircuitState.OPEN:
            raise CircuitOpenError(self.name, self._retry_at, self._retry_at - now, state=state.value)
        # Probe slots busy: the next chance comes when a probe ends, which nobody can know; suggest a short pause.
        pause = min(1.0, self.open_s)
        raise CircuitOpenError(self.name, now + pause, pause, state=state.value)

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Await ``fn()`` through the breaker; its exception, if any, is re-raised unchanged."""
        permit = self.permit()
        try:
            result = await fn()
        except BaseException as err:
            permit.record_exception(err)
            raise
        permit.record_result(result)
        return result

    def _verdict(self, exc: BaseException) -> bool | None:
        """True failure, False success, None neither."""
        if not isinstance(exc, Exception) or self.is_ignored(exc):
            return None
        return self.is_failure(exc)

    def _finish(self, permit: Permit, failed: bool | None, *, slow: bool = False) -> None:
        now = self._clock.monotonic()
        current = permit.generation == self._generation
        if permit.probe and current:
            self._probes -= 1
        if failed is None:
            self._calls["ignored"].inc()
            return
        if slow or (not failed and self.slow_call_s is not None and now - permit.started >= self.slow_call_s):
            failed = True
            self._calls["slow"].inc()
        else:
            self._calls["failure" if failed else "success"].inc()
        state = self._state
        if state is CircuitState.HALF_OPEN:
            if not (current and permit.probe):
                return  # a call admitted before the breaker opened says nothing about the probes
            if failed:
                self._transition(CircuitState.OPEN, "probe_failed", now)
                return
            self._probe_successes += 1
            if self._probe_successes >= self.half_open_successes:
                self._transition(CircuitState.CLOSED, "probes_succeeded", now)
        elif state is CircuitState.CLOSED:
            # A late outcome from before the last close still describes the target as it is now: keep it.
            self._window.add(failed, now)
            calls, failures = self._window.totals(now)
            # A ratio, not failures >= rate * calls: 0.55 * 100 is 55.00000000000001, so 55 of 100 would not open.
            if calls >= self.minimum_calls and failures / calls >= self.failure_rate:
                self._transition(CircuitState.OPEN, "failure_rate", now)

    # --- persistence -------------------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The state and, while open, the seconds left until a probe: monotonic time does not survive a reboot.
        The window of recent outcomes is not kept: after a restart the target is judged afresh."""
        now = self._clock.monotonic()
        self._poll(now)
        remaining = max(0.0, self._retry_at - now) if self._state is CircuitState.OPEN else 0.0
        return {"state": self._state.value, "open_remaining_s": remaining}

    def restore(self, state: Mapping[str, Any], *, downtime_s: float | None = None) -> None:
        """An open breaker stays open for what was left of its wait, less the downtime when it is known (an
        unknown downtime keeps the whole remainder: the safe side for a target that was failing); if nothing is
        left it resumes half-open, so the first call probes. A half-open one resumes half-open."""
        try:
            saved = CircuitState(state["state"])
        except ValueError as err:
            raise ValueError(f"unknown breaker state {state['state']!r}") from err
        now = self._clock.monotonic()
        if saved is CircuitState.OPEN:
            remaining = finite_number(state["open_remaining_s"], "open_remaining_s") - (downtime_s or 0.0)
            if remaining > 0:
                self._transition(CircuitState.OPEN, "restored", now, retry_at=now + remaining)
            else:
                self._transition(CircuitState.HALF_OPEN, "restored", now)
        else:
            self._transition(saved, "restored", now)
