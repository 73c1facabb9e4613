"""The circuit breaker, driven on a fake clock: its states, its window, what counts as a failure, what it
reports (events, metrics, logs) and the cap on half-open probes."""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from gatewayd.errors import DeviceTimeout, NotFound, ValidationFailed
from gatewayd.observability.metrics import REGISTRY
from gatewayd.resilience import (
    BulkheadFull,
    CircuitBreaker,
    CircuitOpenError,
    CircuitState,
    FakeClock,
    HttpStatusError,
    Permit,
    RateLimited,
    StateChange,
    classify,
)

CLOSED, OPEN, HALF_OPEN = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN
_names = itertools.count()


def unique(prefix: str = "brk") -> str:
    """Metrics are process-global: every test gets breakers of its own."""
    return f"{prefix}-{next(_names)}"


def sample(metric: str, **labels: str) -> float:
    value = REGISTRY.get_sample_value(metric, labels)
    return 0.0 if value is None else value


def make(clock: FakeClock, **kw: Any) -> CircuitBreaker:
    kw.setdefault("name", unique())
    return CircuitBreaker(clock=clock, **kw)


def fail(b: CircuitBreaker, n: int = 1) -> None:
    for _ in range(n):
        b.permit().failure()


def succeed(b: CircuitBreaker, n: int = 1) -> None:
    for _ in range(n):
        b.permit().success()


def recorder(b: CircuitBreaker) -> list[StateChange]:
    changes: list[StateChange] = []
    b.add_listener(changes.append)
    return changes


def raising(exc: BaseException) -> Callable[[], Awaitable[Any]]:
    async def fn() -> Any:
        raise exc

    return fn


def returning(value: Any) -> Callable[[], Awaitable[Any]]:
    async def fn() -> Any:
        return value

    return fn


# --- the states ----------------------------------------------------------------------------------------------------


def test_closed_open_half_open_closed() -> None:
    clock = FakeClock(100.0)
    b = make(clock, window_size=10, minimum_calls=4, failure_rate=0.5, open_s=30.0, half_open_successes=2)
    changes = recorder(b)

    succeed(b, 2)
    fail(b, 1)
    assert b.state is CLOSED  # 1 of 3: below minimum_calls anyway
    fail(b, 1)
    assert b.state is OPEN  # 2 of 4 = 50 %
    with pytest.raises(CircuitOpenError):
        b.permit()

    clock.advance(30.0 - 1e-6)
    assert b.state is OPEN
    clock.advance(1e-6)
    assert b.state is HALF_OPEN

    succeed(b, 1)
    assert b.state is HALF_OPEN  # one of the two successes it needs
    succeed(b, 1)
    assert b.state is CLOSED
    assert [(c.old, c.new, c.reason) for c in changes] == [
        (CLOSED, OPEN, "failure_rate"),
        (OPEN, HALF_OPEN, "open_time_elapsed"),
        (HALF_OPEN, CLOSED, "probes_succeeded"),
    ]
    assert changes[0].retry_at == 100.0 + 30.0 and changes[0].at == 100.0
    assert changes[1].retry_at is None

    # Closing empties the window: the failures that opened it do not count against the target any more.
    fail(b, 3)
    assert b.state is CLOSED


def test_failed_probe_reopens_for_a_fresh_open_s() -> None:
    clock = FakeClock()
    b = make(clock, window_size=2, minimum_calls=2, open_s=30.0)
    fail(b, 2)
    clock.advance(30.0)
    assert b.state is HALF_OPEN
    clock.advance(7.0)  # the probe comes some time after the breaker half-opened
    b.permit().failure()

    assert b.state is OPEN
    with pytest.raises(CircuitOpenError) as refused:
        b.permit()
    assert refused.value.retry_at == 37.0 + 30.0
    clock.advance(30.0 - 1e-6)
    assert b.state is OPEN
    clock.advance(1e-6)
    assert b.state is HALF_OPEN


@pytest.mark.parametrize("minimum_calls", [1, 5, 10])
def test_no_opening_below_minimum_calls_even_at_total_failure(minimum_calls: int) -> None:
    b = make(FakeClock(), window_size=10, minimum_calls=minimum_calls, failure_rate=1.0)
    fail(b, minimum_calls - 1)
    assert b.state is CLOSED
    fail(b, 1)
    assert b.state is OPEN


def test_count_window_holds_only_the_last_n_calls() -> None:
    b = make(FakeClock(), window_size=10, minimum_calls=10, failure_rate=0.5)
    fail(b, 4)
    succeed(b, 6)
    fail(b, 4)  # 8 failures of 14 in all, but the first four have left the window: 4 of the last 10
    assert b.state is CLOSED
    fail(b, 1)  # the last 10: 5 successes, 5 failures
    assert b.state is OPEN


@pytest.mark.parametrize(("pause_s", "expected"), [(5.0, OPEN), (9.5, OPEN), (10.0, CLOSED), (60.0, CLOSED)])
def test_time_window_forgets_failures_older_than_window_s(pause_s: float, expected: CircuitState) -> None:
    clock = FakeClock()
    b = make(clock, window="time", window_s=10.0, minimum_calls=4, failure_rate=0.5)
    fail(b, 3)
    clock.advance(pause_s)
    fail(b, 1)  # with the old three still in the window: 4 of 4; without them, 1 call, below minimum_calls
    assert b.state is expected


@pytest.mark.parametrize(("rate", "calls", "failures"), [(0.5, 10, 4), (0.5, 10, 5), (0.55, 100, 54), (0.55, 100, 55)])
def test_failure_rate_threshold_is_exact(rate: float, calls: int, failures: int) -> None:
    b = make(FakeClock(), window_size=calls, minimum_calls=calls, failure_rate=rate)
    succeed(b, calls - failures)
    fail(b, failures)
    reached = failures * 100 >= round(rate * 100) * calls  # integer arithmetic: no float on the oracle's side
    assert b.state is (OPEN if reached else CLOSED)


@settings(max_examples=150, deadline=None)
@given(percent=st.integers(1, 100), calls=st.integers(1, 100), data=st.data())
def test_opens_exactly_when_the_failure_ratio_reaches_the_rate(percent: int, calls: int, data: st.DataObject) -> None:
    failures = data.draw(st.integers(0, calls))
    b = CircuitBreaker(
        "brk-ratio", window_size=calls, minimum_calls=calls, failure_rate=percent / 100, clock=FakeClock()
    )
    succeed(b, calls - failures)
    fail(b, failures)
    assert (b.state is OPEN) == (failures * 100 >= percent * calls)


# --- slow calls ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("slow_call_s", "duration_s", "expected"), [(2.0, 2.0, OPEN), (2.0, 1.9, CLOSED), (None, 60.0, CLOSED)]
)
async def test_a_slow_call_is_a_failure_only_when_slow_call_s_is_set(
    slow_call_s: float | None, duration_s: float, expected: CircuitState
) -> None:
    clock = FakeClock()
    b = make(clock, window_size=3, minimum_calls=3, failure_rate=1.0, slow_call_s=slow_call_s)

    async def answer_late() -> str:
        await clock.sleep(duration_s)
        return "ok"

    for _ in range(3):
        assert await b.call(answer_late) == "ok"  # the caller still gets its answer
    assert b.state is expected
    slow = sample("gatewayd_breaker_calls_total", breaker=b.name, outcome="slow")
    assert slow == (3 if expected is OPEN else 0)


async def test_a_slow_probe_reopens() -> None:
    clock = FakeClock()
    b = make(clock, window_size=1, minimum_calls=1, slow_call_s=1.0, open_s=10.0)
    b.force_open()
    clock.advance(10.0)

    async def answer_late() -> None:
        await clock.sleep(5.0)

    await b.call(answer_late)
    assert b.state is OPEN


def test_a_call_given_up_for_slowness_is_a_slow_failure_without_slow_call_s() -> None:
    clock = FakeClock()
    b = make(clock, window_size=2, minimum_calls=2, failure_rate=1.0)
    for _ in range(2):
        b.permit().slow()  # cut off by a deadline, or a faster target answered first
    assert b.state is OPEN
    assert sample("gatewayd_breaker_calls_total", breaker=b.name, outcome="slow") == 2
    clock.advance(b.open_s)
    probe = b.permit()
    probe.slow()  # a probe that was cut off reopens the breaker
    assert b.state is OPEN
    with pytest.raises(RuntimeError):
        probe.slow()


# --- half-open probes ----------------------------------------------------------------------------------------------


def test_half_open_admits_at_most_half_open_max_calls_probes() -> None:
    clock = FakeClock()
    b = make(clock, open_s=10.0, half_open_max_calls=2, half_open_successes=2)
    b.force_open()
    clock.advance(10.0)
    first, second = b.permit(), b.permit()
    assert first.probe and second.probe
    with pytest.raises(CircuitOpenError) as refused:
        b.permit()
    assert refused.value.details["state"] == "half_open"
    assert refused.value.retry_after_s > 0
    assert b.probes_in_flight == 2

    first.ignore()  # a probe that says nothing still frees its slot
    third = b.permit()
    assert b.state is HALF_OPEN
    second.success()
    third.success()
    assert b.state is CLOSED


# Operations of the property test: ("permit",), ("settle", index, outcome), ("advance", seconds)
_ops = st.one_of(
    st.tuples(st.just("permit")),
    st.tuples(st.just("settle"), st.integers(0, 50), st.sampled_from(["success", "failure", "ignore"])),
    st.tuples(st.just("advance"), st.sampled_from([0.0, 1.0, 5.0, 10.0, 25.0])),
)


@settings(max_examples=150, deadline=None)
@given(cap=st.integers(1, 3), successes=st.integers(1, 3), ops=st.lists(_ops, max_size=60))
def test_half_open_probes_in_flight_never_exceed_the_cap(cap: int, successes: int, ops: list[tuple[Any, ...]]) -> None:
    clock = FakeClock()
    b = CircuitBreaker(
        "brk-probe-cap",
        window_size=2,
        minimum_calls=2,
        open_s=10.0,
        half_open_max_calls=cap,
        half_open_successes=successes,
        clock=clock,
    )
    episode = [0]  # bumped on every state change: the probes of the current half-open spell are ours to count
    b.add_listener(lambda change: episode.__setitem__(0, episode[0] + 1))
    outstanding: list[tuple[Permit, int]] = []

    def current_probes() -> int:
        return sum(1 for p, ep in outstanding if p.probe and ep == episode[0])

    b.force_open()
    for op in ops:
        state = b.state
        if op[0] == "permit":
            free = state is CLOSED or (state is HALF_OPEN and current_probes() < cap)
            try:
                outstanding.append((b.permit(), episode[0]))
            except CircuitOpenError:
                assert not free, f"refused with {current_probes()} of {cap} probes in flight"
            else:
                assert free, f"admitted in {state} with {current_probes()} of {cap} probes in flight"
        elif op[0] == "settle" and outstanding:
            permit, _ = outstanding.pop(op[1] % len(outstanding))
            getattr(permit, op[2])()
        elif op[0] == "advance":
            clock.advance(op[1])
        in_flight = current_probes() if b.state is HALF_OPEN else 0
        assert in_flight <= cap
        assert b.probes_in_flight == in_flight


# --- what counts ---------------------------------------------------------------------------------------------------


async def test_local_refusals_count_neither_way() -> None:
    b = make(FakeClock(), window_size=3, minimum_calls=3, failure_rate=1.0)
    refusals = [
        RateLimited("lim", 1.0, limit=1, remaining=0, reset_s=1.0),
        BulkheadFull("bh", "queue_full", max_concurrent=1, max_queue=0),
        CircuitOpenError("other", 5.0, 5.0, state="open"),
    ]
    fail(b, 2)
    for err in refusals * 5:
        with pytest.raises(type(err)):
            await b.call(raising(err))
    assert b.state is CLOSED  # not failures: three of them would have opened it
    fail(b, 1)
    assert b.state is OPEN  # not successes either: they would have pushed the two failures out of the window
    assert sample("gatewayd_breaker_calls_total", breaker=b.name, outcome="ignored") == 15


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (HttpStatusError(404), CLOSED),
        (NotFound("no such thing"), CLOSED),
        (ValidationFailed("bad params"), CLOSED),
        (HttpStatusError(503), OPEN),
        (DeviceTimeout("no answer"), OPEN),
        (ConnectionResetError(), OPEN),
    ],
)
async def test_by_default_permanent_errors_mean_the_target_answered(error: Exception, expected: CircuitState) -> None:
    b = make(FakeClock(), window_size=3, minimum_calls=3, failure_rate=1.0)
    for _ in range(3):
        with pytest.raises(type(error)):
            await b.call(raising(error))
    assert b.state is expected
    assert classify(error).transient is (expected is OPEN)


async def test_custom_is_failure_decides() -> None:
    b = make(
        FakeClock(), window_size=2, minimum_calls=2, failure_rate=1.0, is_failure=lambda e: isinstance(e, NotFound)
    )
    for _ in range(4):
        with pytest.raises(DeviceTimeout):
            await b.call(raising(DeviceTimeout("slow device")))
    assert b.state is CLOSED  # a timeout is not a failure for this breaker
    for _ in range(2):
        with pytest.raises(NotFound):
            await b.call(raising(NotFound("the model is gone")))
    assert b.state is OPEN


def lacks_choices(body: dict[str, Any]) -> bool:
    return "choices" not in body


async def test_a_normal_return_with_an_unusable_body_is_a_failure() -> None:
    b = make(FakeClock(), window_size=4, minimum_calls=4, failure_rate=0.5, failure_result=lacks_choices)
    good, empty = {"choices": [{"text": "hi"}]}, {"error": None}
    assert await b.call(returning(good)) == good
    assert await b.call(returning(good)) == good
    assert await b.call(returning(empty)) == empty  # returned to the caller unchanged
    assert b.state is CLOSED
    await b.call(returning(empty))
    assert b.state is OPEN
    assert sample("gatewayd_breaker_calls_total", breaker=b.name, outcome="failure") == 2


async def test_a_failure_result_check_that_raises_does_not_wedge_half_open() -> None:
    clock = FakeClock()
    b = make(clock, open_s=10.0, failure_result=lambda body: not body["choices"])
    b.force_open()
    clock.advance(10.0)
    with pytest.raises(KeyError):
        await b.call(returning({"error": "overloaded"}))  # the check itself fails on the body
    assert b.probes_in_flight == 0
    assert b.state is OPEN  # an unreadable body counts as a failed probe
    clock.advance(10.0)
    await b.call(returning({"choices": ["ok"]}))
    assert b.state is CLOSED


async def test_cancellation_is_not_an_outcome() -> None:
    clock = FakeClock()
    b = make(clock, window_size=1, minimum_calls=1, open_s=10.0)
    b.force_open()
    clock.advance(10.0)
    started = asyncio.Event()

    async def hang() -> None:
        started.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(b.call(hang))
    await started.wait()
    assert b.probes_in_flight == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert b.state is HALF_OPEN  # neither reopened nor closed
    assert b.probes_in_flight == 0  # and the probe slot is free for the next caller
    await b.call(returning(None))
    assert b.state is CLOSED


# --- the refusal ---------------------------------------------------------------------------------------------------


def test_circuit_open_error_says_when_to_come_back() -> None:
    clock = FakeClock(50.0)
    b = make(clock, open_s=30.0)
    b.force_open()
    clock.advance(10.5)
    with pytest.raises(CircuitOpenError) as refused:
        b.permit()
    err = refused.value
    assert err.code == "circuit_open" and err.transient and err.status == 503
    assert err.retry_at == 80.0 and b.retry_at == 80.0
    assert err.retry_after_s == pytest.approx(19.5)
    assert err.headers() == {"Retry-After": str(math.ceil(err.retry_after_s))}
    assert err.to_dict()["details"]["breaker"] == b.name
    assert classify(err).hint_s == pytest.approx(19.5)  # a retry policy upstream waits exactly that long


# --- what it reports -----------------------------------------------------------------------------------------------


def test_state_changes_set_the_gauge_and_count_transitions() -> None:
    clock = FakeClock()
    b = make(clock, window_size=2, minimum_calls=2, open_s=5.0)

    def gauge() -> float | None:
        return REGISTRY.get_sample_value("gatewayd_breaker_state", {"breaker": b.name})

    def transitions(old: str, new: str) -> float:
        return sample("gatewayd_breaker_transitions_total", breaker=b.name, from_state=old, to_state=new)

    assert gauge() == 0
    fail(b, 2)
    assert gauge() == 1
    for _ in range(100):
        with pytest.raises(CircuitOpenError):
            b.permit()
    clock.advance(5.0)
    assert b.state is HALF_OPEN and gauge() == 2
    b.permit().failure()
    assert gauge() == 1
    clock.advance(5.0)
    b.permit().success()
    assert gauge() == 0
    assert transitions("closed", "open") == 1
    assert transitions("open", "half_open") == 2
    assert transitions("half_open", "open") == 1
    assert transitions("half_open", "closed") == 1
    assert sample("gatewayd_breaker_calls_total", breaker=b.name, outcome="rejected") == 100


def test_each_state_change_is_logged_once_not_each_call() -> None:
    clock = FakeClock()
    b = make(clock, window_size=2, minimum_calls=2, open_s=5.0)
    with structlog.testing.capture_logs() as logs:
        fail(b, 2)
        for _ in range(100):
            with pytest.raises(CircuitOpenError):
                b.permit()
        clock.advance(5.0)
        for _ in range(10):
            assert b.state is HALF_OPEN
        succeed(b, 1)
        succeed(b, 50)
    ours = [entry for entry in logs if entry.get("breaker") == b.name]
    assert [entry["event"] for entry in ours] == ["breaker_opened", "breaker_half_open", "breaker_closed"]
    opened = ours[0]
    assert opened["log_level"] == "warning" and opened["reason"] == "failure_rate" and opened["retry_after_s"] == 5.0


async def test_a_listener_that_raises_does_not_break_the_call() -> None:
    b = make(FakeClock(), window_size=1, minimum_calls=1)
    after: list[StateChange] = []

    def broken(change: StateChange) -> None:
        raise RuntimeError("listener bug")

    b.add_listener(broken)
    b.add_listener(after.append)
    with structlog.testing.capture_logs() as logs, pytest.raises(DeviceTimeout):
        await b.call(raising(DeviceTimeout("x")))  # the caller sees its own error, not the listener's
    assert b.state is OPEN
    assert [c.new for c in after] == [OPEN]  # the next listener still heard about it
    assert any(e["event"] == "breaker_listener_failed" for e in logs)

    b.remove_listener(broken)
    b.reset()
    assert [c.new for c in after] == [OPEN, CLOSED]


# --- operator actions and late outcomes ----------------------------------------------------------------------------


def test_force_open_and_reset() -> None:
    clock = FakeClock()
    b = make(clock, window_size=4, minimum_calls=4, open_s=30.0)
    changes = recorder(b)
    b.force_open("maintenance")
    assert b.state is OPEN
    with pytest.raises(CircuitOpenError):
        b.permit()
    b.reset()
    assert b.state is CLOSED
    assert [(c.new, c.reason) for c in changes] == [(OPEN, "maintenance"), (CLOSED, "reset")]
    assert b.permit().probe is False


def test_reset_empties_the_window_of_a_closed_breaker() -> None:
    b = make(FakeClock(), window_size=4, minimum_calls=4, failure_rate=1.0)
    fail(b, 3)
    b.reset()
    fail(b, 1)  # had the three earlier failures survived the reset, 4 of 4 would open it
    assert b.state is CLOSED


def test_outcomes_admitted_in_an_earlier_state_do_not_decide_probes() -> None:
    clock = FakeClock()
    b = make(clock, window_size=2, minimum_calls=2, open_s=10.0)
    straggler = b.permit()  # admitted while closed, still running when the breaker opens
    fail(b, 2)
    clock.advance(10.0)
    probe = b.permit()
    straggler.failure()
    assert b.state is HALF_OPEN  # the straggler is not the probe: it cannot reopen the breaker
    assert b.probes_in_flight == 1
    probe.success()
    assert b.state is CLOSED


def test_a_probe_from_an_earlier_half_open_spell_frees_no_current_slot() -> None:
    clock = FakeClock()
    b = make(clock, open_s=10.0)
    b.force_open()
    clock.advance(10.0)
    old_probe = b.permit()
    b.force_open()  # e.g. an operator, while the probe is still out
    clock.advance(10.0)
    probe = b.permit()
    old_probe.success()
    assert b.state is HALF_OPEN  # the old probe's success does not close it
    assert b.probes_in_flight == 1
    with pytest.raises(CircuitOpenError):
        b.permit()  # and did not free the current probe's slot
    probe.failure()
    assert b.state is OPEN


def test_late_probe_after_reset_does_not_unbalance_the_count() -> None:
    clock = FakeClock()
    b = make(clock, open_s=10.0)
    b.force_open()
    clock.advance(10.0)
    probe = b.permit()
    b.reset()
    probe.ignore()
    assert b.probes_in_flight == 0
    b.force_open()
    clock.advance(10.0)
    b.permit()
    with pytest.raises(CircuitOpenError):
        b.permit()  # one slot, taken: the late probe did not leave a spare one behind


def test_a_permit_is_settled_once() -> None:
    b = make(FakeClock())
    permit = b.permit()
    permit.success()
    with pytest.raises(RuntimeError):
        permit.failure()


async def test_permit_as_context_manager_settles_on_exit() -> None:
    b = make(FakeClock(), window_size=2, minimum_calls=2)
    for _ in range(2):
        with pytest.raises(DeviceTimeout):
            async with b.permit():
                raise DeviceTimeout("x")
    assert b.state is OPEN
