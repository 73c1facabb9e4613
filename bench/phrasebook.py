"""The local rules against the phrasebook (tests/phrasebook.txt): accuracy per category, the exact-command rate,
false commands, and latency in-process and through HTTP against a real daemon.

In-process: the local rules built from the bundled config.toml and rules file, every utterance understood
``--rounds`` times (the first round's outcome is scored; every round is timed). Through HTTP: the bundled config
on mock hardware with no provider keys (so the local rules answer, as when the uplink is down), each utterance
POSTed once as ``{"text": ...}`` without ``?wait`` (202 a command, 200 an answer, 4xx a refusal), one at a time,
from a keep-alive client; the figure is the client's round trip. Commands really run on the simulators.

    .venv/bin/python bench/phrasebook.py [--rounds 5] [--no-http] [--json PATH]

Exit status: 0 every target held (>= 97 % right, 0 false commands, p99 <= 2 ms in-process, <= 5 ms through HTTP
for answers and refusals, whose round trip is the interpretation's; a command's also holds its fsync'd accept);
1 a target missed or the daemon misbehaved; 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import report  # bench/report.py: the script's own directory is on sys.path
from daemon import BenchError, Daemon

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gatewayd.interpret.local import LocalRules  # noqa: E402
from tests.phrasebook import Entry, bundled_registry, load, score  # noqa: E402

TARGET_RIGHT = 0.97
TARGET_P99_MS = 2.0
TARGET_HTTP_P99_MS = 5.0
NO_KEYS = {
    "OPENAI_API_KEY": "",
    "ANTHROPIC_API_KEY": "",
    "GATEWAYD_INTERPRET__USER_BURST": "100000",
    "GATEWAYD_INTERPRET__USER_RATE_PER_MINUTE": "100000",
    "GATEWAYD_HTTP__LIMITS__ENABLED": "false",  # one client sends 461 requests at once: measure, not throttle
    "GATEWAYD_MQTT__PORT": "1",  # nobody listens: offline, as with the uplink down
}


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def in_process(entries: list[Entry], rounds: int) -> dict[str, Any]:
    started = time.perf_counter()
    local = LocalRules.build(bundled_registry())
    build_s = time.perf_counter() - started
    latencies: list[float] = []
    per_category: dict[str, Counter[str]] = {}
    false: list[tuple[str, str, str]] = []
    wrong: list[tuple[str, str, str, str]] = []
    commands_expected = commands_exact = 0
    for r in range(rounds):
        for entry in entries:
            t = time.perf_counter()
            found = local.understand(entry.text)
            latencies.append((time.perf_counter() - t) * 1000)
            if r:
                continue
            s = score(entry, found, local.registry)
            counts = per_category.setdefault(entry.category, Counter())
            counts["n"] += 1
            counts["right"] += s.right
            if entry.kind == "command":
                commands_expected += 1
                commands_exact += s.right
            if s.false_command:
                false.append((entry.text, entry.expected, s.got))
            if not s.right:
                wrong.append((entry.category, entry.text, entry.expected, s.got))
    right = sum(c["right"] for c in per_category.values())
    return {
        "utterances": len(entries),
        "build_s": round(build_s, 3),
        "right": right,
        "accuracy": right / len(entries),
        "per_category": {k: {"n": c["n"], "right": c["right"]} for k, c in per_category.items()},
        "commands_expected": commands_expected,
        "exact_command_rate": commands_exact / max(1, commands_expected),
        "false_commands": false,
        "wrong": wrong,
        "p50_ms": percentile(latencies, 0.50),
        "p99_ms": percentile(latencies, 0.99),
        "max_ms": max(latencies),
    }


async def through_http(entries: list[Entry]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="gatewayd-phrasebook-") as tmp:
        async with Daemon(Path(tmp), env=NO_KEYS) as daemon, aiohttp.ClientSession() as session:
            ready_s = await daemon.wait_ready(session, 30.0)
            deadline = time.monotonic() + 30
            while True:  # the local rules are built in a thread after READY; measure them, not their build
                async with session.get(f"{daemon.url}/api/v1/providers") as resp:
                    if (await resp.json())["local"]["ready"]:
                        break
                if time.monotonic() > deadline:
                    raise BenchError("the local rules were not built within 30 s")
                await asyncio.sleep(0.05)
            latencies: list[float] = []
            by_kind: dict[str, list[float]] = {"command": [], "answer": [], "refusal": []}
            server: list[float] = []  # the daemon's own interpretation time (interpretation.latency_ms)
            kinds: Counter[str] = Counter()
            statuses: Counter[int] = Counter()
            for entry in entries:
                t = time.perf_counter()
                async with session.post(f"{daemon.url}/api/v1/commands", json={"text": entry.text}) as resp:
                    body = await resp.json()
                    status = resp.status
                elapsed = (time.perf_counter() - t) * 1000
                latencies.append(elapsed)
                statuses[status] += 1
                if status == 202 or (status == 200 and "id" in body):
                    kinds["command"] += 1
                    by_kind["command"].append(elapsed)
                elif status == 200 and "answer" in body:
                    kinds["answer"] += 1
                    by_kind["answer"].append(elapsed)
                else:
                    kinds[f"refusal ({body.get('error', {}).get('code', '?')})"] += 1
                    by_kind["refusal"].append(elapsed)
                how = body.get("interpretation") or {}
                if isinstance(how.get("latency_ms"), int | float):
                    server.append(float(how["latency_ms"]))
            await daemon.stop()
            return {
                "ready_s": round(ready_s, 3),
                "requests": len(entries),
                "outcomes": dict(kinds),
                "statuses": {str(k): v for k, v in sorted(statuses.items())},
                "p50_ms": percentile(latencies, 0.50),
                "p99_ms": percentile(latencies, 0.99),
                "max_ms": max(latencies),
                "by_kind": {
                    k: {"n": len(v), "p50_ms": percentile(v, 0.5), "p99_ms": percentile(v, 0.99)}
                    for k, v in by_kind.items()
                    if v
                },
                "interpretation_p50_ms": percentile(server, 0.5) if server else None,
                "interpretation_p99_ms": percentile(server, 0.99) if server else None,
            }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="in-process passes over the phrasebook (default 5)")
    parser.add_argument("--no-http", action="store_true", help="skip the run through a real daemon")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON to PATH")
    args = parser.parse_args()
    if not 1 <= args.rounds <= 100:
        parser.error("--rounds must be 1 to 100")
    entries = load()
    local = in_process(entries, args.rounds)
    http = None if args.no_http else asyncio.run(through_http(entries))
    lines = report.header(
        "gatewayd local rules: the phrasebook",
        report.machine_info(),
        f"{len(entries)} utterances (tests/phrasebook.txt), {args.rounds} in-process round(s)"
        + ("" if http is None else ", then each once over HTTP to the bundled config with no provider keys"),
    )
    lines.append(f"{'category':<24}{'right':>8}{'of':>6}{'accuracy':>11}")
    lines.append("-" * 49)
    for category, c in local["per_category"].items():
        lines.append(f"{category:<24}{c['right']:>8}{c['n']:>6}{c['right'] / c['n']:>10.1%}")
    lines.append("-" * 49)
    lines.append(f"{'overall':<24}{local['right']:>8}{local['utterances']:>6}{local['accuracy']:>10.1%}")
    lines += [
        "",
        f"exact-command rate      : {local['exact_command_rate']:.1%} of "
        f"{local['commands_expected']} expected commands",
        f"false commands          : {len(local['false_commands'])}",
        f"in-process latency      : p50 {local['p50_ms']:.3f} ms, p99 {local['p99_ms']:.3f} ms, "
        f"max {local['max_ms']:.3f} ms (build {local['build_s']} s)",
    ]
    if http is not None:
        lines += [
            f"HTTP latency            : p50 {http['p50_ms']:.3f} ms, p99 {http['p99_ms']:.3f} ms, "
            f"max {http['max_ms']:.3f} ms (daemon ready in {http['ready_s']} s)",
            f"HTTP outcomes           : {json.dumps(http['outcomes'])}, statuses {json.dumps(http['statuses'])}",
        ]
        for kind, k in http["by_kind"].items():
            lines.append(f"  {kind + 's':<22}: {k['n']:>4}, p50 {k['p50_ms']:.3f} ms, p99 {k['p99_ms']:.3f} ms")
        if http["interpretation_p99_ms"] is not None:
            lines.append(
                f"  interpretation in the daemon (interpretation.latency_ms): p50 {http['interpretation_p50_ms']:.3f} "
                f"ms, p99 {http['interpretation_p99_ms']:.3f} ms"
            )
        lines.append(
            "  (a command's round trip includes its durable accept: the committed row, fsync with the bundled "
            'synchronous = "full"; answers and refusals write nothing)'
        )
    for text, expected, got in local["false_commands"]:
        lines.append(f"FALSE COMMAND: {text!r}: expected {expected}, got {got}")
    for category, text, expected, got in local["wrong"]:
        lines.append(f"wrong [{category}] {text!r}: expected {expected}, got {got}")
    ok = (
        local["accuracy"] >= TARGET_RIGHT
        and not local["false_commands"]
        and local["p99_ms"] <= TARGET_P99_MS
        and (
            http is None
            or max(http["by_kind"].get(k, {}).get("p99_ms", 0.0) for k in ("answer", "refusal")) <= TARGET_HTTP_P99_MS
        )
    )
    lines.append(
        f"RESULT: {'PASS' if ok else 'FAIL'} (targets: >= {TARGET_RIGHT:.0%} right, 0 false commands, p99 <= "
        f"{TARGET_P99_MS:g} ms in-process, <= {TARGET_HTTP_P99_MS:g} ms through HTTP)"
    )
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"in_process": local, "http": http}, indent=2, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as err:
        print(f"phrasebook: {err}", file=sys.stderr)
        sys.exit(1)
