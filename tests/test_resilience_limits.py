"""Rate limiting: the token bucket and the sliding-window limiter, on a fake clock.

The keyed limiter and the adaptive rate, which build on the bucket, are in test_resilience_keyed_adaptive.py.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gatewayd.observability.metrics import REGISTRY
from gatewayd.resilience import (
    CRITICAL,
    NORMAL,
    AdaptiveRate,
    BucketSpec,
    FakeClock,
    KeyedLimiter,
    RateLimited,
    SlidingWindowLimiter,
    TokenBucket,
)

OUTCOMES = ("allowed", "limited", "bypassed")


@pytest.fixture
def name(request: pytest.FixtureRequest) -> str:
    """A limiter name no other test uses, so the process-wide counters can be read per test."""
    return str(request.node.nodeid)


def decisions(name: str) -> dict[str, float]:
    return {
        outcome: REGISTRY.get_sample_value("gatewayd_rate_limit_decisions_total", {"limiter": name, "outcome": outcome})
        or 0.0
        for outcome in OUTCOMES
    }


def drained(capacity: float, rate: float, clock: FakeClock, name: str) -> TokenBucket:
    return TokenBucket(capacity, rate, name=name, clock=clock, tokens=0)


# --- token bucket ----------------------------------------------------------------------------------------------


def test_worked_example_capacity_10_refill_one_per_6_s(name: str) -> None:
    clock = FakeClock()
    bucket = TokenBucket(10, 1 / 6, name=name, clock=clock)

    at_0 = [bucket.try_acquire() for _ in range(5)]
    clock.advance(10)
    at_10 = [bucket.try_acquire() for _ in range(8)]
    clock.advance(10)
    at_20 = [bucket.try_acquire() for _ in range(4)]

    assert [d.allowed for d in at_0] == [True] * 5
    # 5 left + 10 s / 6 s = 6.67 tokens: 6 whole ones, and the 0.67 left needs 2 s more.
    assert [d.allowed for d in at_10] == [True] * 6 + [False] * 2
    assert [d.wait_s for d in at_10[6:]] == [pytest.approx(2.0)] * 2
    assert at_10[-1].headers()["Retry-After"] == "2"
    # 0.67 + 1.67 = 2.33 tokens: 2 whole ones, and the 0.33 left needs 4 s more.
    assert [d.allowed for d in at_20] == [True] * 2 + [False] * 2
    assert [d.wait_s for d in at_20[2:]] == [pytest.approx(4.0)] * 2
    assert at_20[-1].headers()["Retry-After"] == "4"
    assert decisions(name) == {"allowed": 13, "limited": 4, "bypassed": 0}


def test_refill_is_continuous_on_the_injected_clock(name: str) -> None:
    clock = FakeClock(1000.0)
    bucket = drained(10, 2, clock, name)

    clock.advance(0.25)
    assert bucket.level() == pytest.approx(0.5)  # half a token, not zero until a whole period has passed
    assert bucket.try_acquire().wait_s == pytest.approx(0.25)
    clock.advance(0.25)
    assert bucket.try_acquire().allowed
    clock.advance(3600)
    assert bucket.level() == 10  # capped at the capacity however long it sat


def test_weighted_acquire_counts_tokens_not_requests(name: str) -> None:
    # 90,000 LLM tokens per minute, bursting to a minute's worth.
    clock = FakeClock()
    bucket = TokenBucket(90_000, 1_500, name=name, clock=clock)

    first = bucket.try_acquire(60_000)
    second = bucket.try_acquire(40_000)

    assert first.allowed and first.remaining == pytest.approx(30_000)
    assert not second.allowed
    assert second.wait_s == pytest.approx(10_000 / 1_500)
    assert bucket.try_acquire(30_000).allowed  # a smaller request still fits where the larger one did not


def test_refused_request_is_allowed_after_exactly_the_wait_and_not_before(name: str) -> None:
    clock = FakeClock()
    bucket = drained(5, 0.5, clock, name)
    clock.advance(1.2)

    wait = bucket.try_acquire(3).wait_s
    assert wait == pytest.approx((3 - 0.6) / 0.5)
    clock.advance(wait - 0.01)
    assert not bucket.try_acquire(3).allowed
    clock.advance(0.01)
    assert bucket.try_acquire(3).allowed


@settings(max_examples=300, deadline=None)
@given(
    start=st.floats(0, 1e7),
    capacity=st.floats(1, 1e5),
    rate=st.floats(0.01, 1e4),
    fill=st.floats(0, 1),
    want=st.floats(0.01, 1),
)
def test_sleeping_exactly_the_advertised_wait_is_enough(
    start: float, capacity: float, rate: float, fill: float, want: float
) -> None:
    # Float clocks round ``now + wait``; at months of uptime and high rates that once left the caller a hair short.
    clock = FakeClock(start)
    bucket = TokenBucket(capacity, rate, name="prop-exact-wait", clock=clock, tokens=capacity * fill)
    n = capacity * want

    decision = bucket.try_acquire(n)
    if not decision.allowed:
        clock.advance(decision.wait_s)
        assert bucket.try_acquire(n).allowed


async def test_acquire_sleeps_exactly_the_wait(name: str) -> None:
    clock = FakeClock()
    bucket = drained(10, 4, clock, name)

    decision = await bucket.acquire(3)

    assert decision.allowed
    assert clock.sleeps == [pytest.approx(0.75)]
    assert decisions(name)["allowed"] == 1


async def test_acquire_that_would_not_fit_its_deadline_raises_at_once(name: str) -> None:
    clock = FakeClock()
    bucket = drained(10, 1, clock, name)

    with pytest.raises(RateLimited) as caught:
        await bucket.acquire(2, deadline=1.5)

    assert clock.sleeps == []
    assert caught.value.status == 429
    assert caught.value.retry_after_s == pytest.approx(2.0)
    assert decisions(name)["limited"] == 1
    # The same wait fits a deadline exactly as far away.
    assert (await bucket.acquire(2, deadline=clock.monotonic() + 2.0)).allowed


async def test_more_tokens_than_the_capacity_are_never_granted(name: str) -> None:
    clock = FakeClock()
    bucket = TokenBucket(10, 1, name=name, clock=clock)

    decision = bucket.try_acquire(11)
    with pytest.raises(RateLimited) as caught:
        async with asyncio.timeout(5):  # no deadline: a wrong answer would sleep forever
            await bucket.acquire(11)

    assert not decision.allowed and decision.wait_s == math.inf
    assert caught.value.retry_after_s == math.inf
    assert clock.sleeps == []
    assert bucket.level() == 10  # a refusal takes nothing


@pytest.mark.parametrize("n", [0, -1, math.nan])
async def test_a_request_for_no_tokens_is_a_programming_error(n: float, name: str) -> None:
    bucket = TokenBucket(10, 1, name=name, clock=FakeClock())
    with pytest.raises(ValueError):
        bucket.try_acquire(n)
    with pytest.raises(ValueError):
        bucket.peek(n)
    with pytest.raises(ValueError):
        await bucket.acquire(n)


def test_peek_answers_like_try_acquire_without_taking(name: str) -> None:
    clock = FakeClock()
    bucket = TokenBucket(4, 1, name=name, clock=clock, tokens=1.5)

    assert bucket.peek(2) == bucket.peek(2)
    assert bucket.peek(2).wait_s == pytest.approx(0.5)
    assert bucket.peek(1).allowed
    assert bucket.level() == 1.5
    assert decisions(name) == {"allowed": 0, "limited": 0, "bypassed": 0}


# --- headers ---------------------------------------------------------------------------------------------------


def test_allowed_decision_headers(name: str) -> None:
    clock = FakeClock()
    bucket = TokenBucket(10, 0.5, name=name, clock=clock)

    headers = bucket.try_acquire(3).headers()

    # 7 left, and the 3 taken come back at 0.5 per second.
    assert headers == {"X-RateLimit-Limit": "10", "X-RateLimit-Remaining": "7", "X-RateLimit-Reset": "6"}


def test_refused_decision_headers_round_the_wait_up_to_whole_seconds(name: str) -> None:
    clock = FakeClock()
    bucket = TokenBucket(10, 0.4, name=name, clock=clock, tokens=0.5)

    decision = bucket.try_acquire(2)

    assert (decision.limit, decision.remaining) == (10, 0.5)
    assert decision.wait_s == pytest.approx(1.5 / 0.4)
    assert decision.reset_s == pytest.approx(9.5 / 0.4)
    assert decision.headers() == {
        "X-RateLimit-Limit": "10",
        "X-RateLimit-Remaining": "0",
        "X-RateLimit-Reset": "24",
        "Retry-After": "4",
    }


async def test_rate_limited_carries_the_headers_of_the_refusal(name: str) -> None:
    clock = FakeClock()
    bucket = TokenBucket(8, 0.25, name=name, clock=clock, tokens=1)

    with pytest.raises(RateLimited) as caught:
        await bucket.acquire(3, deadline=5)

    err = caught.value
    assert (err.limit, err.remaining, err.retry_after_s, err.reset_s) == (8, 1, 8.0, 28.0)
    assert err.headers() == {
        "Retry-After": "8",
        "X-RateLimit-Limit": "8",
        "X-RateLimit-Remaining": "1",
        "X-RateLimit-Reset": "28",
    }
    assert err.to_dict()["code"] == "rate_limited"


# --- priorities ------------------------------------------------------------------------------------------------


async def test_critical_request_is_never_refused_and_never_waits(name: str) -> None:
    clock = FakeClock()
    bucket = drained(10, 1, clock, name)

    assert not bucket.try_acquire(priority=NORMAL).allowed
    assert bucket.try_acquire(priority=CRITICAL).allowed
    assert (await bucket.acquire(5, deadline=0, priority=CRITICAL)).allowed
    assert (await bucket.acquire(50, priority=CRITICAL)).allowed  # even beyond the capacity
    assert clock.sleeps == []
    assert decisions(name) == {"allowed": 0, "limited": 1, "bypassed": 3}


def test_critical_takes_what_is_left_but_never_drives_the_level_below_zero(name: str) -> None:
    clock = FakeClock()
    bucket = TokenBucket(10, 1, name=name, clock=clock, tokens=3)

    assert bucket.try_acquire(5, priority=CRITICAL).allowed
    assert bucket.level() == 0  # the 3 there were are gone: emergency traffic counts against normal traffic
    for _ in range(100):
        bucket.try_acquire(priority=CRITICAL)

    # A hundred emergency stops on an empty bucket cost normal traffic one refill, not a hundred.
    refused = bucket.try_acquire(priority=NORMAL)
    assert refused.wait_s == pytest.approx(1.0)
    clock.advance(refused.wait_s)
    assert bucket.try_acquire(priority=NORMAL).allowed


# --- sliding window --------------------------------------------------------------------------------------------


def test_window_allows_no_double_burst_across_a_boundary(name: str) -> None:
    # A fixed per-minute window would let 5 through at 0:59 and 5 more at 1:01.
    clock = FakeClock(59.0)
    window = SlidingWindowLimiter(5, 60, name=name, clock=clock)

    assert all(window.try_acquire().allowed for _ in range(5))
    clock.advance(2)
    refused = window.try_acquire()

    assert not refused.allowed
    assert refused.wait_s == pytest.approx(58.0)
    assert decisions(name) == {"allowed": 5, "limited": 1, "bypassed": 0}


def test_window_wait_is_until_the_oldest_entry_leaves(name: str) -> None:
    clock = FakeClock()
    window = SlidingWindowLimiter(3, 30, name=name, clock=clock)
    for _ in range(3):
        window.try_acquire()
        clock.advance(10)  # entries at 0, 10 and 20; now 30

    assert window.try_acquire().allowed  # the entry at 0 has just left
    blocked = window.try_acquire()
    assert blocked.wait_s == pytest.approx(10.0)  # the entry at 10 leaves at 40
    clock.advance(blocked.wait_s - 0.001)
    assert not window.try_acquire().allowed
    clock.advance(0.001)
    assert window.try_acquire().allowed


def test_weighted_window_waits_until_enough_units_leave(name: str) -> None:
    clock = FakeClock()
    window = SlidingWindowLimiter(10, 60, name=name, clock=clock)
    window.try_acquire(4)
    clock.advance(5)
    window.try_acquire(3)
    clock.advance(5)
    window.try_acquire(2)  # 9 of 10 used: 4 at 0, 3 at 5, 2 at 10

    refused = window.try_acquire(6)

    # Room for 1, so 5 must leave: the 4 leaving at 60 are not enough, with the 3 leaving at 65 they are.
    assert refused.wait_s == pytest.approx(55.0)
    assert (refused.limit, refused.remaining) == (10, 1)
    assert refused.reset_s == pytest.approx(60.0)  # the last entry, at 10, leaves at 70
    assert refused.headers()["Retry-After"] == "55"
    assert not window.try_acquire(11).allowed and window.try_acquire(11).wait_s == math.inf


async def test_window_acquire_sleeps_exactly_or_raises_at_once(name: str) -> None:
    clock = FakeClock(0.7)
    window = SlidingWindowLimiter(1, 7.967599214216396, name=name, clock=clock)  # sums that round badly
    window.try_acquire()

    with pytest.raises(RateLimited) as caught:
        await window.acquire(deadline=5)
    assert clock.sleeps == []
    assert caught.value.retry_after_s == pytest.approx(7.967599214216396)

    async with asyncio.timeout(5):  # a wait that lands a hair early used to spin here forever
        assert (await window.acquire()).allowed
    assert clock.sleeps == [pytest.approx(7.967599214216396)]
    with pytest.raises(RateLimited):
        await window.acquire(2)  # more than the limit: never


def test_window_critical_is_admitted_but_never_pushes_the_window_over(name: str) -> None:
    clock = FakeClock()
    window = SlidingWindowLimiter(10, 60, name=name, clock=clock)
    window.try_acquire(7)

    assert window.try_acquire(5, priority=CRITICAL).allowed  # took the 3 units of room left
    assert not window.try_acquire(priority=NORMAL).allowed
    for _ in range(100):
        assert window.try_acquire(priority=CRITICAL).allowed

    # Normal traffic waits for the entries made at 0 to leave, not for a hundred more.
    refused = window.peek()
    assert refused.wait_s == pytest.approx(60.0)
    clock.advance(60)
    assert window.try_acquire(10).allowed
    assert decisions(name) == {"allowed": 2, "limited": 1, "bypassed": 101}


def test_window_rejects_nonsense_limits() -> None:
    with pytest.raises(ValueError):
        SlidingWindowLimiter(0, 60)
    with pytest.raises(ValueError):
        SlidingWindowLimiter(5, 0)
    with pytest.raises(ValueError):
        TokenBucket(0, 1)
    with pytest.raises(ValueError):
        TokenBucket(10, -1)


# --- persistence -----------------------------------------------------------------------------------------------


def test_bucket_restore_refills_by_a_known_downtime_up_to_the_capacity(name: str) -> None:
    saved = TokenBucket(10, 0.5, name=name, clock=FakeClock(5000), tokens=2).snapshot()

    rebooted = FakeClock()  # monotonic readings start again after a reboot
    short, long, unknown = (TokenBucket(10, 0.5, name=name, clock=rebooted) for _ in range(3))
    short.restore(saved, downtime_s=4)
    long.restore(saved, downtime_s=3600)
    unknown.restore(saved, downtime_s=None)

    assert short.level() == pytest.approx(4)
    assert long.level() == 10
    assert unknown.level() == pytest.approx(2)  # the safe side for the target: no refill we cannot vouch for


def test_window_restore_ages_entries_by_the_downtime(name: str) -> None:
    clock = FakeClock(100)
    window = SlidingWindowLimiter(3, 60, name=name, clock=clock)
    for _ in range(3):
        window.try_acquire()
        clock.advance(20)  # entries aged 60 (gone), 40 and 20 at the save
    saved = window.snapshot()

    known = SlidingWindowLimiter(3, 60, name=name, clock=FakeClock())
    known.restore(saved, downtime_s=30)
    unknown = SlidingWindowLimiter(3, 60, name=name, clock=FakeClock())
    unknown.restore(saved)

    assert [known.try_acquire().allowed for _ in range(3)] == [True, True, False]  # the entry aged 70 left
    assert known.try_acquire().wait_s == pytest.approx(10)  # the one aged 50 leaves in 10 s
    assert [unknown.try_acquire().allowed for _ in range(2)] == [True, False]
    assert unknown.try_acquire().wait_s == pytest.approx(20)


def corrupt_restores() -> list[Any]:
    spec = BucketSpec(10, 1)
    bad_numbers = [-1, math.nan, math.inf, "5", True, None]
    cases: list[Any] = []
    for bad in bad_numbers:
        cases += [
            pytest.param(lambda c: TokenBucket(10, 1, clock=c), {"tokens": bad}, id=f"bucket-{bad!r}"),
            pytest.param(lambda c: KeyedLimiter(spec, clock=c), {"keys": {"a": {"tokens": bad}}}, id=f"keyed-{bad!r}"),
            pytest.param(
                lambda c: SlidingWindowLimiter(5, 60, clock=c), {"events": [[bad, 1]]}, id=f"window-age-{bad!r}"
            ),
            pytest.param(
                lambda c: SlidingWindowLimiter(5, 60, clock=c), {"events": [[1, bad]]}, id=f"window-units-{bad!r}"
            ),
            pytest.param(
                lambda c: AdaptiveRate(TokenBucket(10, 1, clock=c), min_rate=0.5, max_rate=5, clock=c),
                {"rate": bad},
                id=f"adaptive-{bad!r}",
            ),
        ]
    cases += [
        pytest.param(lambda c: KeyedLimiter(spec, clock=c), {"keys": [["a", 1]]}, id="keyed-not-an-object"),
        pytest.param(lambda c: KeyedLimiter(spec, clock=c), {"keys": {"a": 3}}, id="keyed-entry-not-an-object"),
        pytest.param(lambda c: SlidingWindowLimiter(5, 60, clock=c), {"events": "x"}, id="window-not-a-list"),
        pytest.param(lambda c: SlidingWindowLimiter(5, 60, clock=c), {"events": [[1]]}, id="window-short-entry"),
    ]
    return cases


@pytest.mark.parametrize(("make", "state"), corrupt_restores())
def test_restore_rejects_corrupt_state_and_keeps_its_own(make: Any, state: dict[str, Any]) -> None:
    tool = make(FakeClock())
    before = tool.snapshot()

    with pytest.raises(ValueError):
        tool.restore(state, downtime_s=10)

    assert tool.snapshot() == before


# --- properties ------------------------------------------------------------------------------------------------

operations = st.lists(
    st.tuples(
        st.floats(0, 30),  # advance the clock by
        st.sampled_from([0.5, 1, 2, 3, 7]),  # tokens asked for
        st.sampled_from([CRITICAL, NORMAL, NORMAL, NORMAL]),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(capacity=st.floats(1, 20), rate=st.floats(0, 5), ops=operations)
def test_bucket_never_holds_more_than_its_capacity(
    capacity: float, rate: float, ops: list[tuple[float, float, int]]
) -> None:
    clock = FakeClock()
    bucket = TokenBucket(capacity, rate, name="prop-capacity", clock=clock)
    for dt, n, priority in ops:
        clock.advance(dt)
        bucket.try_acquire(n, priority=priority)
        assert 0 <= bucket.level() <= capacity


@settings(max_examples=200, deadline=None)
@given(capacity=st.floats(1, 20), rate=st.floats(0, 5), ops=operations)
def test_bucket_admits_no_more_normal_traffic_than_capacity_plus_refill(
    capacity: float, rate: float, ops: list[tuple[float, float, int]]
) -> None:
    clock = FakeClock()
    bucket = TokenBucket(capacity, rate, name="prop-admitted", clock=clock)
    admitted: list[tuple[float, float]] = []
    for dt, n, priority in ops:
        clock.advance(dt)
        if bucket.try_acquire(n, priority=priority).allowed and priority == NORMAL:
            admitted.append((clock.monotonic(), n))

    for i, (t_i, _) in enumerate(admitted):
        total = 0.0
        for t_j, n in admitted[i:]:
            total += n
            assert total <= capacity + rate * (t_j - t_i) + 1e-6


@settings(max_examples=200, deadline=None)
@given(
    limit=st.integers(1, 8),
    window_s=st.floats(0.5, 60),
    ops=st.lists(
        st.tuples(st.floats(0, 20), st.sampled_from([0.5, 1, 2]), st.sampled_from([CRITICAL, NORMAL, NORMAL])),
        max_size=60,
    ),
)
def test_window_never_admits_more_than_its_limit_in_any_window(
    limit: int, window_s: float, ops: list[tuple[float, float, int]]
) -> None:
    clock = FakeClock()
    window = SlidingWindowLimiter(limit, window_s, name="prop-window", clock=clock)
    admitted: list[tuple[float, float]] = []
    for dt, n, priority in ops:
        clock.advance(dt)
        if window.try_acquire(n, priority=priority).allowed and priority == NORMAL:
            admitted.append((clock.monotonic(), n))

    for i, (t_i, _) in enumerate(admitted):
        in_window = sum(n for t_j, n in admitted[i:] if t_j - t_i < window_s - 1e-9)
        assert in_window <= limit + 1e-9
