"""Benchmark of the resilience kit's cost on the call path: overhead per call over a bare ``await fn()``.

Each tool guards a trivial coroutine, on the happy path a busy daemon is on nearly all the time: the retry policy's
first attempt succeeds, limiters allow, the breaker is closed, the bulkhead has a free slot. For comparison,
tenacity's ``AsyncRetrying`` (stop_after_attempt(4), wait_random_exponential) runs the same coroutine, once with a
fresh object per call (what concurrent callers on one loop need: it keeps per-call state on the object) and once
with one object reused. Each run times ``--calls`` calls of every case with ``time.perf_counter_ns`` (the garbage
collector off while timing, as ``timeit`` does); the table gives the median over ``--runs`` runs.

    .venv/bin/python bench/resilience.py [--calls 20000] [--runs 5]

Exit status: 0 measured; 1 a tool did not behave as the happy path assumes; 2 bad usage.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import report  # bench/report.py: the script's own directory is on sys.path
from report import BenchError
from tenacity import AsyncRetrying, stop_after_attempt, wait_random_exponential

from gatewayd.resilience import (
    AdaptiveRate,
    BucketSpec,
    Bulkhead,
    CircuitBreaker,
    CircuitState,
    KeyedLimiter,
    RetryPolicy,
    SlidingWindowLimiter,
    TokenBucket,
)

KEYS = 10_000
PLENTY = 1e12  # a capacity and rate no benchmark run can exhaust: every decision is "allowed"
WARMUP_FRACTION = 10  # a warm-up pass of calls // 10 before each timed loop


async def trivial() -> int:
    return 1


def tenacity_fresh() -> AsyncRetrying:
    return AsyncRetrying(stop=stop_after_attempt(4), wait=wait_random_exponential(multiplier=0.5, max=30), reraise=True)


# One timed loop per case, written out: a shared wrapper around a per-call lambda would add its own cost to each.
# Each returns the elapsed nanoseconds for n calls.


async def bare(n: int) -> int:
    fn = trivial
    t0 = time.perf_counter_ns()
    for _ in range(n):
        await fn()
    return time.perf_counter_ns() - t0


async def retry_policy(n: int) -> int:
    fn, policy = trivial, RetryPolicy(name="bench")
    if await policy.call(fn) != 1:
        raise BenchError("RetryPolicy.call did not return the coroutine's result")
    t0 = time.perf_counter_ns()
    for _ in range(n):
        await policy.call(fn)
    return time.perf_counter_ns() - t0


async def token_bucket(n: int) -> int:
    fn, bucket = trivial, TokenBucket(PLENTY, PLENTY, name="bench")
    t0 = time.perf_counter_ns()
    for _ in range(n):
        bucket.try_acquire()
        await fn()
    elapsed = time.perf_counter_ns() - t0
    if not bucket.try_acquire().allowed:
        raise BenchError("the token bucket refused")
    return elapsed


async def keyed_limiter(n: int) -> int:
    fn = trivial
    limiter = KeyedLimiter(BucketSpec(PLENTY, PLENTY), name="bench", max_keys=KEYS)
    keys = [f"user-{i}" for i in range(KEYS)]
    for key in keys:  # every key known: the timed loop measures lookups, not the first call of each key
        limiter.try_acquire(key)
    order = (keys * (n // KEYS + 1))[:n]
    t0 = time.perf_counter_ns()
    for key in order:
        limiter.try_acquire(key)
        await fn()
    elapsed = time.perf_counter_ns() - t0
    if len(limiter) != KEYS or not limiter.try_acquire(keys[0]).allowed:
        raise BenchError("the keyed limiter lost keys or refused")
    return elapsed


async def sliding_window(n: int) -> int:
    fn, window = trivial, SlidingWindowLimiter(n + 1, 3600.0, name="bench")
    t0 = time.perf_counter_ns()
    for _ in range(n):
        window.try_acquire()
        await fn()
    elapsed = time.perf_counter_ns() - t0
    if not window.try_acquire().allowed:
        raise BenchError("the sliding window refused")
    return elapsed


async def adaptive_rate(n: int) -> int:
    # Started at its ceiling, so every window of successes asks for a raise that is clamped: no log line per window.
    fn = trivial
    adaptive = AdaptiveRate(TokenBucket(100.0, 50.0, name="bench"), min_rate=1.0, max_rate=50.0)
    t0 = time.perf_counter_ns()
    for _ in range(n):
        await fn()
        adaptive.record(True)
    elapsed = time.perf_counter_ns() - t0
    if adaptive.rate != 50.0:
        raise BenchError(f"the adaptive rate moved to {adaptive.rate}")
    return elapsed


async def circuit_breaker(n: int) -> int:
    fn, breaker = trivial, CircuitBreaker("bench")
    t0 = time.perf_counter_ns()
    for _ in range(n):
        await breaker.call(fn)
    elapsed = time.perf_counter_ns() - t0
    if breaker.state is not CircuitState.CLOSED:
        raise BenchError(f"the breaker is {breaker.state}")
    return elapsed


async def bulkhead(n: int) -> int:
    fn, bh = trivial, Bulkhead("bench", max_concurrent=8, max_queue=8)
    t0 = time.perf_counter_ns()
    for _ in range(n):
        await bh.call(fn)
    elapsed = time.perf_counter_ns() - t0
    if bh.active != 0:
        raise BenchError(f"the bulkhead leaked {bh.active} slot(s)")
    return elapsed


async def tenacity_per_call(n: int) -> int:
    fn = trivial
    t0 = time.perf_counter_ns()
    for _ in range(n):
        await tenacity_fresh()(fn)
    return time.perf_counter_ns() - t0


async def tenacity_reused(n: int) -> int:
    fn, retrying = trivial, tenacity_fresh()
    t0 = time.perf_counter_ns()
    for _ in range(n):
        await retrying(fn)
    return time.perf_counter_ns() - t0


CASES: list[tuple[str, Callable[[int], Awaitable[int]]]] = [
    ("bare await fn()", bare),
    ("RetryPolicy.call (succeeds first time)", retry_policy),
    ("TokenBucket.try_acquire", token_bucket),
    (f"KeyedLimiter.try_acquire ({KEYS:,} keys)", keyed_limiter),
    ("SlidingWindowLimiter.try_acquire", sliding_window),
    ("AdaptiveRate.record", adaptive_rate),
    ("CircuitBreaker.call (closed)", circuit_breaker),
    ("Bulkhead.call (free slot)", bulkhead),
    ("tenacity AsyncRetrying, fresh per call", tenacity_per_call),
    ("tenacity AsyncRetrying, reused", tenacity_reused),
]


async def timed(case: Callable[[int], Awaitable[int]], n: int) -> float:
    """Nanoseconds per call of one timed loop, after a warm-up loop."""
    await case(max(1, n // WARMUP_FRACTION))
    gc.collect()
    gc.disable()
    try:
        return await case(n) / n
    finally:
        gc.enable()


async def bench(args: argparse.Namespace) -> dict[str, list[float]]:
    per_call: dict[str, list[float]] = {label: [] for label, _ in CASES}
    for run in range(1, args.runs + 1):
        print(f"run {run}/{args.runs} ...", file=sys.stderr, flush=True)
        for label, case in CASES:
            per_call[label].append(await timed(case, args.calls))
    return per_call


def render(per_call: dict[str, list[float]], args: argparse.Namespace, wall_s: float) -> str:
    machine = report.machine_info()
    medians_us = {label: statistics.median(values) / 1000 for label, values in per_call.items()}
    base = medians_us[CASES[0][0]]
    label_w = max(len(label) for label, _ in CASES)
    load = f"{args.calls} calls per case per run, {args.runs} run(s); median of the runs; gc off while timing; "
    load += f"{wall_s:.1f} s in all"
    lines = report.header("gatewayd resilience-kit overhead benchmark", machine, load)
    lines.append(f"{'tool':<{label_w}}  {'us/call':>9}  {'overhead us':>11}  {'runs min..max us/call':>22}")
    lines.append("-" * (label_w + 50))
    for label, _ in CASES:
        spread = f"{min(per_call[label]) / 1000:.3f}..{max(per_call[label]) / 1000:.3f}"
        overhead = "-" if label == CASES[0][0] else f"{medians_us[label] - base:.3f}"
        lines.append(f"{label:<{label_w}}  {medians_us[label]:>9.3f}  {overhead:>11}  {spread:>22}")
    lines += [
        "",
        "overhead = median us/call of the case - median us/call of the bare await; sync tools (limiters, the",
        "adaptive rate) are timed as tool call + await fn(), the way they guard a call.",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=20_000, help="calls per case per run (default 20000)")
    parser.add_argument("--runs", type=int, default=5, help="runs; the table shows their median (default 5)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures as JSON to PATH")
    args = parser.parse_args(argv)
    for name, hi in (("calls", 1_000_000), ("runs", 50)):
        if not 1 <= getattr(args, name) <= hi:
            parser.error(f"--{name} must be from 1 to {hi}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    per_call = report.run("resilience", bench(args), stopped="nothing was left running")
    print(render(per_call, args, time.monotonic() - started))
    # JSON: microseconds per call, per case; the runs as one dict of case -> us/call each.
    runs = [{label: values[i] / 1000 for label, values in per_call.items()} for i in range(args.runs)]
    median = {label: statistics.median(values) / 1000 for label, values in per_call.items()}
    report.write_json(args.json, report.machine_info(), vars(args), runs, median)
    return 0


if __name__ == "__main__":
    sys.exit(main())
