"""Cost tracking: the spend ledger in the store matches the usage the providers reported, failed-but-billed
answers included; reaching the daily budget moves interpretation to free providers, then to the local rules, and
a new UTC day starts a new budget."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from gatewayd.config.models import ProviderConfig
from gatewayd.interpret.chain import _estimate_tokens
from gatewayd.interpret.ledger import SpendLedger, cost_of, utc_day
from gatewayd.interpret.simulator import FakeProvider, Fault
from tests.interpret_kit import KEY, START_PUMP, Rig, provider, registry, settings, tried

PRICES = {"a": (3.0, 15.0), "b": (0.8, 4.0)}


async def test_the_spend_ledger_matches_the_usage_the_providers_reported(tmp_path: Path) -> None:
    async with (
        FakeProvider("openai", api_key=KEY, default=START_PUMP) as a,
        FakeProvider("anthropic", api_key=KEY, default=START_PUMP) as b,
    ):
        a.script(None, Fault.unknown_device(), None, Fault.reset(), None)
        cfg = settings(
            {
                "a": provider(a, priority=1, price_in_per_mtok=PRICES["a"][0], price_out_per_mtok=PRICES["a"][1]),
                "b": provider(b, priority=2, price_in_per_mtok=PRICES["b"][0], price_out_per_mtok=PRICES["b"][1]),
            },
            cache_ttl_s=0,
            breaker={"minimum_calls": 10},  # two bad answers in four calls must not open a's breaker here
        )
        async with Rig(tmp_path / "db", cfg) as rig:
            outcomes = [await rig.ask("start pump1") for _ in range(4)]
            totals = await rig.ledger.totals()
            today = rig.ledger.today()
        async with Rig(tmp_path / "db", cfg) as rig:  # restarted: today's spend is read back
            restored = rig.ledger.today()
    # Request 2: a's unknown-device answer (billed) then b. Request 4: a reset mid-body (no usage), then b.
    assert [o.provider for o in outcomes] == ["a", "b", "a", "b"]
    for name, fake in (("a", a), ("b", b)):
        price_in, price_out = PRICES[name]
        assert (totals[name]["tokens_in"], totals[name]["tokens_out"]) == (fake.tokens_in, fake.tokens_out)
        assert totals[name]["cost"] == pytest.approx((fake.tokens_in * price_in + fake.tokens_out * price_out) / 1e6)
    assert totals["a"]["calls"] == 3 and totals["b"]["calls"] == 2
    assert sum(o.cost for o in outcomes) == pytest.approx(today)
    assert restored == pytest.approx(today)


async def test_reaching_the_daily_budget_moves_to_free_providers_then_to_the_local_rules(tmp_path: Path) -> None:
    now = [time.time()]
    async with (
        FakeProvider("openai", api_key=KEY, default=START_PUMP) as paid,
        FakeProvider("ollama", default=START_PUMP) as free,
    ):
        paid_cfg = provider(paid, priority=1, price_in_per_mtok=1000.0, price_out_per_mtok=1000.0, max_tokens=256)
        # What the chain reckons one paid call may cost before making it: prompt estimate plus the answer cap.
        text = "start pump1"
        estimate = cost_of(ProviderConfig(**paid_cfg), _estimate_tokens(registry().prompt_chars + len(text)), 256)
        cfg = settings(
            {"paid": paid_cfg, "free": provider(free, priority=2, cloud=False, api_key_env=None)},
            cache_ttl_s=0,
            daily_budget=1.5 * estimate,  # room for one call (which costs less than its estimate), not two
        )
        async with Rig(tmp_path / "db", cfg, wall=lambda: now[0]) as rig:
            first = await rig.ask(text)
            assert first.provider == "paid" and 0 < first.cost < estimate
            second = await rig.ask("start pump1")  # one more paid call could overrun the budget
            assert tried(second) == [("paid", "skipped", 0), ("free", "answered", 1)]
            assert second.tried[0]["reason"] == "budget" and second.cost == 0

            await free.down()
            third = await rig.ask("start pump1")
            assert third.degraded and tried(third)[0] == ("paid", "skipped", 0)

            now[0] += 86_400  # midnight UTC has passed: a new day, a new budget
            fourth = await rig.ask("start pump1")
            assert fourth.provider == "paid"
    assert len(paid.completions()) == 2


async def test_the_day_is_the_utc_date(tmp_path: Path) -> None:
    assert utc_day(0) == "1970-01-01" and utc_day(86_399.9) == "1970-01-01" and utc_day(86_400) == "1970-01-02"
    async with Rig(tmp_path / "db", settings({})) as rig:
        ledger = SpendLedger(rig.store, budget=None, wall=time.time)
        assert ledger.allows(1e9) and not ledger.exhausted  # no budget: no limit
