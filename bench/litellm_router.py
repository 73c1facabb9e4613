"""Side by side: gatewayd's provider failover chain and LiteLLM's Router, doing the same job against the same fakes.

The job: two OpenAI-compatible deployments of one model, the first the primary and the second the fallback, the
same request (the daemon's own system prompt, tools and text), 3 attempts per provider (LiteLLM: ``num_retries=2``)
and 4 s per attempt (LiteLLM: ``timeout=4``). gatewayd's side is its interpret chain as the daemon builds it from
config.toml (retry policy with jittered pauses, breakers, a SQLite store for the spend ledger, the local rules);
LiteLLM's side is ``litellm.Router`` with the two deployments as ``order`` 1 and 2 of one model group
(``--litellm-routing fallbacks``: two model groups, the second in the first's ``fallbacks``). Failures are met
afresh by every request: gatewayd's breakers are reset before each, LiteLLM's Router has ``disable_cooldowns``.

The fake providers are real HTTP servers on 127.0.0.1 (gatewayd.interpret.simulator) served by this process,
answering after ``--latency``; each side runs in fresh processes of its own (bench/failover_driver.py), gatewayd's
with this venv's python, LiteLLM's with ``.venv-litellm/bin/python``, a venv this script makes with pip on first
use and reuses after (LiteLLM is never a dependency of gatewayd). Scenarios, after one warm-up request each:

- healthy (``--requests``): both providers answer; overhead = median latency - the provider latency;
- refused (``--fault-requests``, as the rest): nothing listens on the primary's port; overhead as above;
- 503, 429: the primary answers every request at once with that status (no Retry-After); as above;
- all down: nothing listens on either port: how long until the caller has an answer, and what it is.

Figures per side, medians over ``--runs`` fresh processes: the time from spawning the process until it is ready
to serve (imports, router or chain built) and until its first answer, RSS then and after the requests, the
overheads, attempts per request at each provider and the pauses between them (counted by the fakes), and the
ratio gatewayd/LiteLLM of each. Nothing leaves the machine: each driver refuses and reports any connection or
name lookup that is not loopback, and the run fails if there was one.

    .venv/bin/python bench/litellm_router.py [--runs 3] [--requests 20] [--fault-requests 8] [--json PATH]
        [--retry-base S] [--litellm-routing order|fallbacks] [--latency 0.05] [--logs DIR]

Exit status: 0 measured; 1 a side misbehaved (a wrong answer, a network attempt, a crash); 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import report  # bench/report.py: the script's own directory is on sys.path

from gatewayd.config import load_config
from gatewayd.config.models import ProviderConfig, RetrySettings
from gatewayd.interpret.providers import OpenAIProvider, Prompt
from gatewayd.interpret.registry import Registry
from gatewayd.interpret.rules import load_rules
from gatewayd.interpret.simulator import FakeProvider, Fault

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "config.toml"
DRIVER = Path(__file__).resolve().parent / "failover_driver.py"
LITELLM_VENV = ROOT / ".venv-litellm"
# 1.106.3 and later 1.106.x need a certifi newer than the registry here serves; 1.107.0 was a compromised release.
LITELLM_PIN = "1.106.2"
# The "mcp" extra: without it LiteLLM 1.106.2 fails every request that has tools (its MCP handler imports the mcp
# package whenever tools are present) with APIConnectionError "No module named 'mcp'", after retrying it.
LITELLM_REQUIREMENT = f"litellm[mcp]=={LITELLM_PIN}"
KEY = "sk-bench-0123456789"
MODEL = "fake-model"
TEXT = "set the irrigation pump speed to 40 percent"  # the fake answers it, and so do the local rules
ANSWER: dict[str, Any] = {"device": "pump1", "action": "set_speed", "params": {"percent": 40}}
ATTEMPTS = 3  # per provider: gatewayd retry.max_attempts, LiteLLM num_retries + 1
TIMEOUT_S = 4.0  # one attempt: gatewayd timeout_s, LiteLLM timeout
WARMUP = 1  # requests before each scenario's measured ones
DRIVER_TIMEOUT_S = 240.0
SIDES = ("gatewayd", "litellm")
SCENARIOS = ("healthy", "refused", "http503", "http429", "all_down")


class BenchError(Exception):
    """A side answered otherwise than the figure assumes, tried the network, or crashed."""


@dataclass
class SideRun:
    """What one fresh process of one side measured."""

    ready_s: float  # spawn until ready to serve (imports done, router or chain built)
    first_s: float  # spawn until the first request was answered
    rss_ready_mib: float
    rss_after_mib: float  # after the healthy scenario's requests
    peak_rss_mib: float  # VmHWM after every scenario
    latency_ms: dict[str, float]  # median per scenario
    outcomes: dict[str, dict[str, int]]  # per scenario: what the caller got, counted
    primary_attempts: dict[str, float]  # per request, at the primary (its server's count, or connection attempts)
    fallback_attempts: dict[str, float]  # the same at the fallback
    retry_pause_ms: dict[str, float | None]  # median pause between two attempts at a failing primary (503, 429)
    log_lines: int  # what the side wrote to stderr


@dataclass
class RunResult:
    run: int
    gw_ready_s: float
    ll_ready_s: float
    gw_first_s: float
    ll_first_s: float
    gw_rss_ready_mib: float
    ll_rss_ready_mib: float
    gw_rss_after_mib: float
    ll_rss_after_mib: float
    gw_peak_rss_mib: float
    ll_peak_rss_mib: float
    bare_ms: float
    gw_overhead_ms: float
    ll_overhead_ms: float
    gw_refused_ms: float
    ll_refused_ms: float
    gw_503_ms: float
    ll_503_ms: float
    gw_429_ms: float
    ll_429_ms: float
    gw_all_down_ms: float
    ll_all_down_ms: float
    ready_x: float
    first_x: float
    rss_ready_x: float
    rss_after_x: float
    overhead_x: float
    refused_x: float
    http503_x: float
    http429_x: float
    all_down_x: float
    sides: dict[str, SideRun] = field(default_factory=dict)


def rows(requests: int) -> list[report.Row]:
    return [
        ("spawn to ready, gatewayd (s)", "gw_ready_s", "{:.3f}"),
        ("spawn to ready, LiteLLM (s)", "ll_ready_s", "{:.3f}"),
        ("spawn to first answer, gatewayd (s)", "gw_first_s", "{:.3f}"),
        ("spawn to first answer, LiteLLM (s)", "ll_first_s", "{:.3f}"),
        ("RSS when ready, gatewayd (MiB)", "gw_rss_ready_mib", "{:.1f}"),
        ("RSS when ready, LiteLLM (MiB)", "ll_rss_ready_mib", "{:.1f}"),
        (f"RSS after {requests + WARMUP + 1} requests, gatewayd (MiB)", "gw_rss_after_mib", "{:.1f}"),
        (f"RSS after {requests + WARMUP + 1} requests, LiteLLM (MiB)", "ll_rss_after_mib", "{:.1f}"),
        ("peak RSS, every scenario, gatewayd (MiB)", "gw_peak_rss_mib", "{:.1f}"),
        ("peak RSS, every scenario, LiteLLM (MiB)", "ll_peak_rss_mib", "{:.1f}"),
        ("plain aiohttp POST, over the latency (ms)", "bare_ms", "{:.2f}"),
        ("per-request overhead, gatewayd (ms)", "gw_overhead_ms", "{:.2f}"),
        ("per-request overhead, LiteLLM (ms)", "ll_overhead_ms", "{:.2f}"),
        ("failover, primary refused, gatewayd (ms)", "gw_refused_ms", "{:.1f}"),
        ("failover, primary refused, LiteLLM (ms)", "ll_refused_ms", "{:.1f}"),
        ("failover, primary 503, gatewayd (ms)", "gw_503_ms", "{:.1f}"),
        ("failover, primary 503, LiteLLM (ms)", "ll_503_ms", "{:.1f}"),
        ("failover, primary 429, gatewayd (ms)", "gw_429_ms", "{:.1f}"),
        ("failover, primary 429, LiteLLM (ms)", "ll_429_ms", "{:.1f}"),
        ("all down: answer after, gatewayd (ms)", "gw_all_down_ms", "{:.1f}"),
        ("all down: answer after, LiteLLM (ms)", "ll_all_down_ms", "{:.1f}"),
        ("gatewayd / LiteLLM: spawn to ready", "ready_x", "{:.3f}"),
        ("gatewayd / LiteLLM: spawn to first answer", "first_x", "{:.3f}"),
        ("gatewayd / LiteLLM: RSS when ready", "rss_ready_x", "{:.3f}"),
        ("gatewayd / LiteLLM: RSS after the requests", "rss_after_x", "{:.3f}"),
        ("gatewayd / LiteLLM: per-request overhead", "overhead_x", "{:.3f}"),
        ("gatewayd / LiteLLM: failover, refused", "refused_x", "{:.3f}"),
        ("gatewayd / LiteLLM: failover, 503", "http503_x", "{:.3f}"),
        ("gatewayd / LiteLLM: failover, 429", "http429_x", "{:.3f}"),
        ("gatewayd / LiteLLM: all down", "all_down_x", "{:.3f}"),
    ]


# --- LiteLLM's venv ---------------------------------------------------------------------------------------------


def litellm_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def installed_litellm(venv: Path) -> str | None:
    """LiteLLM's version in the venv, if it is there with the mcp extra."""
    python = litellm_python(venv)
    if not python.exists():
        return None
    probe = "import importlib.metadata as m; m.version('mcp'); print(m.version('litellm'))"
    done = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=False)
    return done.stdout.strip() if done.returncode == 0 else None


def ensure_litellm(venv: Path) -> str:
    """LiteLLM ``LITELLM_PIN`` in a venv of its own, made with pip on first use; reused while it has that version."""
    have = installed_litellm(venv)
    if have == LITELLM_PIN:
        return have
    print(f"installing {LITELLM_REQUIREMENT} into {venv} (once; about a minute) ...", file=sys.stderr, flush=True)
    if not litellm_python(venv).exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(litellm_python(venv)), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    done = subprocess.run([*pip, LITELLM_REQUIREMENT], capture_output=True, text=True, check=False)
    have = installed_litellm(venv)
    if have != LITELLM_PIN:
        tail = "\n".join(line for line in done.stderr.splitlines() if not line.startswith("WARNING: Location"))
        raise BenchError(f"could not install {LITELLM_REQUIREMENT} into {venv}: {tail[-1500:]}")
    return have


# --- the job ----------------------------------------------------------------------------------------------------


def load_job() -> tuple[dict[str, Any], RetrySettings]:
    """The chat request gatewayd sends for TEXT (system prompt, tools, tool_choice), for LiteLLM to send too, and
    config.toml's retry policy for the providers."""
    loaded = load_config(CONFIG, environ={})
    profiles = {name: loaded.profiles[dev.profile] for name, dev in loaded.config.devices.items()}
    rules, problems = load_rules(loaded.config.interpret.rules_file, profiles)
    if problems:
        raise BenchError(f"the rules file has problems: {problems}")
    descriptions = {name: dev.description for name, dev in loaded.config.devices.items()}
    registry = Registry.build(profiles, descriptions, rules)
    cfg = {"type": "openai", "base_url": "http://127.0.0.1:1/v1", "model": MODEL}
    provider = OpenAIProvider("bench", ProviderConfig.model_validate(cfg), KEY)
    body = provider.request_body(Prompt(registry.prompt, TEXT, registry.tools, 256))
    return body, loaded.config.interpret.retry


class Fakes:
    """The providers the scenarios point at, each scenario its own, so requests are counted per scenario."""

    def __init__(self, latency_s: float):
        self.latency_s = latency_s
        self.servers: dict[str, FakeProvider] = {}
        self.urls: dict[str, tuple[str, str]] = {}  # scenario -> (primary, fallback)
        self.bare = ""

    def fake(self, name: str, fault: Fault | None = None) -> FakeProvider:
        # A failing primary answers at once (a proxy's 503, a 429): what it costs is the library's doing.
        latency = 0.0 if fault is not None else self.latency_s
        fake = FakeProvider("openai", api_key=KEY, model=MODEL, default=ANSWER, latency_s=latency)
        fake.always = fault
        self.servers[name] = fake
        return fake

    async def __aenter__(self) -> Fakes:
        refused = [f"http://127.0.0.1:{port}/v1" for port in closed_ports(3)]
        pairs: dict[str, tuple[FakeProvider | str, FakeProvider | str]] = {
            "healthy": (self.fake("healthy.primary"), self.fake("healthy.fallback")),
            "refused": (refused[0], self.fake("refused.fallback")),
            "http503": (self.fake("http503.primary", Fault.http(503)), self.fake("http503.fallback")),
            "http429": (self.fake("http429.primary", Fault.http(429)), self.fake("http429.fallback")),
            "all_down": (refused[1], refused[2]),
        }
        bare = self.fake("bare")
        for fake in self.servers.values():
            await fake.__aenter__()
        for name, (primary, fallback) in pairs.items():
            self.urls[name] = (url_of(primary), url_of(fallback))
        self.bare = bare.base_url
        return self

    async def __aexit__(self, *exc: object) -> None:
        for fake in self.servers.values():
            await fake.__aexit__(None, None, None)

    def counts(self) -> dict[str, int]:
        """Completion requests each fake has received, by ``scenario.primary`` / ``scenario.fallback``."""
        return {name: len(fake.completions()) for name, fake in self.servers.items()}

    def pauses_ms(self, name: str, since: int, attempts: int) -> float | None:
        """The median pause between attempts at a fake, its requests since ``since`` taken ``attempts`` at a time
        (one caller's request); None unless every request made exactly that many."""
        times = [seen.at for seen in self.servers[name].completions()[since:]]
        if not times or len(times) % attempts:
            return None
        gaps = [b - a for i in range(0, len(times), attempts) for a, b in itertools.pairwise(times[i : i + attempts])]
        return statistics.median(gaps) * 1000 if gaps else None


def url_of(provider: FakeProvider | str) -> str:
    return provider.base_url if isinstance(provider, FakeProvider) else provider


def closed_ports(n: int) -> list[int]:
    """Loopback ports nothing listens on (bound together, so distinct): connections to them are refused."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def spec_for(side: str, args: argparse.Namespace, fakes: Fakes, body: dict[str, Any]) -> dict[str, Any]:
    scenarios = [
        {
            "name": name,
            "primary": fakes.urls[name][0],
            "fallback": fakes.urls[name][1],
            "requests": args.requests if name == "healthy" else args.fault_requests,
        }
        for name in SCENARIOS
    ]
    return {
        "side": side,
        "config": str(CONFIG),
        "model": MODEL,
        "key": KEY,
        "text": TEXT,
        "body": body,
        "attempts": ATTEMPTS,
        "timeout_s": TIMEOUT_S,
        "warmup": WARMUP,
        "scenarios": scenarios,
        "bare": fakes.bare,
        "routing": args.litellm_routing,
        "retry": {} if args.retry_base is None else {"base_s": args.retry_base},
    }


def mib(kib: int) -> float:
    return kib / 1024


def is_answer(answer: Any) -> bool:
    """ANSWER, the defaults gatewayd's validation fills in (``ramp_s``) aside."""
    if not isinstance(answer, dict) or not isinstance(answer.get("params"), dict):
        return False
    same = all(answer.get(k) == ANSWER[k] for k in ("device", "action"))
    return same and ANSWER["params"].items() <= answer["params"].items()


def problem_with(side: str, scenario: str, outcome: dict[str, Any]) -> str | None:
    """What is wrong with an outcome, or None. Every scenario but 'all down' must end in the right provider's
    answer; all down, gatewayd must answer from its local rules, LiteLLM may raise (its exception is the figure)."""
    if scenario == "all_down":
        if side == "litellm" and "error" in outcome:
            return None
        if side == "gatewayd" and outcome.get("by") == "local" and is_answer(outcome.get("answer")):
            return None
        return f"all down: got {json.dumps(outcome)[:400]}"
    want = "primary" if scenario in ("healthy", "first") else "fallback"
    if not is_answer(outcome.get("answer")) or outcome.get("by") != want:
        return f"{scenario}: expected the {want}'s answer {ANSWER}, got {json.dumps(outcome)[:400]}"
    return None


def summary(outcome: dict[str, Any]) -> str:
    if "error" in outcome:
        return str(outcome["error"])
    return f"answer from {outcome['by']}" + (" (degraded)" if outcome.get("degraded") else "")


def log_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8", errors="replace").splitlines()


def port_of(url: str) -> str:
    return url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1]


async def drive(python: Path, spec: dict[str, Any], log_path: Path, env: dict[str, str]) -> list[tuple[float, Any]]:
    """Run one driver; its records, each with the time since spawn it arrived at."""
    with log_path.open("wb") as log:
        started = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            str(python),
            str(DRIVER),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
            env=env,
            cwd=str(ROOT),
        )
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps(spec).encode())
        proc.stdin.close()
        records = []
        try:
            async with asyncio.timeout(DRIVER_TIMEOUT_S):
                async for line in proc.stdout:
                    records.append((time.perf_counter() - started, json.loads(line)))
                code = await proc.wait()
        except BaseException:
            proc.kill()
            await proc.wait()
            raise
    if code != 0 or not records or "done" not in records[-1][1]:
        tail = "\n    ".join(log_lines(log_path)[-15:])
        raise BenchError(f"{spec['side']}: the driver exited {code}; its last log lines:\n    {tail}")
    return records


async def run_side(
    side: str, python: Path, spec: dict[str, Any], fakes: Fakes, log_path: Path, env: dict[str, str]
) -> tuple[SideRun, dict[str, Any]]:
    before = fakes.counts()
    try:
        records = await drive(python, spec, log_path, env)
    except TimeoutError:
        raise BenchError(f"{side}: the driver did not finish within {DRIVER_TIMEOUT_S:g} s") from None
    after = fakes.counts()
    at = {next(iter(r)): (t, r) for t, r in records}  # by the record's first key: ready, first, scenario, done
    done = at["done"][1]
    if done["refused"]:
        raise BenchError(f"{side}: tried to reach beyond this machine: {done['refused']}")
    first = at["first"][1]["first"]
    problem = problem_with(side, "first", first)
    if problem is not None:
        raise BenchError(f"{side}: {problem}")
    by_scenario = {r["scenario"]: r for _, r in records if "scenario" in r}
    latency: dict[str, float] = {}
    outcomes: dict[str, dict[str, int]] = {}
    attempts: dict[str, dict[str, float]] = {"primary": {}, "fallback": {}}
    for sc in spec["scenarios"]:
        name = sc["name"]
        r = by_scenario[name]
        for outcome in r["outcomes"]:
            problem = problem_with(side, name, outcome)
            if problem is not None:
                raise BenchError(f"{side}: {problem}")
        latency[name] = statistics.median(r["latencies"]) * 1000
        outcomes[name] = dict(Counter(summary(o) for o in r["outcomes"]))
        asked = spec["warmup"] + len(r["outcomes"]) + (1 if name == "healthy" else 0)  # + the first request
        for role in ("primary", "fallback"):
            server = f"{name}.{role}"
            if server in after:
                count = after[server] - before[server]
            else:  # a port that refuses: the driver counted its connection attempts
                count = done["connects"].get(f"127.0.0.1:{port_of(sc[role])}", 0)
            attempts[role][name] = count / asked
    pauses = {
        name: fakes.pauses_ms(f"{name}.primary", before[f"{name}.primary"], ATTEMPTS) for name in ("http503", "http429")
    }
    if side == "gatewayd":
        bare = by_scenario["bare"]
        if not all(o == {"status": 200, "has_tool_call": True} for o in bare["outcomes"]):
            raise BenchError(f"the plain POST got {bare['outcomes'][:2]}")
        latency["bare"] = statistics.median(bare["latencies"]) * 1000
    run = SideRun(
        ready_s=at["ready"][0],
        first_s=at["first"][0],
        rss_ready_mib=mib(at["ready"][1]["rss"]["VmRSS"]),
        rss_after_mib=mib(by_scenario["healthy"]["rss"]["VmRSS"]),
        peak_rss_mib=mib(done["rss"]["VmHWM"]),
        latency_ms=latency,
        outcomes=outcomes,
        primary_attempts=attempts["primary"],
        fallback_attempts=attempts["fallback"],
        retry_pause_ms=pauses,
        log_lines=len(log_lines(log_path)),
    )
    return run, by_scenario["all_down"]["outcomes"][0]


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


async def one_run(
    run: int, args: argparse.Namespace, fakes: Fakes, body: dict[str, Any], logs: Path
) -> tuple[RunResult, dict[str, Any]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LITELLM", "OPENAI", "PYTHON"))}
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # the same imports every run: neither side gets to cache bytecode anew
    pythons = {"gatewayd": Path(sys.executable), "litellm": litellm_python(args.litellm_venv)}
    sides: dict[str, SideRun] = {}
    all_down: dict[str, Any] = {}
    for side in SIDES:
        spec = spec_for(side, args, fakes, body)
        sides[side], all_down[side] = await run_side(
            side, pythons[side], spec, fakes, logs / f"run{run}-{side}.log", env
        )
    gw, ll = sides["gatewayd"], sides["litellm"]
    base = args.latency * 1000

    def over(s: SideRun, name: str) -> float:
        return s.latency_ms[name] - (0.0 if name == "all_down" else base)

    result = RunResult(
        run=run,
        gw_ready_s=gw.ready_s,
        ll_ready_s=ll.ready_s,
        gw_first_s=gw.first_s,
        ll_first_s=ll.first_s,
        gw_rss_ready_mib=gw.rss_ready_mib,
        ll_rss_ready_mib=ll.rss_ready_mib,
        gw_rss_after_mib=gw.rss_after_mib,
        ll_rss_after_mib=ll.rss_after_mib,
        gw_peak_rss_mib=gw.peak_rss_mib,
        ll_peak_rss_mib=ll.peak_rss_mib,
        bare_ms=over(gw, "bare"),
        gw_overhead_ms=over(gw, "healthy"),
        ll_overhead_ms=over(ll, "healthy"),
        gw_refused_ms=over(gw, "refused"),
        ll_refused_ms=over(ll, "refused"),
        gw_503_ms=over(gw, "http503"),
        ll_503_ms=over(ll, "http503"),
        gw_429_ms=over(gw, "http429"),
        ll_429_ms=over(ll, "http429"),
        gw_all_down_ms=over(gw, "all_down"),
        ll_all_down_ms=over(ll, "all_down"),
        ready_x=ratio(gw.ready_s, ll.ready_s),
        first_x=ratio(gw.first_s, ll.first_s),
        rss_ready_x=ratio(gw.rss_ready_mib, ll.rss_ready_mib),
        rss_after_x=ratio(gw.rss_after_mib, ll.rss_after_mib),
        overhead_x=ratio(over(gw, "healthy"), over(ll, "healthy")),
        refused_x=ratio(over(gw, "refused"), over(ll, "refused")),
        http503_x=ratio(over(gw, "http503"), over(ll, "http503")),
        http429_x=ratio(over(gw, "http429"), over(ll, "http429")),
        all_down_x=ratio(over(gw, "all_down"), over(ll, "all_down")),
        sides=sides,
    )
    return result, all_down


NOTES = """\
Overheads: a scenario's median request latency (time.perf_counter around the call, in the side's own process)
less the answering provider's {latency:g} ms; 'all down' is the whole median latency, until the caller has an
answer or an exception. The plain POST row is the floor under both: the same request sent by aiohttp alone.
gatewayd's chain also validates the answer against the device profiles and records the spend in SQLite;
LiteLLM's Router returns the completion. 'spawn to ready': the process started until its router (chain) is
built, imports included; 'first answer': until its first request was answered (what a side imports lazily on
its first request counts here). RSS is VmRSS then, and after the healthy scenario; peak is VmHWM at the end."""


def shown(path: Path) -> str:
    """A path relative to the repository when it is inside it."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def render(
    results: list[RunResult],
    all_down: dict[str, Any],
    args: argparse.Namespace,
    retry: RetrySettings,
    version: str,
    wall_s: float,
) -> str:
    base_s = retry.base_s if args.retry_base is None else args.retry_base
    load = (
        f"fake OpenAI-compatible providers on loopback (gatewayd.interpret.simulator) answering after "
        f"{args.latency * 1000:g} ms, failing ones at once; per run and side one fresh process: {args.requests} "
        f"healthy requests and {args.fault_requests} per fault scenario, after {WARMUP} warm-up; {args.runs} run(s), "
        f"{wall_s:.1f} s in all; {ATTEMPTS} attempts per provider, {TIMEOUT_S:g} s per attempt. gatewayd: pauses "
        f"{retry.jitter} jitter, base {base_s:g} s, cap {retry.cap_s:g} s"
        f"{' (config.toml)' if args.retry_base is None else ' (--retry-base)'}; LiteLLM {version} (with its mcp "
        f"extra, in {shown(args.litellm_venv)}): Router, routing '{args.litellm_routing}', "
        f"num_retries={ATTEMPTS - 1}, timeout={TIMEOUT_S:g}, its own pauses"
    )
    lines = report.header("gatewayd failover chain vs LiteLLM Router", report.machine_info(), load)
    lines += report.runs_table(rows(args.requests), results)
    last = results[-1]
    lines += ["", NOTES.format(latency=args.latency * 1000), ""]
    lines.append(
        f"What each side did in run {last.run}: attempts per request at the primary / the fallback, the median"
    )
    lines.append("pause between two attempts at a failing primary (at the fake), and what the caller got:")
    for side in SIDES:
        s = last.sides[side]
        lines.append(f"  {side}:")
        for name in SCENARIOS:
            outs = ", ".join(f"{what} x{n}" for what, n in s.outcomes[name].items())
            tries = f"{s.primary_attempts[name]:.2f} / {s.fallback_attempts[name]:.2f}"
            pause = s.retry_pause_ms.get(name)
            paused = f"pause {pause:6.1f} ms" if pause is not None else ""
            lines.append(f"    {name:<9} {tries:>11}  {paused:>15}   {outs}")
    lines.append("All down, what the caller gets:")
    for side in SIDES:
        ex = all_down[side]
        what = f"{ex['error']}: {ex['message']}" if "error" in ex else json.dumps(ex)
        lines.append(f"  {side}: {what[:400]}")
    return "\n".join(lines)


def summary_rows(
    median: dict[str, float], all_down: dict[str, Any], args: argparse.Namespace, retry: RetrySettings
) -> list[list[str]]:
    """The headline figures for bench/all.py's summary table: [label, value] pairs, gatewayd first."""
    m = median
    base_s = retry.base_s if args.retry_base is None else args.retry_base
    ll_pauses = "retries at once" if args.litellm_routing == "order" else "exponential backoff between retries"
    n = args.requests + WARMUP + 1
    gw_down = all_down["gatewayd"]
    gw_answer = f"answers from its {gw_down.get('by', '?')} rules" if "error" not in gw_down else gw_down["error"]
    ll_down = all_down["litellm"]
    ll_answer = f"raises {ll_down['error'].rsplit('.', 1)[-1]}" if "error" in ll_down else "answers"
    return [
        [
            "vs LiteLLM Router: spawn to first answer, gatewayd / LiteLLM (s)",
            f"{m['gw_first_s']:.2f} / {m['ll_first_s']:.2f}",
        ],
        [
            f"vs LiteLLM Router: RSS after {n} requests, gatewayd / LiteLLM (MiB)",
            f"{m['gw_rss_after_mib']:.1f} / {m['ll_rss_after_mib']:.1f}",
        ],
        [
            f"vs LiteLLM Router: per-request overhead over a {args.latency * 1000:g} ms provider, gatewayd / LiteLLM "
            "(ms)",
            f"{m['gw_overhead_ms']:.2f} / {m['ll_overhead_ms']:.2f}",
        ],
        [
            "vs LiteLLM Router: failover from a refusing / 503 / 429 primary, gatewayd (ms; full-jitter pauses "
            f"between retries, base {base_s:g} s)",
            f"{m['gw_refused_ms']:.0f} / {m['gw_503_ms']:.0f} / {m['gw_429_ms']:.0f}",
        ],
        [
            f"vs LiteLLM Router: the same, LiteLLM (ms; routing '{args.litellm_routing}': {ll_pauses})",
            f"{m['ll_refused_ms']:.0f} / {m['ll_503_ms']:.0f} / {m['ll_429_ms']:.0f}",
        ],
        [
            "vs LiteLLM Router: every provider down",
            f"gatewayd {gw_answer} after {m['gw_all_down_ms']:.0f} ms; LiteLLM {ll_answer} after "
            f"{m['ll_all_down_ms']:.0f} ms",
        ],
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=3, help="fresh processes per side; medians over them (default 3)")
    parser.add_argument("--requests", type=int, default=20, help="healthy requests per run (default 20)")
    parser.add_argument("--fault-requests", type=int, default=8, help="requests per fault scenario (default 8)")
    parser.add_argument("--latency", type=float, default=0.05, help="the fake providers' latency, s (default 0.05)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures as JSON to PATH")
    parser.add_argument("--logs", type=Path, metavar="DIR", help="keep each driver's stderr in DIR")
    parser.add_argument(
        "--retry-base",
        type=float,
        metavar="S",
        help="gatewayd's retry base_s instead of config.toml's (0: retry at once, as LiteLLM does with 'order')",
    )
    parser.add_argument(
        "--litellm-routing",
        choices=("order", "fallbacks"),
        default="order",
        help="LiteLLM's set-up: one model group with deployments of order 1 and 2 (default), or two model groups, "
        "the second in the first's fallbacks",
    )
    parser.add_argument(
        "--litellm-venv", type=Path, default=LITELLM_VENV, help="LiteLLM's own venv (default .venv-litellm)"
    )
    args = parser.parse_args(argv)
    if not 0 < args.latency <= 2:
        parser.error("--latency must be above 0 and at most 2")
    if args.retry_base is not None and not 0 <= args.retry_base <= 2:
        parser.error("--retry-base must be from 0 to 2")
    for name, hi in (("runs", 20), ("requests", 1000), ("fault_requests", 100)):
        if not 1 <= getattr(args, name) <= hi:
            parser.error(f"--{name.replace('_', '-')} must be from 1 to {hi}")
    return args


async def bench(args: argparse.Namespace, body: dict[str, Any]) -> tuple[list[RunResult], dict[str, Any]]:
    main_task = asyncio.current_task()
    assert main_task is not None
    # SIGTERM cleans up like Ctrl-C: the driver running is killed, the fakes stopped, the temp dir removed.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    results: list[RunResult] = []
    all_down: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="gatewayd-bench-litellm-") as tmp:
        logs = args.logs or Path(tmp)
        logs.mkdir(parents=True, exist_ok=True)
        async with Fakes(args.latency) as fakes:
            for run in range(1, args.runs + 1):
                print(f"run {run}/{args.runs} ...", file=sys.stderr, flush=True)
                result, all_down = await one_run(run, args, fakes, body, logs)
                results.append(result)
    return results, all_down


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    machine = report.machine_info()
    try:
        version = ensure_litellm(args.litellm_venv)
        body, retry = load_job()
        started = time.monotonic()
        results, all_down = asyncio.run(bench(args, body))
    except BenchError as err:
        print(f"litellm_router: FAILED: {err}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("litellm_router: interrupted; the drivers were killed", file=sys.stderr)
        return 130
    print(render(results, all_down, args, retry, version, time.monotonic() - started))
    if args.json is not None:
        median = report.medians(rows(args.requests), results)
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "json"}
        payload = {
            "machine": machine,
            "command_line": shlex.join(sys.orig_argv),
            "settings": {
                **settings,
                "litellm": LITELLM_REQUIREMENT.replace(LITELLM_PIN, version),
                "attempts": ATTEMPTS,
                "timeout_s": TIMEOUT_S,
                "warmup": WARMUP,
                "gatewayd_retry": retry.model_dump() | ({} if args.retry_base is None else {"base_s": args.retry_base}),
            },
            "runs": [asdict(r) for r in results],
            "median": median,
            "passed": True,  # a run that failed a check exits 1 without figures
            "summary": summary_rows(median, all_down, args, retry),
            "all_down_answers": all_down,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
