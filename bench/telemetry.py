"""Benchmark of the telemetry path: a Modbus RTU job polled over a pty and forwarded to a local Mosquitto.

The job of issue 19 (measured there side by side with ThingsBoard IoT Gateway): 10 units x 10 holding registers on
one Modbus RTU bus at 115200 baud, answered by pymodbus's own RTU server in a process of its own behind a pty
(bench/modbus_peer.py), polled every 100 ms, each poll one record of 10 datapoints, forwarded with QoS 1 to a
Mosquitto on loopback. The daemon is the real one (``python -m gatewayd run``) with a config written for the job
(bench defaults everywhere else: reconnect, drain, write-behind as shipped). Each run, with a fresh broker, peer and
data directory:

1. broker up: after ``--warmup`` s, a window of ``--seconds`` s: datapoints delivered per second (received by a
   subscriber in the window), the daemon's CPU seconds per 1,000 of them (utime+stime, /proc/PID/stat), its RSS,
   and bytes it wrote to disk per datapoint (write_bytes, /proc/PID/io: the WAL, the database, checkpoints, its
   log file).
2. outage: the broker stopped for ``--outage`` s and started again. From the moment it accepts connections: seconds
   to the first live sample (observed after that moment) at the subscriber, and to the backlog drained (every
   sample observed before that moment delivered). Then the peer is paused (no more polls), and every poll the
   daemon counted is looked for at the subscriber: datapoints lost, and datapoints delivered more than once. Each
   poll of a unit carries a number of its own (register 0 counts the unit's reads), so a sample is one
   (device, number).
3. overload: a new daemon polling every ``--fast-ms`` (20 ms: nominal 5,000 datapoints/s), broker up: datapoints
   delivered per second, RSS at the start and the end of the window (flat: memory does not grow with a backlog),
   and the outbox depth at the end.

    .venv/bin/python bench/telemetry.py [--runs 1] [--seconds 60] [--warmup 15] [--outage 30] [--json PATH]
    .venv/bin/python bench/telemetry.py --root /tmp/gatewayd-baseline   # an earlier tree's daemon, same job

Exit status 0 when every run met every target (below); 1 otherwise. Linux only (/proc, pty).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import paho.mqtt.client as mqtt
import report  # bench/report.py: the script's own directory is on sys.path
from daemon import ROOT, Daemon, proc_cpu_s, proc_status_mib, proc_write_bytes, scan_log
from modbus_tcp import TcpPeer, profile_toml, write_tcp_job  # the same job's profile, and its TCP side

sys.path.insert(0, str(ROOT))

from tests.mqtt_broker import Broker  # the tests' broker

GATEWAY_ID = "gw-bench"
PREFIX = f"gatewayd/{GATEWAY_ID}"
READY_TIMEOUT_S = 30.0
SETTLE_TIMEOUT_S = 120.0  # after the outage: everything counted must arrive within this

# Targets of issue 19, on this machine.
MAX_BYTES_PER_DP = 25.0
MAX_CPU_S_PER_1000_DP = 0.04
MAX_FIRST_LIVE_S = 1.0
MAX_DRAINED_S = 10.0
MIN_FAST_FRACTION = 0.99
MAX_RSS_GROWTH_MIB = 3.0


# --- the job -------------------------------------------------------------------------------------------------------


def config_toml(work: Path, link: Path, broker_port: int, units: int) -> str:
    devices = "".join(
        f'[devices.dev{u:02d}]\nprofile = "bench_registers"\nbus = "bus1"\naddress = {u}\n\n'
        for u in range(1, units + 1)
    )
    return (
        "[gateway]\n"
        f'id = "{GATEWAY_ID}"\n'
        'mode = "mock"\n'
        f'profiles_dir = "{work / "profiles"}"\n\n'
        "[mqtt]\n"
        'host = "127.0.0.1"\n'
        f"port = {broker_port}\n\n"
        "[serial.bus1]\n"
        'protocol = "modbus_rtu"\n'
        f'port = "{link}"\n'
        "baudrate = 115200\n"
        "simulate = false\n"
        "response_timeout_s = 0.5\n\n"
        f"{devices}"
        "[interpret]\n"
        "enabled = false\n"
    )


def write_job(work: Path, link: Path, broker_port: int, units: int, registers: int, poll_s: float) -> Path:
    (work / "profiles").mkdir(parents=True, exist_ok=True)
    (work / "profiles" / "bench_registers.toml").write_text(profile_toml(poll_s, registers), encoding="utf-8")
    config = work / "config.toml"
    config.write_text(config_toml(work, link, broker_port, units), encoding="utf-8")
    return config


class Peer:
    """bench/modbus_peer.py as a process: pymodbus's RTU server behind a pty published at ``link``."""

    def __init__(self, work: Path, units: int, registers: int):
        self.link = work / "bus1.tty"
        self.argv = [
            sys.executable,
            str(ROOT / "bench" / "modbus_peer.py"),
            "--link",
            str(self.link),
            "--units",
            str(units),
            "--registers",
            str(registers),
        ]
        self.log = work / "peer.log"
        self.proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> Peer:
        with self.log.open("wb") as out:
            self.proc = await asyncio.create_subprocess_exec(*self.argv, stdout=out, stderr=asyncio.subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while not self.link.is_symlink():
            if self.proc.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the Modbus peer did not start: {self.log.read_text(errors='replace')}")
            await asyncio.sleep(0.02)
        return self

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    async def __aexit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


# --- what the subscriber saw -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    arrived: float  # wall clock at the subscriber
    device: str
    number: int  # register 0: the unit's read count
    observed: float  # the sample's own timestamp (the daemon's wall clock)
    datapoints: int


def _epoch(iso: str) -> float:
    return datetime.strptime(iso, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


def samples_of(arrived: float, payload: bytes) -> list[Sample]:
    """One message's samples: one record ({device, values, ts}) or a batch ({device?, samples: [...]})."""
    body = json.loads(payload)
    entries = body.get("samples", [body])
    out = []
    for entry in entries:
        values = entry["values"]
        device = entry.get("device", body.get("device"))
        out.append(Sample(arrived, device, int(values["r0"]), _epoch(entry["ts"]), len(values)))
    return out


class Subscriber:
    """A persistent-session paho client on the gateway's telemetry topics, noting when each message arrived."""

    def __init__(self, port: int, client_id: str):
        self.port = port
        self.raw: list[tuple[float, bytes]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
        self.client.on_connect = lambda c, *_: c.subscribe([(f"{PREFIX}/telemetry/#", 1), (f"{PREFIX}/telemetry", 1)])
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.02, 0.1)  # back within 0.1 s of the broker: not what is measured

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.raw.append((time.time(), msg.payload))

    def __enter__(self) -> Subscriber:
        self.client.connect("127.0.0.1", self.port, keepalive=5)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise RuntimeError("subscription not confirmed")
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.loop_stop()
        self.client.disconnect()

    def samples(self) -> list[Sample]:
        with self._lock:
            raw = list(self.raw)
        return [s for arrived, payload in raw for s in samples_of(arrived, payload)]


# --- the daemon as /proc sees it -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reading:
    wall: float
    cpu_s: float
    written: int
    rss_mib: float


def reading(pid: int) -> Reading:
    return Reading(time.time(), proc_cpu_s(pid), proc_write_bytes(pid), proc_status_mib(pid, "VmRSS"))


async def get(session: aiohttp.ClientSession, d: Daemon, path: str) -> Any:
    async with session.get(f"{d.url}{path}", timeout=aiohttp.ClientTimeout(total=10)) as resp:
        return await resp.json()


@dataclass
class Window:
    seconds: float
    datapoints: int
    dp_per_s: float
    cpu_s_per_1000_dp: float
    bytes_per_dp: float
    rss_start_mib: float
    rss_end_mib: float


async def polls_made(session: aiohttp.ClientSession, d: Daemon) -> int:
    """Polls the daemon has made of every unit so far (answered or not)."""
    devices = (await get(session, d, "/api/v1/devices"))["devices"]
    return sum(int(dev["poll"]["polls"]) for dev in devices if "poll" in dev)


async def measure(d: Daemon, sub: Subscriber, seconds: float) -> Window:
    first = reading(d.pid)
    await asyncio.sleep(seconds)
    last = reading(d.pid)
    dp = sum(s.datapoints for s in sub.samples() if first.wall <= s.arrived < last.wall)
    span = last.wall - first.wall
    return Window(
        seconds=span,
        datapoints=dp,
        dp_per_s=dp / span,
        cpu_s_per_1000_dp=(last.cpu_s - first.cpu_s) / max(1, dp) * 1000,
        bytes_per_dp=(last.written - first.written) / max(1, dp),
        rss_start_mib=first.rss_mib,
        rss_end_mib=last.rss_mib,
    )


# --- one run -------------------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    run: int
    dp_per_s: float
    cpu_s_per_1000_dp: float
    rss_mib: float
    bytes_per_dp: float
    outage_bytes_per_dp: float
    first_live_s: float
    drained_s: float
    lost_dp: int
    duplicated_dp: int
    fast_dp_per_s: float
    fast_fraction: float
    fast_cpu_s_per_1000_dp: float
    fast_bytes_per_dp: float
    fast_rss_start_mib: float
    fast_rss_end_mib: float
    fast_outbox_rows: int
    fast_polled_dp_per_s: float = 0.0  # datapoints the daemon read from the bus a second (delivered or not)
    problems: list[str] = field(default_factory=list)
    log_events: dict[str, int] = field(default_factory=dict)


async def one_run(run: int, args: argparse.Namespace, work: Path) -> RunResult:
    broker = Broker(work / "broker")
    broker.start()
    root = args.root or ROOT
    try:
        peer_of = TcpPeer if args.transport == "tcp" else Peer
        async with peer_of(work, args.units, args.registers) as peer, aiohttp.ClientSession() as session:

            def job(where: Path, poll_s: float) -> Path:
                if args.transport == "tcp":
                    return write_tcp_job(
                        where, peer.port, broker.port, args.units, args.registers, poll_s, gateway_id=GATEWAY_ID
                    )
                return write_job(where, peer.link, broker.port, args.units, args.registers, poll_s)

            with Subscriber(broker.port, f"bench-telemetry-{run}") as sub:
                # 1. Broker up, 100 ms polls.
                config = job(work / "slow", args.poll_ms / 1000)
                async with Daemon(work / "slow", root=root, config=config) as d:
                    await d.wait_ready(session, READY_TIMEOUT_S)
                    await asyncio.sleep(args.warmup)
                    steady = await measure(d, sub, args.seconds)
                    # 2. Outage.
                    down = reading(d.pid)
                    broker.stop()
                    await asyncio.sleep(args.outage)
                    await asyncio.to_thread(broker.start)
                    returned = time.time()
                    first_live, drained = await wait_return(sub, returned)
                    drained_at = reading(d.pid)
                    kept = sum(s.datapoints for s in sub.samples() if down.wall <= s.observed < returned)
                    peer.pause()  # no more polls: every one counted from here on must arrive
                    await asyncio.sleep(1.5)
                    devices = (await get(session, d, "/api/v1/devices"))["devices"]
                    polls = {dev["name"]: int(dev["poll"]["polls"]) for dev in devices if "poll" in dev}
                    lost, duplicated = await settle(sub, polls, args)
                    peer.resume()
                    await d.stop()
                    events = scan_log(d.log_path).events
                # 3. Overload: 20 ms polls.
                config = job(work / "fast", args.fast_ms / 1000)
                async with Daemon(work / "fast", root=root, config=config) as d:
                    await d.wait_ready(session, READY_TIMEOUT_S)
                    await asyncio.sleep(args.warmup)
                    polls_before = await polls_made(session, d)
                    fast = await measure(d, sub, args.seconds)
                    polled = (await polls_made(session, d) - polls_before) * args.registers / fast.seconds
                    outbox = await get(session, d, "/api/v1/outbox")
                    await d.stop()
                    for event, n in scan_log(d.log_path).events.items():
                        events[event] = events.get(event, 0) + n
    finally:
        broker.kill9()
    nominal = args.units * args.registers * 1000 / args.fast_ms
    result = RunResult(
        run=run,
        dp_per_s=steady.dp_per_s,
        cpu_s_per_1000_dp=steady.cpu_s_per_1000_dp,
        rss_mib=steady.rss_end_mib,
        bytes_per_dp=steady.bytes_per_dp,
        outage_bytes_per_dp=(drained_at.written - down.written) / max(1, kept),
        first_live_s=first_live,
        drained_s=drained,
        lost_dp=lost,
        duplicated_dp=duplicated,
        fast_dp_per_s=fast.dp_per_s,
        fast_fraction=fast.dp_per_s / nominal,
        fast_cpu_s_per_1000_dp=fast.cpu_s_per_1000_dp,
        fast_bytes_per_dp=fast.bytes_per_dp,
        fast_rss_start_mib=fast.rss_start_mib,
        fast_rss_end_mib=fast.rss_end_mib,
        fast_outbox_rows=int(outbox["rows"]),
        fast_polled_dp_per_s=polled,
        log_events=dict(events),
    )
    result.problems = problems(result)
    return result


async def wait_return(sub: Subscriber, returned: float) -> tuple[float, float]:
    """Seconds from the broker's return to the first sample observed after it, and to the last observed before it
    (once nothing older is missing: the backlog drained)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    first_live = float("nan")
    while time.monotonic() < deadline:
        samples = sub.samples()
        live = [s.arrived for s in samples if s.observed >= returned]
        if live and first_live != first_live:
            first_live = min(live) - returned
        backlog = [s for s in samples if s.observed < returned]
        if live and backlog and complete(backlog):
            newest_old = max(s.arrived for s in backlog)
            if time.time() - newest_old > 2.0:  # nothing more of the backlog for 2 s: it is all there
                return first_live, newest_old - returned
        await asyncio.sleep(0.2)
    return first_live, float("nan")


def complete(samples: list[Sample]) -> bool:
    """No gap in any device's numbers."""
    numbers: dict[str, set[int]] = {}
    for s in samples:
        numbers.setdefault(s.device, set()).add(s.number)
    return all(max(n) - min(n) + 1 == len(n) for n in numbers.values())


async def settle(sub: Subscriber, polls: dict[str, int], args: argparse.Namespace) -> tuple[int, int]:
    """Datapoints lost (polls counted by the daemon never delivered) and delivered more than once, once the
    deliveries stop."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while True:
        samples = sub.samples()
        unique: dict[str, set[int]] = {}
        for s in samples:
            unique.setdefault(s.device, set()).add(s.number)
        missing = sum(max(0, n - len(unique.get(dev, ()))) for dev, n in polls.items())
        if not missing or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    await asyncio.sleep(2.0)  # late duplicates
    samples = sub.samples()
    seen: set[tuple[str, int]] = set()
    duplicated = 0
    for s in samples:
        if (s.device, s.number) in seen:
            duplicated += s.datapoints
        seen.add((s.device, s.number))
    return missing * args.registers, duplicated


def problems(r: RunResult) -> list[str]:
    out = []
    if not r.bytes_per_dp <= MAX_BYTES_PER_DP:
        out.append(
            f"{r.bytes_per_dp:.0f} bytes written per datapoint with the broker up (target <= {MAX_BYTES_PER_DP:g})"
        )
    if not r.cpu_s_per_1000_dp <= MAX_CPU_S_PER_1000_DP:
        out.append(f"{r.cpu_s_per_1000_dp:.3f} CPU-s per 1,000 datapoints (target <= {MAX_CPU_S_PER_1000_DP:g})")
    if not r.first_live_s <= MAX_FIRST_LIVE_S:
        out.append(
            f"first live sample {r.first_live_s:.2f} s after the broker returned (target <= {MAX_FIRST_LIVE_S:g})"
        )
    if not r.drained_s <= MAX_DRAINED_S:
        out.append(f"backlog drained {r.drained_s:.2f} s after the broker returned (target <= {MAX_DRAINED_S:g})")
    if r.lost_dp:
        out.append(f"{r.lost_dp} datapoints lost")
    if not r.fast_fraction >= MIN_FAST_FRACTION:
        out.append(f"{r.fast_fraction:.1%} of the nominal rate delivered at the fast poll (target >= 99 %)")
    if not r.fast_rss_end_mib - r.fast_rss_start_mib <= MAX_RSS_GROWTH_MIB:
        out.append(
            f"RSS grew {r.fast_rss_end_mib - r.fast_rss_start_mib:.1f} MiB over the fast window "
            f"(target <= {MAX_RSS_GROWTH_MIB:g})"
        )
    return out


ROWS: list[report.Row] = [
    ("broker up: delivered (datapoints/s)", "dp_per_s", "{:.0f}"),
    ("broker up: CPU-s per 1,000 datapoints", "cpu_s_per_1000_dp", "{:.4f}"),
    ("broker up: RSS (MiB)", "rss_mib", "{:.1f}"),
    ("broker up: bytes written per datapoint", "bytes_per_dp", "{:.1f}"),
    ("outage: bytes written per datapoint kept [1]", "outage_bytes_per_dp", "{:.1f}"),
    ("outage: first live sample after return (s)", "first_live_s", "{:.2f}"),
    ("outage: backlog drained after return (s)", "drained_s", "{:.2f}"),
    ("datapoints lost", "lost_dp", "{:.0f}"),
    ("datapoints duplicated", "duplicated_dp", "{:.0f}"),
    ("fast poll: polled (datapoints/s)", "fast_polled_dp_per_s", "{:.0f}"),
    ("fast poll: delivered (datapoints/s)", "fast_dp_per_s", "{:.0f}"),
    ("fast poll: fraction of nominal", "fast_fraction", "{:.1%}"),
    ("fast poll: CPU-s per 1,000 datapoints", "fast_cpu_s_per_1000_dp", "{:.4f}"),
    ("fast poll: bytes written per datapoint", "fast_bytes_per_dp", "{:.1f}"),
    ("fast poll: RSS at start of window (MiB)", "fast_rss_start_mib", "{:.1f}"),
    ("fast poll: RSS at end of window (MiB)", "fast_rss_end_mib", "{:.1f}"),
    ("fast poll: outbox rows at end of window", "fast_outbox_rows", "{:.0f}"),
]

NOTES = f"""\
[1] bytes written from the broker's stop until the backlog was delivered, over the datapoints observed while it
    was away: what keeping a backlog costs the card (the outbox written while the broker is away, its rows deleted
    once acknowledged after it returns).
Targets: <= {MAX_BYTES_PER_DP:g} bytes per datapoint with the broker up, <= {MAX_CPU_S_PER_1000_DP:g} CPU-s per 1,000
datapoints, first live sample <= {MAX_FIRST_LIVE_S:g} s and the backlog drained <= {MAX_DRAINED_S:g} s after the
broker returns, 0 lost, >= {MIN_FAST_FRACTION:.0%} of nominal at the fast poll with RSS flat (<= {MAX_RSS_GROWTH_MIB:g}
MiB of growth over the window)."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument(
        "--transport",
        choices=("rtu", "tcp"),
        default="rtu",
        help="the devices on one Modbus RTU bus behind a pty (the issue's job), or each over Modbus TCP on loopback",
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="measured window (broker up, fast poll)")
    parser.add_argument("--warmup", type=float, default=15.0)
    parser.add_argument("--outage", type=float, default=30.0, help="seconds the broker is away")
    parser.add_argument("--units", type=int, default=10)
    parser.add_argument("--registers", type=int, default=10)
    parser.add_argument("--poll-ms", type=float, default=100.0)
    parser.add_argument("--fast-ms", type=float, default=20.0)
    parser.add_argument("--root", type=Path, help="run the daemon from this source tree (a baseline)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures as JSON to PATH")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.seconds <= 0 or args.warmup < 0 or args.outage <= 0:
        parser.error("runs, seconds and outage must be positive")
    tree = f" (daemon from {args.root})" if args.root else ""
    how = (
        ("Modbus TCP", "each over its own loopback connection (pymodbus TCP server)")
        if args.transport == "tcp"
        else ("Modbus RTU", "over a pty (pymodbus RTU server)")
    )
    load = (
        f"{args.units} {how[0]} units x {args.registers} holding registers, polled every {args.poll_ms:g} ms "
        f"{how[1]}, QoS 1 to a local Mosquitto; {args.warmup:g} s warm-up, {args.seconds:g} s "
        f"windows, a {args.outage:g} s outage, then every {args.fast_ms:g} ms; {args.runs} run(s){tree}"
    )
    title = f"gatewayd telemetry benchmark ({how[0]} to MQTT)"
    print("\n".join(report.header(title, report.machine_info(), load)))
    results = []
    work = Path(tempfile.mkdtemp(prefix="gatewayd-bench-telemetry-"))
    try:
        for run in range(1, args.runs + 1):
            (work / f"run{run}").mkdir()
            try:
                results.append(asyncio.run(one_run(run, args, work / f"run{run}")))
            except Exception as err:
                print(f"run {run} failed: {err!r}", file=sys.stderr)
                return 1
            print(f"run {run} done", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n".join(report.runs_table(ROWS, results)))
    print()
    print(NOTES)
    print("\n".join(report.log_events_and_result(results)))
    runs = [dataclasses.asdict(r) for r in results]
    passed = not any(r.problems for r in results)
    report.write_json(args.json, report.machine_info(), vars(args), runs, report.medians(ROWS, results), passed)
    return 0 if passed else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
    raise SystemExit(130)
