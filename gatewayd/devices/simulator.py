"""Simulated devices behind real pseudo-terminals, so mock mode runs the real serial code.

The simulator owns the master side of a pty; the gateway opens the slave path with pyserial exactly as it would
open ``/dev/ttyUSB0``. Each simulated device keeps an execution log (JSON lines) of every action it performed:
tests read it to prove that an action ran exactly once. Like a real device that honours the protocol's ``id``
field, it remembers the ids it executed (across restarts, from its log) and answers a repeated request with the
original result instead of acting again.

``python -m gatewayd.devices.simulator --link PATH --sim-dir DIR`` runs the same devices as a process of their
own, behind a pty published at ``PATH``: a stand-in for hardware that can be unplugged (stopped or killed) and
plugged back in (started again) while the daemon runs.

Faults are scriptable, so tests can drive the real serial code through a hostile line: per device (:class:`Faults`,
drawn from the device's own seeded generator, so a run is repeatable) noise before a reply, a reply cut short,
lost, or with a wrong CRC, and a flood of unsolicited telemetry; per line (:class:`PtySimulator`) byte-at-a-time
delivery and pacing to a baud rate (a pty itself moves bytes as fast as the kernel does).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import os
import random
import signal
import time
import tty
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import structlog

from gatewayd.devices.framing import Decoder, Frame, Kind
from gatewayd.devices.linelog import LineLog
from gatewayd.tasks import TaskOwner

if TYPE_CHECKING:
    from gatewayd.resilience.bucket import TokenBucket

log = structlog.get_logger("gatewayd.simulator")

# What a device queues for the wire before its telemetry waits: a microcontroller's TX buffer is small, and a
# flood faster than the line must not grow the simulator's memory.
TX_BACKLOG = 4096
# Paced output is written in chunks of this many bytes; the line's bucket holds a few chunks, so a late wake-up
# (the loop's timer resolution) is made up for by the next writes instead of lowering the rate.
_PACE_CHUNK = 64


@dataclass(frozen=True)
class Faults:
    """A device's faults on the wire. Probabilities are per reply; the device acts before its reply is lost, cut
    or corrupted, as a real one whose answer was garbled on the way would have."""

    garbage: float = 0.0  # noise bytes (1 to garbage_max of them, any value) before a reply
    garbage_max: int = 32
    partial: float = 0.0  # the reply is cut short and never finished: the next frame follows its stub
    drop: float = 0.0  # the reply is lost
    corrupt: float = 0.0  # the reply's CRC is wrong
    telemetry_hz: float = 0.0  # unsolicited T frames per second (0: none)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("garbage", "partial", "drop", "corrupt"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a probability, 0 to 1")
        if not 1 <= self.garbage_max <= 256:
            raise ValueError("garbage_max must be 1 to 256 bytes")
        if not 0.0 <= self.telemetry_hz <= 100_000:
            raise ValueError("telemetry_hz must be 0 to 100000")


NO_FAULTS = Faults()


class Refused(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class PumpModel:
    """A pump controller: start, stop, set_speed(percent, ramp_s), read. Sends no telemetry of its own."""

    report_hz = 0.0

    def __init__(self, rng: random.Random | None = None):
        self.running = False
        self.speed = 0
        self._rng = rng or random.Random(1)

    def execute(self, action: str, params: dict[str, Any]) -> dict[str, Any]:
        if action == "start":
            self.running = True
        elif action == "stop":
            self.running = False
        elif action == "set_speed":
            percent = params.get("percent")
            if not isinstance(percent, int) or not 0 <= percent <= 100:
                raise Refused("bad_param", "percent must be an integer 0-100")
            self.speed = percent
        elif action != "read":
            raise Refused("unknown_action", f"no action {action!r}")
        return self.snapshot()

    def snapshot(self) -> dict[str, Any]:
        return {
            "running": self.running,
            "speed": self.speed,
            "temperature_c": round(18.0 + self._rng.uniform(-0.5, 0.5) + (0.05 * self.speed if self.running else 0), 2),
        }


class SensorNodeModel:
    """A microcontroller sensor node (an ESP32 or RP2040 with a BME280 and a Li-ion cell): reports temperature,
    humidity, pressure and battery voltage every ``interval_s`` as T frames, and an E frame when the temperature
    crosses the alarm threshold (either way). Actions: read, set_interval(seconds), set_alarm(above_c),
    identify(seconds)."""

    def __init__(self, rng: random.Random | None = None):
        self._rng = rng or random.Random(1)
        self.report_hz = 1.0
        self.alarm_above_c: float | None = None
        self._alarmed = False
        self.temperature_c = 21.0
        self.humidity_pct = 45.0
        self.pressure_hpa = 1013.0
        self.battery_v = 4.1
        self.identify_until = 0.0
        self._pending_events: list[dict[str, Any]] = []

    def execute(self, action: str, params: dict[str, Any]) -> dict[str, Any]:
        if action == "set_interval":
            seconds = params.get("seconds")
            if not isinstance(seconds, int | float) or not 0.01 <= seconds <= 3600:
                raise Refused("bad_param", "seconds must be 0.01-3600")
            self.report_hz = 1.0 / seconds
            return {"interval_s": seconds}
        if action == "set_alarm":
            above = params.get("above_c")
            if not isinstance(above, int | float):
                raise Refused("bad_param", "above_c must be a number")
            self.alarm_above_c, self._alarmed = float(above), False
            return {"alarm_above_c": self.alarm_above_c}
        if action == "identify":
            seconds = params.get("seconds", 5)
            self.identify_until = time.monotonic() + float(seconds)
            return {"identifying_s": seconds}
        if action != "read":
            raise Refused("unknown_action", f"no action {action!r}")
        return self.snapshot()

    def snapshot(self) -> dict[str, Any]:
        """A new reading: a slow random walk, as room air drifts; the cell discharges a little each time."""
        rng = self._rng
        self.temperature_c = min(60.0, max(-10.0, self.temperature_c + rng.gauss(0, 0.05)))
        self.humidity_pct = min(100.0, max(0.0, self.humidity_pct + rng.gauss(0, 0.2)))
        self.pressure_hpa += rng.gauss(0, 0.05)
        self.battery_v = max(3.0, self.battery_v - 0.00001)
        reading = {
            "temperature_c": round(self.temperature_c, 2),
            "humidity_pct": round(self.humidity_pct, 1),
            "pressure_hpa": round(self.pressure_hpa, 1),
            "battery_v": round(self.battery_v, 3),
        }
        if self.alarm_above_c is not None:
            above = self.temperature_c > self.alarm_above_c
            if above != self._alarmed:
                self._alarmed = above
                self._pending_events.append(
                    {
                        "event": "temperature_alarm" if above else "temperature_normal",
                        "severity": "warning" if above else "info",
                        "temperature_c": reading["temperature_c"],
                        "above_c": self.alarm_above_c,
                    }
                )
        return reading

    def take_events(self) -> list[dict[str, Any]]:
        events, self._pending_events = self._pending_events, []
        return events


MODELS: dict[str, type[PumpModel] | type[SensorNodeModel]] = {"pump": PumpModel, "sensor_node": SensorNodeModel}


class ExecutionLog:
    """Append-only JSON-lines log of executed actions, and the memory of which ids were executed (lines that a
    full disk held back are written later: :mod:`gatewayd.devices.linelog`)."""

    def __init__(self, path: Path, remember: int = 10_000):
        self.path = path
        self._remember = remember
        self._results: OrderedDict[str, dict[str, Any]] = OrderedDict()
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                    self._remember_result(entry["id"], entry["result"])
                except (ValueError, KeyError, TypeError):
                    continue  # a torn last line after a crash
        self._lines = LineLog(path)

    def result_of(self, command_id: str) -> dict[str, Any] | None:
        return self._results.get(command_id)

    def record(self, command_id: str, action: str, params: dict[str, Any], result: dict[str, Any]) -> None:
        line = json.dumps({"ts": time.time(), "id": command_id, "action": action, "params": params, "result": result})
        self._lines.append(line.encode())  # one write() of one line: survives kill -9 of this process
        self._remember_result(command_id, result)

    def _remember_result(self, command_id: str, result: dict[str, Any]) -> None:
        self._results[command_id] = result
        self._results.move_to_end(command_id)
        while len(self._results) > self._remember:
            self._results.popitem(last=False)

    def close(self) -> None:
        self._lines.close()


class SimulatedDevice:
    def __init__(
        self,
        name: str,
        model: str,
        log_path: Path,
        latency_s: float = 0.0,
        mute: bool = False,
        busy_replies: int = 0,
        faults: Faults = NO_FAULTS,
    ):
        self.name = name
        self.model = MODELS[model](random.Random(faults.seed))
        self.log = ExecutionLog(log_path)
        self.latency_s = latency_s
        self.mute = mute
        self.busy_replies = busy_replies
        self.faults = faults
        self.rng = random.Random(faults.seed)
        self.telemetry_sent = 0
        self.telemetry_skipped = 0  # the TX backlog was full: the flood outran the line
        self.faulted: OrderedDict[str, int] = OrderedDict((k, 0) for k in ("garbage", "partial", "drop", "corrupt"))
        self._busy_counts: OrderedDict[str, int] = OrderedDict()

    def handle(self, payload: dict[str, Any]) -> tuple[Kind, dict[str, Any]]:
        command_id = payload.get("id")
        action = payload.get("action")
        params = payload.get("params", {})
        if not isinstance(command_id, str) or not isinstance(action, str) or not isinstance(params, dict):
            return Kind.NAK, {"id": command_id, "code": "bad_request", "message": "id, action and params required"}
        previous = self.log.result_of(command_id)
        if previous is not None:
            return Kind.REPLY, {"id": command_id, "result": previous, "duplicate": True}
        if self._still_busy(command_id):
            return Kind.NAK, {"id": command_id, "code": "busy", "message": "busy, try again shortly"}
        try:
            result = self.model.execute(action, params)
        except Refused as err:
            return Kind.NAK, {"id": command_id, "code": err.code, "message": err.message}
        self.log.record(command_id, action, params, result)
        return Kind.REPLY, {"id": command_id, "result": result}

    @property
    def report_hz(self) -> float:
        """Unsolicited T frames per second: a flood fault's rate if one is set, else the model's own."""
        return self.faults.telemetry_hz or self.model.report_hz

    def telemetry(self, address: int) -> Frame:
        seq = self.telemetry_sent % 256
        self.telemetry_sent += 1
        return Frame(address, seq, Kind.TELEMETRY, {"n": self.telemetry_sent, **self.model.snapshot()})

    def unsolicited(self, address: int) -> list[Frame]:
        """One report: a T frame, and an E frame for each event the reading raised."""
        frames = [self.telemetry(address)]
        if isinstance(self.model, SensorNodeModel):
            frames += [Frame(address, 0, Kind.EVENT, event) for event in self.model.take_events()]
        return frames

    def on_wire(self, reply: Frame) -> bytes:
        """The bytes that reach the line for ``reply``, after this device's faults (maybe none at all)."""
        faults, rng = self.faults, self.rng
        if faults.drop and rng.random() < faults.drop:
            self.faulted["drop"] += 1
            return b""
        data = reply.to_bytes()
        if faults.corrupt and rng.random() < faults.corrupt:
            self.faulted["corrupt"] += 1
            star = data.rindex(b"*")
            wrong = (int(data[star + 1 : star + 5], 16) ^ (1 << rng.randrange(16))) & 0xFFFF
            data = data[: star + 1] + f"{wrong:04X}".encode("ascii") + b"\n"
        if faults.partial and rng.random() < faults.partial:
            self.faulted["partial"] += 1
            data = data[: rng.randrange(1, len(data) - 1)]  # no newline: the stub prefixes the next frame
        if faults.garbage and rng.random() < faults.garbage:
            self.faulted["garbage"] += 1
            data = rng.randbytes(rng.randint(1, faults.garbage_max)) + data
        return data

    def _still_busy(self, command_id: str) -> bool:
        """True for the first ``busy_replies`` requests of each command id (a device still finishing a ramp)."""
        if not self.busy_replies:
            return False
        seen = self._busy_counts.get(command_id, 0)
        if seen >= self.busy_replies:
            return False
        self._busy_counts[command_id] = seen + 1
        while len(self._busy_counts) > 1024:
            self._busy_counts.popitem(last=False)
        return True


class PtySimulator:
    """Devices on one simulated bus, answering on the master side of a pseudo-terminal.

    With ``link``, the simulator publishes a stable path to its current slave pty (a symlink, replaced
    atomically), as udev does with ``/dev/serial/by-id/...``: the gateway opens the link and finds the device
    again after :meth:`unplug` and :meth:`plug`, which close the pty (the gateway reads EOF/EIO, as when a USB
    adapter is pulled) and open a new one.
    """

    def __init__(
        self,
        bus: str,
        devices: dict[int, SimulatedDevice],
        link: Path | None = None,
        *,
        byte_at_a_time: bool = False,
        byte_pause_s: float = 0.0,
        baudrate: int | None = None,
    ):
        """``byte_at_a_time``: every byte is a write of its own, ``byte_pause_s`` apart (0: each write still yields
        to the event loop, so an in-process reader sees them one by one). ``baudrate``: output paced to that rate,
        10 bits a byte (8N1), as a UART would send it."""
        if not byte_pause_s >= 0:
            raise ValueError("byte_pause_s must not be negative")
        if baudrate is not None and not 50 <= baudrate <= 10_000_000:
            raise ValueError("baudrate must be 50 to 10000000")
        self.bus = bus
        self.devices = devices
        self.link = link
        self.byte_at_a_time = byte_at_a_time
        self.byte_pause_s = byte_pause_s
        self.baudrate = baudrate
        self._line: TokenBucket | None = None
        if baudrate is not None:
            # Imported here: the resilience package pulls in aiohttp (0.3 s), and a simulator process that is
            # started again after an unplug must be back quickly.
            from gatewayd.resilience.bucket import TokenBucket

            self._line = TokenBucket(4 * _PACE_CHUNK, baudrate / 10, name=f"sim.{bus}.line")
        self._tx_wake = asyncio.Event()
        self.port: str = ""
        self._master = -1
        self._slave = -1
        self._decoder = Decoder()
        self._requests: asyncio.Queue[Frame] = asyncio.Queue(maxsize=256)
        self._out = bytearray()
        self._tasks = TaskOwner(f"sim:{bus}")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._link_inode: int | None = None

    async def __aenter__(self) -> PtySimulator:
        self._loop = asyncio.get_running_loop()
        await self._tasks.open()
        try:
            self.plug()
            self._tasks.spawn("serve", self._serve())
            self._tasks.spawn("tx", self._transmit())
            for address, device in self.devices.items():
                if device.report_hz:
                    self._tasks.spawn(f"report:{device.name}", self._flood(address, device))
        except BaseException:
            self._close_fds()
            await self._tasks.close()
            raise
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._unpublish()
        self._close_fds()
        await self._tasks.close()
        for device in self.devices.values():
            device.log.close()

    @property
    def plugged(self) -> bool:
        return self._master >= 0

    def plug(self) -> None:
        """Open a new pty (the device appears) and point the link at it."""
        assert self._loop is not None, "plug() needs the simulator entered"
        if self.plugged:
            return
        self._master, self._slave = os.openpty()
        try:
            tty.setraw(self._master)
            tty.setraw(self._slave)
            os.set_blocking(self._master, False)
            self.port = os.ttyname(self._slave)
            self._loop.add_reader(self._master, self._on_readable)
            self._publish()
        except BaseException:
            self._close_fds()
            raise
        log.info(
            "simulator_started",
            bus=self.bus,
            port=self.port,
            link=str(self.link) if self.link else None,
            devices=self.device_names(),
        )

    def device_names(self) -> list[str]:
        return [d.name for d in self.devices.values()]

    def unplug(self) -> None:
        """Close the pty (the device disappears) and remove the link, as udev removes a by-id link when the
        adapter goes. A link left dangling could, once the pty's number is reused by another program, lead
        the gateway into someone else's terminal. What the devices remember (their execution logs) stays."""
        if not self.plugged:
            return
        self._unpublish()
        self._close_fds()
        log.info("simulator_unplugged", bus=self.bus, port=self.port)

    def _publish(self) -> None:
        if self.link is None:
            return
        self.link.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.link.with_name(f".{self.link.name}.{os.getpid()}.tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(self.port, tmp)
        os.replace(tmp, self.link)  # atomic: a reader sees the old target or the new one, never no link
        self._link_inode = os.lstat(self.link).st_ino

    def _unpublish(self) -> None:
        """Remove the link, unless another simulator has taken it over since."""
        if self.link is None or self._link_inode is None:
            return
        with contextlib.suppress(OSError):
            if os.lstat(self.link).st_ino == self._link_inode:  # a pts path may be reused: compare the link
                self.link.unlink()
        self._link_inode = None

    def _close_fds(self) -> None:
        if self._master >= 0:
            if self._loop is not None:
                self._loop.remove_reader(self._master)
                self._loop.remove_writer(self._master)
            os.close(self._master)
            self._master = -1
        if self._slave >= 0:
            os.close(self._slave)
            self._slave = -1
        # What was on the wire dies with the pty: a device that is plugged back in starts from a clean line.
        self._out.clear()
        self._decoder = Decoder()
        while not self._requests.empty():
            self._requests.get_nowait()

    def _read_master(self) -> bytes:
        """What the gateway wrote and is waiting at the pty's master side: b'' when nothing is, or when no slave
        is open at the moment (the gateway's port is closed: EIO)."""
        try:
            return os.read(self._master, 4096)
        except BlockingIOError:
            return b""
        except OSError as err:
            if err.errno == errno.EIO:
                return b""
            raise

    def _on_readable(self) -> None:
        data = self._read_master()
        for frame in self._decoder.feed(data):
            if frame.kind is Kind.REQUEST and frame.address in self.devices:
                with contextlib.suppress(asyncio.QueueFull):  # a real MCU drops what it cannot buffer too
                    self._requests.put_nowait(frame)

    async def _serve(self) -> None:
        while True:
            frame = await self._requests.get()
            device = self.devices[frame.address]
            if device.mute:
                continue
            if device.latency_s:
                await asyncio.sleep(device.latency_s)
            kind, payload = device.handle(frame.payload)
            self._write(device.on_wire(Frame(frame.address, frame.seq, kind, payload)))

    async def _flood(self, address: int, device: SimulatedDevice) -> None:
        """Unsolicited telemetry at the device's ``report_hz``, on an absolute schedule so timer jitter does not
        slow it. Started for the devices that report when the simulator is entered."""
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            hz = device.report_hz  # a test may turn a flood off and on again (dataclasses.replace), a node its rate
            if not hz:
                await asyncio.sleep(0.05)
                next_at = loop.time()
                continue
            next_at += 1.0 / hz
            delay = next_at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -1.0:  # the loop stalled: carry on from now rather than burst to catch up
                next_at = loop.time()
                await asyncio.sleep(0)
            if not self.plugged:
                continue
            if len(self._out) >= TX_BACKLOG:
                device.telemetry_skipped += 1
                continue
            self._write(b"".join(frame.to_bytes() for frame in device.unsolicited(address)))

    def inject(self, data: bytes) -> None:
        """Put raw bytes on the line (noise, a burst of garbage), behind whatever is already queued."""
        self._write(data)

    def _write(self, data: bytes) -> None:
        if self._master < 0 or not data:
            return
        self._out += data
        if self.byte_at_a_time or self._line is not None:
            self._tx_wake.set()
        else:
            self._flush()

    async def _transmit(self) -> None:
        """The paced and byte-at-a-time line: bytes leave in small writes, at the line's rate."""
        while True:
            await self._tx_wake.wait()
            self._tx_wake.clear()
            while self._out and self._master >= 0:
                size = 1 if self.byte_at_a_time else _PACE_CHUNK
                chunk = bytes(self._out[:size])
                del self._out[:size]
                if self._line is not None:
                    await self._line.acquire(len(chunk))
                await self._send(chunk)
                if self.byte_at_a_time:
                    await asyncio.sleep(self.byte_pause_s)

    async def _send(self, chunk: bytes) -> None:
        while chunk and self._master >= 0:
            try:
                n = os.write(self._master, chunk)
            except BlockingIOError:  # the reader is behind and the pty's buffer is full
                await asyncio.sleep(0.001)
                continue
            chunk = chunk[n:]

    def _flush(self) -> None:
        assert self._loop is not None
        while self._out:
            try:
                n = os.write(self._master, self._out)
            except BlockingIOError:
                self._loop.add_writer(self._master, self._flush)
                return
            del self._out[:n]
        self._loop.remove_writer(self._master)


def _parse_device(spec: str) -> tuple[str, int, str]:
    name, sep, rest = spec.partition(":")
    address, sep2, model = rest.partition(":")
    if not (sep and sep2 and name and address.isdigit() and 1 <= int(address) <= 247 and model in MODELS):
        raise argparse.ArgumentTypeError(f"{spec!r}: want NAME:ADDRESS:MODEL, address 1-247, model in {list(MODELS)}")
    return name, int(address), model


async def _serve_until_signalled(args: argparse.Namespace) -> None:
    devices: dict[int, SimulatedDevice] = {}
    for index, (name, address, model) in enumerate(args.device):
        faults = Faults(
            garbage=args.garbage,
            garbage_max=args.garbage_max,
            partial=args.partial,
            drop=args.drop,
            corrupt=args.corrupt,
            telemetry_hz=args.telemetry_hz,
            seed=args.seed + index,
        )
        devices[address] = SimulatedDevice(
            name, model, args.sim_dir / f"{name}.jsonl", latency_s=args.latency, faults=faults
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with PtySimulator(
        args.link.stem,
        devices,
        link=args.link,
        byte_at_a_time=args.byte_at_a_time,
        byte_pause_s=args.byte_pause,
        baudrate=args.baudrate,
    ):
        await stop.wait()
    log.info("simulator_stopped", link=str(args.link))


def main(argv: list[str] | None = None) -> int:
    """``python -m gatewayd.devices.simulator``: simulated devices behind a new pty, published at ``--link``.

    Point ``serial.<bus>.port`` at the link and set ``serial.<bus>.simulate = false``; stopping this process
    (SIGTERM, SIGINT, or kill -9) is an unplug, starting it again a replug.
    """
    parser = argparse.ArgumentParser(prog="python -m gatewayd.devices.simulator", description=main.__doc__)
    parser.add_argument("--link", type=Path, required=True, help="symlink to publish, pointing at the pty")
    parser.add_argument("--sim-dir", type=Path, required=True, help="directory of the execution logs")
    parser.add_argument(
        "--device",
        action="append",
        type=_parse_device,
        metavar="NAME:ADDRESS:MODEL",
        help="a device on the bus (repeatable; default pump1:1:pump)",
    )
    parser.add_argument("--latency", type=float, default=0.0, help="seconds each device takes to answer")
    faults = parser.add_argument_group("faults (per reply unless said otherwise; every device on the bus)")
    faults.add_argument("--garbage", type=float, default=0.0, metavar="P", help="probability of noise before a reply")
    faults.add_argument("--garbage-max", type=int, default=32, metavar="N", help="most noise bytes at once (1-256)")
    faults.add_argument("--partial", type=float, default=0.0, metavar="P", help="probability a reply is cut short")
    faults.add_argument("--drop", type=float, default=0.0, metavar="P", help="probability a reply is lost")
    faults.add_argument("--corrupt", type=float, default=0.0, metavar="P", help="probability of a wrong CRC")
    faults.add_argument(
        "--telemetry-hz", type=float, default=0.0, metavar="HZ", help="unsolicited T frames per second per device"
    )
    faults.add_argument("--seed", type=int, default=0, help="seed of the fault draws (device i uses seed + i)")
    faults.add_argument("--byte-at-a-time", action="store_true", help="write every byte on its own")
    faults.add_argument("--byte-pause", type=float, default=0.0, metavar="S", help="pause between those writes")
    faults.add_argument("--baudrate", type=int, metavar="BAUD", help="pace the output to BAUD, 10 bits a byte")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    if not args.latency >= 0:
        parser.error("--latency must not be negative")
    try:
        Faults(args.garbage, args.garbage_max, args.partial, args.drop, args.corrupt, args.telemetry_hz)
    except ValueError as err:
        parser.error(str(err))
    if not args.byte_pause >= 0:
        parser.error("--byte-pause must not be negative")
    if args.baudrate is not None and not 50 <= args.baudrate <= 10_000_000:
        parser.error("--baudrate must be 50 to 10000000")
    args.device = args.device or [("pump1", 1, "pump")]
    addresses = [address for _, address, _ in args.device]
    names = [name for name, _, _ in args.device]
    if len(set(addresses)) != len(addresses) or len(set(names)) != len(names):
        parser.error("each --device needs its own name and address")
    from gatewayd.observability.logging import configure

    configure(args.log_level)
    asyncio.run(_serve_until_signalled(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
