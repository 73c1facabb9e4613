"""Rate limiting built on the token bucket: per-key buckets and the adaptive (AIMD) rate, on a fake clock."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gatewayd.observability.metrics import REGISTRY
from gatewayd.resilience import AdaptiveRate, BucketSpec, FakeClock, KeyedLimiter, TokenBucket


@pytest.fixture
def name(request: pytest.FixtureRequest) -> str:
    """A limiter name no other test uses, so the process-wide metrics can be read per test."""
    return str(request.node.nodeid)


def keys_gauge(name: str) -> float | None:
    return REGISTRY.get_sample_value("gatewayd_rate_limit_keys", {"limiter": name})


def evictions(name: str, reason: str) -> float | None:
    return REGISTRY.get_sample_value("gatewayd_rate_limit_evictions_total", {"limiter": name, "reason": reason})


def burst(limiter: KeyedLimiter, key: str, tier: str | None = None) -> int:
    """How many single requests the key gets through right now."""
    allowed = 0
    while allowed < 1_000 and limiter.try_acquire(key, tier=tier).allowed:
        allowed += 1
    return allowed


# --- keyed limiter ---------------------------------------------------------------------------------------------


def test_keys_are_independent(name: str) -> None:
    clock = FakeClock()
    limiter = KeyedLimiter(BucketSpec(2, 0.1), name=name, clock=clock)

    assert burst(limiter, "alice") == 2
    assert limiter.try_acquire("alice").wait_s == pytest.approx(10)
    assert burst(limiter, "bob") == 2  # alice's debt is hers alone


def test_override_beats_tier_beats_default(name: str) -> None:
    limiter = KeyedLimiter(
        BucketSpec(2, 1),
        name=name,
        tiers={"gold": BucketSpec(10, 1)},
        overrides={"vip": BucketSpec(50, 1)},
        clock=FakeClock(),
    )

    assert burst(limiter, "anon") == 2
    assert burst(limiter, "paying", tier="gold") == 10
    assert burst(limiter, "vip", tier="gold") == 50
    assert burst(limiter, "typo", tier="platinum") == 2  # an unknown tier is the default


def test_a_key_changing_tier_gets_the_new_spec(name: str) -> None:
    clock = FakeClock()
    limiter = KeyedLimiter(BucketSpec(2, 0.5), name=name, tiers={"gold": BucketSpec(10, 5)}, clock=clock)
    assert burst(limiter, "k") == 2

    upgraded = limiter.try_acquire("k", tier="gold")
    assert upgraded.limit == 10
    assert upgraded.wait_s == pytest.approx(1 / 5)  # the debt is kept, but repaid at the gold rate
    clock.advance(10)
    assert burst(limiter, "k", tier="gold") == 10

    clock.advance(10)
    assert burst(limiter, "k") == 2  # and back down
    assert len(limiter) == 1


@settings(max_examples=100, deadline=None)
@given(ops=st.lists(st.tuples(st.integers(0, 30), st.floats(0, 5)), max_size=80), max_keys=st.integers(1, 6))
def test_keys_held_never_exceed_max_keys(ops: list[tuple[int, float]], max_keys: int) -> None:
    clock = FakeClock()
    limiter = KeyedLimiter(BucketSpec(3, 0.5), name="prop-max-keys", max_keys=max_keys, scan=2, clock=clock)
    for key, dt in ops:
        clock.advance(dt)
        limiter.try_acquire(f"user{key}")
        assert len(limiter) <= max_keys
        assert keys_gauge("prop-max-keys") == len(limiter)


def test_idle_keys_are_evicted_before_busy_ones_and_lru_otherwise(name: str) -> None:
    clock = FakeClock()
    limiter = KeyedLimiter(BucketSpec(2, 0.001), name=name, overrides={"b": BucketSpec(2, 10)}, max_keys=3, clock=clock)
    for key in ("a", "b", "c"):
        limiter.try_acquire(key, 2)
    clock.advance(1)  # b is full again; a and c are still in debt

    limiter.try_acquire("d")
    assert ("a" in limiter, "b" in limiter, "c" in limiter) == (True, False, True)  # a was older, but in debt

    limiter.try_acquire("e")  # nobody idle: the least recently used goes
    assert ("a" in limiter, "c" in limiter, "d" in limiter) == (False, True, True)
    assert (evictions(name, "idle"), evictions(name, "lru")) == (1, 1)
    assert not limiter.try_acquire("c").allowed  # a kept key kept its debt


def test_sweep_drops_full_and_long_untouched_keys(name: str) -> None:
    clock = FakeClock()
    limiter = KeyedLimiter(
        BucketSpec(2, 1), name=name, overrides={"slow": BucketSpec(2, 0.001)}, idle_s=60, clock=clock
    )
    for key in ("full", "slow", "busy"):
        limiter.try_acquire(key, 2)
    clock.advance(59)
    limiter.try_acquire("busy", 2)
    clock.advance(1)  # full refilled; slow is in debt but untouched for 60 s; busy is in debt, touched 1 s ago
    assert keys_gauge(name) == 3

    assert limiter.sweep() == 2

    assert ("full" in limiter, "slow" in limiter, "busy" in limiter) == (False, False, True)
    assert keys_gauge(name) == 1
    assert evictions(name, "idle") == 2


def test_saving_does_not_keep_an_unused_key_alive(name: str) -> None:
    clock = FakeClock()
    limiter = KeyedLimiter(BucketSpec(10, 0.001), name=name, idle_s=100, clock=clock)
    limiter.try_acquire("a", 10)
    for _ in range(10):  # the state saver snapshots every 30 s
        clock.advance(30)
        limiter.snapshot()

    assert limiter.sweep() == 1
    assert "a" not in limiter


def test_peek_of_an_unknown_key_does_not_create_it(name: str) -> None:
    clock = FakeClock()
    limiter = KeyedLimiter(BucketSpec(5, 1), name=name, tiers={"gold": BucketSpec(20, 1)}, max_keys=1, clock=clock)
    limiter.try_acquire("real", 5)

    unknown = [limiter.peek(f"scan{i}", tier="gold") for i in range(100)]

    assert all(d.allowed and d.remaining == 20 for d in unknown)
    assert not limiter.peek("ghost", 6).allowed and limiter.peek("ghost", 6).wait_s == float("inf")
    assert len(limiter) == 1 and "ghost" not in limiter
    assert keys_gauge(name) == 1
    assert limiter.peek("real").wait_s == pytest.approx(1)  # the real key and its debt survived the scan


def test_keyed_snapshot_keeps_only_keys_in_debt_and_restores_them(name: str) -> None:
    clock = FakeClock(500)
    limiter = KeyedLimiter(BucketSpec(4, 1), name=name, clock=clock)
    limiter.try_acquire("a", 4)
    limiter.try_acquire("b", 1)
    clock.advance(1)  # a has 1; b is full again
    limiter.try_acquire("c", 1)  # c has 3

    saved = limiter.snapshot()
    assert set(saved["keys"]) == {"a", "c"}

    rebooted = FakeClock()
    known = KeyedLimiter(BucketSpec(4, 1), name=name, max_keys=2, clock=rebooted)
    known.restore(saved, downtime_s=1)
    unknown = KeyedLimiter(BucketSpec(4, 1), name=name, max_keys=2, clock=rebooted)
    unknown.restore(saved)

    assert (burst(known, "a"), burst(known, "c")) == (2, 4)  # refilled by the downtime, capped at capacity
    assert (unknown.peek("a").remaining, unknown.peek("c").remaining) == (1, 3)
    unknown.try_acquire("new")  # the recency order survived: a, used before c, goes first
    assert ("a" in unknown, "c" in unknown) == (False, True)


def test_keyed_snapshot_is_bounded_to_the_most_recent_keys(name: str) -> None:
    limiter = KeyedLimiter(BucketSpec(4, 1), name=name, snapshot_keys=2, clock=FakeClock())
    for key in ("old", "mid", "new"):
        limiter.try_acquire(key)
    limiter.try_acquire("old")

    assert set(limiter.snapshot()["keys"]) == {"old", "new"}


# --- adaptive rate ---------------------------------------------------------------------------------------------


def adaptive(name: str, clock: FakeClock, *, rate: float = 2.0) -> AdaptiveRate:
    bucket = TokenBucket(10, rate, name=name, clock=clock)
    return AdaptiveRate(bucket, min_rate=0.5, max_rate=5, increase=1, window=20, cooldown_s=10, clock=clock)


def rate_gauge(name: str) -> float | None:
    return REGISTRY.get_sample_value("gatewayd_adaptive_rate", {"limiter": name})


def record(aimd: AdaptiveRate, ok: int, failed: int) -> None:
    for i in range(ok + failed):
        aimd.record(i < ok)


@pytest.mark.parametrize(
    ("ok", "expected"),
    [
        (20, 3.0),
        (19, 3.0),  # 0.95 > 0.9: up by `increase`
        (18, 2.0),  # 0.9 is not above 0.9: hold
        (14, 2.0),  # 0.7 is not below 0.7: hold
        (13, 1.0),  # 0.65 < 0.7: halved
        (0, 1.0),
    ],
)
def test_rate_follows_the_success_ratio_of_a_window(ok: int, expected: float, name: str) -> None:
    aimd = adaptive(name, FakeClock())

    outcomes = [True] * ok + [False] * (20 - ok)

    for outcome in outcomes[:-1]:
        aimd.record(outcome)
    assert aimd.rate == 2.0  # not judged before the window is full
    aimd.record(outcomes[-1])

    assert aimd.rate == expected
    assert aimd.bucket.rate == expected
    assert rate_gauge(name) == expected


def test_adapted_rate_is_the_rate_the_bucket_refills_at(name: str) -> None:
    clock = FakeClock()
    aimd = adaptive(name, clock)
    aimd.bucket.try_acquire(10)

    record(aimd, 0, 20)

    assert aimd.bucket.try_acquire().wait_s == pytest.approx(1 / 1.0)


def test_each_change_starts_a_fresh_window(name: str) -> None:
    aimd = adaptive(name, FakeClock())
    record(aimd, 20, 0)
    assert aimd.rate == 3

    record(aimd, 19, 0)
    assert aimd.rate == 3  # the 20 that raised it are not counted again
    record(aimd, 1, 0)
    assert aimd.rate == 4


def test_a_429_cuts_the_rate_at_once_but_once_per_cooldown(name: str) -> None:
    clock = FakeClock()
    aimd = adaptive(name, clock, rate=4)

    aimd.record(True, throttled=True)
    assert aimd.rate == 2  # no need to wait for a window: the other side said so
    clock.advance(9.9)
    for _ in range(5):  # the calls that were already in flight when the first 429 came back
        aimd.record(False, throttled=True)
    assert aimd.rate == 2
    clock.advance(0.1)
    aimd.record(False, throttled=True)
    assert aimd.rate == 1
    assert rate_gauge(name) == 1


def test_a_429_restarts_the_window(name: str) -> None:
    aimd = adaptive(name, FakeClock(), rate=4)
    record(aimd, 15, 0)
    aimd.record(False, throttled=True)

    record(aimd, 19, 0)
    assert aimd.rate == 2  # the 15 successes before the 429 were made at the old rate


@settings(max_examples=100, deadline=None)
@given(
    outcomes=st.lists(st.tuples(st.booleans(), st.booleans(), st.floats(0, 20)), max_size=200),
    start=st.floats(0.01, 100),
)
def test_rate_never_leaves_its_bounds(outcomes: list[tuple[bool, bool, float]], start: float) -> None:
    clock = FakeClock()
    aimd = AdaptiveRate(
        TokenBucket(10, start, name="prop-aimd", clock=clock),
        min_rate=0.5,
        max_rate=5,
        window=4,
        cooldown_s=1,
        clock=clock,
    )
    assert 0.5 <= aimd.rate <= 5
    for ok, throttled, dt in outcomes:
        clock.advance(dt)
        aimd.record(ok, throttled=throttled)
        assert 0.5 <= aimd.rate <= 5
        assert aimd.bucket.rate == aimd.rate == rate_gauge("prop-aimd")


def test_rate_stops_at_its_bounds(name: str) -> None:
    clock = FakeClock()
    aimd = adaptive(name, clock)
    record(aimd, 200, 0)
    assert aimd.rate == 5
    for _ in range(10):
        clock.advance(10)
        aimd.record(False, throttled=True)
    assert aimd.rate == 0.5


def test_adaptive_restore_keeps_the_learned_rate_within_bounds(name: str) -> None:
    saved = adaptive(name, FakeClock(), rate=3.5).snapshot()

    for downtime in (None, 0.0, 86_400.0):  # it is where the other side left us, however long ago
        restored = adaptive(name, FakeClock())
        restored.restore(saved, downtime_s=downtime)
        assert restored.rate == 3.5 == restored.bucket.rate == rate_gauge(name)

    restored.restore({"rate": 100})
    assert restored.rate == 5


def test_adaptive_rejects_nonsense_bounds() -> None:
    bucket = TokenBucket(10, 1)
    for kwargs in (
        {"min_rate": 0, "max_rate": 5},
        {"min_rate": 5, "max_rate": 1},
        {"min_rate": 1, "max_rate": 5, "decrease": 1},
        {"min_rate": 1, "max_rate": 5, "window": 0},
        {"min_rate": 1, "max_rate": 5, "raise_above": 0.5, "lower_below": 0.7},
    ):
        with pytest.raises(ValueError):
            AdaptiveRate(bucket, **kwargs)
