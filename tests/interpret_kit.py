"""What the natural-language tests share: the repository's device profiles as a registry, provider settings for
fake providers, and a rig that runs the real failover chain over a real SQLite store and real HTTP."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp

from gatewayd.config import load_profiles
from gatewayd.config.models import InterpretSection
from gatewayd.config.profiles import Profile
from gatewayd.errors import ConfigProblem
from gatewayd.interpret.cache import PromptCache
from gatewayd.interpret.chain import Chain, Outcome, Slot
from gatewayd.interpret.ledger import SpendLedger
from gatewayd.interpret.local import LocalRules
from gatewayd.interpret.registry import Registry
from gatewayd.interpret.rules import EMPTY, RulesFile
from gatewayd.interpret.service import build_slots
from gatewayd.interpret.simulator import FakeProvider
from gatewayd.resilience import REAL_CLOCK, Clock
from gatewayd.store import Store
from tests.conftest import ROOT

KEY = "sk-test-0123456789"
ENV = {"FAKE_KEY": KEY}
DEVICES = {"pump1": "sim_pump", "relay1": "gpio_relay", "fan2": "gpio_pwm_dimmer"}
START_PUMP = {"device": "pump1", "action": "start", "params": {}}


def profiles() -> dict[str, Profile]:
    problems: list[ConfigProblem] = []
    found = load_profiles(ROOT / "hardware" / "profiles", problems)
    assert not problems, problems
    return found


def registry(rules: RulesFile = EMPTY, **replace: Profile) -> Registry:
    known = profiles()
    device_profiles = {name: replace.get(name, known[profile]) for name, profile in DEVICES.items()}
    return Registry.build(device_profiles, {}, rules)


def provider(fake: FakeProvider | str, kind: str | None = None, **kw: Any) -> dict[str, Any]:
    """Provider settings for a fake (or a URL: a closed port is a provider that refuses connections)."""
    if isinstance(fake, FakeProvider):
        url, kind = fake.base_url, fake.kind
    else:
        url = fake
    return {
        "type": kind or "openai",
        "base_url": url,
        "model": "fake-model",
        "api_key_env": "FAKE_KEY",
        "cloud": True,
        "timeout_s": 1.0,
        "connect_timeout_s": 0.5,
        **kw,
    }


def settings(providers: dict[str, dict[str, Any]], **kw: Any) -> InterpretSection:
    data: dict[str, Any] = {
        "deadline_s": 3.0,
        "local_reserve_s": 0.2,
        "retry": {"max_attempts": 3, "base_s": 0.01, "multiplier": 2.0, "cap_s": 0.05},
        "breaker": {"window_size": 10, "minimum_calls": 4, "failure_rate": 0.5, "open_s": 30},
        "providers": providers,
    }
    for key, value in kw.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return InterpretSection.model_validate(data)


class Rig:
    """The chain as the service builds it, without the daemon around it: ``await rig.ask("start pump1")``."""

    def __init__(
        self,
        path: Path,
        cfg: InterpretSection,
        *,
        clock: Clock = REAL_CLOCK,
        wall: Callable[[], float] = time.time,
        reg: Registry | None = None,
        environ: dict[str, str] | None = None,
        seed: int = 1,
    ):
        self.path = path
        self.cfg = cfg
        self.clock = clock
        self.wall = wall
        self.registry = reg or registry()
        self.environ = ENV if environ is None else environ
        self.seed = seed
        self.store = Store(path, synchronous="normal")
        self.session: aiohttp.ClientSession | None = None
        self.slots: list[Slot] = []
        self.local: LocalRules | None = None

    async def __aenter__(self) -> Rig:
        await self.store.__aenter__()
        self.session = aiohttp.ClientSession()
        self.slots = build_slots(self.cfg, self.environ, clock=self.clock, wall=self.wall)
        self.ledger = SpendLedger(self.store, budget=self.cfg.daily_budget, wall=self.wall)
        await self.ledger.load()
        self.cache = PromptCache(
            self.store, ttl_s=self.cfg.cache_ttl_s, max_entries=self.cfg.cache_max_entries, wall=self.wall
        )
        self.chain = Chain(
            self.cfg,
            self.slots,
            session=self.session,
            ledger=self.ledger,
            cache=self.cache,
            store=self.store,
            clock=self.clock,
            rng=random.Random(self.seed),
        )
        self.local = LocalRules.build(self.registry)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.session is not None:
            await self.session.close()
        await self.store.close()

    def slot(self, name: str) -> Slot:
        return next(s for s in self.slots if s.name == name)

    async def ask(self, text: str) -> Outcome:
        """One request, and its spend rows and cache entry committed (the chain queues them and does not wait)."""
        out = await self.chain.interpret(text, self.registry, self.local)
        await self.chain.settled()
        return out

    def use(self, reg: Registry) -> None:
        """New devices or profiles (what a SIGHUP reload does), and their local rules."""
        self.registry = reg
        self.local = LocalRules.build(reg)


def tried(outcome: Outcome) -> list[tuple[str, str, int]]:
    """(provider, outcome, attempts) in the order the chain went through them."""
    return [(t["provider"], t["outcome"], t["attempts"]) for t in outcome.tried]
