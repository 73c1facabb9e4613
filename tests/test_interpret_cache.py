"""The prompt cache in SQLite: the same text twice is one provider call; a hit costs nothing and is validated
again; a profile change, the TTL and a wall clock stepped back all make a miss; entries survive a restart."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from gatewayd.config.profiles import ParamSpec
from gatewayd.interpret.cache import PromptCache, cache_key
from gatewayd.interpret.registry import normalise
from gatewayd.interpret.simulator import FakeProvider
from gatewayd.observability.metrics import REGISTRY
from gatewayd.store import Store
from tests.interpret_kit import KEY, Rig, profiles, provider, registry, settings

SET_SPEED = {"device": "pump1", "action": "set_speed", "params": {"percent": 40}}


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_the_same_text_twice_is_a_hit_that_costs_nothing(tmp_path: Path) -> None:
    hits, misses = (
        metric("gatewayd_interpret_cache_lookups_total", result="hit"),
        metric("gatewayd_interpret_cache_lookups_total", result="miss"),
    )
    saved = metric("gatewayd_interpret_cache_cost_saved_total")
    async with FakeProvider("openai", api_key=KEY, default=SET_SPEED) as a:
        cfg = settings({"a": provider(a, price_in_per_mtok=3.0, price_out_per_mtok=15.0)})
        async with Rig(tmp_path / "db", cfg) as rig:
            first = await rig.ask("Set the pump speed to 40 percent.")
            second = await rig.ask("  set the PUMP speed to 40 percent ")
            ledger = await rig.ledger.totals()
    assert not first.cached and first.cost > 0 and first.attempts == 1
    assert second.cached and (second.provider, second.model) == ("a", "fake-model")
    assert (second.cost, second.attempts, second.tokens_in, second.degraded) == (0.0, 0, 0, False)
    assert second.cost_saved == pytest.approx(first.cost)
    assert second.command == first.command
    assert len(a.completions()) == 1 and ledger["a"]["calls"] == 1  # paid once
    assert metric("gatewayd_interpret_cache_lookups_total", result="hit") == hits + 1
    assert metric("gatewayd_interpret_cache_lookups_total", result="miss") == misses + 1
    assert metric("gatewayd_interpret_cache_cost_saved_total") == pytest.approx(saved + first.cost)
    assert rig.cache.stats()["hit_rate"] == 0.5


async def test_a_cached_answer_is_validated_again_before_it_is_used(tmp_path: Path) -> None:
    async with FakeProvider("openai", api_key=KEY, default=SET_SPEED) as a:
        async with Rig(tmp_path / "db", settings({"a": provider(a)})) as rig:
            await rig.ask("set the pump speed to 40 percent")
            with sqlite3.connect(tmp_path / "db") as conn:  # a row that no longer passes validation
                changed = conn.execute(
                    "UPDATE interpret_cache SET command = ?",
                    (json.dumps({"device": "pump1", "action": "set_speed", "params": {"percent": 400}}),),
                ).rowcount
            assert changed == 1
            out = await rig.ask("set the pump speed to 40 percent")
            rows = await rig.store.read(lambda c: c.execute("SELECT command FROM interpret_cache").fetchall())
    assert not out.cached and out.command.params["percent"] == 40  # asked the provider again
    assert len(a.completions()) == 2
    assert [json.loads(r[0])["params"]["percent"] for r in rows] == [40]  # the bad row was replaced


async def test_a_profile_change_invalidates_the_cache(tmp_path: Path) -> None:
    async with FakeProvider("openai", api_key=KEY, default=SET_SPEED) as a:
        async with Rig(tmp_path / "db", settings({"a": provider(a)})) as rig:
            await rig.ask("set the pump speed to 40 percent")
            pump = profiles()["sim_pump"]
            speed = pump.actions["set_speed"]
            narrower = speed.model_copy(
                update={"params": {**speed.params, "percent": ParamSpec(type="int", min=0, max=80, unit="%")}}
            )
            old = rig.registry.digest
            rig.use(registry(pump1=pump.model_copy(update={"actions": {**pump.actions, "set_speed": narrower}})))
            assert rig.registry.digest != old
            out = await rig.ask("set the pump speed to 40 percent")
            purged = await rig.cache.purge(rig.registry.digest)
            left = await rig.cache.size()
    assert not out.cached and len(a.completions()) == 2
    assert purged == 1 and left == 1  # the answer about the old profile is gone, the new one stays


async def test_entries_survive_a_restart(tmp_path: Path) -> None:
    async with FakeProvider("anthropic", api_key=KEY, default=SET_SPEED) as a:
        cfg = settings({"a": provider(a)})
        async with Rig(tmp_path / "db", cfg) as rig:
            await rig.ask("set the pump speed to 40 percent")
        async with Rig(tmp_path / "db", cfg) as rig:  # a new process on the same file
            out = await rig.ask("set the pump speed to 40 percent")
    assert out.cached and len(a.completions()) == 1


async def test_the_ttl_and_a_clock_stepped_back_make_a_miss(tmp_path: Path) -> None:
    now = [1_800_000_000.0]
    async with FakeProvider("ollama", api_key=KEY, default=SET_SPEED) as a:
        async with Rig(tmp_path / "db", settings({"a": provider(a)}, cache_ttl_s=60), wall=lambda: now[0]) as rig:
            await rig.ask("set the pump speed to 40 percent")
            now[0] += 59.9
            assert (await rig.ask("set the pump speed to 40 percent")).cached
            now[0] += 0.2
            assert not (await rig.ask("set the pump speed to 40 percent")).cached  # expired: bought again
            now[0] -= 3600  # NTP steps the clock back an hour: the fresh entry now seems to come from the future
            assert not (await rig.ask("set the pump speed to 40 percent")).cached
    assert len(a.completions()) == 3


async def test_the_key_is_the_text_the_registry_the_provider_and_its_model(tmp_path: Path) -> None:
    text = normalise("Set the pump speed to 40 percent!")
    assert text == "set the pump speed to 40 percent"
    key = cache_key(text, "digest", "a", "m1")
    assert len({key, cache_key(text, "other", "a", "m1"), cache_key(text, "digest", "b", "m1")}) == 3
    assert cache_key(text, "digest", "a", "m2") != key
    async with (
        FakeProvider("openai", api_key=KEY, default=SET_SPEED) as a,
        FakeProvider("openai", api_key=KEY, default=SET_SPEED, model="other-model") as b,
    ):
        async with Rig(tmp_path / "db", settings({"a": provider(a)})) as rig:
            await rig.ask("set the pump speed to 40 percent")
        # The same text to another model of the same provider name: not the same answer.
        async with Rig(tmp_path / "db", settings({"a": provider(b, model="other-model")})) as rig:
            out = await rig.ask("set the pump speed to 40 percent")
    assert not out.cached and len(b.completions()) == 1


async def test_local_answers_are_never_cached(tmp_path: Path) -> None:
    async with Rig(tmp_path / "db", settings({})) as rig:
        first = await rig.ask("start pump 1")
        second = await rig.ask("start pump 1")
        size = await rig.cache.size()
    assert first.degraded and second.degraded and not second.cached and size == 0


async def test_a_text_never_answered_is_a_miss_without_a_read_and_an_answer_is_found_again(tmp_path: Path) -> None:
    """After load(), the cache knows which keys may be in the table: a text no provider answered (every refusal,
    every local answer while offline) costs no read; an answer put is found, also by the next start."""
    command = {"device": "pump1", "action": "start", "params": {}}
    pairs = [("a", "m1"), ("b", "m2")]
    async with Store(tmp_path / "db") as store:
        reads = 0
        read = store.read

        async def counting(job: Any) -> Any:
            nonlocal reads
            reads += 1
            return await read(job)

        store.read = counting  # type: ignore[method-assign]
        cache = PromptCache(store, ttl_s=3600, max_entries=100, wall=lambda: 1_700_000_000.0)
        assert await cache.lookup("start the pump", "digest", pairs) is None and reads == 1  # not loaded: read
        await cache.load()
        reads = 0
        for i in range(50):
            assert await cache.lookup(f"nonsense {i}", "digest", pairs) is None
        assert reads == 0
        entry = cache.entry("start the pump", "digest", "b", "m2", command, 0.01)
        assert entry is not None
        await store.write(lambda c: cache.put(c, entry))
        hit = await cache.lookup("start the pump", "digest", pairs)
        assert hit is not None and hit.provider == "b" and hit.command == command and reads == 1
        assert await cache.lookup("start the pump", "another digest", pairs) is None and reads == 1
        again = PromptCache(store, ttl_s=3600, max_entries=100, wall=lambda: 1_700_000_000.0)
        await again.load()
        hit = await again.lookup("start the pump", "digest", pairs)
        assert hit is not None and hit.provider == "b"
