"""Benchmark of the telemetry job over Modbus TCP, side by side with the same job over Modbus RTU.

The job of issue 19 (bench/telemetry.py on its branch): 10 units x 10 holding registers polled every 100 ms, each
poll one record of 10 datapoints, forwarded with QoS 1 to a Mosquitto on loopback and counted by a subscriber;
1,000 datapoints a second nominal. The daemon is the real one (``python -m gatewayd run``) with a config written
for the job; the units are pymodbus's own server in a process of its own (its CPU time is not the daemon's):

- ``rtu``: one Modbus RTU bus at 115200 baud, pymodbus's serial server behind a pty (no line time is simulated: a
  pty moves bytes as fast as the kernel does), units 1..N on it;
- ``tcp``: pymodbus's TCP server on loopback, one ``[modbus_tcp.devN]`` connection per device as separate meters
  each with an address of their own are wired (``--layout gateway``: every unit on one connection, as behind a
  Modbus TCP gateway); ``--framer rtu`` carries RTU frames over TCP instead (a serial server).

Each unit's register 0 counts the reads it has answered, so every poll carries a number of its own; the others
hold ``unit * 100 + index``. After ``--warmup`` s, over a window of ``--seconds`` s, the figures bench/telemetry.py
reports for the RTU job:

- delivered dp/s: datapoints (values in the telemetry messages) that reached the subscriber, per second;
- polled dp/s: datapoints the daemon's pollers read (its own count of successful polls);
- CPU-s per 1,000 dp: the daemon's user + system CPU time (/proc/<pid>/stat) per thousand delivered datapoints;
- RSS: the daemon's resident memory at the end of the window (VmRSS), and its threads;
- bytes written per dp: the daemon's write_bytes (/proc/<pid>/io: SQLite, WAL, checkpoints) per delivered dp.

    .venv/bin/python bench/modbus_tcp.py [--transport both|tcp|rtu] [--devices 10] [--registers 10]
        [--interval 0.1] [--seconds 30] [--warmup 10] [--runs 1] [--framer socket|rtu]
        [--layout per-device|gateway] [--json PATH]

For bench/telemetry.py ``--transport tcp``: :class:`TcpPeer` is its ``Peer`` over TCP (an async context manager
with ``pause``/``resume``, and the ``port`` to connect to), and :func:`write_tcp_job` its ``write_job``: the same
profile, with Modbus TCP connections in place of the serial bus. :func:`run_job` runs one measured window of
either transport on its own and returns a :class:`RunResult`.

Exit status: 0 every run delivered at least 95 % of the nominal rate; 1 a run fell short or failed; 2 bad usage.
Linux only (/proc, pty). Needs mosquitto (apt-get install mosquitto).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tty
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import paho.mqtt.client as mqtt
import report  # bench/report.py: the script's own directory is on sys.path
from daemon import BenchError, free_port, proc_cpu_s, proc_status_mib, proc_threads, proc_write_bytes, scan_log

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.mqtt_broker import Broker  # noqa: E402  (the tests' Mosquitto, on a free port)

Transport = Literal["rtu", "tcp"]
GATEWAY_ID = "gw-bench-tcp"
TARGET = 0.95  # of the nominal datapoints per second
READY_TIMEOUT_S = 30.0
PEER_START_S = 15.0
BAUDRATE = 115200  # the RTU job's bus (bench/telemetry.py)
LABELS = {"rtu": "Modbus RTU (pty)", "tcp": "Modbus TCP"}

ROWS: list[report.Row] = [
    ("nominal dp/s", "nominal_dp_per_s", "{:.0f}"),
    ("polled dp/s", "polled_dp_per_s", "{:.1f}"),
    ("delivered dp/s", "delivered_dp_per_s", "{:.1f}"),
    ("CPU-s per 1,000 dp", "cpu_s_per_1000_dp", "{:.4f}"),
    ("CPU load (of one core)", "cpu_load", "{:.1%}"),
    ("RSS (MiB)", "rss_mib", "{:.1f}"),
    ("threads", "threads", "{:.0f}"),
    ("bytes written per dp", "bytes_written_per_dp", "{:.1f}"),
    ("devices failing at the end", "devices_failing", "{:.0f}"),
]


@dataclass
class RunResult:
    run: int
    transport: str
    seconds: float
    nominal_dp_per_s: float
    polled_dp_per_s: float
    delivered_dp_per_s: float
    cpu_s_per_1000_dp: float
    cpu_load: float
    rss_mib: float
    threads: int
    bytes_written_per_dp: float
    devices_failing: int
    log_events: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


# --- the units: pymodbus's server, in a process of its own ---------------------------------------------------------


def unit_device(unit: int, registers: int) -> Any:
    """Unit ``unit``: ``registers`` holding registers from 0; register 0 counts the reads it has answered."""
    from pymodbus.simulator import DataType, SimData, SimDevice

    values = [0] + [unit * 100 + i for i in range(1, registers)]

    async def on_access(function: int, start: int, address: int, count: int, cells: list[int], written: Any) -> None:
        if function == 3 and written is None and address <= 0 < address + count:
            cells[-start] = (cells[-start] + 1) & 0xFFFF  # the live list pymodbus answers from: this read carries it
        return

    holding = [SimData(0, values=values, datatype=DataType.REGISTERS)]
    bits = [SimData(0, values=[False] * 16, datatype=DataType.BITS)]
    inputs = [SimData(0, values=[0], datatype=DataType.REGISTERS)]
    return SimDevice(unit, simdata=(bits, bits, holding, inputs), action=on_access)


async def _serve_tcp(units: int, registers: int, framer: str, stop: asyncio.Event) -> None:
    """pymodbus's TCP server on a free loopback port, printed on standard output once it listens."""
    from pymodbus.framer import FramerType
    from pymodbus.server import ModbusTcpServer

    server = ModbusTcpServer(
        [unit_device(n, registers) for n in range(1, units + 1)],
        framer=FramerType.SOCKET if framer == "socket" else FramerType.RTU,
        address=("127.0.0.1", 0),
    )
    await server.serve_forever(background=True)
    listening = server.transport
    assert isinstance(listening, asyncio.Server)
    print(listening.sockets[0].getsockname()[1], flush=True)
    try:
        await stop.wait()
    finally:
        await server.shutdown()  # type: ignore[no-untyped-call]


def _raw_pty() -> tuple[int, int]:
    master, slave = os.openpty()
    tty.setraw(master)
    tty.setraw(slave)
    os.set_blocking(master, False)
    return master, slave


async def _serve_rtu(link: Path, units: int, registers: int, stop: asyncio.Event) -> None:
    """pymodbus's serial server behind a pty whose other end is published at ``link``. The server and the gateway
    both open a port by its path, so two pty pairs are joined by a byte bridge."""
    from pymodbus.server import ModbusSerialServer

    loop = asyncio.get_running_loop()
    server_master, server_slave = _raw_pty()
    gateway_master, gateway_slave = _raw_pty()

    def pump(src: int, dst: int) -> None:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            if data := os.read(src, 65536):
                os.write(dst, data)

    loop.add_reader(gateway_master, pump, gateway_master, server_master)
    loop.add_reader(server_master, pump, server_master, gateway_master)
    server = ModbusSerialServer(
        [unit_device(n, registers) for n in range(1, units + 1)], port=os.ttyname(server_slave), baudrate=BAUDRATE
    )
    await server.serve_forever(background=True)
    new = link.with_name(link.name + ".new")  # the link appears whole: the gateway may be looking for it
    os.symlink(os.ttyname(gateway_slave), new)
    os.replace(new, link)
    try:
        await stop.wait()
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(link)
        await server.shutdown()  # type: ignore[no-untyped-call]
        for fd in (server_master, gateway_master):
            loop.remove_reader(fd)
        for fd in (server_master, server_slave, gateway_master, gateway_slave):
            os.close(fd)


def serve(transport: str, units: int, registers: int, framer: str, link: Path | None) -> None:
    """The peer process: serves until SIGTERM or SIGINT."""
    logging.getLogger("pymodbus").setLevel(logging.ERROR)

    async def main() -> None:
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        if transport == "tcp":
            await _serve_tcp(units, registers, framer, stop)
        else:
            assert link is not None
            await _serve_rtu(link, units, registers, stop)

    asyncio.run(main())


class Peer:
    """The units as a process: over TCP (:attr:`port`), or on a Modbus RTU bus behind a pty (:attr:`link`). A
    context manager, plain or async (its start is a short blocking wait)."""

    def __init__(self, work: Path, transport: Transport, units: int, registers: int, framer: str = "socket"):
        self.transport = transport
        self.link = work / "bus1.tty"
        self.argv = [
            sys.executable, __file__, "--serve", transport, "--devices", str(units),
            "--registers", str(registers), "--framer", framer, "--link", str(self.link),
        ]  # fmt: skip
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0

    def __enter__(self) -> Peer:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        assert self.proc.stdout is not None
        if self.transport == "tcp":
            line = self.proc.stdout.readline()
            if not line.strip().isdigit():
                self.__exit__()
                raise BenchError(f"the Modbus TCP peer did not start (exit {self.proc.poll()})")
            self.port = int(line)
            return self
        deadline = time.monotonic() + PEER_START_S
        while not self.link.is_symlink():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise BenchError(f"the Modbus RTU peer did not start (exit {self.proc.poll()})")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    async def __aenter__(self) -> Peer:
        return self.__enter__()

    async def __aexit__(self, *exc: object) -> None:
        self.__exit__()

    def pause(self) -> None:
        """No more replies (SIGSTOP): the daemon's polls stop succeeding."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)


class TcpPeer(Peer):
    """pymodbus's TCP server answering units 1..N: bench/telemetry.py's ``Peer`` for ``--transport tcp``."""

    def __init__(self, work: Path, units: int, registers: int, framer: str = "socket"):
        super().__init__(work, "tcp", units, registers, framer)


# --- the job's configuration -------------------------------------------------------------------------------------


def profile_toml(poll_s: float, registers: int) -> str:
    """bench/telemetry.py's profile: ``registers`` uint16 holding registers, read in one request per poll."""
    points = "".join(
        f'[telemetry.r{i}]\ntype = "int"\nmodbus = {{ table = "holding", address = {i}, type = "uint16" }}\n\n'
        for i in range(registers)
    )
    return (
        'kind = "modbus_rtu"\n'
        f'description = "{registers} holding registers (bench)"\n'
        f"poll_interval_s = {poll_s}\n\n"
        "[actions.read]\n"
        'description = "Read every register now"\n'
        "actuates = false\n"
        'modbus = { read = "telemetry" }\n\n'
        f"{points}"
    )


def tcp_sections(port: int, units: int, framer: str = "socket", layout: str = "per-device") -> str:
    """The job's devices over Modbus TCP: a connection per device (each unit id on its own), or one for all."""
    connection = (
        f'host = "127.0.0.1"\nport = {port}\nframer = "{framer}"\nresponse_timeout_s = 0.5\nsimulate = false\n\n'
    )
    out = f"[modbus_tcp.gateway]\n{connection}" if layout == "gateway" else ""
    for u in range(1, units + 1):
        bus = "gateway" if layout == "gateway" else f"dev{u:02d}"
        if layout != "gateway":
            out += f"[modbus_tcp.{bus}]\n{connection}"
        out += f'[devices.dev{u:02d}]\nprofile = "bench_registers"\nbus = "{bus}"\nunit_id = {u}\n\n'
    return out


def rtu_sections(link: Path, units: int) -> str:
    """The job's devices on one Modbus RTU bus (bench/telemetry.py's)."""
    out = (
        f'[serial.bus1]\nprotocol = "modbus_rtu"\nport = "{link}"\nbaudrate = {BAUDRATE}\nsimulate = false\n'
        "response_timeout_s = 0.5\n\n"
    )
    for u in range(1, units + 1):
        out += f'[devices.dev{u:02d}]\nprofile = "bench_registers"\nbus = "bus1"\naddress = {u}\n\n'
    return out


def _write(
    work: Path,
    sections: str,
    broker_port: int,
    registers: int,
    poll_s: float,
    http_port: int | None,
    gateway_id: str = GATEWAY_ID,
) -> Path:
    (work / "profiles").mkdir(parents=True, exist_ok=True)
    (work / "profiles" / "bench_registers.toml").write_text(profile_toml(poll_s, registers), encoding="utf-8")
    http = "" if http_port is None else f'[http]\nhost = "127.0.0.1"\nport = {http_port}\n\n'
    config = work / "config.toml"
    config.write_text(
        f'[gateway]\nid = "{gateway_id}"\nmode = "mock"\nprofiles_dir = "{work / "profiles"}"\n'
        f'data_dir = "{work / "data"}"\n\n'
        f'[mqtt]\nhost = "127.0.0.1"\nport = {broker_port}\n\n{http}'
        f"{sections}[interpret]\nenabled = false\n",
        encoding="utf-8",
    )
    return config


def write_tcp_job(
    work: Path,
    port: int,
    broker_port: int,
    units: int,
    registers: int,
    poll_s: float,
    *,
    framer: str = "socket",
    layout: str = "per-device",
    http_port: int | None = None,
    gateway_id: str = GATEWAY_ID,
) -> Path:
    """bench/telemetry.py's ``write_job`` over Modbus TCP: the same profile and gateway, the units at
    127.0.0.1:``port`` (a :class:`TcpPeer`) in place of the serial bus. Returns the config's path."""
    sections = tcp_sections(port, units, framer, layout)
    return _write(work, sections, broker_port, registers, poll_s, http_port, gateway_id)


def write_rtu_job(
    work: Path, link: Path, broker_port: int, units: int, registers: int, poll_s: float, *, http_port: int | None = None
) -> Path:
    return _write(work, rtu_sections(link, units), broker_port, registers, poll_s, http_port)


# --- the measurement ---------------------------------------------------------------------------------------------


class Counter:
    """An MQTT subscriber counting the datapoints of every telemetry message."""

    def __init__(self, port: int):
        self.port = port
        self.datapoints = 0
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-counter", clean_session=True)
        self.client.on_connect = lambda c, *a: c.subscribe(f"gatewayd/{GATEWAY_ID}/telemetry/+", qos=1)
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        values = json.loads(msg.payload).get("values", {})
        with self._lock:
            self.datapoints += len(values)

    def count(self) -> int:
        with self._lock:
            return self.datapoints

    def __enter__(self) -> Counter:
        self.client.connect("127.0.0.1", self.port, keepalive=10)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise BenchError("the counting subscriber was not subscribed")
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@dataclass(frozen=True)
class Reading:
    """The daemon's counters and the subscriber's at one instant."""

    at: float
    cpu_s: float
    written: int
    datapoints: int
    polls: int
    failing: int

    @classmethod
    def of(cls, pid: int, counter: Counter, http_port: int) -> Reading:
        polled, failing = polls(http_port)
        return cls(time.monotonic(), proc_cpu_s(pid), proc_write_bytes(pid), counter.count(), polled, failing)


def get(port: int, path: str) -> Any:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
        return json.loads(resp.read())


def polls(http_port: int) -> tuple[int, int]:
    """Polls that succeeded, and devices whose polls are failing, over every device (the daemon's own count)."""
    devices = get(http_port, "/api/v1/devices")["devices"]
    return sum(int(d["poll"]["polls"]) for d in devices), sum(1 for d in devices if d["poll"]["failing"])


def wait_ready(daemon: subprocess.Popen[bytes], http_port: int) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise BenchError(f"the daemon exited with {daemon.returncode} before it was ready")
        with contextlib.suppress(OSError, ValueError):
            if get(http_port, "/readyz").get("status") == "ready":
                return
        time.sleep(0.05)
    raise BenchError(f"the daemon was not ready within {READY_TIMEOUT_S:g} s")


def stop(daemon: subprocess.Popen[bytes]) -> None:
    if daemon.poll() is None:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()


def run_job(
    transport: Transport,
    *,
    devices: int = 10,
    registers: int = 10,
    interval: float = 0.1,
    seconds: float = 30.0,
    warmup: float = 10.0,
    framer: str = "socket",
    layout: str = "per-device",
    run: int = 1,
) -> RunResult:
    """One measured window of the job over ``transport``, with a fresh broker, peer, daemon and data directory."""
    nominal = devices * registers / interval
    with tempfile.TemporaryDirectory(prefix=f"gatewayd-bench-{transport}-") as tmp:
        work = Path(tmp)
        broker = Broker(work / "broker", die_with_parent=True)
        broker.start()
        try:
            with Peer(work, transport, devices, registers, framer) as peer, Counter(broker.port) as counter:
                http_port = free_port()
                if transport == "tcp":
                    config = write_tcp_job(
                        work, peer.port, broker.port, devices, registers, interval,
                        framer=framer, layout=layout, http_port=http_port,
                    )  # fmt: skip
                else:
                    config = write_rtu_job(
                        work, peer.link, broker.port, devices, registers, interval, http_port=http_port
                    )
                env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAYD_")}
                env.pop("NOTIFY_SOCKET", None)
                log = work / "daemon.log"
                with log.open("wb") as out:
                    daemon = subprocess.Popen(
                        [sys.executable, "-m", "gatewayd", "run", "--config", str(config)],
                        cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                    )  # fmt: skip
                try:
                    wait_ready(daemon, http_port)
                    time.sleep(warmup)
                    before = Reading.of(daemon.pid, counter, http_port)
                    time.sleep(seconds)
                    after = Reading.of(daemon.pid, counter, http_port)
                    rss, threads = proc_status_mib(daemon.pid, "VmRSS"), proc_threads(daemon.pid)
                finally:
                    stop(daemon)
                events = scan_log(log).events
        finally:
            broker.stop()
    elapsed, datapoints, cpu = after.at - before.at, after.datapoints - before.datapoints, after.cpu_s - before.cpu_s
    if datapoints <= 0:
        raise BenchError(f"{transport}: no telemetry reached the subscriber in the measured window")
    result = RunResult(
        run=run,
        transport=transport,
        seconds=elapsed,
        nominal_dp_per_s=nominal,
        polled_dp_per_s=(after.polls - before.polls) * registers / elapsed,
        delivered_dp_per_s=datapoints / elapsed,
        cpu_s_per_1000_dp=cpu / datapoints * 1000,
        cpu_load=cpu / elapsed,
        rss_mib=rss,
        threads=threads,
        bytes_written_per_dp=(after.written - before.written) / datapoints,
        devices_failing=after.failing,
        log_events=dict(events),
    )
    if result.delivered_dp_per_s < TARGET * nominal:
        result.problems.append(
            f"{transport}: delivered {result.delivered_dp_per_s:.0f} dp/s, below {TARGET:.0%} of {nominal:.0f}"
        )
    return result


# --- the report --------------------------------------------------------------------------------------------------


def side_by_side(by_transport: dict[str, list[RunResult]]) -> list[str]:
    """One column per transport: the median of its runs."""
    label_w = max(len(label) for label, _, _ in ROWS)
    heads = [LABELS[t] for t in by_transport]
    col_w = max(12, *(len(h) + 2 for h in heads))
    lines = [f"{'median of the runs':<{label_w}}" + "".join(f"{h:>{col_w}}" for h in heads)]
    lines.append("-" * (label_w + col_w * len(heads)))
    mids = {t: report.medians(ROWS, results) for t, results in by_transport.items()}
    for label, name, fmt in ROWS:
        lines.append(f"{label:<{label_w}}" + "".join(f"{fmt.format(mids[t][name]):>{col_w}}" for t in by_transport))
    return lines


def render(by_transport: dict[str, list[RunResult]], args: argparse.Namespace, machine: dict[str, Any]) -> str:
    layout = "a connection per device" if args.layout == "per-device" else "one connection (a gateway)"
    tcp = "Modbus TCP" if args.framer == "socket" else "Modbus RTU over TCP"
    load = (
        f"{args.devices} devices x {args.registers} holding registers every {args.interval:g} s; "
        f"RTU: one bus at {BAUDRATE} baud on a pty; TCP: {tcp} on loopback, {layout}; pymodbus's server in its own "
        f"process; MQTT QoS 1 to a local Mosquitto; {args.warmup:g} s warm-up, {args.seconds:g} s measured"
    )
    lines = report.header("gatewayd telemetry job: Modbus TCP beside Modbus RTU", machine, load)
    lines += side_by_side(by_transport)
    for transport, results in by_transport.items():
        lines += ["", f"{LABELS[transport]}, each run:", *report.runs_table(ROWS, results)]
    every = [r for results in by_transport.values() for r in results]
    return "\n".join([*lines, "", *report.log_events_and_result(every)])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--transport", choices=["both", "tcp", "rtu"], default="both", help="default: both")
    parser.add_argument("--devices", type=int, default=10, help="devices (default 10, max 100)")
    parser.add_argument("--registers", type=int, default=10, help="holding registers per device (default 10)")
    parser.add_argument("--interval", type=float, default=0.1, help="poll interval in seconds (default 0.1)")
    parser.add_argument("--seconds", type=float, default=30.0, help="measured window per run (default 30)")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds before the window (default 10)")
    parser.add_argument("--runs", type=int, default=1, help="runs of each transport (default 1, max 10)")
    parser.add_argument("--framer", choices=["socket", "rtu"], default="socket", help="TCP: rtu is RTU over TCP")
    parser.add_argument("--layout", choices=["per-device", "gateway"], default="per-device")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures as JSON to PATH")
    parser.add_argument("--serve", choices=["tcp", "rtu"], help=argparse.SUPPRESS)  # the peer process
    parser.add_argument("--link", type=Path, help=argparse.SUPPRESS)  # the peer's pty (rtu)
    args = parser.parse_args(argv)
    if not 1 <= args.devices <= 100 or not 1 <= args.registers <= 125:
        parser.error("--devices must be 1 to 100 and --registers 1 to 125 (one request)")
    if not 0.01 <= args.interval <= 60 or not 1 <= args.seconds <= 600 or not 0 <= args.warmup <= 600:
        parser.error("--interval must be 0.01 to 60 s, --seconds 1 to 600, --warmup 0 to 600")
    if not 1 <= args.runs <= 10:
        parser.error("--runs must be from 1 to 10")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        serve(args.serve, args.devices, args.registers, args.framer, args.link)
        return 0
    machine = report.machine_info()
    transports: list[Transport] = ["rtu", "tcp"] if args.transport == "both" else [args.transport]
    by_transport: dict[str, list[RunResult]] = {t: [] for t in transports}
    try:
        for run in range(1, args.runs + 1):
            for transport in transports:  # alternated, so a slow spell of the machine falls on both
                print(f"run {run}/{args.runs} {transport} ...", file=sys.stderr, flush=True)
                result = run_job(
                    transport, devices=args.devices, registers=args.registers, interval=args.interval,
                    seconds=args.seconds, warmup=args.warmup, framer=args.framer, layout=args.layout, run=run,
                )  # fmt: skip
                by_transport[transport].append(result)
    except BenchError as err:
        print(f"modbus_tcp: FAILED: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print(render(by_transport, args, machine))
    runs = [asdict(r) for results in by_transport.values() for r in results]
    median = {
        f"{t}.{name}": statistics.median(float(getattr(r, name)) for r in results)
        for t, results in by_transport.items()
        for _, name, _ in ROWS
    }
    passed = not any(r.problems for results in by_transport.values() for r in results)
    report.write_json(args.json, machine, vars(args), runs, median, passed=passed)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
