"""The retry policy: its backoff schedule, attempt limit, deadline, server hints, cancellation, metrics and logs.

Time is a :class:`FakeClock` (hours of backoff pass in microseconds) and jitter a seeded ``random.Random``. One
test talks to a real aiohttp server on loopback, so the hints are read from real response headers.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import statistics
import uuid
from collections.abc import Iterator, MutableMapping, Sequence
from email.utils import formatdate
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestServer
from structlog.testing import capture_logs

from gatewayd.errors import DeviceBusy, DeviceTimeout, ValidationFailed
from gatewayd.observability.metrics import REGISTRY
from gatewayd.resilience import (
    CircuitOpenError,
    DeadlineExceeded,
    FakeClock,
    HttpStatusError,
    RateLimited,
    RetryExhausted,
    RetryPolicy,
)

WALL = 1_700_000_000.0
Logs = list[MutableMapping[str, Any]]


@pytest.fixture
def name() -> str:
    """A policy name of this test's own: the retry counters are process-global."""
    return f"test-retry-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def logs() -> Iterator[Logs]:
    """Every log event, whatever level an earlier test configured."""
    wrapper = structlog.get_config()["wrapper_class"]
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    try:
        with capture_logs() as entries:
            yield entries
    finally:
        structlog.configure(wrapper_class=wrapper)


def metric(kind: str, policy: str, **labels: str) -> float:
    value = REGISTRY.get_sample_value(f"gatewayd_retry_{kind}_total", {"policy": policy, **labels})
    return 0.0 if value is None else value


def events(entries: Logs, event: str) -> Logs:
    return [entry for entry in entries if entry["event"] == event]


class Upstream:
    """An async call that fails with ``errors`` in turn and then answers ``result``. Each call takes
    ``duration_s`` on the clock (its I/O) and records the time it started."""

    def __init__(
        self, clock: FakeClock, errors: Sequence[BaseException] = (), result: str = "ok", duration_s: float = 0.0
    ):
        self.clock = clock
        self.errors = list(errors)
        self.result = result
        self.duration_s = duration_s
        self.starts: list[float] = []

    @property
    def calls(self) -> int:
        return len(self.starts)

    async def __call__(self) -> str:
        self.starts.append(self.clock.monotonic())
        await asyncio.sleep(0)  # a suspension point, as real I/O has
        self.clock.advance(self.duration_s)
        if self.errors:
            raise self.errors.pop(0)
        return self.result


def timeouts(n: int) -> list[BaseException]:
    return [DeviceTimeout(f"no answer #{i}") for i in range(n)]


# --- backoff schedule ------------------------------------------------------------------------------------------


def test_full_jitter_spreads_pauses_over_zero_to_the_ceiling() -> None:
    base, multiplier, cap = 0.1, 2.0, 1.0
    policy = RetryPolicy(base_s=base, multiplier=multiplier, cap_s=cap, rng=random.Random(7))
    assert policy.jitter == "full"
    for n in range(8):
        ceiling = min(cap, base * multiplier**n)
        draws = [policy.backoff(n) for _ in range(2000)]
        assert all(0.0 <= d <= ceiling for d in draws)
        assert max(draws) > 0.97 * ceiling
        assert min(draws) < 0.03 * ceiling
        assert statistics.fmean(draws) == pytest.approx(ceiling / 2, rel=0.06)


def test_proportional_jitter_stays_within_a_quarter_of_the_ceiling_and_under_the_cap() -> None:
    base, multiplier, cap = 0.1, 2.0, 1.0
    policy = RetryPolicy(base_s=base, multiplier=multiplier, cap_s=cap, jitter="proportional", rng=random.Random(3))
    for n in range(8):
        ceiling = min(cap, base * multiplier**n)
        draws = [policy.backoff(n) for _ in range(2000)]
        assert all(0.75 * ceiling <= d <= min(cap, 1.25 * ceiling) for d in draws)
        if 1.25 * ceiling <= cap:
            assert max(draws) > 1.2 * ceiling and min(draws) < 0.8 * ceiling
    assert max(policy.backoff(50) for _ in range(200)) <= cap


def test_no_jitter_is_exactly_the_ceiling() -> None:
    base, multiplier, cap = 0.25, 3.0, 20.0
    policy = RetryPolicy(base_s=base, multiplier=multiplier, cap_s=cap, jitter="none")
    assert [policy.backoff(n) for n in range(6)] == [min(cap, base * multiplier**n) for n in range(6)]


@pytest.mark.parametrize("jitter", ["full", "proportional", "none"])
@pytest.mark.parametrize("multiplier", [2, 2.0, 10.0])
def test_the_cap_holds_for_huge_retry_numbers(jitter: Any, multiplier: float) -> None:
    policy = RetryPolicy(base_s=0.5, multiplier=multiplier, cap_s=7.0, jitter=jitter, rng=random.Random(1))
    assert policy.ceiling(10_000) == 7.0
    assert all(0.0 <= policy.backoff(n) <= 7.0 for n in (1023, 1024, 5000, 10_000))


def test_no_base_means_no_pause_however_many_retries() -> None:
    policy = RetryPolicy(base_s=0.0, cap_s=7.0, jitter="none")
    assert policy.backoff(3) == 0.0
    assert policy.backoff(10_000) == 0.0


async def test_the_pauses_taken_follow_the_schedule(name: str) -> None:
    clock = FakeClock()
    base, multiplier, cap = 0.2, 2.0, 1.0
    policy = RetryPolicy(
        max_attempts=7, base_s=base, multiplier=multiplier, cap_s=cap, clock=clock, rng=random.Random(11), name=name
    )
    with pytest.raises(RetryExhausted):
        await policy.call(Upstream(clock, timeouts(7)))
    assert len(clock.sleeps) == 6
    for n, pause in enumerate(clock.sleeps):
        assert 0.0 <= pause <= min(cap, base * multiplier**n)
    assert len(set(clock.sleeps)) == 6  # drawn, not fixed


async def test_the_same_seed_gives_the_same_schedule(name: str) -> None:
    async def schedule(seed: int) -> list[float]:
        clock = FakeClock()
        policy = RetryPolicy(max_attempts=5, clock=clock, rng=random.Random(seed), name=name)
        with pytest.raises(RetryExhausted):
            await policy.call(Upstream(clock, timeouts(5)))
        return clock.sleeps

    assert await schedule(5) == await schedule(5)
    assert await schedule(5) != await schedule(6)


# --- attempts ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_attempts", [1, 2, 5])
async def test_the_call_is_made_exactly_max_attempts_times(name: str, max_attempts: int) -> None:
    clock = FakeClock()
    errors = timeouts(max_attempts + 3)
    upstream = Upstream(clock, errors)
    policy = RetryPolicy(max_attempts=max_attempts, clock=clock, rng=random.Random(1), name=name)
    with pytest.raises(RetryExhausted) as info:
        await policy.call(upstream)
    assert upstream.calls == max_attempts
    assert len(clock.sleeps) == max_attempts - 1
    assert info.value.reason == "attempts"
    assert info.value.attempts == max_attempts
    assert info.value.__cause__ is info.value.last_error
    assert str(info.value.__cause__) == f"no answer #{max_attempts - 1}"


async def test_a_call_that_recovers_returns_its_answer(name: str) -> None:
    clock = FakeClock()
    upstream = Upstream(clock, timeouts(2), result="pump1: 42 rpm")
    policy = RetryPolicy(max_attempts=3, clock=clock, rng=random.Random(1), name=name)
    assert await policy.call(upstream) == "pump1: 42 rpm"
    assert upstream.calls == 3


@pytest.mark.parametrize(
    ("last", "status"),
    [
        (DeviceTimeout("no answer"), 504),
        (DeviceBusy("device busy"), 503),
        (HttpStatusError(504), 504),
        (HttpStatusError(408), 504),
        (HttpStatusError(503), 503),
        (HttpStatusError(429), 503),
    ],
)
async def test_giving_up_keeps_the_last_errors_status(name: str, last: BaseException, status: int) -> None:
    clock = FakeClock()
    policy = RetryPolicy(max_attempts=2, clock=clock, rng=random.Random(1), name=name)
    with pytest.raises(RetryExhausted) as info:
        await policy.call(Upstream(clock, [DeviceBusy("device busy"), last]))
    assert info.value.status == status
    assert info.value.to_dict()["details"]["last_error"] == getattr(last, "code", None)


# --- deadline ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("duration_s", [0.0, 0.7])
async def test_no_attempt_starts_after_deadline_s(name: str, seed: int, duration_s: float) -> None:
    clock = FakeClock(start=100.0)
    end = 100.0 + 10.0
    upstream = Upstream(clock, timeouts(100), duration_s=duration_s)
    policy = RetryPolicy(
        max_attempts=100, base_s=1.0, cap_s=8.0, deadline_s=10.0, clock=clock, rng=random.Random(seed), name=name
    )
    with pytest.raises(RetryExhausted) as info:
        await policy.call(upstream)
    assert info.value.reason == "deadline"
    assert upstream.calls > 1
    assert all(start < end for start in upstream.starts)
    assert len(clock.sleeps) == upstream.calls - 1  # gave up instead of sleeping once more
    assert metric("gave_up", name, reason="deadline") == 1


async def test_an_absolute_deadline_bounds_the_schedule(name: str) -> None:
    clock = FakeClock(start=50.0)
    end = 53.0
    upstream = Upstream(clock, timeouts(20))
    policy = RetryPolicy(max_attempts=20, base_s=0.5, jitter="none", deadline_s=600.0, clock=clock, name=name)
    with pytest.raises(RetryExhausted) as info:
        await policy.call(upstream, deadline=end)
    assert info.value.reason == "deadline"
    # 0.5 + 1.0 brings the third attempt to 51.5; the next 2.0 would end at 53.5, past the deadline.
    assert upstream.starts == [50.0, 50.5, 51.5]
    assert clock.now < end


async def test_deadline_s_bounds_the_schedule_when_it_is_the_earlier(name: str) -> None:
    clock = FakeClock(start=50.0)
    upstream = Upstream(clock, timeouts(20))
    policy = RetryPolicy(max_attempts=20, base_s=0.5, jitter="none", deadline_s=1.0, clock=clock, name=name)
    with pytest.raises(RetryExhausted) as info:
        await policy.call(upstream, deadline=1000.0)
    assert info.value.reason == "deadline"
    assert upstream.starts == [50.0, 50.5]


@pytest.mark.parametrize("late_by", [0.0, 1.0])
async def test_a_deadline_already_passed_makes_no_attempt(name: str, late_by: float) -> None:
    clock = FakeClock(start=20.0)
    upstream = Upstream(clock)
    policy = RetryPolicy(clock=clock, name=name)
    with pytest.raises(DeadlineExceeded) as info:
        await policy.call(upstream, deadline=20.0 - late_by)
    assert upstream.calls == 0
    assert info.value.status == 504
    assert metric("attempts", name, outcome="success") == 0


# --- cancellation --------------------------------------------------------------------------------------------


async def test_cancelling_during_the_pause_stops_at_once(name: str) -> None:
    clock = FakeClock()
    upstream = Upstream(clock, timeouts(5))
    policy = RetryPolicy(max_attempts=5, clock=clock, rng=random.Random(1), name=name)
    task = asyncio.create_task(policy.call(upstream))
    for _ in range(100):
        if clock.sleeps:
            break
        await asyncio.sleep(0)
    assert clock.sleeps and upstream.calls == 1  # now suspended in the pause after the first failure
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(10):
        await asyncio.sleep(0)
    assert upstream.calls == 1
    assert len(clock.sleeps) == 1


async def test_cancelling_a_running_attempt_stops_at_once(name: str) -> None:
    clock = FakeClock()
    started = asyncio.Event()
    calls = 0

    async def hangs() -> str:
        nonlocal calls
        calls += 1
        started.set()
        await asyncio.Event().wait()
        return "never"

    policy = RetryPolicy(max_attempts=5, clock=clock, name=name)
    task = asyncio.create_task(policy.call(hangs))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(10):
        await asyncio.sleep(0)
    assert calls == 1
    assert clock.sleeps == []
    assert metric("attempts", name, outcome="transient") == 0
    assert metric("attempts", name, outcome="permanent") == 0


# --- server hints --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "hint"),
    [
        ({"Retry-After": "1.5"}, 1.5),
        ({"Retry-After": formatdate(WALL + 20, usegmt=True)}, 20.0),
        ({"retry-after-ms": "250"}, 0.25),
        ({"Retry-After": "7", "Retry-After-Ms": "250"}, 0.25),
    ],
    ids=["seconds", "http-date", "milliseconds", "milliseconds-win"],
)
async def test_a_server_hint_replaces_the_backoff(name: str, logs: Logs, headers: dict[str, str], hint: float) -> None:
    clock = FakeClock()
    upstream = Upstream(clock, [HttpStatusError(503, headers)])
    policy = RetryPolicy(base_s=5.0, jitter="none", clock=clock, wall=lambda: WALL, name=name)
    assert await policy.call(upstream) == "ok"
    assert clock.sleeps == [pytest.approx(hint)]
    assert metric("hints", name, outcome="used") == 1
    [used] = events(logs, "retry_hint_used")
    assert used["hint_s"] == pytest.approx(hint)
    assert used["policy"] == name


@pytest.mark.parametrize(
    "headers",
    [
        {"Retry-After": "soon"},
        {"Retry-After": "-3"},
        {"Retry-After": "NaN"},
        {"retry-after-ms": "-1"},
        {"Retry-After": formatdate(WALL - 60, usegmt=True)},
    ],
    ids=["garbage", "negative", "nan", "negative-ms", "past-date"],
)
async def test_an_unusable_hint_falls_back_to_the_backoff(name: str, headers: dict[str, str]) -> None:
    clock = FakeClock()
    policy = RetryPolicy(base_s=0.4, jitter="none", clock=clock, wall=lambda: WALL, name=name)
    assert await policy.call(Upstream(clock, [HttpStatusError(503, headers)])) == "ok"
    assert clock.sleeps == [policy.backoff(0)]
    assert metric("hints", name, outcome="used") == 0


async def test_a_hint_longer_than_max_hint_gives_up_without_sleeping(name: str, logs: Logs) -> None:
    clock = FakeClock()
    upstream = Upstream(clock, [HttpStatusError(503, {"Retry-After": "600"})])
    policy = RetryPolicy(max_hint_s=60.0, clock=clock, name=name)
    with pytest.raises(RetryExhausted) as info:
        await policy.call(upstream)
    assert info.value.reason == "hint_too_long"
    assert info.value.retry_after_s == 600.0
    assert upstream.calls == 1
    assert clock.sleeps == []
    assert metric("hints", name, outcome="refused") == 1
    assert metric("gave_up", name, reason="hint_too_long") == 1
    [gave_up] = events(logs, "retry_gave_up")
    assert (gave_up["reason"], gave_up["hint_s"], gave_up["attempts"]) == ("hint_too_long", 600.0, 1)


async def test_a_hint_ending_past_the_deadline_gives_up_without_sleeping(name: str) -> None:
    clock = FakeClock()
    upstream = Upstream(clock, [HttpStatusError(429, {"retry-after-ms": "12000"})])
    policy = RetryPolicy(deadline_s=10.0, clock=clock, name=name)
    with pytest.raises(RetryExhausted) as info:
        await policy.call(upstream)
    assert info.value.reason == "hint_past_deadline"
    assert info.value.retry_after_s == 12.0
    assert upstream.calls == 1
    assert clock.sleeps == []
    assert metric("hints", name, outcome="refused") == 1
    assert metric("gave_up", name, reason="hint_past_deadline") == 1


@pytest.mark.parametrize(
    "refusal",
    [
        RateLimited("provider:openai", 2.5, limit=60, remaining=0, reset_s=2.5),
        CircuitOpenError("device:pump1", retry_at=2.5, retry_after_s=2.5, state="open"),
    ],
    ids=["rate-limited", "circuit-open"],
)
async def test_our_own_refusals_act_as_hints(name: str, refusal: BaseException) -> None:
    clock = FakeClock()
    policy = RetryPolicy(base_s=10.0, jitter="none", clock=clock, name=name)
    assert await policy.call(Upstream(clock, [refusal])) == "ok"
    assert clock.sleeps == [2.5]


async def test_a_limiter_that_can_never_admit_the_call_gives_up_at_once(name: str) -> None:
    clock = FakeClock()
    never = RateLimited("bus:rs485", math.inf, limit=1, remaining=0, reset_s=math.inf)
    upstream = Upstream(clock, [never])
    policy = RetryPolicy(clock=clock, name=name)  # no hint cap, no deadline
    with pytest.raises(RetryExhausted) as info:
        await policy.call(upstream)
    assert info.value.reason == "hint_too_long"
    assert upstream.calls == 1
    assert clock.sleeps == []


# --- a real HTTP server --------------------------------------------------------------------------------------


class Flaky503:
    """An upstream that answers 503 with a ``retry-after-ms`` hint ``failures`` times, then 200; 400 on /bad."""

    def __init__(self, hints_ms: Sequence[int]):
        self.hints_ms = list(hints_ms)
        self.requests = {"/flaky": 0, "/bad": 0}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/flaky", self.flaky)
        app.router.add_get("/bad", self.bad)
        return app

    async def flaky(self, request: web.Request) -> web.Response:
        self.requests["/flaky"] += 1
        if self.requests["/flaky"] <= len(self.hints_ms):
            hint = self.hints_ms[self.requests["/flaky"] - 1]
            return web.Response(status=503, text="busy", headers={"Retry-After-Ms": str(hint)})
        return web.Response(text="pump1: 42 rpm")

    async def bad(self, request: web.Request) -> web.Response:
        self.requests["/bad"] += 1
        return web.Response(status=400, text="no such register", headers={"Retry-After": "1"})


async def get_raising_for_status(session: aiohttp.ClientSession, url: Any) -> str:
    async with session.get(url) as resp:
        resp.raise_for_status()
        return await resp.text()


async def get_raising_http_status_error(session: aiohttp.ClientSession, url: Any) -> str:
    async with session.get(url) as resp:
        if resp.status >= 400:
            raise HttpStatusError(resp.status, resp.headers)
        return await resp.text()


@pytest.mark.parametrize("get", [get_raising_for_status, get_raising_http_status_error])
async def test_retries_a_real_server_with_its_own_hints(name: str, get: Any) -> None:
    upstream = Flaky503(hints_ms=[250, 120])
    clock = FakeClock()
    policy = RetryPolicy(base_s=5.0, jitter="none", max_hint_s=1.0, clock=clock, name=name)
    async with TestServer(upstream.app(), host="127.0.0.1", port=0) as server, aiohttp.ClientSession() as session:
        body = await policy.call(lambda: get(session, server.make_url("/flaky")))
        assert body == "pump1: 42 rpm"
        assert upstream.requests["/flaky"] == 3
        assert clock.sleeps == [0.25, 0.12]
        assert metric("hints", name, outcome="used") == 2

        with pytest.raises((aiohttp.ClientResponseError, HttpStatusError)) as info:
            await policy.call(lambda: get(session, server.make_url("/bad")))
        refused = info.value
        if isinstance(refused, HttpStatusError):
            assert refused.http_status == 400
        else:
            assert isinstance(refused, aiohttp.ClientResponseError) and refused.status == 400
        assert upstream.requests["/bad"] == 1
        assert clock.sleeps == [0.25, 0.12]


async def test_a_tls_failure_against_a_real_server_is_not_retried(name: str) -> None:
    upstream = Flaky503(hints_ms=[])
    clock = FakeClock()
    policy = RetryPolicy(clock=clock, name=name)
    async with TestServer(upstream.app(), host="127.0.0.1", port=0) as server, aiohttp.ClientSession() as session:
        url = server.make_url("/flaky").with_scheme("https")  # a TLS handshake with a plain HTTP server
        with pytest.raises(aiohttp.ClientSSLError):
            await policy.call(lambda: get_raising_for_status(session, url))
    assert clock.sleeps == []
    assert metric("attempts", name, outcome="permanent") == 1


# --- metrics and logs ----------------------------------------------------------------------------------------


async def test_every_attempt_is_counted_and_logged(name: str, logs: Logs) -> None:
    clock = FakeClock()
    upstream = Upstream(clock, [DeviceBusy("device busy"), DeviceTimeout("no answer")])
    policy = RetryPolicy(max_attempts=5, clock=clock, rng=random.Random(2), name=name)
    assert await policy.call(upstream) == "ok"
    assert metric("attempts", name, outcome="transient") == 2
    assert metric("attempts", name, outcome="success") == 1
    assert metric("attempts", name, outcome="permanent") == 0
    failed = events(logs, "retry_attempt_failed")
    assert [(e["attempt"], e["error"], e["retryable"]) for e in failed] == [
        (1, "device_busy", True),
        (2, "device_timeout", True),
    ]
    assert [e["delay_s"] for e in failed] == [pytest.approx(s) for s in clock.sleeps]
    [succeeded] = events(logs, "retry_succeeded")
    assert succeeded["attempts"] == 3
    assert events(logs, "retry_gave_up") == []


async def test_a_permanent_failure_is_counted_and_logged(name: str, logs: Logs) -> None:
    clock = FakeClock()
    policy = RetryPolicy(clock=clock, name=name)
    with pytest.raises(ValidationFailed):
        await policy.call(Upstream(clock, [ValidationFailed("speed must be 0..100")]))
    assert metric("attempts", name, outcome="permanent") == 1
    [failed] = events(logs, "retry_attempt_failed")
    assert (failed["retryable"], failed["error"]) == (False, "validation_failed")
    assert events(logs, "retry_gave_up") == []


async def test_giving_up_is_counted_and_logged_once(name: str, logs: Logs) -> None:
    clock = FakeClock()
    policy = RetryPolicy(max_attempts=3, clock=clock, rng=random.Random(4), name=name)
    with pytest.raises(RetryExhausted):
        await policy.call(Upstream(clock, timeouts(3)))
    assert metric("attempts", name, outcome="transient") == 3
    assert metric("gave_up", name, reason="attempts") == 1
    [gave_up] = events(logs, "retry_gave_up")
    assert (gave_up["reason"], gave_up["attempts"], gave_up["error"]) == ("attempts", 3, "device_timeout")
    assert gave_up["log_level"] == "warning"
    assert len(events(logs, "retry_attempt_failed")) == 2


# --- sharing, configuration, the clock -------------------------------------------------------------------------


async def test_one_policy_serves_concurrent_calls_separately(name: str) -> None:
    clock = FakeClock()
    policy = RetryPolicy(max_attempts=4, clock=clock, rng=random.Random(9), name=name)
    upstreams = [Upstream(clock, timeouts(failures), result=f"answer {failures}") for failures in range(6)]
    results = await asyncio.gather(*(policy.call(u) for u in upstreams), return_exceptions=True)
    assert results[:4] == ["answer 0", "answer 1", "answer 2", "answer 3"]
    assert [u.calls for u in upstreams] == [1, 2, 3, 4, 4, 4]
    for exhausted in results[4:]:
        assert isinstance(exhausted, RetryExhausted)
        assert exhausted.attempts == 4
    assert metric("attempts", name, outcome="success") == 4
    assert metric("gave_up", name, reason="attempts") == 2


@pytest.mark.parametrize(
    "config",
    [
        {"max_attempts": 0},
        {"base_s": -0.1},
        {"base_s": math.nan},
        {"cap_s": -1.0},
        {"multiplier": 0.5},
        {"multiplier": math.nan},
        {"jitter": "gaussian"},
        {"deadline_s": 0.0},
        {"deadline_s": math.nan},
        {"max_hint_s": -1.0},
    ],
    ids=str,
)
def test_invalid_configuration_is_refused(config: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**config)


async def test_fake_clock_sleeps_overlap_and_never_run_backwards() -> None:
    clock = FakeClock(start=10.0)
    await asyncio.gather(clock.sleep(1.0), clock.sleep(5.0), clock.sleep(-2.0))
    assert clock.now == 15.0
    assert clock.sleeps == [1.0, 5.0, 0.0]
    with pytest.raises(ValueError):
        clock.advance(-1.0)
    clock.advance(2.5)
    assert clock.monotonic() == 17.5


async def test_a_quiet_policy_logs_retried_failures_at_debug_and_still_counts_them(name: str, logs: Logs) -> None:
    clock = FakeClock()
    upstream = Upstream(clock, [TimeoutError(), TimeoutError()])
    policy = RetryPolicy(max_attempts=3, name=name, clock=clock, rng=random.Random(1), quiet=True)
    assert await policy.call(upstream) == "ok"
    failed = events(logs, "retry_attempt_failed")
    assert [entry["log_level"] for entry in failed] == ["debug", "debug"]
    assert metric("attempts", name, outcome="transient") == 2


# --- a schedule of one's own, and pauses a breaker ends -----------------------------------------------------------


async def test_a_schedule_decides_as_call_does_one_failure_at_a_time(name: str) -> None:
    clock = FakeClock()
    policy = RetryPolicy(max_attempts=3, base_s=1.0, jitter="none", max_hint_s=5.0, name=name, clock=clock)
    schedule = policy.schedule(deadline=10.0)
    first = schedule.failed(DeviceTimeout("no answer"))
    assert (first.verdict.transient, first.delay_s, first.give_up) == (True, 1.0, None)
    hinted = schedule.failed(HttpStatusError(429, {"Retry-After": "2"}))
    assert (hinted.delay_s, hinted.give_up, hinted.verdict.hint_s) == (2.0, None, 2.0)
    last = schedule.failed(DeviceTimeout("no answer"))
    assert last.give_up == "attempts" and schedule.attempts == 3
    exhausted = schedule.exhausted(DeviceTimeout("no answer"), last)
    assert isinstance(exhausted, RetryExhausted) and exhausted.attempts == 3 and exhausted.reason == "attempts"
    assert policy.schedule().failed(ValidationFailed("bad")).give_up == "permanent"
    assert metric("attempts", name, outcome="transient") == 3 and metric("attempts", name, outcome="permanent") == 1
    assert clock.sleeps == []  # a schedule never sleeps by itself: its caller decides what to do meanwhile


async def test_a_wake_event_ends_a_pause_at_once_and_the_next_attempt_runs(name: str) -> None:
    wake = asyncio.Event()
    policy = RetryPolicy(max_attempts=3, base_s=30.0, jitter="none", name=name)  # the real clock: 30 s pauses
    calls: list[float] = []
    loop = asyncio.get_running_loop()

    async def attempt() -> str:
        calls.append(loop.time())
        if len(calls) == 1:
            loop.call_later(0.05, wake.set)  # a breaker opens 50 ms into the pause
            raise DeviceTimeout("no answer")
        return "ok"

    assert await asyncio.wait_for(policy.call(attempt, wake=wake), 5) == "ok"
    assert len(calls) == 2 and 0.04 <= calls[1] - calls[0] < 1.0
    schedule = policy.schedule()
    assert await schedule.pause(30.0, wake) is False  # already set: no pause at all
    assert await schedule.pause(0.0, asyncio.Event()) is True
