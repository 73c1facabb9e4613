"""Side by side: gatewayd's provider failover chain and LiteLLM's Router, doing the same job against the same fakes.

The job: two OpenAI-compatible deployments of one model, the first the primary and the second the fallback, the
same request (the daemon's own system prompt, tools and text), 2 s per attempt on every side. Three
configurations, each in fresh processes of its own (bench/failover_driver.py), each stated in the output:

- gatewayd: its interpret chain as the daemon builds it from config.toml's [interpret] (deadline, retry policy,
  breakers, hedging: fail over first, retry later), a SQLite store for the spend ledger, the local rules;
- LiteLLM, defaults: ``litellm.Router`` as its documentation sets up failover, two model groups, the second in the
  first's ``fallbacks``, with LiteLLM's default retries (2), allowed fails (3) and cooldowns (5 s); only
  ``timeout`` is set (its default is 6000 s);
- LiteLLM, order: the tuned setup, one model group with the deployments as ``order`` 1 and 2, ``num_retries=2``,
  cooldowns on.

The fake providers are real HTTP servers on 127.0.0.1 (gatewayd.interpret.simulator) served by this process, the
healthy ones answering after ``--latency``, the failing ones at once. Every scenario gets a fresh router (chain):
its request 1 meets the fault for the first time, and what it learnt (cooldowns, breakers) carries over to
request 2 and the rest ("steady", the median of requests 3 and on). Scenarios:

- healthy: both providers answer; the overhead is the median latency less a plain aiohttp POST of the same body
  to a healthy fake from the same process (the floor, measured interleaved with the requests);
- refused: nothing listens on the primary's port;
- http500, http503: the primary answers every request at once with that status;
- http429: the primary answers 429 with ``Retry-After: 1``;
- hang: the primary accepts the request and never answers (the attempt timeout, 2 s, ends it);
- all down: nothing listens on either port: how long until the caller has an answer, and what it is.

Per configuration and run: spawn to ready and to the first answer, RSS, and per scenario requests 1, 2 and steady,
who answered and the attempts per request at each provider (counted by the fakes, or by the driver's connection
attempts to a closed port). Nothing leaves the machine: each driver refuses and reports any connection or name
lookup that is not loopback, and the run fails if there was one. When LiteLLM cannot be installed, its
configurations are skipped (said so in the output) and gatewayd's table is still measured.

    .venv/bin/python bench/litellm_router.py [--runs 1] [--requests 20] [--fault-requests 5] [--latency 0.05]
        [--only gatewayd,litellm-defaults,litellm-order] [--json PATH] [--logs DIR]

Exit status: 0 measured; 1 a side misbehaved (a wrong answer, a network attempt, a crash); 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import report  # bench/report.py: the script's own directory is on sys.path
from report import BenchError

from gatewayd.config import load_config
from gatewayd.config.models import InterpretSection, ProviderConfig
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
ATTEMPTS = 3  # LiteLLM's default: num_retries 2, and 1 + 2 attempts; gatewayd's config.toml max_attempts
TIMEOUT_S = 2.0  # one attempt, every side: gatewayd timeout_s, LiteLLM timeout
DRIVER_TIMEOUT_S = 1200.0
CONFIGS: dict[str, tuple[str, str | None]] = {  # name -> (side, LiteLLM setup)
    "gatewayd": ("gatewayd", None),
    "litellm-defaults": ("litellm", "defaults"),
    "litellm-order": ("litellm", "order"),
}
SCENARIOS = ("healthy", "refused", "http500", "http503", "http429", "hang", "all_down")
FAULTS = {
    "healthy": "both answer",
    "refused": "refusing connections",
    "http500": "500",
    "http503": "503",
    "http429": "429 with Retry-After: 1",
    "hang": "hanging (timeout 2 s)",
    "all_down": "every provider down",
}


@dataclass
class Scenario:
    """One scenario of one configuration's run: latencies in ms, who answered, attempts per request."""

    r1_ms: float
    r2_ms: float
    steady_ms: float  # median of requests 3 and on
    answers: dict[str, int]  # what the callers got, counted
    primary_attempts: float  # per request
    fallback_attempts: float


@dataclass
class SideRun:
    """What one fresh process of one configuration measured."""

    config: str
    run: int
    ready_s: float  # spawn until ready to serve (imports done, router or chain built)
    first_s: float  # spawn until the first request was answered
    rss_ready_mib: float
    rss_after_mib: float  # after the healthy scenario
    peak_rss_mib: float  # VmHWM after every scenario
    floor_ms: float  # a plain aiohttp POST of the same body, median
    overhead_ms: float  # healthy, median of every request, less the floor
    scenarios: dict[str, Scenario]
    all_down: dict[str, Any]  # what the caller got, request 1
    log_lines: int  # what the side wrote to stderr


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


def load_job() -> tuple[dict[str, Any], InterpretSection]:
    """The chat request gatewayd sends for TEXT (system prompt, tools, tool_choice), for LiteLLM to send too, and
    config.toml's [interpret] settings."""
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
    return body, loaded.config.interpret


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
        faults = {
            "http500": Fault.http(500),
            "http503": Fault.http(503),
            "http429": Fault.http(429, retry_after="1"),
            "hang": Fault.hang(60),
        }
        pairs: dict[str, tuple[FakeProvider | str, FakeProvider | str]] = {
            "healthy": (self.fake("healthy.primary"), self.fake("healthy.fallback")),
            "refused": (refused[0], self.fake("refused.fallback")),
            **{name: (self.fake(f"{name}.primary", f), self.fake(f"{name}.fallback")) for name, f in faults.items()},
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


def spec_for(config: str, args: argparse.Namespace, fakes: Fakes, body: dict[str, Any]) -> dict[str, Any]:
    side, setup = CONFIGS[config]
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
        "setup": setup,
        "config": str(CONFIG),
        "model": MODEL,
        "key": KEY,
        "text": TEXT,
        "body": body,
        "attempts": ATTEMPTS,
        "timeout_s": TIMEOUT_S,
        "scenarios": scenarios,
        "bare": fakes.bare,
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
    """What is wrong with an outcome, or None. gatewayd must answer every scenario with the right provider's
    answer (the primary's when healthy, else the fallback's; all down, its local rules'). LiteLLM may raise (its
    exception is the figure) but must not give a wrong answer."""
    if "error" in outcome:
        return None if side == "litellm" else f"{scenario}: {json.dumps(outcome)[:400]}"
    if scenario == "all_down":
        want = "local"
    else:
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
    config: str, run: int, python: Path, spec: dict[str, Any], fakes: Fakes, log_path: Path, env: dict[str, str]
) -> SideRun:
    side = spec["side"]
    before = fakes.counts()
    try:
        records = await drive(python, spec, log_path, env)
    except TimeoutError:
        raise BenchError(f"{config}: the driver did not finish within {DRIVER_TIMEOUT_S:g} s") from None
    after = fakes.counts()
    at = {next(iter(r)): (t, r) for t, r in records}  # by the record's first key: ready, first, scenario, done
    done = at["done"][1]
    if done["refused"]:
        raise BenchError(f"{config}: tried to reach beyond this machine: {done['refused']}")
    problem = problem_with(side, "first", at["first"][1]["first"])
    if problem is not None:
        raise BenchError(f"{config}: {problem}")
    by_scenario = {r["scenario"]: r for _, r in records if "scenario" in r}
    scenarios: dict[str, Scenario] = {}
    for sc in spec["scenarios"]:
        name = sc["name"]
        r = by_scenario[name]
        for outcome in r["outcomes"]:
            problem = problem_with(side, name, outcome)
            if problem is not None:
                raise BenchError(f"{config}: {problem}")
        ms = [x * 1000 for x in r["latencies"]]
        attempts = {}
        for role in ("primary", "fallback"):
            server = f"{name}.{role}"
            if server in after:
                count = after[server] - before[server]
                if server == "healthy.primary":
                    count -= 1  # the process's first request, before the scenarios
            else:  # a port that refuses: the driver counted its connection attempts
                count = done["connects"].get(f"127.0.0.1:{port_of(sc[role])}", 0)
            attempts[role] = count / len(ms)
        scenarios[name] = Scenario(
            r1_ms=ms[0],
            r2_ms=ms[1] if len(ms) > 1 else float("nan"),
            steady_ms=statistics.median(ms[2:]) if len(ms) > 2 else float("nan"),
            answers=dict(Counter(summary(o) for o in r["outcomes"])),
            primary_attempts=attempts["primary"],
            fallback_attempts=attempts["fallback"],
        )
    healthy = by_scenario["healthy"]
    floor_ms = statistics.median(healthy["floor"]) * 1000
    return SideRun(
        config=config,
        run=run,
        ready_s=at["ready"][0],
        first_s=at["first"][0],
        rss_ready_mib=mib(at["ready"][1]["rss"]["VmRSS"]),
        rss_after_mib=mib(healthy["rss"]["VmRSS"]),
        peak_rss_mib=mib(done["rss"]["VmHWM"]),
        floor_ms=floor_ms,
        overhead_ms=statistics.median(healthy["latencies"]) * 1000 - floor_ms,
        scenarios=scenarios,
        all_down=by_scenario["all_down"]["outcomes"][0],
        log_lines=len(log_lines(log_path)),
    )


def figures(side: SideRun) -> dict[str, float]:
    """One run's figures, flat, as bench/all.py's JSON holds them: ``<config>.<figure>``."""
    c = side.config
    out = {
        f"{c}.ready_s": side.ready_s,
        f"{c}.first_s": side.first_s,
        f"{c}.rss_ready_mib": side.rss_ready_mib,
        f"{c}.rss_after_mib": side.rss_after_mib,
        f"{c}.peak_rss_mib": side.peak_rss_mib,
        f"{c}.floor_ms": side.floor_ms,
        f"{c}.overhead_ms": side.overhead_ms,
    }
    for name, sc in side.scenarios.items():
        out |= {f"{c}.{name}.r1_ms": sc.r1_ms, f"{c}.{name}.r2_ms": sc.r2_ms, f"{c}.{name}.steady_ms": sc.steady_ms}
        out |= {f"{c}.{name}.primary_attempts": sc.primary_attempts}
        out |= {f"{c}.{name}.fallback_attempts": sc.fallback_attempts}
    return out


def medians(runs: list[SideRun]) -> dict[str, float]:
    flat = [figures(r) for r in runs]
    keys = dict.fromkeys(k for f in flat for k in f)
    return {k: statistics.median(f[k] for f in flat if k in f) for k in keys}


def setup_of(config: str, args: argparse.Namespace, interpret: InterpretSection, version: str | None) -> str:
    if config == "gatewayd":
        r = interpret.retry
        return (
            f"gatewayd: config.toml's [interpret] (deadline {interpret.deadline_s:g} s, local reserve "
            f"{interpret.local_reserve_s:g} s; fail over first, then up to {r.max_attempts} attempts a provider, "
            f"{r.jitter} jitter base {r.base_s:g} s cap {r.cap_s:g} s; Retry-After as cool-down, at most "
            f"{interpret.max_hint_s:g} s; hedging {'on' if interpret.hedge else 'off'}, delay p"
            f"{interpret.hedge_quantile * 100:g} of recent latency within [{interpret.hedge_min_s:g}, "
            f"{interpret.hedge_max_s:g}] s; breakers as config.toml), timeout_s={TIMEOUT_S:g}, no prompt cache"
        )
    if config == "litellm-defaults":
        return (
            f"LiteLLM {version}, defaults: Router(model_list=[two model groups, one deployment each], "
            f"fallbacks=[{{group: [group-fallback]}}], timeout={TIMEOUT_S:g}); num_retries, allowed_fails, "
            "cooldown_time and retry_after LiteLLM's defaults (2, 3, 5 s, 0)"
        )
    return (
        f"LiteLLM {version}, order: Router(model_list=[one model group, deployments with order=1 and order=2], "
        f"num_retries={ATTEMPTS - 1}, timeout={TIMEOUT_S:g}); cooldowns on (LiteLLM's defaults)"
    )


def fmt_ms(x: float) -> str:
    return "-" if x != x else f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def table(config: str, med: dict[str, float], last: SideRun) -> list[str]:
    """The issue's table for one configuration: per fault, requests 1, 2 and steady (medians over the runs), who
    answered and the attempts a request made at each provider (the last run)."""
    lines = [
        "| primary fault | request 1 (ms) | request 2 (ms) | requests 3+ (ms) | answered by (last run) "
        "| attempts per request, primary / fallback |",
        "|---|---:|---:|---:|---|---|",
    ]
    for name in SCENARIOS:
        sc = last.scenarios[name]
        k = f"{config}.{name}"
        answers = ", ".join(f"{what} x{n}" for what, n in sc.answers.items())
        tries = f"{med[k + '.primary_attempts']:.2f} / {med[k + '.fallback_attempts']:.2f}"
        lines.append(
            f"| {FAULTS[name]} | {fmt_ms(med[k + '.r1_ms'])} | {fmt_ms(med[k + '.r2_ms'])} "
            f"| {fmt_ms(med[k + '.steady_ms'])} | {answers} | {tries} |"
        )
    return lines


def render(
    runs: dict[str, list[SideRun]],
    skipped: str | None,
    args: argparse.Namespace,
    interpret: InterpretSection,
    version: str | None,
    wall_s: float,
) -> str:
    load = (
        f"fake OpenAI-compatible providers on loopback (gatewayd.interpret.simulator), healthy ones answering after "
        f"{args.latency * 1000:g} ms, failing ones at once; per run and configuration one fresh process, a fresh "
        f"router (chain) per scenario: {args.requests} healthy requests, {args.fault_requests} per fault; "
        f"{args.runs} run(s), {wall_s:.1f} s in all"
    )
    lines = report.header("gatewayd failover chain vs LiteLLM Router", report.machine_info(), load)
    lines.append("Configurations:")
    for config in runs:
        lines.append(f"  {config}: {setup_of(config, args, interpret, version)}")
    if skipped:
        lines.append(f"  LiteLLM: SKIPPED, {skipped}")
    lines.append("")
    rows: list[report.Row] = []
    for config in runs:
        rows += [
            (f"{config}: spawn to ready (s)", f"{config}.ready_s", "{:.3f}"),
            (f"{config}: spawn to first answer (s)", f"{config}.first_s", "{:.3f}"),
            (f"{config}: RSS when ready (MiB)", f"{config}.rss_ready_mib", "{:.1f}"),
            (f"{config}: RSS after the healthy requests (MiB)", f"{config}.rss_after_mib", "{:.1f}"),
            (f"{config}: peak RSS (MiB)", f"{config}.peak_rss_mib", "{:.1f}"),
            (f"{config}: plain aiohttp POST, the floor (ms)", f"{config}.floor_ms", "{:.2f}"),
            (f"{config}: overhead over the floor, healthy (ms)", f"{config}.overhead_ms", "{:.2f}"),
        ]

    class Flat:
        def __init__(self, run: int, values: dict[str, float]):
            self.run, self.values = run, values

        def __getattr__(self, name: str) -> float:
            return self.values.get(name, float("nan"))

    flat = [
        Flat(i + 1, {k: v for r in runs.values() if i < len(r) for k, v in figures(r[i]).items()})
        for i in range(args.runs)
    ]
    lines += report.runs_table(rows, flat)
    lines += [
        "",
        "Latencies are time.perf_counter around the call in the side's own process; requests 3+ is their median;",
        "every cell is the median over the runs. The overhead is the healthy requests' median less the median of",
        "the plain POSTs interleaved with them. gatewayd also validates the answer against the device profiles and",
        "records the spend in SQLite; LiteLLM returns the completion.",
    ]
    for config, side_runs in runs.items():
        med = medians(side_runs)
        lines += ["", f"{config}:", ""]
        lines += table(config, med, side_runs[-1])
    lines += ["", "All down, what the caller gets on request 1:"]
    for config, side_runs in runs.items():
        ex = side_runs[-1].all_down
        what = f"{ex['error']}: {ex['message']}" if "error" in ex else json.dumps(ex)
        lines.append(f"  {config}: {what[:400]}")
    return "\n".join(lines)


def summary_rows(runs: dict[str, list[SideRun]], args: argparse.Namespace) -> list[list[str]]:
    """The headline figures for bench/all.py's summary table: [label, value] pairs."""
    med = {c: medians(r) for c, r in runs.items()}
    names = [c for c in CONFIGS if c in runs]

    def each(key: str, fmt: str) -> str:
        return " / ".join(fmt.format(med[c][f"{c}.{key}"]) for c in names)

    who = " / ".join(names)
    out = [
        [f"vs LiteLLM Router: spawn to first answer, {who} (s)", each("first_s", "{:.2f}")],
        [f"vs LiteLLM Router: RSS after the healthy requests, {who} (MiB)", each("rss_after_mib", "{:.1f}")],
        [
            f"vs LiteLLM Router: overhead over a plain aiohttp POST, {args.latency * 1000:g} ms provider, {who} (ms)",
            each("overhead_ms", "{:.2f}"),
        ],
    ]
    for name in ("refused", "http429", "hang", "all_down"):
        out.append(
            [
                f"vs LiteLLM Router: {'' if name == 'all_down' else 'primary '}{FAULTS[name]}, request 1 / 2 / 3+ (ms)",
                "; ".join(
                    f"{c} {fmt_ms(med[c][f'{c}.{name}.r1_ms'])} / {fmt_ms(med[c][f'{c}.{name}.r2_ms'])} / "
                    f"{fmt_ms(med[c][f'{c}.{name}.steady_ms'])}"
                    for c in names
                ),
            ]
        )
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=1, help="fresh processes per configuration (default 1)")
    parser.add_argument("--requests", type=int, default=20, help="healthy requests per run (default 20)")
    parser.add_argument("--fault-requests", type=int, default=5, help="requests per fault scenario (default 5)")
    parser.add_argument("--latency", type=float, default=0.05, help="the fake providers' latency, s (default 0.05)")
    parser.add_argument(
        "--only", default=",".join(CONFIGS), help=f"configurations, comma-separated (default {','.join(CONFIGS)})"
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures as JSON to PATH")
    parser.add_argument("--logs", type=Path, metavar="DIR", help="keep each driver's stderr in DIR")
    parser.add_argument(
        "--litellm-venv", type=Path, default=LITELLM_VENV, help="LiteLLM's own venv (default .venv-litellm)"
    )
    args = parser.parse_args(argv)
    if not 0 < args.latency <= 2:
        parser.error("--latency must be above 0 and at most 2")
    for name, lo, hi in (("runs", 1, 20), ("requests", 3, 1000), ("fault_requests", 3, 100)):
        if not lo <= getattr(args, name) <= hi:
            parser.error(f"--{name.replace('_', '-')} must be from {lo} to {hi}")
    args.only = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = [c for c in args.only if c not in CONFIGS]
    if unknown or not args.only:
        parser.error(f"--only takes {', '.join(CONFIGS)}; not {', '.join(unknown) or 'nothing'}")
    return args


async def bench(args: argparse.Namespace, body: dict[str, Any], configs: list[str]) -> dict[str, list[SideRun]]:
    # Ctrl-C and SIGTERM clean up: the driver running is killed, the fakes stopped, the temp dir removed.
    report.stop_on_signals()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LITELLM", "OPENAI", "PYTHON"))}
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # the same imports every run: neither side gets to cache bytecode anew
    pythons = {"gatewayd": Path(sys.executable), "litellm": litellm_python(args.litellm_venv)}
    runs: dict[str, list[SideRun]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory(prefix="gatewayd-bench-litellm-") as tmp:
        logs = args.logs or Path(tmp)
        logs.mkdir(parents=True, exist_ok=True)
        async with Fakes(args.latency) as fakes:
            for run in range(1, args.runs + 1):
                for config in configs:
                    print(f"run {run}/{args.runs}: {config} ...", file=sys.stderr, flush=True)
                    spec = spec_for(config, args, fakes, body)
                    python = pythons[CONFIGS[config][0]]
                    log = logs / f"run{run}-{config}.log"
                    runs[config].append(await run_side(config, run, python, spec, fakes, log, env))
    return runs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    machine = report.machine_info()
    configs = list(args.only)
    version: str | None = None
    skipped: str | None = None
    if any(CONFIGS[c][0] == "litellm" for c in configs):
        try:
            version = ensure_litellm(args.litellm_venv)
        except (BenchError, OSError, subprocess.SubprocessError) as err:
            skipped = f"{LITELLM_REQUIREMENT} could not be installed: {str(err)[-300:]}"
            print(f"litellm_router: {skipped}; measuring gatewayd alone", file=sys.stderr)
            configs = [c for c in configs if CONFIGS[c][0] != "litellm"]
    started = time.monotonic()

    async def measured() -> tuple[InterpretSection, dict[str, list[SideRun]]]:
        body, interpret = load_job()
        return interpret, (await bench(args, body, configs) if configs else {})

    interpret, runs = report.run("litellm_router", measured(), stopped="the drivers were killed")
    if not runs:
        print(f"litellm_router: nothing measured ({skipped})", file=sys.stderr)
        return 1
    print(render(runs, skipped, args, interpret, version, time.monotonic() - started))
    if args.json is not None:
        median = {k: v for r in runs.values() for k, v in medians(r).items()}
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "json"}
        payload = {
            "machine": machine,
            "command_line": shlex.join(sys.orig_argv),
            "settings": {
                **settings,
                "litellm": LITELLM_REQUIREMENT.replace(LITELLM_PIN, version) if version else None,
                "litellm_skipped": skipped,
                "configurations": {c: setup_of(c, args, interpret, version) for c in runs},
                "timeout_s": TIMEOUT_S,
            },
            "runs": [asdict(r) for side_runs in runs.values() for r in side_runs],
            "median": median,
            "passed": True,  # a run that failed a check exits 1 without figures
            "summary": summary_rows(runs, args),
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
