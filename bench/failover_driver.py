"""One side of bench/litellm_router.py's comparison, in a process of its own: gatewayd's failover chain (run with
the project's venv) or LiteLLM's Router (run with the benchmark's own ``.venv-litellm``). Not for use by hand.

It reads a JSON spec on stdin, builds its side, says ``ready`` (with its RSS) on stdout, answers one request, then
runs the scenarios the spec lists against the fake providers the parent serves, each with a router (chain) of its
own built just before, so that its request 1 meets the fault for the first time and its cooldowns (breakers) carry
over to its requests 2 and on; it writes one JSON line per scenario and a last one with its RSS and every network
address it tried. Only the standard library is imported before the side's own imports,
so what ``ready`` costs is that side's.

Nothing may leave this machine: an audit hook, installed before anything else is imported, records every socket
connection and name lookup and refuses (PermissionError, before any packet is sent) any that is not loopback.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
CONNECTS: Counter[str] = Counter()  # "host:port" -> connection attempts, loopback ones included
REFUSED: list[str] = []  # what the hook refused: "connect host:port" or "lookup host"


def _loopback(host: object) -> bool:
    if host is None:
        return True
    name = host.decode() if isinstance(host, bytes) else str(host)
    return name in LOOPBACK_NAMES or name.startswith("127.") or name.endswith(".localhost")


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "socket.connect":
        sock, address = args
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return  # a Unix socket stays on this machine
        host, port = address[0], address[1]
        CONNECTS[f"{host}:{port}"] += 1
        if not _loopback(host):
            REFUSED.append(f"connect {host}:{port}")
            raise PermissionError(f"benchmark: no connection off this machine ({host}:{port})")
    elif event == "socket.getaddrinfo":
        host = args[0]
        if not _loopback(host):
            REFUSED.append(f"lookup {host!r}")
            raise PermissionError(f"benchmark: no name lookups ({host!r})")


def rss_kib() -> dict[str, int]:
    out = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def emit(**record: Any) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


# One request: its outcome as a short dict ({"answer": ..., "by": ...} or {"error": ..., "message": ...}).
Ask = Callable[[], Awaitable[dict[str, Any]]]


class Side:
    """Builds one router (chain) per pair of provider URLs and asks it the spec's text."""

    async def start(self, spec: dict[str, Any]) -> None: ...

    async def router(self, primary: str, fallback: str) -> Ask:
        """A fresh router (chain) for the pair: nothing it knows of earlier failures, its cooldowns and breakers on."""
        raise NotImplementedError

    async def close(self) -> None: ...


class LiteLLMSide(Side):
    async def start(self, spec: dict[str, Any]) -> None:
        # Offline: the bundled model cost map instead of fetching the current one at import.
        os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
        os.environ["LITELLM_TELEMETRY"] = "False"
        import litellm  # type: ignore[import-not-found]  # in .venv-litellm only
        from litellm import Router

        litellm.telemetry = False
        litellm.suppress_debug_info = True
        litellm.success_callback = []
        litellm.failure_callback = []
        litellm.callbacks = []
        self.Router, self.spec = Router, spec

    async def router(self, primary: str, fallback: str) -> Ask:
        spec = self.spec
        body = spec["body"]

        def deployment(url: str, group: str, **extra: Any) -> dict[str, Any]:
            params = {"model": f"openai/{spec['model']}", "api_base": url, "api_key": spec["key"], **extra}
            return {"model_name": group, "litellm_params": params}

        group = spec["model"]
        if spec["setup"] == "order":
            # Tuned: one model group, its deployments tried by their order; retries stated (2, the default).
            router = self.Router(
                model_list=[deployment(primary, group, order=1), deployment(fallback, group, order=2)],
                num_retries=spec["attempts"] - 1,
                timeout=spec["timeout_s"],
            )
        else:
            # Documented defaults: two model groups, the second in the first's fallbacks; LiteLLM's own retries,
            # allowed fails and cooldowns. Only the timeout is set (the default is 6000 s).
            router = self.Router(
                model_list=[deployment(primary, group), deployment(fallback, f"{group}-fallback")],
                fallbacks=[{group: [f"{group}-fallback"]}],
                timeout=spec["timeout_s"],
            )
        names = {primary.rstrip("/"): "primary", fallback.rstrip("/"): "fallback"}

        async def ask() -> dict[str, Any]:
            try:
                resp = await router.acompletion(
                    model=spec["model"],
                    messages=body["messages"],
                    tools=body["tools"],
                    tool_choice=body["tool_choice"],
                    temperature=body["temperature"],
                    max_tokens=body["max_tokens"],
                )
            except Exception as err:
                return {"error": f"{type(err).__module__}.{type(err).__qualname__}", "message": str(err)[:400]}
            call = resp.choices[0].message.tool_calls[0]
            base = str((getattr(resp, "_hidden_params", None) or {}).get("api_base") or "").rstrip("/")
            return {"answer": json.loads(call.function.arguments), "by": names.get(base, base)}

        return ask


class GatewaydSide(Side):
    async def start(self, spec: dict[str, Any]) -> None:
        import random
        import tempfile
        from pathlib import Path

        import aiohttp

        from gatewayd.config import load_config
        from gatewayd.config.models import InterpretSection
        from gatewayd.interpret.chain import Chain
        from gatewayd.interpret.errors import NotUnderstood
        from gatewayd.interpret.ledger import SpendLedger
        from gatewayd.interpret.local import LocalRules
        from gatewayd.interpret.registry import Registry
        from gatewayd.interpret.rules import load_rules
        from gatewayd.interpret.service import build_slots
        from gatewayd.observability import logging as gwlog
        from gatewayd.resilience import REAL_CLOCK
        from gatewayd.store import Store

        loaded = load_config(Path(spec["config"]), environ={})
        gwlog.configure(loaded.config.log.level, stream=sys.stderr)  # as the daemon logs, away from stdout
        base = loaded.config.interpret
        profiles = {name: loaded.profiles[dev.profile] for name, dev in loaded.config.devices.items()}
        rules, problems = load_rules(base.rules_file, profiles)
        if problems:
            raise RuntimeError(f"the rules file has problems: {problems}")
        descriptions = {name: dev.description for name, dev in loaded.config.devices.items()}
        self.registry = Registry.build(profiles, descriptions, rules)
        self.local = LocalRules.build(self.registry)
        self.tmp = tempfile.TemporaryDirectory(prefix="gatewayd-bench-router-")
        self.store = Store(Path(self.tmp.name) / "bench.sqlite3", synchronous="normal")
        await self.store.__aenter__()
        self.session = aiohttp.ClientSession()
        self.spec, self.base, self.not_understood = spec, base, NotUnderstood
        self.InterpretSection, self.Chain, self.SpendLedger = InterpretSection, Chain, SpendLedger
        self.build_slots, self.clock, self.random = build_slots, REAL_CLOCK, random

    async def router(self, primary: str, fallback: str) -> Ask:
        spec = self.spec

        def provider(url: str, priority: int) -> dict[str, Any]:
            return {
                "type": "openai",
                "base_url": url,
                "model": spec["model"],
                "api_key_env": "BENCH_KEY",
                "cloud": True,  # as a real one would be: the connectivity breaker takes part
                "priority": priority,
                "timeout_s": spec["timeout_s"],
                "max_tokens": spec["body"]["max_tokens"],
                "rpm": 100_000,  # the benchmark's pace is not a provider's limit (the default is 60 a minute)
                "tpm": 100_000_000,
            }

        data = {
            **self.base.model_dump(),  # config.toml's [interpret]: deadline, retry policy, breakers, hedging
            "cache_ttl_s": 0,  # every request goes to the providers, as LiteLLM's do (no cache configured there)
            "providers": {"primary": provider(primary, 1), "fallback": provider(fallback, 2)},
        }
        cfg = self.InterpretSection.model_validate(data)
        slots = self.build_slots(cfg, {"BENCH_KEY": spec["key"]}, clock=self.clock, wall=time.time)
        ledger = self.SpendLedger(self.store, budget=None, wall=time.time)
        chain = self.Chain(
            cfg,
            slots,
            session=self.session,
            ledger=ledger,
            cache=None,
            store=self.store,
            clock=self.clock,
            rng=self.random.Random(1),
        )

        async def ask() -> dict[str, Any]:
            try:
                out = await chain.interpret(spec["text"], self.registry, self.local)
            except self.not_understood as err:
                return {"error": f"{type(err).__module__}.{type(err).__qualname__}", "message": str(err)[:400]}
            tried = {t["provider"]: t.get("attempts", 0) for t in out.tried}
            return {"answer": out.command.to_api(), "by": out.provider, "degraded": out.degraded, "tried": tried}

        return ask

    async def close(self) -> None:
        await self.session.close()
        await self.store.close()
        self.tmp.cleanup()


async def main_async(spec: dict[str, Any]) -> None:
    side: Side = LiteLLMSide() if spec["side"] == "litellm" else GatewaydSide()
    await side.start(spec)
    scenarios = spec["scenarios"]
    ask = await side.router(scenarios[0]["primary"], scenarios[0]["fallback"])
    emit(ready=True, rss=rss_kib())  # imported, built: ready to serve
    first = await ask()  # what is imported lazily on the first request (LiteLLM: its MCP handler) is paid here
    emit(first=first, rss=rss_kib())

    import aiohttp  # both sides have it (LiteLLM depends on it): the floor is measured with the same client

    headers = {"Authorization": f"Bearer {spec['key']}"}
    async with aiohttp.ClientSession() as session:

        async def bare() -> float:
            """One plain POST of the same body to a healthy fake: the floor under every figure."""
            started = time.perf_counter()
            async with session.post(f"{spec['bare']}/chat/completions", json=spec["body"], headers=headers) as resp:
                data = await resp.json()
            elapsed = time.perf_counter() - started
            if resp.status != 200 or not data["choices"][0]["message"].get("tool_calls"):
                raise RuntimeError(f"the plain POST got HTTP {resp.status}: {str(data)[:200]}")
            return elapsed

        await bare()  # its connection made, as the routers' are by their first request
        for sc in scenarios:
            ask = await side.router(sc["primary"], sc["fallback"])  # request 1 meets the fault for the first time
            latencies, outcomes, floor = [], [], []
            for _ in range(sc["requests"]):
                if sc["name"] == "healthy":  # interleaved, so that the floor and the requests share the noise
                    floor.append(await bare())
                started = time.perf_counter()
                outcome = await ask()
                latencies.append(time.perf_counter() - started)
                outcomes.append(outcome)
            emit(scenario=sc["name"], latencies=latencies, outcomes=outcomes, floor=floor, rss=rss_kib())
    await side.close()
    emit(done=True, rss=rss_kib(), connects=dict(CONNECTS), refused=REFUSED)


def main() -> int:
    sys.addaudithook(_audit)
    spec = json.load(sys.stdin)
    asyncio.run(main_async(spec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
