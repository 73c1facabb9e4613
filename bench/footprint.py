"""Footprint of the daemon as a user gets it: the bundled config.toml, started the way systemd starts it.

Per run: a fresh data directory, a free loopback HTTP port, MQTT pointed at a loopback port nobody listens on
(offline is a normal state: the uplink keeps retrying with capped backoff), and ``NOTIFY_SOCKET`` set to a unix
datagram socket this script binds, with ``WATCHDOG_USEC`` as systemd/gatewayd.service's ``WatchdogSec=30`` gives it.
Start to ``READY=1`` is measured the way systemd sees it: from just before the process is spawned until the READY
datagram arrives. Then, after a warm-up, the daemon is left alone for ``--idle-seconds``: its CPU time (utime +
stime from /proc/PID/stat) over that window as a percentage of one core, VmRSS sampled every second (the steady
RSS is their median), and at the end VmHWM (peak RSS), PSS, open file descriptors and threads. "Idle" is what the
user gets with the bundled config: the sensor node reports once a second, the energy meter is polled every 10 s
and the relay board every 5 s, the uplink retries its broker, the watchdog is fed every 5 s; no client traffic.
Finally SIGTERM: the time to exit and the exit code (must be 0).

    .venv/bin/python bench/footprint.py [--runs 3] [--idle-seconds 60] [--warmup-seconds 10] [--json PATH]

Exit status: 0 every check passed; 1 a check failed or the daemon misbehaved; 2 bad usage. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import shutil
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import report  # bench/report.py: the script's own directory is on sys.path
from daemon import (
    CONFIG,
    BenchError,
    Daemon,
    free_port,
    proc_cpu_s,
    proc_fds,
    proc_pss_mib,
    proc_status_mib,
    proc_threads,
    scan_log,
)

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "gatewayd.service"

READY_TIMEOUT_S = 30.0
SAMPLE_INTERVAL_S = 1.0


def unit_setting(name: str, default: str) -> str:
    """A ``Name=value`` line of the systemd unit we ship (the watchdog period and limits the bench compares to)."""
    with contextlib.suppress(OSError):
        for line in UNIT.read_text(encoding="utf-8").splitlines():
            key, sep, value = line.partition("=")
            if sep and key.strip() == name:
                return value.strip()
    return default


def systemd_seconds(value: str) -> float:
    """``30``, ``30s``, ``2min``, ``500ms`` (the forms our unit uses) in seconds."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*(ms|s|sec|min|m|h)?\s*", value)
    if match is None:
        raise BenchError(f"cannot read {value!r} as a systemd time span")
    scale = {"ms": 0.001, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, None: 1}[match.group(2)]
    return float(match.group(1)) * scale


def systemd_bytes(value: str) -> float:
    """``256M`` and the like in MiB (systemd's K/M/G are powers of 1024)."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)\s*", value)
    if match is None:
        raise BenchError(f"cannot read {value!r} as a systemd size")
    return float(match.group(1)) * {"": 2**-20, "K": 2**-10, "M": 1, "G": 2**10, "T": 2**20}[match.group(2)]


WATCHDOG_S = systemd_seconds(unit_setting("WatchdogSec", "30"))
MEMORY_MAX_MIB = systemd_bytes(unit_setting("MemoryMax", "256M"))
TASKS_MAX = int(unit_setting("TasksMax", "64"))


# --- sd_notify, the systemd side ---------------------------------------------------------------------------------


class NotifySocket:
    """The unix datagram socket systemd would hand the daemon in ``NOTIFY_SOCKET``, with arrival times."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[tuple[float, dict[str, str]]] = []  # (monotonic arrival, fields)
        self._arrived = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> NotifySocket:
        self._reader = asyncio.create_task(self._read(), name="footprint.notify")
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self.sock.close()

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.sock_recv(self.sock, 4096)
            arrived = time.monotonic()
            fields = dict(line.partition("=")[::2] for line in data.decode("utf-8", "replace").splitlines() if line)
            self.messages.append((arrived, fields))
            self._arrived.set()

    def first(self, key: str, value: str | None = None, since: float = 0.0) -> float | None:
        for at, fields in self.messages:
            if at >= since and key in fields and (value is None or fields[key] == value):
                return at
        return None

    def count(self, key: str, since: float, until: float) -> int:
        return sum(1 for at, fields in self.messages if since <= at <= until and key in fields)

    async def wait_for(self, key: str, value: str, deadline: float, alive: Any) -> float:
        while (at := self.first(key, value)) is None:
            if not alive():
                raise BenchError(f"the daemon exited before it sent {key}={value}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(f"no {key}={value} on the notify socket within {READY_TIMEOUT_S:g} s")
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), min(remaining, 0.2))
        return at


# --- the daemon ----------------------------------------------------------------------------------------------------


def logged_startup_s(log_path: Path) -> float:
    """``startup_s`` of the ``gateway_ready`` line: the supervisor's own part of the start (no imports)."""
    for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines():
        with contextlib.suppress(ValueError, AttributeError):
            entry = json.loads(line)
            if entry.get("event") == "gateway_ready":
                return float(entry["startup_s"])
    return float("nan")


async def http_status(port: int, path: str) -> int:
    """One GET over a raw connection (no client library in the measured window); the status code."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 5)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return int(status_line.split()[1])


# --- one run -------------------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    run: int
    start_to_ready_s: float
    supervisor_startup_s: float
    readyz_status: int
    steady_rss_mib: float
    rss_min_mib: float
    rss_max_mib: float
    peak_rss_mib: float
    pss_mib: float
    idle_cpu_s: float
    idle_window_s: float
    idle_cpu_pct: float
    open_fds: int
    threads: int
    watchdog_pings: int
    status_updates: int
    stop_s: float
    stopping_sent: bool
    exit_code: int
    log_warnings: int
    log_errors: int
    log_not_json: int
    log_events: dict[str, int]
    rss_samples_mib: list[float] = field(repr=False)
    problems: list[str] = field(default_factory=list)


async def one_run(run: int, args: argparse.Namespace) -> RunResult:
    workdir = Path(tempfile.mkdtemp(prefix=f"gatewayd-footprint-{run}-"))
    keep = False
    try:
        async with NotifySocket(workdir / "notify.sock") as notify:
            env = {
                "GATEWAYD_MQTT__PORT": str(free_port()),  # nobody listens there: offline, as often in the field
                "NOTIFY_SOCKET": str(notify.path),
                "WATCHDOG_USEC": str(int(WATCHDOG_S * 1_000_000)),
            }
            daemon = Daemon(workdir, env)  # stop() allows the unit's TimeoutStopSec, the default
            async with daemon:
                try:
                    ready_at = await notify.wait_for("READY", "1", daemon.spawned_mono + READY_TIMEOUT_S, daemon.alive)
                    ready_s = ready_at - daemon.spawned_mono
                    readyz = await http_status(daemon.port, "/readyz")

                    await asyncio.sleep(args.warmup_seconds)
                    rss: list[float] = []
                    window_start = time.monotonic()
                    cpu_start = proc_cpu_s(daemon.pid)
                    window_end = window_start + args.idle_seconds
                    while (now := time.monotonic()) < window_end:
                        rss.append(proc_status_mib(daemon.pid, "VmRSS"))
                        await asyncio.sleep(min(SAMPLE_INTERVAL_S, window_end - now))
                    cpu_s = proc_cpu_s(daemon.pid) - cpu_start
                    window_s = time.monotonic() - window_start
                    rss.append(proc_status_mib(daemon.pid, "VmRSS"))
                    peak = proc_status_mib(daemon.pid, "VmHWM")
                    pss = proc_pss_mib(daemon.pid)
                    fds, threads = proc_fds(daemon.pid), proc_threads(daemon.pid)
                    pings = notify.count("WATCHDOG", window_start, window_start + window_s)
                    statuses = notify.count("STATUS", window_start, window_start + window_s)
                    stop_mark = time.monotonic()
                    exit_code, stop_s = await daemon.stop()
                    await asyncio.sleep(0.05)  # the last datagrams
                    stopping = notify.first("STOPPING", "1", since=stop_mark) is not None
                except BenchError as err:
                    keep = True
                    raise BenchError(
                        f"run {run}: {err}\n  daemon log ({daemon.log_path}), last lines:\n{daemon.log_tail()}"
                    ) from None

        problems: list[str] = []
        if readyz != 200:
            problems.append(f"/readyz answered {readyz} after READY=1 (expected 200)")
        if exit_code != 0:
            problems.append(f"the daemon exited with code {exit_code} after SIGTERM (expected 0)")
        if not stopping:
            problems.append("no STOPPING=1 on the notify socket after SIGTERM")
        expected_pings = int(window_s // min(5.0, WATCHDOG_S / 2))
        if pings < expected_pings - 1:
            problems.append(f"{pings} WATCHDOG=1 in {window_s:.0f} s idle (expected about {expected_pings})")
        if peak > MEMORY_MAX_MIB:
            problems.append(f"peak RSS {peak:.1f} MiB is over the unit's MemoryMax={MEMORY_MAX_MIB:.0f} MiB")
        if threads > TASKS_MAX:
            problems.append(f"{threads} threads is over the unit's TasksMax={TASKS_MAX}")
        scan = scan_log(daemon.log_path)
        if scan.errors:
            problems.append(f"{scan.errors} error line(s) in the daemon log")
        if problems:
            keep = True
            problems.append(f"daemon log kept: {daemon.log_path}")
        return RunResult(
            run=run,
            start_to_ready_s=ready_s,
            supervisor_startup_s=logged_startup_s(daemon.log_path),
            readyz_status=readyz,
            steady_rss_mib=statistics.median(rss),
            rss_min_mib=min(rss),
            rss_max_mib=max(rss),
            peak_rss_mib=peak,
            pss_mib=pss,
            idle_cpu_s=cpu_s,
            idle_window_s=window_s,
            idle_cpu_pct=100.0 * cpu_s / window_s,
            open_fds=fds,
            threads=threads,
            watchdog_pings=pings,
            status_updates=statuses,
            stop_s=stop_s,
            stopping_sent=stopping,
            exit_code=exit_code,
            log_warnings=scan.warnings,
            log_errors=scan.errors,
            log_not_json=scan.not_json,
            log_events=dict(scan.events.most_common()),
            rss_samples_mib=rss,
            problems=problems,
        )
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


# --- report --------------------------------------------------------------------------------------------------------

ROWS: list[report.Row] = [
    ("start to READY=1 (s) [1]", "start_to_ready_s", "{:.3f}"),
    ("  of which supervisor start-up (s) [2]", "supervisor_startup_s", "{:.3f}"),
    ("steady RSS, median VmRSS (MiB) [3]", "steady_rss_mib", "{:.1f}"),
    ("  VmRSS min in the window (MiB)", "rss_min_mib", "{:.1f}"),
    ("  VmRSS max in the window (MiB)", "rss_max_mib", "{:.1f}"),
    ("peak RSS, VmHWM (MiB)", "peak_rss_mib", "{:.1f}"),
    ("PSS at the end (MiB) [4]", "pss_mib", "{:.1f}"),
    ("idle CPU (% of one core) [5]", "idle_cpu_pct", "{:.2f}"),
    ("  CPU time in the window (s)", "idle_cpu_s", "{:.2f}"),
    ("open file descriptors", "open_fds", "{:.0f}"),
    ("threads", "threads", "{:.0f}"),
    ("WATCHDOG=1 in the window", "watchdog_pings", "{:.0f}"),
    ("SIGTERM to exit (s)", "stop_s", "{:.2f}"),
    ("exit code after SIGTERM (must be 0)", "exit_code", "{:.0f}"),
    ("daemon log warning lines", "log_warnings", "{:.0f}"),
    ("daemon log error lines", "log_errors", "{:.0f}"),
]


def notes(args: argparse.Namespace) -> str:
    return f"""\
[1] from just before the process was spawned to the arrival of READY=1 on the notify socket (what systemd waits
    for with Type=notify): interpreter start, imports, config, store, devices, HTTP listener.
[2] `startup_s` of the daemon's `gateway_ready` log line: from the supervisor's creation to READY (no imports).
[3] VmRSS sampled every {SAMPLE_INTERVAL_S:g} s over the idle window, after a {args.warmup_seconds:g} s warm-up.
[4] /proc/PID/smaps_rollup Pss: private memory plus a share of the pages shared with other processes.
[5] utime+stime (/proc/PID/stat) over the {args.idle_seconds:g} s idle window, over its wall-clock length. Idle
    with the bundled config still runs the telemetry pollers (sensor node 1/s, meter every 10 s, relay board
    every 5 s, written to the outbox every 0.5 s), the uplink's reconnect attempts and the watchdog.
The unit (systemd/gatewayd.service) allows MemoryMax={MEMORY_MAX_MIB:.0f} MiB and TasksMax={TASKS_MAX}; WatchdogSec=\
{WATCHDOG_S:g} s, fed every {min(5.0, WATCHDOG_S / 2):g} s."""


def render(results: list[RunResult], args: argparse.Namespace, machine: dict[str, Any]) -> str:
    load = (
        f"none from clients: the bundled {CONFIG.relative_to(ROOT)} on mock hardware, MQTT broker unreachable, "
        f"{args.warmup_seconds:g} s warm-up then {args.idle_seconds:g} s idle; {args.runs} run(s), "
        "a fresh daemon and data directory each"
    )
    lines = report.header("gatewayd footprint benchmark", machine, load) + report.runs_table(ROWS, results)
    lines += ["", notes(args), ""]
    lines += report.log_events_and_result(results)
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=3, help="runs, each with a fresh daemon (default 3, max 10)")
    parser.add_argument(
        "--idle-seconds", type=float, default=60.0, help="idle window for CPU and RSS (default 60, 5 to 3600)"
    )
    parser.add_argument(
        "--warmup-seconds", type=float, default=10.0, help="wait after READY before measuring (default 10, 0 to 600)"
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures as JSON to PATH")
    args = parser.parse_args(argv)
    if not 1 <= args.runs <= 10:
        parser.error("--runs must be from 1 to 10")
    if not 5 <= args.idle_seconds <= 3600:
        parser.error("--idle-seconds must be from 5 to 3600")
    if not 0 <= args.warmup_seconds <= 600:
        parser.error("--warmup-seconds must be from 0 to 600")
    return args


async def bench(args: argparse.Namespace) -> list[RunResult]:
    # Ctrl-C and SIGTERM clean up: the daemon is stopped and the temp dir removed on the way out.
    report.stop_on_signals()
    results = []
    for run in range(1, args.runs + 1):
        print(f"run {run}/{args.runs} ...", file=sys.stderr, flush=True)
        results.append(await one_run(run, args))
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    machine = report.machine_info()
    results = report.run("footprint", bench(args))
    print(render(results, args, machine))
    return report.conclude(args, machine, ROWS, results)


if __name__ == "__main__":
    sys.exit(main())
