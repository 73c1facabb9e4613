"""Benchmark of the whole command path: HTTP accept -> SQLite -> dispatcher -> device -> final state.

Starts a real daemon (``python -m gatewayd run``) with the bundled config.toml on a free loopback port and a fresh
data directory, sends commands to the simulated devices (pump1 behind a pseudo-terminal, relay1 on gpiozero's
MockFactory) with bounded concurrency, waits until every command is final, and reports start-to-ready time,
throughput, accept-to-succeeded latency, exactly-once execution on the pump, the daemon's memory and CPU time, and
a clean SIGTERM exit. Repeats with a fresh daemon per run and prints per-run figures and medians.

With ``--via mqtt`` the same commands are published QoS 1 on ``gatewayd/<id>/cmd`` to a Mosquitto the benchmark
starts on loopback (each counted as sent once the broker has PUBACKed it), and a subscriber on ``result/#`` also
times each publish to its result: what an MQTT client sees end to end. The ingress limits ([http.limits],
[mqtt] commands_per_s) are lifted: one client sending as fast as it can would measure them, not the path.

With ``--baseline REV`` every run is made twice, side by side, by the daemon of the git revision REV (its tree
exported to a temp dir) and by this tree's, alternating which goes first; both tables and their ratios are printed.

    .venv/bin/python bench/command_path.py [--via http|mqtt] [--commands 2000] [--concurrency 32] [--runs 3]
                                           [--baseline REV] [--json PATH]

Exit status: 0 every check passed; 1 a check failed or the daemon misbehaved; 2 bad usage. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import aiomqtt
import report  # bench/report.py: the script's own directory is on sys.path
from daemon import CONFIG, BenchError, Daemon, knows, proc_cpu_s, proc_status_mib, scan_log

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.mqtt_broker import GW, Broker  # noqa: E402  (the tests' broker: Mosquitto on a free loopback port)

READY_TIMEOUT_S = 10.0
FINAL_TIMEOUT_S = 120.0  # from the first POST until every command is final
STOP_TIMEOUT_S = 15.0
REQUEST_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.01
QUEUE_FULL_RETRIES = 200  # 503 queue_full is the daemon's back-pressure: the same id is sent again after a pause
QUEUE_FULL_PAUSE_S = 0.05

FINAL_STATES = frozenset({"succeeded", "failed", "expired", "rejected", "cancelled"})
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
T = TypeVar("T")
R = TypeVar("R")


# --- load ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    id: str
    device: str
    action: str
    params: dict[str, Any]

    def body(self) -> dict[str, Any]:
        return {"id": self.id, "device": self.device, "action": self.action, "params": self.params}


@dataclass
class Submitted:
    spec: Spec
    status: int
    body: Any
    queue_full_retries: int


def make_specs(n: int, run: int, rng: random.Random) -> list[Spec]:
    """About half pump1 set_speed with a random percent, half relay1 on/off; ids unique across runs."""
    nonce = rng.getrandbits(32)
    specs = []
    for i in range(n):
        cid = f"bench-{run}-{nonce:08x}-{i:06d}"
        if rng.random() < 0.5:
            specs.append(Spec(cid, "pump1", "set_speed", {"percent": rng.randint(0, 100)}))
        else:
            specs.append(Spec(cid, "relay1", rng.choice(("on", "off")), {}))
    return specs


async def bounded_map(fn: Callable[[T], Awaitable[R]], items: Iterable[T], concurrency: int) -> list[R]:
    """``fn`` over ``items`` with at most ``concurrency`` calls in flight; results in input order."""
    todo = list(enumerate(items))
    results: dict[int, R] = {}
    feed = iter(todo)

    async def worker() -> None:
        for index, item in feed:
            results[index] = await fn(item)

    async with asyncio.TaskGroup() as tg:
        for w in range(min(concurrency, len(todo))):
            tg.create_task(worker(), name=f"bench.worker{w}")
    return [results[i] for i in range(len(todo))]


async def submit(session: aiohttp.ClientSession, url: str, spec: Spec) -> Submitted:
    retries = 0
    while True:
        async with session.post(f"{url}/api/v1/commands", json=spec.body()) as resp:
            body = await resp.json(content_type=None)
            code = (body.get("error") or {}).get("code") if isinstance(body, dict) else None
            if resp.status == 503 and code == "queue_full" and retries < QUEUE_FULL_RETRIES:
                retries += 1
                await asyncio.sleep(QUEUE_FULL_PAUSE_S)
                continue
            return Submitted(spec, resp.status, body, retries)


class MqttClient:
    """Publishes commands QoS 1 (sent = PUBACKed by the broker) and records when each ``result/<id>`` arrives."""

    def __init__(self, port: int):
        self.port = port
        self.sent_at: dict[str, float] = {}
        self.result_at: dict[str, float] = {}
        self.result_state: dict[str, str] = {}

    async def run_subscriber(self, subscribed: asyncio.Event) -> None:
        async with aiomqtt.Client("127.0.0.1", self.port, identifier="bench-results") as client:
            await client.subscribe(f"{GW}/result/#", qos=1)
            subscribed.set()
            async for message in client.messages:
                cid = str(message.topic).rsplit("/", 1)[1]
                self.result_at.setdefault(cid, time.monotonic())
                with contextlib.suppress(ValueError, TypeError, AttributeError):
                    self.result_state.setdefault(cid, json.loads(bytes(message.payload))["state"])  # type: ignore[arg-type]

    async def submit(self, client: aiomqtt.Client, spec: Spec) -> Submitted:
        self.sent_at[spec.id] = time.monotonic()
        await client.publish(f"{GW}/cmd", json.dumps(spec.body()), qos=1, timeout=REQUEST_TIMEOUT_S)
        return Submitted(spec, 202, {"id": spec.id}, 0)

    async def wait_results(self, ids: list[str], deadline: float) -> float:
        """Monotonic time at which the last of ``ids`` had its result delivered."""
        while True:
            missing = [cid for cid in ids if cid not in self.result_at]
            if not missing:
                return max(self.result_at[cid] for cid in ids)
            if time.monotonic() >= deadline:
                raise BenchError(f"{len(missing)} result(s) never reached the subscriber, e.g. {missing[:3]}")
            await asyncio.sleep(POLL_INTERVAL_S)


async def wait_drained(session: aiohttp.ClientSession, url: str, deadline: float) -> float:
    """Monotonic time at which the daemon reports nothing queued and nothing executing.

    Polling /api/v1/queue is cheap; polling 2000 records while they execute would slow down what is measured.
    """
    while True:
        async with session.get(f"{url}/api/v1/queue") as resp:
            queue = await resp.json()
        if queue["queued"] == 0 and queue["in_flight"] == 0:
            return time.monotonic()
        if time.monotonic() >= deadline:
            raise BenchError(
                f"commands still open {FINAL_TIMEOUT_S:g} s after the first POST: "
                f"{queue['queued']} queued, {queue['in_flight']} executing"
            )
        await asyncio.sleep(POLL_INTERVAL_S)


async def fetch_final(
    session: aiohttp.ClientSession, url: str, ids: list[str], concurrency: int, deadline: float
) -> dict[str, dict[str, Any]]:
    """Every command's record (GET by id), polling those not final yet until ``deadline``."""
    records: dict[str, dict[str, Any]] = {}

    async def get(cid: str) -> dict[str, Any]:
        async with session.get(f"{url}/api/v1/commands/{cid}") as resp:
            body: dict[str, Any] = await resp.json()
            if resp.status != 200:
                raise BenchError(f"GET /api/v1/commands/{cid} answered {resp.status}: {body}")
            return body

    pending = ids
    while pending:
        for rec in await bounded_map(get, pending, concurrency):
            records[rec["id"]] = rec
        pending = [cid for cid in pending if records[cid]["state"] not in FINAL_STATES]
        if pending and time.monotonic() >= deadline:
            states = Counter(records[cid]["state"] for cid in pending)
            raise BenchError(f"{len(pending)} command(s) not final in time: {dict(states)}")
        if pending:
            await asyncio.sleep(0.1)
    return records


# --- figures -------------------------------------------------------------------------------------------------------


def iso_ms(text: str) -> int:
    """``2026-11-22T15:26:26.397Z`` as integer milliseconds since the epoch (the API's precision)."""
    dt = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    return (dt - EPOCH) // timedelta(milliseconds=1)


def transition_ms(rec: dict[str, Any], state: str) -> int | None:
    for t in rec.get("transitions", []):
        if t["state"] == state:
            return iso_ms(t["at"])
    return None


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not sorted_values:
        return math.nan
    pos = (len(sorted_values) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def pump_executions(path: Path) -> Counter[str]:
    """How many times the pump simulator executed each command id, from its JSON-lines execution log."""
    counts: Counter[str] = Counter()
    if not path.exists():
        return counts
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            counts[json.loads(line)["id"]] += 1
    return counts


@dataclass
class RunResult:
    run: int
    commands: int
    start_to_ready_s: float
    post_phase_s: float
    accepted: int
    queue_full_retries: int
    throughput_transitions_cps: float
    throughput_wall_cps: float
    latency_p50_ms: float
    latency_p90_ms: float
    latency_p99_ms: float
    latency_max_ms: float
    e2e_p50_ms: float  # --via mqtt: publish -> result received by a subscriber
    e2e_p99_ms: float
    throughput_results_cps: float  # --via mqtt: commands / (first publish -> last result received)
    not_succeeded: int
    final_states: dict[str, int]
    pump_commands: int
    pump_duplicates: int
    pump_missing: int
    daemon_cpu_s: float
    peak_rss_mib: float
    rss_mib: float
    exit_code: int
    log_warnings: int
    log_errors: int
    log_not_json: int
    log_events: dict[str, int]
    problems: list[str]


async def one_run(run: int, args: argparse.Namespace, root: Path = ROOT) -> RunResult:
    rng = random.Random(args.seed + run)
    specs = make_specs(args.commands, run, rng)
    workdir = Path(tempfile.mkdtemp(prefix=f"gatewayd-bench-{run}-"))
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    broker: Broker | None = None
    mqtt: MqttClient | None = None
    env = {
        # One client sending 2,000 commands as fast as it can: the per-client HTTP limit would measure itself, not
        # the command path.
        "GATEWAYD_HTTP__LIMITS__ENABLED": "false",
        "GATEWAYD_MQTT__ENABLED": "false",
    }
    if knows(root, "max_connections"):
        # --concurrency up to 256 keeps that many connections open: above [http] max_connections (64) the rest
        # would be refused 503; room for them, and for the wrapper's readiness probes.
        env["GATEWAYD_HTTP__MAX_CONNECTIONS"] = str(max(64, args.concurrency + 8))
    if args.via == "mqtt":
        broker = Broker(workdir / "broker")
        broker.start()
        mqtt = MqttClient(broker.port)
        env |= {
            "GATEWAYD_MQTT__ENABLED": "true",
            "GATEWAYD_MQTT__PORT": str(broker.port),
            "GATEWAYD_MQTT__DRAIN_MESSAGES_PER_S": "0",  # results as fast as the broker takes them
        }
        if knows(root, "commands_per_s"):  # the MQTT ingress pace, as the HTTP limits above
            env |= {"GATEWAYD_MQTT__COMMANDS_PER_S": "1000000", "GATEWAYD_MQTT__COMMANDS_BURST": "1000000"}
    daemon = Daemon(workdir, env, stop_timeout_s=STOP_TIMEOUT_S, root=root)
    try:
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session, daemon:
            subscriber: asyncio.Task[None] | None = None
            try:
                ready_s = await daemon.wait_ready(session, READY_TIMEOUT_S)
                if mqtt is not None:
                    subscribed = asyncio.Event()
                    subscriber = asyncio.create_task(mqtt.run_subscriber(subscribed), name="bench.results")
                    await asyncio.wait_for(subscribed.wait(), READY_TIMEOUT_S)
                    await wait_uplink_connected(session, daemon.url)
                cpu_before = proc_cpu_s(daemon.pid)

                first_post_wall, first_post_mono = time.time(), time.monotonic()
                deadline = first_post_mono + FINAL_TIMEOUT_S
                results_mono = math.nan
                if mqtt is not None:
                    assert broker is not None
                    publisher = aiomqtt.Client("127.0.0.1", broker.port, identifier=f"bench-cmd-{run}")
                    # aiomqtt warns about every publish beyond 10 awaiting its PUBACK: --concurrency is the point.
                    publisher.pending_calls_threshold = args.concurrency + 10
                    async with publisher as client:
                        submitted = await bounded_map(lambda s: mqtt.submit(client, s), specs, args.concurrency)
                else:
                    submitted = await bounded_map(lambda s: submit(session, daemon.url, s), specs, args.concurrency)
                post_phase_s = time.monotonic() - first_post_mono
                if mqtt is not None:
                    results_mono = await mqtt.wait_results([s.id for s in specs], deadline)
                drained_mono = await wait_drained(session, daemon.url, deadline)
                cpu_s = proc_cpu_s(daemon.pid) - cpu_before
                peak_rss, rss = proc_status_mib(daemon.pid, "VmHWM"), proc_status_mib(daemon.pid, "VmRSS")

                accepted = [
                    s
                    for s in submitted
                    if s.status == 202 and isinstance(s.body, dict) and s.body.get("id") == s.spec.id
                ]
                records = await fetch_final(
                    session, daemon.url, [s.spec.id for s in accepted], args.concurrency, deadline
                )
                exit_code, _ = await daemon.stop()
                if subscriber is not None:
                    subscriber.cancel()
                    with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                        await subscriber
            except BenchError as err:
                raise BenchError(
                    f"run {run}: {err}\n  daemon log ({daemon.log_path}), last lines:\n{daemon.log_tail()}"
                ) from None
            except aiohttp.ClientError as err:
                raise BenchError(
                    f"run {run}: HTTP error talking to the daemon: {type(err).__name__}: {err}\n"
                    f"  daemon log, last lines:\n{daemon.log_tail()}"
                ) from err

        problems: list[str] = []
        accepted_ids = {s.spec.id for s in accepted}
        refused = [s for s in submitted if s.spec.id not in accepted_ids]
        for s in refused[:5]:
            problems.append(f"POST {s.spec.id} answered {s.status}: {json.dumps(s.body)[:200]}")

        states = Counter(rec["state"] for rec in records.values())
        succeeded = [rec for rec in records.values() if rec["state"] == "succeeded"]
        not_succeeded = args.commands - len(succeeded)
        if not_succeeded:
            problems.append(f"{not_succeeded} command(s) not succeeded (final states {dict(states)})")
        latencies: list[float] = []
        last_succeeded_ms = 0
        for rec in succeeded:
            accepted_at, succeeded_at = transition_ms(rec, "accepted"), transition_ms(rec, "succeeded")
            if accepted_at is None or succeeded_at is None:
                problems.append(f"command {rec['id']} has no accepted or succeeded transition")
                continue
            latencies.append(float(succeeded_at - accepted_at))
            last_succeeded_ms = max(last_succeeded_ms, succeeded_at)
        latencies.sort()
        span_s = last_succeeded_ms / 1000 - first_post_wall
        throughput_transitions = args.commands / span_s if succeeded and span_s > 0 else math.nan
        throughput_wall = args.commands / (drained_mono - first_post_mono)

        pump_ids = {s.spec.id for s in accepted if s.spec.device == "pump1"}
        executions = pump_executions(daemon.data_dir / "sim" / "pump1.jsonl")
        duplicates = sum(n - 1 for cid, n in executions.items() if n > 1)
        missing = sum(1 for cid in pump_ids if executions[cid] == 0)
        strangers = sum(1 for cid in executions if cid not in pump_ids)
        if duplicates:
            problems.append(f"{duplicates} duplicate pump execution(s)")
        if missing:
            problems.append(f"{missing} pump command(s) never executed")
        if strangers:
            problems.append(f"{strangers} unknown id(s) in the pump's execution log")
        if exit_code != 0:
            problems.append(f"the daemon exited with code {exit_code} after SIGTERM (expected 0)")

        e2e: list[float] = []
        if mqtt is not None:
            e2e = sorted(1000 * (mqtt.result_at[s.id] - mqtt.sent_at[s.id]) for s in specs if s.id in mqtt.result_at)
            wrong = [cid for cid, state in mqtt.result_state.items() if state != "succeeded"]
            if wrong:
                problems.append(f"{len(wrong)} result message(s) not succeeded, e.g. {wrong[:3]}")
        scan = scan_log(daemon.log_path)
        return RunResult(
            run=run,
            commands=args.commands,
            start_to_ready_s=ready_s,
            post_phase_s=post_phase_s,
            accepted=len(accepted),
            queue_full_retries=sum(s.queue_full_retries for s in submitted),
            throughput_transitions_cps=throughput_transitions,
            throughput_wall_cps=throughput_wall,
            latency_p50_ms=percentile(latencies, 0.50),
            latency_p90_ms=percentile(latencies, 0.90),
            latency_p99_ms=percentile(latencies, 0.99),
            latency_max_ms=latencies[-1] if latencies else math.nan,
            e2e_p50_ms=percentile(e2e, 0.50) if e2e else math.nan,
            e2e_p99_ms=percentile(e2e, 0.99) if e2e else math.nan,
            throughput_results_cps=args.commands / (results_mono - first_post_mono) if mqtt else math.nan,
            not_succeeded=not_succeeded,
            final_states=dict(states),
            pump_commands=len(pump_ids),
            pump_duplicates=duplicates,
            pump_missing=missing,
            daemon_cpu_s=cpu_s,
            peak_rss_mib=peak_rss,
            rss_mib=rss,
            exit_code=exit_code,
            log_warnings=scan.warnings,
            log_errors=scan.errors,
            log_not_json=scan.not_json,
            log_events=dict(scan.events.most_common()),
            problems=problems,
        )
    finally:
        if broker is not None:
            broker.kill9()
        shutil.rmtree(workdir, ignore_errors=True)


async def wait_uplink_connected(session: aiohttp.ClientSession, url: str) -> None:
    """Until the daemon's MQTT session is up: before its first connect, the broker has no session to queue for."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        async with session.get(f"{url}/api/v1/stats") as resp:
            stats = await resp.json()
        if (stats.get("uplink") or {}).get("connected"):
            return
        if time.monotonic() >= deadline:
            raise BenchError(f"the daemon did not connect to the broker within {READY_TIMEOUT_S:g} s")
        await asyncio.sleep(POLL_INTERVAL_S)


# --- report --------------------------------------------------------------------------------------------------------

# (label, RunResult field, format)
ROWS: list[tuple[str, str, str]] = [
    ("start-to-ready (s)", "start_to_ready_s", "{:.3f}"),
    ("POST phase, all 202s (s)", "post_phase_s", "{:.2f}"),
    ("throughput, transitions (cmd/s) [1]", "throughput_transitions_cps", "{:.1f}"),
    ("throughput, wall clock (cmd/s) [2]", "throughput_wall_cps", "{:.1f}"),
    ("accept->succeeded p50 (ms) [3]", "latency_p50_ms", "{:.1f}"),
    ("accept->succeeded p90 (ms)", "latency_p90_ms", "{:.1f}"),
    ("accept->succeeded p99 (ms)", "latency_p99_ms", "{:.1f}"),
    ("accept->succeeded max (ms)", "latency_max_ms", "{:.0f}"),
    ("not succeeded (must be 0)", "not_succeeded", "{:.0f}"),
    ("queue_full retries (503)", "queue_full_retries", "{:.0f}"),
    ("pump commands", "pump_commands", "{:.0f}"),
    ("pump duplicates (must be 0)", "pump_duplicates", "{:.0f}"),
    ("pump missing (must be 0)", "pump_missing", "{:.0f}"),
    ("daemon CPU during load (s) [4]", "daemon_cpu_s", "{:.2f}"),
    ("daemon peak RSS, VmHWM (MiB)", "peak_rss_mib", "{:.1f}"),
    ("daemon RSS after load, VmRSS (MiB)", "rss_mib", "{:.1f}"),
    ("exit code after SIGTERM (must be 0)", "exit_code", "{:.0f}"),
    ("daemon log warning lines", "log_warnings", "{:.0f}"),
    ("daemon log error lines", "log_errors", "{:.0f}"),
    ("daemon log non-JSON lines", "log_not_json", "{:.0f}"),
]

MQTT_ROWS: list[tuple[str, str, str]] = [
    ("throughput, publish->result (cmd/s) [5]", "throughput_results_cps", "{:.1f}"),
    ("publish->result received p50 (ms) [6]", "e2e_p50_ms", "{:.1f}"),
    ("publish->result received p99 (ms)", "e2e_p99_ms", "{:.1f}"),
]


def rows_for(via: str) -> list[tuple[str, str, str]]:
    return ROWS[:4] + MQTT_ROWS + ROWS[4:] if via == "mqtt" else ROWS


NOTES = """\
[1] primary: commands / (last `succeeded` transition timestamp - wall clock of the first POST); same host clock.
[2] commands / (first POST until /api/v1/queue reports nothing queued or executing; polled every 10 ms).
[3] per command, `succeeded.at - accepted.at` from the record's transitions; timestamps have 1 ms precision,
    so each latency is +-1 ms. Percentiles interpolate linearly between ranks.
[4] utime+stime of the daemon process from the first POST until the queue drained (/proc/<pid>/stat).
--via mqtt: "POST" reads "publish" (QoS 1, sent when the broker PUBACKs), and
[5] commands / (first publish until the subscriber on result/# has every command's result).
[6] per command, from the publish call to the arrival of its result/<id> at the subscriber (same process clock)."""


def render(
    results: list[RunResult],
    args: argparse.Namespace,
    machine: dict[str, Any],
    baseline: list[RunResult] | None = None,
) -> str:
    load = (
        f"over {args.via.upper()}: {args.commands} commands per run "
        "(pump1 set_speed random percent / relay1 on|off, about 50/50), "
        f"{args.concurrency} in flight, {args.runs} run(s), seed {args.seed}; config {CONFIG.relative_to(ROOT)}"
    )
    lines = report.header("gatewayd command-path benchmark", machine, load)
    rows = rows_for(args.via)
    if baseline:
        lines += [f"before: the daemon of {args.baseline} (runs interleaved with the ones after)", ""]
        lines += report.runs_table(rows, baseline)
        lines += ["", "after: this tree", ""]
    lines += report.runs_table(rows, results)
    if baseline:
        before, after = report.medians(rows, baseline), report.medians(rows, results)
        lines += ["", "after / before, medians:"]
        for label, name, fmt in rows:
            if before[name] and not math.isnan(before[name]) and name in RATIO_ROWS:
                ratio = after[name] / before[name]
                lines.append(
                    f"  {label:<44} {fmt.format(before[name]):>10} -> {fmt.format(after[name]):>10}  x{ratio:.2f}"
                )
    lines += ["", NOTES, ""]
    for r in baseline or []:
        lines += [f"baseline run {r.run}: {p}" for p in r.problems]  # shown, not this tree's verdict
    lines += report.log_events_and_result(results)
    return "\n".join(lines)


RATIO_ROWS = frozenset(
    {
        "throughput_transitions_cps",
        "throughput_wall_cps",
        "throughput_results_cps",
        "e2e_p50_ms",
        "e2e_p99_ms",
        "latency_p50_ms",
        "latency_p99_ms",
        "daemon_cpu_s",
        "peak_rss_mib",
    }
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--via", choices=("http", "mqtt"), default="http", help="how commands are sent (default http)")
    parser.add_argument("--commands", type=int, default=2000, help="commands per run (default 2000, max 20000)")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight (default 32, max 256)")
    parser.add_argument("--runs", type=int, default=3, help="runs, each with a fresh daemon (default 3, max 10)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the command mix (default 1)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures as JSON to PATH")
    parser.add_argument(
        "--baseline", metavar="REV", help="also run the daemon of git revision REV, side by side (before/after)"
    )
    args = parser.parse_args(argv)
    for name, hi in (("commands", 20_000), ("concurrency", 256), ("runs", 10)):
        if not 1 <= getattr(args, name) <= hi:
            parser.error(f"--{name} must be from 1 to {hi}")
    return args


async def bench(args: argparse.Namespace) -> tuple[list[RunResult], list[RunResult]]:
    """(this tree's runs, the baseline's runs: empty without --baseline)."""
    # Ctrl-C and SIGTERM clean up: the daemon is stopped and the temp dir removed on the way out.
    report.stop_on_signals()
    results: list[RunResult] = []
    before: list[RunResult] = []
    with contextlib.ExitStack() as stack:
        base_root = stack.enter_context(exported(args.baseline)) if args.baseline else None
        for run in range(1, args.runs + 1):
            order = [(ROOT, results)]
            if base_root is not None:
                order.insert(run % 2, (base_root, before))  # the baseline first in odd runs, second in even ones
            for root, into in order:
                what = "baseline" if root != ROOT else "this tree"
                print(f"run {run}/{args.runs} ({what}) ...", file=sys.stderr, flush=True)
                into.append(await one_run(run, args, root))
    return results, before


@contextlib.contextmanager
def exported(rev: str) -> Any:
    """The tree of git revision ``rev`` in a temp dir (removed on the way out)."""
    target = Path(tempfile.mkdtemp(prefix="gatewayd-baseline-"))
    try:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], capture_output=True, check=False)
        if archive.returncode != 0:
            raise BenchError(f"--baseline {rev}: {archive.stderr.decode(errors='replace').strip()}")
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
        yield target
    finally:
        shutil.rmtree(target, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    machine = report.machine_info()
    results, baseline = report.run(
        "command_path", bench(args), stopped="the daemon was killed and its temp dir removed"
    )
    print(render(results, args, machine, baseline))
    passed = not any(r.problems for r in results)
    median = report.medians(rows_for(args.via), results)
    runs = [asdict(r) for r in results]
    if baseline:  # the baseline's runs too, marked, with their medians under "baseline_median"
        runs += [{**asdict(r), "baseline": args.baseline} for r in baseline]
        median = {**median, **{f"baseline_{k}": v for k, v in report.medians(rows_for(args.via), baseline).items()}}
    report.write_json(args.json, machine, vars(args), runs, median, passed)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
