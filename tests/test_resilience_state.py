"""Breaker states, limiter levels and adaptive rates kept across a restart, in the real SQLite store: restored as
remaining durations less the downtime, when the downtime can be known."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import structlog

from gatewayd.errors import StoreUnavailable
from gatewayd.observability.metrics import REGISTRY
from gatewayd.resilience import (
    AdaptiveRate,
    BucketSpec,
    CircuitBreaker,
    CircuitState,
    FakeClock,
    KeyedLimiter,
    Persistent,
    ResilienceState,
    SlidingWindowLimiter,
    TokenBucket,
)
from gatewayd.store import Store

T = TypeVar("T")

OPEN_S = 30.0
SAVE_MONO = 1010.0  # the first process's monotonic clock when it saves
SAVE_WALL = 1_700_000_000.0  # and its wall clock


def sample(metric: str, **labels: str) -> float:
    value = REGISTRY.get_sample_value(metric, labels)
    return 0.0 if value is None else value


def skipped(reason: str) -> float:
    return sample("gatewayd_resilience_state_rows_skipped_total", reason=reason)


class Wall:
    """An injected wall clock that a test sets, as NTP (or its absence) would."""

    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


class Process:
    """The persisted tools of one gatewayd process, built from the same configuration each time it starts."""

    def __init__(self, clock: FakeClock, wall: Wall, boot_id: str):
        self.clock = clock
        self.breaker = CircuitBreaker("state-breaker", open_s=OPEN_S, clock=clock)
        self.bucket = TokenBucket(10.0, 1.0, name="state-bucket", clock=clock)
        self.keyed = KeyedLimiter(BucketSpec(5.0, 0.5), name="state-keyed", clock=clock)
        self.window = SlidingWindowLimiter(3, 60.0, name="state-window", clock=clock)
        self.adaptive = AdaptiveRate(
            TokenBucket(20.0, 5.0, name="state-adaptive", clock=clock), min_rate=1.0, max_rate=10.0, clock=clock
        )
        self.state = ResilienceState(clock=clock, wall=wall, boot_id=boot_id)
        for key, tool in self.tools().items():
            self.state.register(key, tool)

    def tools(self) -> dict[str, Persistent]:
        return {
            "breaker:upstream": self.breaker,
            "limiter:api": self.bucket,
            "limiter:users": self.keyed,
            "limiter:hourly": self.window,
            "adaptive:provider": self.adaptive,
        }


def wear(p: Process) -> None:
    """Leave every tool in a state worth keeping: breaker open, limiters drained, the rate cut by a 429."""
    p.breaker.force_open()
    p.clock.advance(SAVE_MONO - p.clock.now)
    p.bucket.try_acquire(8)
    p.keyed.try_acquire("alice", 5)
    for _ in range(3):
        p.window.try_acquire()
    p.adaptive.record(False, throttled=True)


async def save_worn_process(path: Path, boot_id: str = "boot-a") -> Process:
    p = Process(FakeClock(SAVE_MONO - 10.0), Wall(SAVE_WALL), boot_id)
    wear(p)
    async with Store(path) as store:
        assert await p.state.save(store) == len(p.tools())
    return p


async def load(path: Path, p: Process) -> int:
    async with Store(path) as store:
        return await p.state.load(store)


@pytest.mark.parametrize(
    ("boot_id", "mono", "wall", "downtime"),
    [
        # The machine did not reboot: the monotonic readings give the downtime, even with the wall clock stepped back.
        pytest.param("boot-a", SAVE_MONO + 5.0, SAVE_WALL - 3600.0, 5.0, id="same_boot"),
        # A reboot: monotonic time restarted near zero; the wall clock, later than at the save, gives the downtime.
        pytest.param("boot-b", 3.0, SAVE_WALL + 6.0, 6.0, id="other_boot"),
        # A reboot onto a wall clock behind the save (no RTC, no NTP yet): the downtime is unknown.
        pytest.param("boot-b", 3.0, SAVE_WALL - 1000.0, None, id="other_boot_wall_behind"),
    ],
)
async def test_a_restart_restores_remaining_durations_less_the_downtime(
    tmp_path: Path, boot_id: str, mono: float, wall: float, downtime: float | None
) -> None:
    before = await save_worn_process(tmp_path / "g.db")
    assert before.breaker.retry_at is not None
    open_left = before.breaker.retry_at - SAVE_MONO
    bucket_left = before.bucket.level()
    alice_left = before.keyed.bucket("alice").level()
    assert open_left == 20.0 and bucket_left == 2.0 and alice_left == 0.0  # the scenario is what it says

    clock = FakeClock(mono)
    after = Process(clock, Wall(wall), boot_id)
    assert await load(tmp_path / "g.db", after) == len(after.tools())

    known = downtime if downtime is not None else 0.0
    # Buckets refill by the downtime at their rate (unknown: not at all).
    assert after.bucket.level() == pytest.approx(bucket_left + known * after.bucket.rate)
    assert after.keyed.bucket("alice").level() == pytest.approx(alice_left + known * after.keyed.default.rate)
    assert "bob" not in after.keyed  # a full bucket is not saved: a new key gets one anyway
    # The window's entries aged by the downtime: still in the window, leaving it that much sooner.
    assert not after.window.peek().allowed
    assert after.window.peek().wait_s == pytest.approx(after.window.window_s - known)
    # The adaptive rate is where the other side left it, whatever the downtime.
    assert after.adaptive.rate == before.adaptive.rate < 5.0
    # The open breaker waits out what was left, less the downtime (unknown: all of it).
    assert after.breaker.state is CircuitState.OPEN
    assert after.breaker.retry_at == pytest.approx(mono + open_left - known)
    clock.advance(open_left - known - 1e-3)
    assert after.breaker.state is CircuitState.OPEN
    clock.advance(2e-3)
    assert after.breaker.state is CircuitState.HALF_OPEN


async def test_a_downtime_longer_than_the_wait_resumes_half_open_and_full(tmp_path: Path) -> None:
    await save_worn_process(tmp_path / "g.db")
    after = Process(FakeClock(3.0), Wall(SAVE_WALL + 3600.0), "boot-b")
    assert await load(tmp_path / "g.db", after) == len(after.tools())
    assert after.breaker.state is CircuitState.HALF_OPEN  # the first call probes
    assert after.bucket.level() == after.bucket.capacity
    assert after.window.peek().allowed


async def test_a_second_save_replaces_the_first(tmp_path: Path) -> None:
    clock = FakeClock(SAVE_MONO - 10.0)
    p = Process(clock, Wall(SAVE_WALL), "boot-a")
    wear(p)
    async with Store(tmp_path / "g.db") as store:
        await p.state.save(store)
        p.breaker.reset()
        await p.state.save(store)
        rows = await store.read(lambda c: c.execute("SELECT key FROM resilience_state").fetchall())
    assert len(rows) == len(p.tools())
    after = Process(FakeClock(SAVE_MONO), Wall(SAVE_WALL), "boot-a")
    await load(tmp_path / "g.db", after)
    assert after.breaker.state is CircuitState.CLOSED


async def test_bad_rows_are_skipped_and_the_others_restored(tmp_path: Path) -> None:
    path = tmp_path / "g.db"
    saved = await save_worn_process(path)
    envelope = {"mono": SAVE_MONO, "snapshot": {}}

    def with_snapshot(snapshot: dict[str, Any]) -> str:
        return json.dumps({**envelope, "snapshot": snapshot})  # NaN is written as the bare token NaN

    def corrupt(conn: sqlite3.Connection) -> None:
        update = "UPDATE resilience_state SET state = ? WHERE key = ?"
        conn.execute(update, ("{not json", "breaker:upstream"))
        conn.execute("UPDATE resilience_state SET kind = 'sliding_window' WHERE key = 'limiter:api'")
        conn.execute(update, (with_snapshot({"keys": {"alice": {"tokens": float("nan")}}}), "limiter:users"))
        conn.execute(update, (with_snapshot({"events": [[-5.0, 1.0]]}), "limiter:hourly"))
        insert = "INSERT INTO resilience_state (key, kind, state, saved_at, boot_id) VALUES (?, ?, ?, ?, ?)"
        # A tool since removed from the configuration.
        conn.execute(insert, ("breaker:removed", "circuit_breaker", with_snapshot({"state": "open"}), SAVE_WALL, "b"))
        # A breaker in a state that does not exist; a bucket with a negative level; one with a 400-digit level;
        # one whose saved_at is not a number; an envelope that is not an object; a snapshot missing its field.
        rows = [
            ("breaker:second", with_snapshot({"state": "ajar", "open_remaining_s": 0.0}), SAVE_WALL),
            ("limiter:negative", with_snapshot({"tokens": -1.0}), SAVE_WALL),
            ("limiter:huge", f'{{"mono": {SAVE_MONO}, "snapshot": {{"tokens": {"9" * 400}}}}}', SAVE_WALL),
            ("limiter:when", with_snapshot({"tokens": 1.0}), "yesterday"),
            ("limiter:list", "[1, 2]", SAVE_WALL),
            ("limiter:empty", with_snapshot({}), SAVE_WALL),
        ]
        for key, state, saved_at in rows:
            kind = "circuit_breaker" if key.startswith("breaker") else "token_bucket"
            conn.execute(insert, (key, kind, state, saved_at, "boot-a"))

    async with Store(path) as store:
        await store.write(corrupt)

    clock = FakeClock(SAVE_MONO + 1.0)
    after = Process(clock, Wall(SAVE_WALL + 1.0), "boot-a")
    second = CircuitBreaker("state-breaker-2", clock=clock)
    extra = {name: TokenBucket(10.0, 1.0, name=f"state-{name}", clock=clock) for name in ("negative", "huge", "when")}
    after.state.register("breaker:second", second)
    for name, bucket in extra.items():
        after.state.register(f"limiter:{name}", bucket)
    after.state.register("limiter:list", TokenBucket(10.0, 1.0, name="state-list", clock=clock))
    after.state.register("limiter:empty", TokenBucket(10.0, 1.0, name="state-empty", clock=clock))

    counts = {reason: skipped(reason) for reason in ("unknown_key", "wrong_kind", "corrupt")}
    with structlog.testing.capture_logs() as logs:
        restored = await load(path, after)  # never raises for a bad row

    assert restored == 1  # only the adaptive rate's row was left sound
    assert after.adaptive.rate == saved.adaptive.rate
    assert skipped("unknown_key") - counts["unknown_key"] == 1
    assert skipped("wrong_kind") - counts["wrong_kind"] == 1
    assert skipped("corrupt") - counts["corrupt"] == 9
    warned = {e["key"] for e in logs if e["event"] == "resilience_state_skipped" and e["log_level"] == "warning"}
    assert warned == {
        "breaker:upstream",
        "limiter:users",
        "limiter:hourly",
        "breaker:second",
        "limiter:negative",
        "limiter:huge",
        "limiter:when",
        "limiter:list",
        "limiter:empty",
    }
    # Tools whose rows were skipped start as configured, untouched by the bad data.
    assert after.breaker.state is CircuitState.CLOSED and second.state is CircuitState.CLOSED
    assert after.bucket.level() == after.bucket.capacity
    assert after.keyed.bucket("alice").level() == 5.0
    assert after.window.peek().allowed
    assert all(bucket.level() == 10.0 for bucket in extra.values())


class FlakyStore(Store):
    """The real store, with a disk that is full for the first ``failures`` writes, reported as the store does."""

    def __init__(self, path: Path, failures: int):
        super().__init__(path)
        self.failures = failures
        self.attempts = 0
        self.saved = 0
        self.saved_twice = asyncio.Event()

    async def write(self, job: Callable[[sqlite3.Connection], T]) -> T:
        self.attempts += 1
        if self.attempts <= self.failures:
            raise StoreUnavailable("database write failed: database or disk is full")
        result = await super().write(job)
        self.saved += 1
        if self.saved == 2:
            self.saved_twice.set()
        return result


async def test_run_saver_saves_every_interval_and_survives_a_failed_save(tmp_path: Path) -> None:
    start, interval = 500.0, 30.0
    clock = FakeClock(start)
    p = Process(clock, Wall(SAVE_WALL), "boot-a")
    ok = sample("gatewayd_resilience_state_saves_total", outcome="ok")
    failed = sample("gatewayd_resilience_state_saves_total", outcome="failed")
    async with FlakyStore(tmp_path / "g.db", failures=1) as store:
        with structlog.testing.capture_logs() as logs:
            saver = asyncio.create_task(p.state.run_saver(store, interval_s=interval))
            async with asyncio.timeout(10):  # a guard against a hang, not a pause: the fake clock does not wait
                await store.saved_twice.wait()
            saver.cancel()
            with pytest.raises(asyncio.CancelledError):
                await saver
        monos = await store.read(
            lambda c: [json.loads(r[0])["mono"] for r in c.execute("SELECT state FROM resilience_state")]
        )

    assert store.attempts == 3
    assert all(s == interval for s in clock.sleeps) and len(clock.sleeps) >= 3
    assert monos == [start + 3 * interval] * len(p.tools())  # the rows are from the latest save
    assert sample("gatewayd_resilience_state_saves_total", outcome="failed") - failed == 1
    assert sample("gatewayd_resilience_state_saves_total", outcome="ok") - ok == 2
    assert [e["event"] for e in logs if e["event"].startswith("resilience_state_save")] == [
        "resilience_state_save_failed"
    ]


async def test_run_saver_needs_a_positive_interval(tmp_path: Path) -> None:
    p = Process(FakeClock(), Wall(SAVE_WALL), "boot-a")
    async with Store(tmp_path / "g.db") as store:
        with pytest.raises(ValueError):
            await p.state.run_saver(store, interval_s=0)
