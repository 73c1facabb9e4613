"""``gatewayd scan``: what a technician does first when wiring a new Modbus device. Probe a bus or a host for the unit
ids that answer, and with a profile, read its points once from each, printing values with their units.

A unit answers when it sends anything back to the probe: data, or an exception (an address it does not have is
still an answer from a unit that is there). Silence, or a gateway's exception 11 (its target did not respond), is
no unit. The probe without a profile reads holding register 0; with one it reads the profile's points, so a unit
that answers but refuses them is told apart: it is there, and it is not the device the profile describes.

The bus is the daemon's own :class:`~gatewayd.devices.modbus.ModbusBus`, so the scan sees the line as the daemon
will: the same timeouts, hunt for the reply and quiet line after a miss. Stop the daemon first if it holds the
serial port; a TCP device may take only a few connections at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from gatewayd.config.loader import LoadedConfig, load_config, load_profiles
from gatewayd.config.models import ModbusTcpConfig, SerialBusConfig
from gatewayd.config.profiles import Profile
from gatewayd.devices.manager import address_of, simulated_units, unit_id_of
from gatewayd.devices.modbus import ModbusBus, ModbusDevice
from gatewayd.devices.modbus_codec import Value
from gatewayd.devices.modbus_link import ModbusLink, SerialLink, TcpLink
from gatewayd.errors import ConfigError, ConfigProblem, DeviceTimeout, DeviceUnavailable, GatewayError
from gatewayd.telemetry import MemorySink

EXIT_FOUND, EXIT_NONE, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
TRANSPORTS = {"modbus_rtu": "Modbus RTU", "modbus_tcp": "Modbus TCP", "modbus_rtu_over_tcp": "Modbus RTU over TCP"}


def parse_units(spec: str, highest: int = 255) -> list[int]:
    """``"1-10,20,255"`` -> the unit ids in order, each once; ValueError for anything else."""
    units: list[int] = []
    for part in spec.split(","):
        first, sep, last = part.strip().partition("-")
        try:
            low, high = int(first), int(last if sep else first)
        except ValueError:
            raise ValueError(f"{part.strip()!r} is not a unit id or a range of them (1-247, 1,2,5)") from None
        if not 0 <= low <= high <= highest:
            raise ValueError(f"{part.strip()!r}: unit ids are 0 to {highest}, low to high")
        units.extend(u for u in range(low, high + 1) if u not in units)
    return units


@dataclass
class Found:
    """A unit that answered the probe."""

    unit: int
    values: dict[str, Value] = field(default_factory=dict)  # with a profile: every point read
    refused: str | None = None  # with a profile: why its points could not all be read

    def to_json(self, profile: Profile | None) -> dict[str, Any]:
        units = {} if profile is None else {name: point.unit for name, point in profile.telemetry.items()}
        return {
            "unit": self.unit,
            "values": {n: {"value": _finite(v), "unit": units.get(n)} for n, v in self.values.items()},
            "refused": self.refused,
        }


@dataclass
class Scan:
    """What to scan and how. ``link`` and ``settings`` are the daemon's own for that bus or connection."""

    name: str
    link: ModbusLink
    settings: SerialBusConfig | ModbusTcpConfig
    units: Sequence[int]
    profile: Profile | None = None


async def scan(job: Scan, out: TextIO, *, as_json: bool = False) -> int:
    """Probe every unit of ``job`` in turn, printing each that answers (and its values) as it is found."""
    what = TRANSPORTS[job.link.describe()["transport"]]
    if not as_json:
        timeout = job.settings.response_timeout_s
        about = f"profile {job.profile.name}" if job.profile else "no profile: holding register 0"
        ids = f"{len(job.units)} unit id(s)"
        print(f"scanning {job.link.where} ({what}), {ids}, {timeout:g} s timeout, {about}", file=out)
    found: list[Found] = []
    async with ModbusBus(job.name, job.settings, job.link) as bus:
        if not bus.availability.available:
            print(f"gatewayd: {bus.availability.last_error}", file=out)
            return EXIT_UNREACHABLE
        for unit in job.units:
            try:
                answer = await _probe(bus, unit, job.profile)
            except DeviceUnavailable as err:
                print(f"gatewayd: {err.message}", file=out)
                return EXIT_UNREACHABLE
            if answer is None:
                continue
            found.append(answer)
            if not as_json:
                _print_unit(answer, job.profile, out)
    if as_json:
        json.dump([f.to_json(job.profile) for f in found], out, indent=2)
        print(file=out)
    else:
        ids = ", ".join(str(f.unit) for f in found) or "none"
        print(f"{len(found)} unit(s) answered: {ids}", file=out)
    return EXIT_FOUND if found else EXIT_NONE


async def _probe(bus: ModbusBus, unit: int, profile: Profile | None) -> Found | None:
    before = bus.transactions
    try:
        if profile is None or not profile.telemetry:
            await bus.read(unit, "holding", 0, 1)
            return Found(unit)
        device = ModbusDevice(f"unit{unit}", profile, bus, unit, MemorySink())  # no poller: read once
        return Found(unit, await device.read_points(list(profile.telemetry)))
    except DeviceTimeout as err:
        if bus.transactions == before or err.details.get("exception_code") is not None:
            return None  # silence, or a gateway saying its target is silent: nobody there
        return Found(unit, refused=f"timed out after answering: {err.message}")
    except DeviceUnavailable:
        raise
    except GatewayError as err:  # an exception reply: a unit is there
        return Found(unit, refused=None if profile is None else err.message)


def _print_unit(found: Found, profile: Profile | None, out: TextIO) -> None:
    if found.refused is not None and profile is not None:
        print(f"unit {found.unit}: answers, but not as {profile.name} expects: {found.refused}", file=out)
        return
    print(f"unit {found.unit}: answers", file=out)
    if profile is None:
        return
    width = max(len(name) for name in found.values)
    for name, value in found.values.items():
        unit = profile.telemetry[name].unit
        shown = format(value, ".7g") if isinstance(value, float) else str(value)
        print(f"    {name:<{width}}  {shown}{' ' + unit if unit else ''}", file=out)


def _finite(value: Value) -> Value | None:
    """JSON has no NaN: a register a device leaves unimplemented (SunSpec's NaN) is null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


# --- building the job -------------------------------------------------------------------------------------------


def tcp_job(
    host: str, port: int, *, framer: str, timeout_s: float, units: Iterable[int], profile: Profile | None
) -> Scan:
    settings = ModbusTcpConfig(
        host=host, port=port, framer=framer, response_timeout_s=timeout_s, connect_timeout_s=max(timeout_s, 3.0)
    )
    link = TcpLink(host, port, settings.framer, settings.connect_timeout_s)
    return Scan("scan", link, settings, list(units), profile)


def serial_job(settings: SerialBusConfig, units: Iterable[int], profile: Profile | None) -> Scan:
    return Scan("scan", SerialLink(settings.port, settings), settings, list(units), profile)


@contextlib.asynccontextmanager
async def simulated(job: Scan, units: dict[int, Any]) -> AsyncIterator[Scan]:
    """Mock mode: the job pointed at a simulated host (or line) answering for ``units`` (ModbusUnit by id), as the
    daemon would run it."""
    if isinstance(job.link, TcpLink):
        from gatewayd.devices.modbus_tcp_sim import ModbusTcpSimulator

        async with ModbusTcpSimulator(job.name, units, framer=job.link.framer) as host:
            link = TcpLink(host.host, host.port, job.link.framer, job.link.connect_timeout_s)
            yield Scan(job.name, link, job.settings, job.units, job.profile)
        return
    from gatewayd.devices.manager import pty_framing
    from gatewayd.devices.modbus_sim import ModbusSimulator

    assert isinstance(job.settings, SerialBusConfig)
    async with ModbusSimulator(job.name, units) as line:
        settings = pty_framing(job.settings)
        yield Scan(job.name, SerialLink(line.port, settings), settings, job.units, job.profile)


# --- the command ------------------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> int:
    """``gatewayd scan``, from its parsed arguments (gatewayd.cli)."""
    try:
        profile = _profile(args)
        job, units = _job(args, profile)
    except (ValueError, ConfigError) as err:
        print(f"gatewayd scan: {err}", file=sys.stderr)
        return EXIT_USAGE

    async def run() -> int:
        if units is None:
            return await scan(job, sys.stdout, as_json=args.json)
        print(f"mock mode: scanning the simulated {job.name}, as the daemon runs it", file=sys.stderr)
        with tempfile.TemporaryDirectory(prefix="gatewayd-scan-") as logs:  # the simulated units', not the daemon's
            async with simulated(job, units(Path(logs))) as sim_job:
                return await scan(sim_job, sys.stdout, as_json=args.json)

    return asyncio.run(run())


def _profile(args: argparse.Namespace) -> Profile | None:
    """``--profile``: a file, or a name in ``--profiles``, else in the config's profiles directory."""
    if args.profile is None:
        return None
    directory: Path
    if args.profile.endswith(".toml"):
        path = Path(args.profile)
        directory, name = path.parent, path.stem
    elif args.profiles is not None:
        directory, name = Path(args.profiles), args.profile
    elif args.config is not None:
        directory, name = _config(args).config.gateway.profiles_dir, args.profile
    else:
        directory, name = Path("hardware/profiles"), args.profile
    problems: list[ConfigProblem] = []
    profiles = load_profiles(directory, problems)
    if name not in profiles:
        raise ValueError("; ".join(str(p) for p in problems) or f"no profile {name!r} in {directory}")
    if profiles[name].kind != "modbus_rtu":
        raise ValueError(f"profile {name!r} is not a Modbus profile (kind {profiles[name].kind})")
    return profiles[name]


def _config(args: argparse.Namespace) -> LoadedConfig:
    try:
        return load_config(args.config)
    except ConfigError as err:
        raise ValueError(f"{args.config}: " + "; ".join(str(p) for p in err.problems)) from None


SimulatedUnits = Callable[[Path], dict[int, Any]]  # their logs' directory -> the units, by id


def _job(args: argparse.Namespace, profile: Profile | None) -> tuple[Scan, SimulatedUnits | None]:
    """The scan, and in mock mode how to make the simulated units it scans (None: the real bus or host)."""
    if args.host:
        units = parse_units(args.units, 247 if args.rtu_over_tcp else 255)
        framer = "rtu" if args.rtu_over_tcp else "socket"
        job = tcp_job(args.host, args.port, framer=framer, timeout_s=args.timeout or 1.0, units=units, profile=profile)
        return job, None
    if args.serial:
        settings = SerialBusConfig(
            port=args.serial,
            protocol="modbus_rtu",
            baudrate=args.baudrate,
            parity=args.parity,
            stopbits=args.stopbits,
            response_timeout_s=args.timeout or 0.5,
        )
        return serial_job(settings, parse_units(args.units, 247), profile), None
    loaded = _config(args)
    cfg = loaded.config
    on_bus = {n: d for n, d in cfg.devices.items() if d.bus == args.bus}
    if args.bus in cfg.modbus_tcp:
        connection = cfg.modbus_tcp[args.bus]
        if args.timeout:
            connection = connection.model_copy(update={"response_timeout_s": args.timeout})
        link = TcpLink(connection.host, connection.port, connection.framer, connection.connect_timeout_s)
        units = parse_units(args.units, 247 if connection.framer == "rtu" else 255)
        job = Scan(args.bus, link, connection, units, profile)
        simulate = connection.simulated(cfg.gateway.mode)
        return job, (lambda logs: simulated_units(loaded, on_bus, unit_id_of, logs)) if simulate else None
    bus = cfg.serial.get(args.bus)
    if bus is None or bus.protocol != "modbus_rtu":
        raise ValueError(f"{args.config} has no Modbus TCP connection or Modbus RTU bus {args.bus!r}")
    if args.timeout:
        bus = bus.model_copy(update={"response_timeout_s": args.timeout})
    job = serial_job(bus, parse_units(args.units, 247), profile)
    job.name = args.bus
    simulate = cfg.bus_simulated(args.bus)
    return job, (lambda logs: simulated_units(loaded, on_bus, address_of, logs)) if simulate else None
