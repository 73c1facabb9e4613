"""The first requests after a fault, on real time against fake providers that are real HTTP servers on loopback:
what a failing primary adds over the healthy secondary's own latency, request by request, with the shipped retry
policy (pauses of up to 0.2 s, then 0.4 s: any pause would show).

Timing on a shared machine is noisy, so each figure is the median over a few fresh chains (a fresh chain meets the
fault for the first time), and it is compared with the same request number of a fresh chain that has only the
secondary, measured in the same test: that difference is what the fault costs. It must be within 5 ms, plus a
margin for a loaded 2-core machine's scheduling noise; what the margin could hide, a retry pause, is checked
structurally: the chains run on a clock that records every pause they sleep, and there must be none. Each test
also checks who answered and how many calls each provider got, which timing alone would not show.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

import pytest

from gatewayd.interpret.chain import Outcome
from gatewayd.interpret.simulator import FakeProvider, Fault
from gatewayd.resilience import REAL_CLOCK, CircuitState, FakeClock
from tests.conftest import free_port
from tests.interpret_kit import KEY, START_PUMP, Rig, provider, settings, tried

LATENCY_S = 0.05  # the secondary's own latency, as in the measurements
REPS = 5  # fresh chains per figure; the median of their requests is compared
OVERHEAD_S = 0.005  # what a failing primary may add to the first requests
NOISE_S = 0.010  # and the margin for a loaded machine, more if the secondary alone varied more (a pause slept
# is caught by SleepLog, not by this)
HEDGE_S = 0.2  # the primary's hedge delay while it has no latency record (hedge_max_s)
HEDGE_MIN_S = 0.1  # and while its last call was too slow (hedge_min_s)
TEXT = "start pump1"


def chain_settings(providers: dict[str, dict[str, Any]], **kw: Any) -> Any:
    """The shipped deadline and retry policy (config.toml), no prompt cache (each request asks the providers)."""
    return settings(
        providers,
        deadline_s=5.0,
        local_reserve_s=0.5,
        retry={"max_attempts": 3, "base_s": 0.2, "multiplier": 2.0, "cap_s": 2.0},
        cache_ttl_s=0,
        hedge_min_s=HEDGE_MIN_S,
        hedge_max_s=HEDGE_S,
        **kw,
    )


class SleepLog:
    """Real time, and every pause slept on it (the chain's retry pauses and waits for a cool-down go through its
    clock; hedge timers and HTTP timeouts run on the loop's time and are not pauses)."""

    def __init__(self) -> None:
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return REAL_CLOCK.monotonic()

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        await REAL_CLOCK.sleep(seconds)


def refused_url() -> str:
    return f"http://127.0.0.1:{free_port()}/v1"


async def timed(rig: Rig) -> tuple[float, Outcome]:
    """One request, timed as its caller sees it (its spend rows are committed after, outside the timing)."""
    started = time.perf_counter()
    out = await rig.chain.interpret(TEXT, rig.registry, rig.local)
    elapsed = time.perf_counter() - started
    await rig.chain.settled()
    return elapsed, out


async def requests(
    path: Path, providers: dict[str, dict[str, Any]], n: int = 2, clock: SleepLog | None = None
) -> list[tuple[float, Outcome]]:
    """Requests 1..n of a fresh chain."""
    async with Rig(path, chain_settings(providers), clock=clock or SleepLog()) as rig:
        return [await timed(rig) for _ in range(n)]


async def secondary_alone(tmp_path: Path, b: FakeProvider) -> tuple[list[float], float]:
    """Requests 1 and 2 of fresh chains that have only the secondary: the median latency of each, and the margin
    for noise (NOISE_S, or more if these latencies themselves spread more: the machine is busy)."""
    runs = [await requests(tmp_path / f"alone{i}", {"b": provider(b, timeout_s=2.0)}) for i in range(REPS)]
    for run in runs:
        assert all(tried(out) == [("b", "answered", 1)] for _, out in run)
    samples = [latency for run in runs for latency, _ in run]
    return [statistics.median(run[i][0] for run in runs) for i in range(2)], max(NOISE_S, max(samples) - min(samples))


@pytest.fixture
async def b() -> Any:
    async with FakeProvider("openai", api_key=KEY, default=START_PUMP, latency_s=LATENCY_S) as fake:
        yield fake


@pytest.mark.parametrize("fault", ["refused", "500", "503", "429 Retry-After 1"])
async def test_a_failing_primary_adds_at_most_5_ms_to_the_first_requests(
    tmp_path: Path, b: FakeProvider, fault: str
) -> None:
    alone, noise = await secondary_alone(tmp_path, b)
    async with FakeProvider("openai", api_key=KEY, default=START_PUMP) as a:
        if fault == "refused":
            primary = refused_url()
        else:
            status = int(fault[:3])
            a.always = Fault.http(status, retry_after="1") if status == 429 else Fault.http(status)
            primary = a.base_url
        providers = {"a": provider(primary, priority=1, timeout_s=2.0), "b": provider(b, priority=2)}
        runs = []
        for i in range(REPS):
            before = len(b.completions())
            clock = SleepLog()
            run = await requests(tmp_path / f"fault{i}", providers, clock=clock)
            runs.append(run)
            assert len(b.completions()) - before == 2  # each request asked b exactly once
            assert clock.sleeps == []  # no retry pause, no wait for a's Retry-After: b was asked at once
    for (_, first), (_, second) in runs:
        assert first.provider == "b" and not first.degraded
        assert tried(first) == [("a", "failed", 1), ("b", "answered", 1)]  # one call to a, none repeated
        if fault.startswith("429"):  # a's Retry-After is its cool-down: request 2 does not call it
            assert tried(second) == [("a", "skipped", 0), ("b", "answered", 1)]
            assert second.tried[0]["reason"] == "cooling_down"
        else:
            assert tried(second) == [("a", "failed", 1), ("b", "answered", 1)]
    if fault != "refused":
        calls = 1 if fault.startswith("429") else 2
        assert len(a.completions()) == calls * REPS
    added = [statistics.median(run[i][0] for run in runs) - alone[i] for i in range(2)]
    assert added[0] <= OVERHEAD_S + noise and added[1] <= OVERHEAD_S + noise, (
        f"{fault}: requests 1 and 2 took {[round(x * 1000, 2) for x in added]} ms more than the secondary's own"
        f" {[round(x * 1000, 2) for x in alone]} ms"
    )


async def test_a_hanging_primary_is_hedged_then_its_breaker_opens(tmp_path: Path, b: FakeProvider) -> None:
    alone, noise = await secondary_alone(tmp_path, b)
    async with FakeProvider("openai", api_key=KEY, default=START_PUMP) as a:
        a.always = Fault.hang(30)
        prices = {"price_in_per_mtok": 1.0, "price_out_per_mtok": 4.0}
        providers = {
            "a": provider(a, priority=1, timeout_s=2.0, **prices),
            "b": provider(b, priority=2, timeout_s=2.0, **prices),
        }
        runs = []
        for i in range(3):  # each chain makes four hedged requests: fewer chains keep the test short
            clock = SleepLog()
            async with Rig(tmp_path / f"hang{i}", chain_settings(providers), clock=clock) as rig:
                run = [await timed(rig) for _ in range(4)]
                steady = await timed(rig)
                window = rig.slot("a").breaker._window.totals(0.0)
                state = rig.slot("a").breaker.state
                ledger = await rig.ledger.totals()
            runs.append(run)
            # Four requests, each hedged: a's four calls were cut off after its hedge delay, each a slow failure,
            # and its breaker opened; from then on b answers at once, and a is not asked.
            assert window == (4, 4) and state is CircuitState.OPEN
            assert tried(steady[1]) == [("a", "skipped", 0), ("b", "answered", 1)]
            assert steady[0] < alone[1] + HEDGE_MIN_S  # b at once: not after a hedge delay
            assert clock.sleeps == []
            # The ledger counts both calls of every hedged request: a's cancelled one at an estimate.
            assert ledger["a"]["calls"] == 4 and ledger["b"]["calls"] == 5
    for run in runs:
        for i, (latency, out) in enumerate(run):
            assert out.provider == "b" and not out.degraded
            assert tried(out) == [("a", "cancelled", 1), ("b", "answered", 1)]
            # b was asked when a had been silent for its hedge delay, not before: hedge_max_s while a had no
            # latency record, then hedge_min_s, as a's last call had been outrun
            assert latency >= (HEDGE_S if i == 0 else HEDGE_MIN_S)
            # well inside the 4.5 s the providers have; after request 1, before hedge_max_s + b's latency
            assert latency < (1.0 if i == 0 else HEDGE_S + LATENCY_S)
    for i, delay in enumerate((HEDGE_S, HEDGE_MIN_S)):
        added = statistics.median(run[i][0] for run in runs) - alone[i] - delay
        assert added <= OVERHEAD_S + noise, f"request {i + 1}: {added * 1000:.2f} ms over hedge delay + b's own latency"


async def test_with_every_provider_down_the_local_rules_answer_the_first_request_within_50_ms(tmp_path: Path) -> None:
    providers = {"a": provider(refused_url(), priority=1), "b": provider(refused_url(), priority=2)}
    latencies = []
    for i in range(REPS):
        clock = SleepLog()
        (first_s, first), (second_s, second) = await requests(tmp_path / f"down{i}", providers, clock=clock)
        assert clock.sleeps == []  # the local rules answered right after the last refusal
        assert first.degraded and first.provider == "local" and first.command.action == "start"
        assert tried(first) == [("a", "failed", 1), ("b", "failed", 1)]  # each refused once; no pause, no retry
        assert tried(second) == [("a", "skipped", 0), ("b", "skipped", 0)]  # the cloud is offline
        assert {t["reason"] for t in second.tried} == {"offline"}
        latencies.append((first_s, second_s))
    first_s, second_s = (statistics.median(x[i] for x in latencies) for i in range(2))
    assert first_s <= 0.05 and second_s <= 0.05, (first_s, second_s)


async def test_refused_fail_over_still_opens_half_opens_and_closes_the_breaker(tmp_path: Path) -> None:
    clock = FakeClock()
    async with (
        FakeProvider("openai", api_key=KEY, default=START_PUMP) as a,
        FakeProvider("openai", api_key=KEY, default=START_PUMP) as b,
    ):
        cfg = settings(
            {"a": provider(a, priority=1), "b": provider(b, priority=2)},
            breaker={"window_size": 10, "minimum_calls": 4, "failure_rate": 0.5, "open_s": 30},
            cache_ttl_s=0,
        )
        async with Rig(tmp_path / "db", cfg, clock=clock) as rig:
            breaker = rig.slot("a").breaker
            await a.down()
            for _ in range(4):
                assert tried(await rig.ask(TEXT)) == [("a", "failed", 1), ("b", "answered", 1)]
            assert breaker.state is CircuitState.OPEN and not rig.chain.connectivity.offline  # b answered
            out = await rig.ask(TEXT)
            assert tried(out) == [("a", "skipped", 0), ("b", "answered", 1)]
            assert out.tried[0]["reason"] == "circuit_open"
            await a.up()
            clock.advance(30)
            assert breaker.state is CircuitState.HALF_OPEN
            assert tried(await rig.ask(TEXT)) == [("a", "answered", 1)]  # the probe
            assert breaker.state is CircuitState.CLOSED
    assert clock.sleeps == []  # nobody paused: there was always another provider


@pytest.mark.parametrize("what", ["its breaker", "the connectivity breaker"])
async def test_a_breaker_that_opens_ends_a_pending_pause_at_once(tmp_path: Path, what: str) -> None:
    async with FakeProvider("openai", api_key=KEY, default=START_PUMP) as a:
        a.always = Fault.http(503, retry_after="3")  # the only provider: its Retry-After would be waited for
        async with Rig(tmp_path / "db", chain_settings({"a": provider(a, timeout_s=2.0)})) as rig:
            breaker = rig.slot("a").breaker if what == "its breaker" else rig.chain.connectivity.breaker
            asyncio.get_running_loop().call_later(0.1, breaker.force_open, "test")
            latency, out = await timed(rig)
    assert out.degraded and tried(out) == [("a", "failed", 1)] and len(a.completions()) == 1
    assert 0.1 <= latency < 0.5, latency  # the 3 s pause ended when the breaker opened
