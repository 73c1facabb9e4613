"""Run every benchmark, one after the other on this machine, and write docs/benchmarks.md from what they printed.

    ./scripts/bench                          # installs what the benchmarks need, then runs this
    .venv/bin/python bench/all.py [--only NAME[,NAME...]] [--quick] [--out docs/benchmarks.md]

Each benchmark runs as its own process with ``--json``; the document gets a summary of the headline figures (medians
of each benchmark's runs, read from its JSON), then per benchmark the command, what it measures, and its printed
output verbatim: the machine, the exact command line, every run and the median. ``--quick`` runs fewer and shorter
runs, to check the pipeline; its document says so. Exit status 1 when any benchmark failed (its section says how).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import report  # bench/report.py: the script's own directory is on sys.path

ROOT = Path(__file__).resolve().parent.parent
BENCH_TIMEOUT_S = 1800  # the slowest (the LiteLLM comparison, with its one-time install) stays well under this


@dataclass(frozen=True)
class Bench:
    name: str
    title: str
    script: str
    args: tuple[str, ...]
    quick_args: tuple[str, ...]
    about: str
    # (label, median key(s) in the JSON joined by "|", format) for the summary at the top
    headline: tuple[tuple[str, str, str], ...] = ()


BENCHES: tuple[Bench, ...] = (
    Bench(
        "command_http",
        "Command path over HTTP",
        "command_path.py",
        ("--via", "http", "--runs", "3"),
        ("--via", "http", "--runs", "1", "--commands", "300"),
        "Starts the real daemon (`python -m gatewayd run`) with the bundled `config.toml` on mock hardware, submits "
        "2,000 commands over HTTP with 32 in flight (about half `pump1 set_speed` through the serial simulator "
        "behind a pty, half `relay1 on|off` on gpiozero's MockFactory), waits until every one is final, checks the "
        "pump simulator's execution log for exactly-once execution, and expects exit 0 after SIGTERM. The load is "
        "open loop (all commands are accepted long before the devices drain them), so accept-to-succeeded latency "
        "is mostly time waiting in the device queues: throughput is the figure that measures the pipeline. Each "
        "command costs three committed SQLite transactions (group-committed, `synchronous = FULL`).",
        (
            ("HTTP commands/s, accept to succeeded", "throughput_transitions_cps", "{:.0f}"),
            ("HTTP accept → succeeded p50 / p99 (ms), 2,000 queued at once", "latency_p50_ms|latency_p99_ms", "{:.0f}"),
        ),
    ),
    Bench(
        "command_mqtt",
        "Command path over MQTT",
        "command_path.py",
        ("--via", "mqtt", "--runs", "3"),
        ("--via", "mqtt", "--runs", "1", "--commands", "300"),
        "The same 2,000 commands published QoS 1 on `gatewayd/gw-dev/cmd` to a Mosquitto the benchmark starts on "
        "loopback; a subscriber on `result/#` times each publish to its result. The daemon acknowledges each "
        "message only after the command is committed, and deletes each result from its outbox only after the "
        "broker's PUBACK. Publish-to-result latency includes the time a command waits at the broker and in the "
        "device queue behind the others (open loop).",
        (
            ("MQTT commands/s, publish to result received", "throughput_results_cps", "{:.0f}"),
            ("MQTT accept → succeeded p50 / p99 (ms)", "latency_p50_ms|latency_p99_ms", "{:.0f}"),
            ("MQTT publish → result received p50 / p99 (ms), 2,000 at once", "e2e_p50_ms|e2e_p99_ms", "{:.0f}"),
        ),
    ),
    Bench(
        "serial_bus",
        "Serial receive path",
        "serial_bus.py",
        ("--runs", "3"),
        ("--runs", "1", "--seconds", "2"),
        "The standalone simulator floods telemetry frames paced to 115200 baud (10 bits per byte) behind a pty; a "
        "`SerialBus` in the benchmark's process decodes them. Fraction of the line rate carried as valid frames, "
        "and this process's CPU time per frame.",
        (
            ("serial: line rate achieved at 115200 baud", "line_rate_fraction", "{:.1%}"),
            ("serial: CPU per frame (µs)", "cpu_us_per_frame", "{:.0f}"),
        ),
    ),
    Bench(
        "modbus_tcp",
        "Telemetry over Modbus TCP beside Modbus RTU",
        "modbus_tcp.py",
        ("--runs", "3"),
        ("--runs", "1", "--seconds", "5", "--warmup", "3"),
        "The telemetry job (10 devices x 10 holding registers polled every 100 ms: 1,000 datapoints/s nominal, QoS 1 "
        "to a local Mosquitto, counted by a subscriber) run by the real daemon twice, alternately: over one Modbus "
        "RTU bus at 115200 baud (pymodbus's serial server behind a pty) and over Modbus TCP (pymodbus's TCP server "
        "on loopback, a connection per device), the server in a process of its own. Datapoints delivered per "
        "second, the daemon's CPU seconds per 1,000 of them, its RSS and bytes written to disk per datapoint.",
        (
            ("Modbus: delivered dp/s, RTU / TCP", "rtu.delivered_dp_per_s|tcp.delivered_dp_per_s", "{:.0f}"),
            ("Modbus: daemon CPU-s per 1,000 dp, RTU / TCP", "rtu.cpu_s_per_1000_dp|tcp.cpu_s_per_1000_dp", "{:.3f}"),
            ("Modbus: daemon RSS (MiB), RTU / TCP", "rtu.rss_mib|tcp.rss_mib", "{:.1f}"),
        ),
    ),
    Bench(
        "uplink",
        "MQTT uplink: backlog drain and disk",
        "uplink.py",
        ("--runs", "3"),
        ("--runs", "1", "--backlog", "2000", "--commands", "100", "--seconds", "3"),
        "(1) A 20,000-record backlog in the outbox, drained to a local Mosquitto with the drain's rate limit off: "
        "records/s from READY until a subscriber has them all. (2) 500 commands on `cmd` at 50/s, timed from "
        "publish to `result/<id>` (closed to the devices' pace, unlike the open-loop command path above). "
        "(3) Telemetry at 40 readings/s: the daemon's `write_bytes` (/proc/PID/io) per forwarded message. The disk "
        "figure is SQLite page granularity: each batch is an insert and a delete-after-PUBACK transaction, each "
        "appending a few 4 KiB pages to the WAL, written again at checkpoint.",
        (
            ("uplink: backlog drain (records/s)", "drain_per_s", "{:.0f}"),
            ("uplink: MQTT command → result at 50/s, p50 / p99 (ms)", "p50_ms|p99_ms", "{:.1f}"),
            ("uplink: bytes written to disk per message", "disk_bytes_per_msg", "{:.0f}"),
        ),
    ),
    Bench(
        "telemetry",
        "Telemetry: Modbus RTU to MQTT, write-behind, outage and overload",
        "telemetry.py",
        ("--runs", "2"),
        ("--runs", "1", "--seconds", "10", "--warmup", "3", "--outage", "10"),
        "Issue 19's job: 10 Modbus RTU units x 10 holding registers polled every 100 ms over a pty (pymodbus's RTU "
        "server in a process of its own), forwarded QoS 1 to a local Mosquitto. Broker up: datapoints delivered "
        "a second, the daemon's CPU seconds per 1,000 of them, RSS, and bytes it wrote to disk per datapoint "
        "(/proc/PID/io). A 30 s broker outage: datapoints lost and duplicated, seconds from the broker's return "
        "to the first live sample and to the backlog drained. Then a 20 ms poll (nominal 5,000 datapoints/s).",
        (
            ("telemetry: delivered (dp/s), broker up", "dp_per_s", "{:.0f}"),
            ("telemetry: CPU-s per 1,000 dp / bytes written per dp", "cpu_s_per_1000_dp|bytes_per_dp", "{:.3g}"),
            ("telemetry: after a 30 s outage, first live / drained (s)", "first_live_s|drained_s", "{:.2f}"),
            ("telemetry: outage dp lost / duplicated", "lost_dp|duplicated_dp", "{:.0f}"),
            ("telemetry: 20 ms poll, delivered (dp/s)", "fast_dp_per_s", "{:.0f}"),
        ),
    ),
    Bench(
        "interpret",
        "Natural-language interpretation",
        "interpret.py",
        ("--runs", "3"),
        ("--runs", "1", "--requests", "5"),
        "gatewayd's interpretation chain against a fake OpenAI-compatible provider on loopback that answers after "
        "0.2 s: a prompt-cache hit, the local rules, and what a failing first provider adds (breaker open; "
        "connection refused, with config.toml's retry policy or max_attempts = 1: it fails over first), each as a "
        "ratio to the provider's own latency.",
        (
            ("NL: cache hit (ms; x provider latency)", "cache_hit_ms|cache_hit_x", "{:.3g}"),
            ("NL: local rules (ms; x provider latency)", "local_ms|local_x", "{:.3g}"),
            ("NL: first provider refusing, added (ms; x provider latency)", "failover_ms|failover_x", "{:.3g}"),
        ),
    ),
    Bench(
        "litellm",
        "Failover side by side: gatewayd's chain and LiteLLM's Router",
        "litellm_router.py",
        ("--runs", "2"),
        ("--runs", "1", "--requests", "5", "--fault-requests", "3"),
        "The same failover job (two OpenAI-compatible deployments of one model on loopback fakes, the first "
        "failing in the scripted ways: refused, 500, 503, 429 with Retry-After, hanging; then both down) done by "
        "gatewayd's interpretation chain and by LiteLLM's `Router` with its documented defaults (`fallbacks`) and "
        "with the tuned `order` setup, cooldowns on, each in fresh processes with a fresh router per scenario: "
        "requests 1, 2 and the steady state apart. LiteLLM (with the `mcp` extra its tool calls need) is installed "
        "by the benchmark into `.venv-litellm/`, never into the daemon's environment; when it cannot be installed, "
        "its configurations are skipped and gatewayd's table is still measured.",
    ),
    Bench(
        "footprint",
        "Footprint of the bundled configuration",
        "footprint.py",
        ("--runs", "3"),
        ("--runs", "1", "--idle-seconds", "10"),
        "The daemon with the bundled `config.toml` on mock hardware (its pollers and simulators running: that is "
        "the idle a user gets), started with `NOTIFY_SOCKET` as systemd starts it: start to READY=1, RSS, idle CPU "
        "over a minute, then SIGTERM.",
        (
            ("footprint: start to READY=1 (s)", "start_to_ready_s", "{:.2f}"),
            ("footprint: steady / peak RSS (MiB)", "steady_rss_mib|peak_rss_mib", "{:.1f}"),
            ("footprint: idle CPU over a minute (% of one core)", "idle_cpu_pct", "{:.2f}"),
        ),
    ),
    Bench(
        "page",
        "Status page: first paint and transfer size",
        "page.py",
        ("--runs", "3", "--loads", "10"),
        ("--runs", "1", "--loads", "3"),
        "The daemon with the bundled `config.toml` on mock hardware; Debian's headless Chromium at 1400x1000 opens "
        "the status page on loopback with a cold cache, and the browser's Performance API gives first paint and "
        "the bytes on the wire per request (HTML, stylesheet, script, the API calls the script makes). The small "
        "login page's first paint in the same browser is the baseline: what the browser and the machine's load "
        "cost whatever the page.",
        (
            ("page: first paint / login-page baseline (ms)", "first_paint_ms|baseline_first_paint_ms", "{:.0f}"),
            ("page: total transfer / HTML+CSS+JS (KiB)", "total_kib|first_load_kib", "{:.1f}"),
        ),
    ),
    Bench(
        "resilience",
        "Resilience kit overhead",
        "resilience.py",
        ("--runs", "5"),
        ("--runs", "2", "--calls", "2000"),
        "Each tool guarding a trivial coroutine, in process, with the garbage collector off while timing, less a "
        "bare `await fn()`; tenacity's `AsyncRetrying` for comparison. JSON figures are µs per call.",
        (
            (
                "resilience: RetryPolicy.call (µs/call) vs tenacity AsyncRetrying",
                "RetryPolicy.call (succeeds first time)|tenacity AsyncRetrying, fresh per call",
                "{:.2f}",
            ),
        ),
    ),
)


@dataclass
class Outcome:
    bench: Bench
    command: str
    returncode: int
    wall_s: float
    stdout: str
    stderr_tail: str
    data: dict[str, Any] = field(default_factory=dict)


def run_one(bench: Bench, quick: bool, workdir: Path) -> Outcome:
    json_path = workdir / f"{bench.name}.json"
    argv = [sys.executable, str(ROOT / "bench" / bench.script), *(bench.quick_args if quick else bench.args)]
    shown = shlex.join([".venv/bin/python", f"bench/{bench.script}", *argv[2:]])
    print(f"== {bench.name}: {shown}", file=sys.stderr, flush=True)
    started = time.monotonic()
    try:
        done = subprocess.run(
            [*argv, "--json", str(json_path)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=BENCH_TIMEOUT_S,
            check=False,
        )
        returncode, stdout, stderr = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as err:
        returncode = -1
        stdout = err.stdout if isinstance(err.stdout, str) else ""
        stderr = f"timed out after {BENCH_TIMEOUT_S} s"
    wall = time.monotonic() - started
    data: dict[str, Any] = {}
    if json_path.exists():
        try:
            data = json.loads(json_path.read_text(encoding="utf-8"))
        except ValueError as err:
            stderr += f"\n(unreadable JSON: {err})"
    print(f"   exit {returncode} after {wall:.0f} s", file=sys.stderr, flush=True)
    tail = "\n".join(stderr.strip().splitlines()[-15:])
    return Outcome(bench, shown, returncode, wall, stdout, tail, data)


def figure(data: dict[str, Any], keys: str, fmt: str) -> str:
    medians = data.get("median") or {}
    out = []
    for key in keys.split("|"):
        value = medians.get(key)
        out.append("n/a" if not isinstance(value, int | float) or math.isnan(value) else fmt.format(value))
    return " / ".join(out)


def render(
    outcomes: list[Outcome],
    quick: bool,
    wall_s: float,
    extra_summary: Callable[[Outcome], list[str]],
    load: tuple[tuple[float, ...], tuple[float, ...]],
) -> str:
    machine = report.machine_info()
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Benchmarks",
        "",
        "Written by `./scripts/bench` (which runs `.venv/bin/python bench/all.py`); every figure below comes from",
        "that one run, on one machine, one benchmark after another. Re-run it to get your own figures.",
        "",
        f"- When: {when}, {wall_s / 60:.1f} minutes in all",
        f"- Machine: {machine['platform']}; {machine['cpu']} ({machine['cpu_count']} logical CPUs); "
        f"Python {machine['python']}",
        "- Figures are medians over each benchmark's runs (every run is in its section). This machine is shared "
        "and noisy: compare figures of one run with each other, not across runs.",
        f"- Load average (1, 5, 15 min) at the start: {', '.join(f'{x:.2f}' for x in load[0])}; at the end: "
        f"{', '.join(f'{x:.2f}' for x in load[1])} (the benchmarks themselves load the machine too)",
    ]
    if quick:
        lines += ["", "**`--quick` run: fewer and shorter runs, to check the pipeline; not figures to quote.**"]
    failed = [o for o in outcomes if o.returncode != 0]
    if failed:
        lines += ["", "**Failed:** " + ", ".join(f"{o.bench.name} (exit {o.returncode})" for o in failed)]
    lines += ["", "## Summary", "", "| figure | median | from |", "|---|---|---|"]
    for o in outcomes:
        for label, keys, fmt in o.bench.headline:
            lines.append(f"| {label} | {figure(o.data, keys, fmt)} | [{o.bench.name}](#{o.bench.name}) |")
        lines += extra_summary(o)
    for o in outcomes:
        lines += [
            "",
            f'<a id="{o.bench.name}"></a>',
            f"## {o.bench.title}",
            "",
            "```sh",
            o.command,
            "```",
            "",
            o.bench.about,
            "",
            f"Exit status {o.returncode}, {o.wall_s:.0f} s. Its output:",
            "",
            "```text",
            o.stdout.rstrip() or "(nothing)",
            "```",
        ]
        if o.returncode != 0 and o.stderr_tail:
            lines += ["", "Its last error lines:", "", "```text", o.stderr_tail, "```"]
    return "\n".join(lines) + "\n"


def summary_from_json(o: Outcome) -> list[str]:
    """Rows a benchmark's JSON asks for itself: ``summary`` = [[label, value], ...] (footprint, LiteLLM)."""
    rows = o.data.get("summary") or []
    return [f"| {label} | {value} | [{o.bench.name}](#{o.bench.name}) |" for label, value in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--only", help="comma-separated names: " + ", ".join(b.name for b in BENCHES))
    parser.add_argument("--quick", action="store_true", help="fewer, shorter runs (checks the pipeline)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md", help="the document to write")
    args = parser.parse_args(argv)
    chosen = list(BENCHES)
    if args.only:
        names = {n.strip() for n in args.only.split(",") if n.strip()}
        unknown = names - {b.name for b in BENCHES}
        if unknown:
            parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
        chosen = [b for b in BENCHES if b.name in names]
    started, load_before = time.monotonic(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="gatewayd-bench-all-") as tmp:
        outcomes = [run_one(b, args.quick, Path(tmp)) for b in chosen]
    load = (load_before, os.getloadavg())
    text = render(outcomes, args.quick, time.monotonic() - started, summary_from_json, load)
    args.out.write_text(text, encoding="utf-8")
    # The same figures for machines: each benchmark's command, exit status, printed output and JSON.
    raw = args.out.with_suffix(".json")
    raw.write_text(
        json.dumps(
            [
                {"name": o.bench.name, "command": o.command, "exit": o.returncode, "wall_s": round(o.wall_s, 1)}
                | {"stdout": o.stdout, "data": o.data}
                for o in outcomes
            ],
            indent=1,
        )
        + "\n",
        encoding="utf-8",
    )
    print(f"wrote {args.out} and {raw}", file=sys.stderr)
    return 1 if any(o.returncode != 0 for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
