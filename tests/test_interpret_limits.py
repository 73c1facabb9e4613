"""Provider rate limits: a burst beyond a provider's requests per minute goes to the next provider, or waits for
the limit within the deadline when there is none; tokens per minute are estimated before a call and settled with
the reported usage after. Limiter time runs on a FakeClock (no refill unless the test advances it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gatewayd.interpret.simulator import FakeProvider
from gatewayd.resilience import FakeClock
from tests.interpret_kit import KEY, START_PUMP, Rig, provider, settings, tried


async def test_a_burst_beyond_a_providers_rpm_goes_to_the_next_provider(tmp_path: Path) -> None:
    clock = FakeClock()
    async with (
        FakeProvider("openai", api_key=KEY, default=START_PUMP) as a,
        FakeProvider("anthropic", api_key=KEY, default=START_PUMP) as b,
    ):
        cfg = settings({"a": provider(a, priority=1, rpm=2), "b": provider(b, priority=2)}, cache_ttl_s=0)
        async with Rig(tmp_path / "db", cfg, clock=clock) as rig:
            outs = [await rig.ask("start pump1") for _ in range(4)]
    assert [o.provider for o in outs] == ["a", "a", "b", "b"]
    assert tried(outs[2]) == [("a", "skipped", 0), ("b", "answered", 1)]
    assert outs[2].tried[0]["reason"] == "rate_limited"
    assert outs[2].tried[0]["retry_after_s"] == pytest.approx(30.0)  # 2 per minute: one every 30 s
    assert len(a.completions()) == 2 and clock.sleeps == []


async def test_with_no_other_provider_the_burst_waits_for_the_limit_within_the_deadline(tmp_path: Path) -> None:
    clock = FakeClock()
    async with FakeProvider("openai", api_key=KEY, default=START_PUMP) as a:
        cfg = settings({"a": provider(a, rpm=2)}, cache_ttl_s=0, deadline_s=40.0)
        async with Rig(tmp_path / "db", cfg, clock=clock) as rig:
            outs = [await rig.ask("start pump1") for _ in range(3)]
    assert [o.provider for o in outs] == ["a", "a", "a"]
    assert tried(outs[2]) == [("a", "skipped", 0), ("a", "answered", 1)]  # limited, then waited for it
    assert clock.sleeps == [pytest.approx(30.0)]
    assert outs[2].latency_s == pytest.approx(30.0, abs=0.01) and outs[2].latency_s < 40.0


async def test_a_limit_that_frees_only_after_the_deadline_leaves_it_to_the_local_rules(tmp_path: Path) -> None:
    clock = FakeClock()
    async with FakeProvider("openai", api_key=KEY, default=START_PUMP) as a:
        cfg = settings({"a": provider(a, rpm=2)}, cache_ttl_s=0, deadline_s=5.0)
        async with Rig(tmp_path / "db", cfg, clock=clock) as rig:
            outs = [await rig.ask("start pump 1") for _ in range(3)]
    assert outs[2].degraded and tried(outs[2]) == [("a", "skipped", 0)] and clock.sleeps == []


async def test_tokens_per_minute_are_settled_with_the_reported_usage(tmp_path: Path) -> None:
    clock = FakeClock()
    async with FakeProvider("anthropic", api_key=KEY, default=START_PUMP) as a:
        cfg = settings({"a": provider(a, tpm=20_000, max_tokens=256)}, cache_ttl_s=0)
        async with Rig(tmp_path / "db", cfg, clock=clock) as rig:
            tpm = rig.slot("a").tpm
            await rig.ask("start pump1")
            level = tpm.level()
            assert rig.slot("a").reserved_tokens == 0
    assert level == pytest.approx(20_000 - a.tokens_in - a.tokens_out)


async def test_a_request_bigger_than_the_tpm_allowance_is_not_sent(tmp_path: Path) -> None:
    async with FakeProvider("openai", api_key=KEY, default=START_PUMP) as a:
        cfg = settings({"a": provider(a, tpm=300, max_tokens=256)}, cache_ttl_s=0)
        async with Rig(tmp_path / "db", cfg) as rig:
            out = await rig.ask("start pump 1")
    # The prompt alone is several hundred tokens: it could never fit, so the provider is passed over.
    assert out.degraded and out.tried[0]["reason"] == "rate_limited" and a.completions() == []
