"""Benchmark of the serial receive path: a saturated 115200-baud line into SerialBus.

A simulator process (``python -m gatewayd.devices.simulator``) floods unsolicited telemetry behind a pty, its
output paced to the baud rate (10 bits a byte, 8N1: a pty has no baud rate of its own, it moves bytes as fast as
the kernel does) and its flood faster than the line, so the line never idles. This process runs only the bus, so
its CPU time is the receiving side's: reads, framing, CRC, JSON, the per-device inbound rate limit. Reported per
run and as medians:

- line rate achieved: bytes of valid frames decoded per second x 10 bits / baud (target: at least 90 %);
- CPU per frame: process CPU time (``time.process_time``) over the window / frames decoded;
- CPU load: the same CPU time / wall time of the window.

    .venv/bin/python bench/serial_bus.py [--runs 3] [--seconds 5] [--baudrate 115200] [--json PATH]

Exit status: 0 every run reached the target; 1 a run missed it or failed; 2 bad usage. Linux only (pty).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import report  # bench/report.py: the script's own directory is on sys.path
from report import BenchError

from gatewayd.config.models import SerialBusConfig
from gatewayd.devices.serial_bus import SerialBus
from gatewayd.observability.logging import configure

ROOT = Path(__file__).resolve().parent.parent
TARGET = 0.90
WARMUP_S = 1.0
START_TIMEOUT_S = 10.0
FLOOD_HZ = 5_000  # frames per second asked of the device: far above what the line carries (about 260 at 115200)


@dataclass
class RunResult:
    run: int
    seconds: float
    frames: int
    frame_bytes: int
    line_rate_fraction: float
    frames_per_s: float
    cpu_us_per_frame: float
    user_us_per_frame: float
    sys_us_per_frame: float
    cpu_load: float
    decode_dropped: int
    inbound_dropped: int


class Simulator:
    """The simulator as a process of its own, so its CPU time is not counted as the receiver's."""

    def __init__(self, workdir: Path, baudrate: int):
        self.link = workdir / "bus0.tty"
        self.log_path = workdir / "simulator.log"
        self.argv = [
            sys.executable,
            "-m",
            "gatewayd.devices.simulator",
            "--link",
            str(self.link),
            "--sim-dir",
            str(workdir / "sim"),
            "--telemetry-hz",
            str(FLOOD_HZ),
            "--baudrate",
            str(baudrate),
            "--log-level",
            "warning",
        ]
        self.proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> Simulator:
        with self.log_path.open("wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.link.is_symlink():
            if self.proc.returncode is not None:
                raise BenchError(f"the simulator exited with {self.proc.returncode}: {self.log_path.read_text()}")
            if time.monotonic() > deadline:
                raise BenchError(f"the simulator published no link within {START_TIMEOUT_S:g} s")
            await asyncio.sleep(0.02)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


@dataclass(frozen=True)
class Reading:
    at: float
    cpu: float
    user: float
    sys: float
    frames: int
    frame_bytes: int
    dropped: int


def _reading(bus: SerialBus) -> Reading:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return Reading(
        time.monotonic(),
        time.process_time(),
        usage.ru_utime,
        usage.ru_stime,
        bus.decoder.frames,
        bus.decoder.frame_bytes,
        bus.decoder.dropped,
    )


async def one_run(run: int, args: argparse.Namespace) -> RunResult:
    workdir = Path(tempfile.mkdtemp(prefix=f"gatewayd-serial-bench-{run}-"))
    try:
        async with Simulator(workdir, args.baudrate) as sim:
            # The inbound limit is set out of the way (it still decides every frame): the bench measures decoding.
            cfg = SerialBusConfig(
                port=str(sim.link), baudrate=args.baudrate, inbound_frames_per_s=100_000, inbound_burst=100_000
            )
            async with SerialBus("bench", cfg, str(sim.link)) as bus:
                if not bus.availability.available:
                    raise BenchError(f"the bus did not open: {bus.availability.last_error}")
                await asyncio.sleep(WARMUP_S)
                # The window starts after the warm-up: the bus may join the line in the middle of a frame.
                first = _reading(bus)
                await asyncio.sleep(args.seconds)
                last = _reading(bus)
                frames, nbytes = last.frames - first.frames, last.frame_bytes - first.frame_bytes
                if frames <= 0:
                    raise BenchError(f"run {run}: no frames received; simulator log: {sim.log_path.read_text()}")
                elapsed, cpu = last.at - first.at, last.cpu - first.cpu
                return RunResult(
                    run=run,
                    seconds=elapsed,
                    frames=frames,
                    frame_bytes=nbytes,
                    line_rate_fraction=nbytes * 10 / args.baudrate / elapsed,
                    frames_per_s=frames / elapsed,
                    cpu_us_per_frame=cpu / frames * 1e6,
                    user_us_per_frame=(last.user - first.user) / frames * 1e6,
                    sys_us_per_frame=(last.sys - first.sys) / frames * 1e6,
                    cpu_load=cpu / elapsed,
                    decode_dropped=last.dropped - first.dropped,
                    inbound_dropped=sum(bus.inbound_dropped.values()),
                )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


ROWS: list[tuple[str, str, str]] = [
    ("window (s)", "seconds", "{:.2f}"),
    ("frames decoded", "frames", "{:.0f}"),
    ("frames per second", "frames_per_s", "{:.1f}"),
    ("line rate achieved (%) [1]", "line_rate_fraction", "{:.1%}"),
    ("CPU per frame (us) [2]", "cpu_us_per_frame", "{:.1f}"),
    ("  of which user (us)", "user_us_per_frame", "{:.1f}"),
    ("  of which system (us)", "sys_us_per_frame", "{:.1f}"),
    ("CPU load, one core (%)", "cpu_load", "{:.1%}"),
    ("frames dropped by the decoder (must be 0)", "decode_dropped", "{:.0f}"),
    ("frames dropped by the inbound limit (must be 0)", "inbound_dropped", "{:.0f}"),
]

NOTES = f"""\
[1] bytes of valid frames (':' to '\\n') decoded per second x 10 bits / baud rate; target >= {TARGET:.0%}. The
    simulator paces its writes to the baud rate (a pty has none); what it cannot pace exactly counts against us.
[2] time.process_time() of this process (the bus only; the simulator is another process) / frames decoded;
    user and system from getrusage(RUSAGE_SELF). It includes the event loop's wake-ups (about one read per
    frame at this rate) and handing each frame to the telemetry sink (here in memory, not the store)."""


def render(results: list[RunResult], args: argparse.Namespace, machine: dict[str, Any]) -> str:
    load = (
        f"one simulated device flooding telemetry at {args.baudrate} baud (8N1), {args.runs} run(s) of "
        f"{args.seconds:g} s after {WARMUP_S:g} s of warm-up, a fresh simulator and bus each"
    )
    lines = report.header("gatewayd serial receive-path benchmark", machine, load) + report.runs_table(ROWS, results)
    lines += ["", NOTES, ""]
    lines.append("RESULT: PASS" if not problems(results) else "RESULT: FAIL\n  " + "\n  ".join(problems(results)))
    return "\n".join(lines)


def problems(results: list[RunResult]) -> list[str]:
    out = []
    median = statistics.median(r.line_rate_fraction for r in results)
    if median < TARGET:
        out.append(f"median line rate {median:.1%} is below the {TARGET:.0%} target")
    for r in results:
        if r.decode_dropped or r.inbound_dropped:
            out.append(f"run {r.run}: {r.decode_dropped} decode and {r.inbound_dropped} inbound-limit drops")
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=3, help="runs (default 3, max 10)")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured window per run (default 5, max 60)")
    parser.add_argument("--baudrate", type=int, default=115200, help="line rate (default 115200)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures as JSON to PATH")
    args = parser.parse_args(argv)
    if not 1 <= args.runs <= 10:
        parser.error("--runs must be from 1 to 10")
    if not 0.5 <= args.seconds <= 60:
        parser.error("--seconds must be from 0.5 to 60")
    if not 1200 <= args.baudrate <= 4_000_000:
        parser.error("--baudrate must be from 1200 to 4000000")
    return args


async def bench(args: argparse.Namespace) -> list[RunResult]:
    results = []
    for run in range(1, args.runs + 1):
        print(f"run {run}/{args.runs} ...", file=sys.stderr, flush=True)
        results.append(await one_run(run, args))
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure("warning")  # the bus logs every telemetry frame at info: not what is measured
    machine = report.machine_info()
    results = report.run("serial_bus", bench(args), stopped="the simulator and the bus were closed")
    print(render(results, args, machine))
    runs = [asdict(r) for r in results]
    median = {name: statistics.median(float(run[name]) for run in runs) for name in runs[0] if name != "run"}
    report.write_json(args.json, machine, vars(args), runs, median, passed=not problems(results))
    return 1 if problems(results) else 0


if __name__ == "__main__":
    sys.exit(main())
