"""Circuit breakers in the chain: a failing provider's breaker opens, is passed over without a call, half-opens and
closes on a good probe (a request or a token-free health check); the connectivity breaker skips every cloud
provider at once when the network is gone, and only then. Breaker time runs on a FakeClock."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import cast

from gatewayd.commands.service import CommandService
from gatewayd.interpret.service import InterpretService
from gatewayd.interpret.simulator import FakeProvider, Fault
from gatewayd.resilience import CircuitState, FakeClock
from gatewayd.store import Store
from tests.interpret_kit import DEVICES, ENV, KEY, START_PUMP, Rig, profiles, provider, settings, tried


async def test_a_failing_providers_breaker_opens_then_half_opens_and_closes(tmp_path: Path) -> None:
    clock = FakeClock()
    async with (
        FakeProvider("openai", api_key=KEY, default=START_PUMP) as a,
        FakeProvider("anthropic", api_key=KEY, default=START_PUMP) as b,
    ):
        a.script(*[Fault.http(500)] * 4)
        cfg = settings(
            {"a": provider(a, priority=1), "b": provider(b, priority=2)},
            retry={"max_attempts": 1},
            breaker={"window_size": 4, "minimum_calls": 4, "failure_rate": 0.5, "open_s": 30},
            cache_ttl_s=0,
        )
        async with Rig(tmp_path / "db", cfg, clock=clock) as rig:
            breaker = rig.slot("a").breaker
            for _ in range(4):
                assert tried(await rig.ask("start pump1")) == [("a", "failed", 1), ("b", "answered", 1)]
            assert breaker.state is CircuitState.OPEN

            out = await rig.ask("start pump1")  # passed over without a call
            assert (
                tried(out) == [("a", "skipped", 0), ("b", "answered", 1)] and out.tried[0]["reason"] == "circuit_open"
            )
            assert len(a.completions()) == 4

            clock.advance(29.9)
            assert breaker.state is CircuitState.OPEN
            clock.advance(0.1)
            assert breaker.state is CircuitState.HALF_OPEN
            out = await rig.ask("start pump1")  # the probe: a is healthy again
            assert tried(out) == [("a", "answered", 1)] and breaker.state is CircuitState.CLOSED


async def test_a_failed_probe_opens_the_breaker_again(tmp_path: Path) -> None:
    clock = FakeClock()
    async with FakeProvider("openai", api_key=KEY, default=START_PUMP) as a:
        a.script(*[Fault.http(503)] * 3)
        cfg = settings(
            {"a": provider(a)},
            retry={"max_attempts": 1},
            breaker={"window_size": 2, "minimum_calls": 2, "open_s": 10},
            cache_ttl_s=0,
        )
        async with Rig(tmp_path / "db", cfg, clock=clock) as rig:
            breaker = rig.slot("a").breaker
            for _ in range(2):
                assert (await rig.ask("start pump1")).degraded
            assert breaker.state is CircuitState.OPEN
            clock.advance(10)
            out = await rig.ask("start pump1")
            assert tried(out) == [("a", "failed", 1)] and out.degraded
            assert breaker.state is CircuitState.OPEN and breaker.retry_at == clock.now + 10


async def test_a_token_free_health_check_is_the_probe_of_a_half_open_breaker(tmp_path: Path) -> None:
    clock = FakeClock()
    async with FakeProvider("ollama", api_key=KEY, default=START_PUMP) as a:
        cfg = settings({"a": provider(a)}, breaker={"open_s": 5})
        async with Rig(tmp_path / "db", cfg, clock=clock) as rig:
            slot = rig.slot("a")
            slot.breaker.force_open("test")
            health = await rig.chain.check(slot)  # open: only looks
            assert health.ok is True and slot.breaker.state is CircuitState.OPEN
            clock.advance(5)
            a.health_faults.append(Fault.http(503))
            health = await rig.chain.check(slot)  # half-open: the probe, and it fails
            assert health.ok is False and "503" in str(health.error) and slot.breaker.state is CircuitState.OPEN
            clock.advance(5)
            health = await rig.chain.check(slot)
            assert health.ok is True and health.info == {"models": 1, "model_listed": True}
            assert slot.breaker.state is CircuitState.CLOSED
    assert a.completions() == [] and [s.path for s in a.seen] == ["/api/tags"] * 3  # no tokens spent


async def test_the_connectivity_breaker_skips_every_cloud_provider_at_once_until_a_probe_answers(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    async with (
        FakeProvider("openai", api_key=KEY, default=START_PUMP) as a,
        FakeProvider("anthropic", api_key=KEY, default=START_PUMP) as b,
        FakeProvider("ollama", default=START_PUMP) as lan,
    ):
        cfg = settings(
            {
                "a": provider(a, priority=1),
                "b": provider(b, priority=2),
                "lan": provider(lan, priority=3, cloud=False, api_key_env=None),
            },
            retry={"max_attempts": 2},
            connectivity_providers=2,
            connectivity_open_s=30,
            cache_ttl_s=0,
        )
        async with Rig(tmp_path / "db", cfg, clock=clock) as rig:
            connectivity = rig.chain.connectivity
            await a.down()
            await b.down()
            out = await rig.ask("start pump1")
            # a refused: one witness; b refused: the second. The link is down, so neither is asked again, and the
            # provider on the local network answers.
            assert tried(out) == [("a", "failed", 1), ("b", "failed", 1), ("lan", "answered", 1)]
            assert connectivity.offline

            started = time.monotonic()
            out = await rig.ask("start pump1")
            elapsed = time.monotonic() - started
            assert tried(out) == [("a", "skipped", 0), ("b", "skipped", 0), ("lan", "answered", 1)]
            assert [t["reason"] for t in out.tried[:2]] == ["offline", "offline"]
            assert elapsed < 0.1  # no connection attempted to any cloud provider

            await a.up()
            await b.up()
            clock.advance(30)
            assert connectivity.breaker.state is CircuitState.HALF_OPEN
            await rig.chain.check(rig.slot("b"))  # a health check answers: the probe
            assert connectivity.breaker.state is CircuitState.CLOSED
            out = await rig.ask("start pump1")
            assert tried(out) == [("a", "answered", 1)]
    assert [s.path for s in b.seen] == ["/v1/models"]  # b was probed without spending a token


async def test_one_unreachable_provider_does_not_take_the_cloud_offline(tmp_path: Path) -> None:
    clock = FakeClock()
    async with (
        FakeProvider("openai", api_key=KEY, default=START_PUMP) as a,
        FakeProvider("openai", api_key=KEY, default=START_PUMP) as b,
    ):
        cfg = settings(
            {"a": provider(a, priority=1), "b": provider(b, priority=2)},
            breaker={"window_size": 20, "minimum_calls": 20},
            cache_ttl_s=0,
        )
        async with Rig(tmp_path / "db", cfg, clock=clock) as rig:
            await a.down()
            for _ in range(5):
                out = await rig.ask("start pump1")
                assert tried(out) == [("a", "failed", 1), ("b", "answered", 1)]
            assert not rig.chain.connectivity.offline


async def test_health_checks_run_at_start_right_after_a_breaker_opens_and_probe_when_it_half_opens(
    tmp_path: Path,
) -> None:
    async with FakeProvider("openai", api_key=KEY, default=START_PUMP) as a, Store(tmp_path / "db") as store:
        cfg = settings({"a": provider(a)}, health_interval_s=3600, breaker={"open_s": 0.3})
        service = InterpretService(
            cfg,
            store=store,
            service=cast(CommandService, None),  # not needed to interpret
            profiles=lambda: {n: profiles()[p] for n, p in DEVICES.items()},
            descriptions={},
            environ=ENV,
        )
        async with service:
            slot = service.slots[0]

            await asyncio.wait_for(a.wait_seen("/v1/models", 1), 2)  # at start
            slot.breaker.force_open("test")
            await asyncio.wait_for(a.wait_seen("/v1/models", 2), 2)  # at once, after it opened
            assert slot.breaker.state is CircuitState.OPEN
            await asyncio.wait_for(a.wait_seen("/v1/models", 3), 2)  # when the probe is due: it closes the breaker
            await asyncio.sleep(0.05)
            assert slot.breaker.state is CircuitState.CLOSED and slot.health.ok is True
            described = await service.describe()
            [info] = described["providers"]
            assert info["health"]["ok"] is True and info["breaker"]["state"] == "closed"
            assert info["health"]["checked_at"].endswith("Z")


async def test_a_single_cloud_provider_that_cannot_connect_takes_the_cloud_offline_at_once(tmp_path: Path) -> None:
    clock = FakeClock()
    async with FakeProvider("openai", api_key=KEY, default=START_PUMP) as a:
        cfg = settings({"a": provider(a)}, connectivity_providers=2, connectivity_open_s=30, cache_ttl_s=0)
        async with Rig(tmp_path / "db", cfg, clock=clock) as rig:
            assert rig.chain.connectivity.needed == 1  # only one cloud provider to witness
            await a.down()
            first = await rig.ask("start pump 1")
            second = await rig.ask("start pump 1")
    # Every cloud provider failed to connect: the local rules answer at once, with no pause to retry it.
    assert tried(first) == [("a", "failed", 1)] and first.degraded and clock.sleeps == []
    assert tried(second) == [("a", "skipped", 0)] and second.tried[0]["reason"] == "offline"


async def test_one_provider_failing_request_after_request_is_one_witness(tmp_path: Path) -> None:
    clock = FakeClock()
    async with (
        FakeProvider("openai", api_key=KEY, default=START_PUMP) as a,
        FakeProvider("openai", api_key=KEY, default=START_PUMP) as b,
    ):
        cfg = settings(
            {"a": provider(a, priority=1), "b": provider(b, priority=2)},
            breaker={"window_size": 20, "minimum_calls": 20},
            connectivity_providers=2,
            cache_ttl_s=0,
        )
        async with Rig(tmp_path / "db", cfg, clock=clock) as rig:
            await a.down()
            rig.slot("b").breaker.force_open("test")  # b is passed over: no answer from it ends a's streak
            for _ in range(3):
                out = await rig.ask("start pump 1")
                assert tried(out) == [("a", "failed", 3), ("b", "skipped", 0)]
            assert not rig.chain.connectivity.offline  # three failures of one host are not a network down
