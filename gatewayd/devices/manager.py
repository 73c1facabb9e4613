"""Builds every device from the configuration: serial buses (each with a simulator behind a pseudo-terminal in
mock mode), Modbus RTU buses (pymodbus's server as the simulator in mock mode), Modbus TCP connections (pymodbus's
TCP server on loopback in mock mode) and GPIO outputs. Opening a device that is missing marks it unavailable; it
never stops the daemon.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import structlog

from gatewayd.config.loader import LoadedConfig
from gatewayd.config.models import DeviceConfig, ModbusTcpConfig, SerialBusConfig
from gatewayd.config.profiles import GPIO_KINDS, Profile
from gatewayd.devices.base import Device
from gatewayd.devices.gpio import GpioController, GpioInput, GpioOutput, GpioPwm
from gatewayd.devices.serial_bus import SerialBus, SerialDevice
from gatewayd.devices.simulator import Faults, PtySimulator, SimulatedDevice
from gatewayd.telemetry import MemorySink, Record, TelemetrySink

if TYPE_CHECKING:
    from gatewayd.devices.modbus import ModbusBus
    from gatewayd.devices.modbus_sim import ModbusUnit
    from gatewayd.devices.modbus_tcp_sim import ModbusTcpSimulator

log = structlog.get_logger("gatewayd.devices")


class DeviceManager:
    def __init__(self, loaded: LoadedConfig, sink: TelemetrySink | None = None):
        self._loaded = loaded
        self.sink: TelemetrySink = sink if sink is not None else MemorySink()  # telemetry and events
        self.devices: dict[str, Device] = {}
        self.buses: dict[str, SerialBus] = {}
        self.modbus_buses: dict[str, ModbusBus] = {}
        self.simulators: dict[str, PtySimulator] = {}
        self.tcp_simulators: dict[str, ModbusTcpSimulator] = {}  # Modbus TCP connection -> the host mock mode runs
        self._stack = contextlib.AsyncExitStack()

    @property
    def sim_dir(self) -> Path:
        return self._loaded.config.gateway.data_dir / "sim"

    async def __aenter__(self) -> DeviceManager:
        try:
            await self._open()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def _open(self) -> None:
        cfg = self._loaded.config
        profiles = self._loaded.profiles
        for bus_name, bus_cfg in cfg.serial.items():
            if bus_cfg.protocol == "modbus_rtu":
                await self._open_modbus(bus_name, bus_cfg)
                continue
            on_bus = {n: d for n, d in cfg.devices.items() if d.bus == bus_name}
            port = bus_cfg.port
            if cfg.bus_simulated(bus_name):
                sims = {}
                for name, dev in on_bus.items():
                    model = profiles[dev.profile].simulator
                    assert model is not None and dev.address is not None  # checked by the config loader
                    sim_cfg = dev.simulator
                    sims[dev.address] = SimulatedDevice(
                        name,
                        model,
                        self.sim_dir / f"{name}.jsonl",
                        latency_s=sim_cfg.latency_s,
                        mute=sim_cfg.mute,
                        busy_replies=sim_cfg.busy_replies,
                        faults=Faults(
                            garbage=sim_cfg.garbage,
                            partial=sim_cfg.partial,
                            drop=sim_cfg.drop,
                            corrupt=sim_cfg.corrupt,
                            telemetry_hz=sim_cfg.telemetry_hz or 0.0,
                            seed=sim_cfg.seed,
                        ),
                    )
                # The bus opens a stable link, not the pty itself, as it would open /dev/serial/by-id/...: the
                # simulator can then be unplugged and plugged back in (a new pty) under the same name.
                link = self.sim_dir / f"{bus_name}.tty"
                line = bus_cfg.simulator
                sim = await self._stack.enter_async_context(
                    PtySimulator(
                        bus_name,
                        sims,
                        link=link,
                        byte_at_a_time=line.byte_at_a_time,
                        byte_pause_s=line.byte_pause_s,
                        baudrate=line.baudrate,
                    )
                )
                self.simulators[bus_name] = sim
                port = str(link)
                bus_cfg = pty_framing(bus_cfg)
            bus = SerialBus(bus_name, bus_cfg, port, sink=self.sink)
            for name, dev in on_bus.items():
                assert dev.address is not None
                bus.names[dev.address] = name
            bus = await self._stack.enter_async_context(bus)
            self.buses[bus_name] = bus
            for name, dev in on_bus.items():
                assert dev.address is not None
                self.devices[name] = SerialDevice(name, profiles[dev.profile], bus, dev.address)
        for name, connection in cfg.modbus_tcp.items():
            await self._open_modbus_tcp(name, connection)
        gpio_devices = {n: d for n, d in cfg.devices.items() if profiles[d.profile].kind in GPIO_KINDS}
        if gpio_devices:
            controller = await self._stack.enter_async_context(
                GpioController(mock=cfg.gateway.mode == "mock", pin_factory=cfg.gpio.pin_factory)
            )
            for name, dev in gpio_devices.items():
                profile = profiles[dev.profile]
                gpio: GpioOutput | GpioPwm | GpioInput
                if profile.kind == "gpio_input":
                    gpio = GpioInput(name, profile, dev, controller)
                    gpio.listeners.append(self._edge_records)
                elif profile.kind == "gpio_pwm":
                    gpio = GpioPwm(name, profile, dev, controller)
                else:
                    gpio = GpioOutput(name, profile, dev, controller)
                await gpio.open()
                self._stack.push_async_callback(gpio.close)
                self.devices[name] = gpio
        # Keep the configuration's order for listings.
        self.devices = {name: self.devices[name] for name in cfg.devices if name in self.devices}

    def _edge_records(self, edge: dict[str, Any]) -> None:
        """A GPIO input's edge is an event (pressed, released, ...) and a telemetry reading of the level."""
        device, mono = edge["device"], edge["mono"]
        data = {"active": edge["active"], "edges": edge["edges"]}
        self.sink.put(Record.of_event(device, edge["event"], data, mono=mono))
        self.sink.put(Record.telemetry(device, data, mono=mono))

    async def _open_modbus(self, bus_name: str, bus_cfg: SerialBusConfig) -> None:
        """A Modbus RTU bus and its units; in mock mode pymodbus's server answers for them behind a pty."""
        from gatewayd.devices.modbus import ModbusBus  # pymodbus only for configs that use it
        from gatewayd.devices.modbus_link import SerialLink

        on_bus = {n: d for n, d in self._loaded.config.devices.items() if d.bus == bus_name}
        port = bus_cfg.port
        if self._loaded.config.bus_simulated(bus_name):
            from gatewayd.devices.modbus_sim import ModbusSimulator

            link = self.sim_dir / f"{bus_name}.tty"  # a stable name, as for line-protocol buses
            units = simulated_units(self._loaded, on_bus, address_of, self.sim_dir)
            self.simulators[bus_name] = await self._stack.enter_async_context(
                ModbusSimulator(bus_name, units, link=link)
            )
            port = str(link)
            bus_cfg = pty_framing(bus_cfg)
        await self._modbus_devices(ModbusBus(bus_name, bus_cfg, SerialLink(port, bus_cfg)), on_bus, address_of)

    async def _open_modbus_tcp(self, name: str, connection: ModbusTcpConfig) -> None:
        """A Modbus TCP connection and the units it reaches; in mock mode pymodbus's TCP server answers for them,
        on loopback behind a simulated host (gatewayd.devices.modbus_tcp_sim)."""
        from gatewayd.devices.modbus import ModbusBus
        from gatewayd.devices.modbus_link import TcpLink

        on_it = {n: d for n, d in self._loaded.config.devices.items() if d.bus == name}
        host, port = connection.host, connection.port
        if connection.simulated(self._loaded.config.gateway.mode):
            from gatewayd.devices.modbus_tcp_sim import ModbusTcpSimulator

            units = simulated_units(self._loaded, on_it, unit_id_of, self.sim_dir)
            sim = ModbusTcpSimulator(name, units, framer=connection.framer)
            self.tcp_simulators[name] = await self._stack.enter_async_context(sim)
            host, port = sim.host, sim.port
        link = TcpLink(host, port, connection.framer, connection.connect_timeout_s)
        await self._modbus_devices(ModbusBus(name, connection, link), on_it, unit_id_of)

    async def _modbus_devices(
        self, bus: ModbusBus, on_bus: Mapping[str, DeviceConfig], unit_of: Callable[[DeviceConfig], int]
    ) -> None:
        from gatewayd.devices.modbus import ModbusDevice

        bus = await self._stack.enter_async_context(bus)
        self.modbus_buses[bus.name] = bus
        for name, dev in on_bus.items():
            device = ModbusDevice(name, self._loaded.profiles[dev.profile], bus, unit_of(dev), self.sink)
            self.devices[name] = await self._stack.enter_async_context(device)

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stack.aclose()

    def profiles(self) -> Mapping[str, Profile]:
        """Device name -> its profile: what commands are validated against."""
        return {name: dev.profile for name, dev in self.devices.items()}

    def reload_profiles(self, profiles: Mapping[str, Profile], device_profile: Mapping[str, str]) -> list[str]:
        """Swap in re-read profiles (SIGHUP). A profile whose kind changed needs a restart and is kept as it was."""
        changed = []
        for name, dev in self.devices.items():
            new = profiles.get(device_profile.get(name, ""))
            if new is None or new == dev.profile:
                continue
            if new.kind != dev.profile.kind:
                log.warning("profile_reload_needs_restart", device=name, profile=new.name)
                continue
            dev.profile = new
            changed.append(name)
        return changed

    def describe(self) -> list[dict[str, Any]]:
        out = []
        for name, dev in self.devices.items():
            actions = {
                action: {
                    "description": spec.description,
                    "params": spec.json_schema(),
                    "ttl_s": dev.profile.ttl_for(action),
                }
                for action, spec in dev.profile.actions.items()
            }
            out.append(
                {
                    "name": name,
                    "profile": dev.profile.name,
                    "description": self._loaded.config.devices[name].description or dev.profile.description,
                    **dev.availability.to_api(),
                    **dev.describe(),
                    "actions": actions,
                }
            )
        return out


def pty_framing(cfg: SerialBusConfig) -> SerialBusConfig:
    """A simulated bus opens its pseudo-terminal as 8N1: a pty carries bytes, not characters, so parity and data
    bits mean nothing on it, and Linux refuses to set them on one (EINVAL)."""
    return cfg.model_copy(update={"bytesize": 8, "parity": "N", "stopbits": 1})


def simulated_units(
    loaded: LoadedConfig, on_bus: Mapping[str, DeviceConfig], unit_of: Callable[[DeviceConfig], int], sim_dir: Path
) -> dict[int, ModbusUnit]:
    """Mock mode: a simulated unit for each Modbus device on a bus or connection, with the faults its
    ``simulator`` settings ask for and its execution log in ``sim_dir``."""
    from gatewayd.devices.modbus_sim import ModbusUnit, make_model

    units = {}
    for name, dev in on_bus.items():
        profile = loaded.profiles[dev.profile]
        assert profile.simulator is not None  # checked by the config loader
        sim = dev.simulator
        unit = unit_of(dev)
        units[unit] = ModbusUnit(
            name,
            unit,
            make_model(profile.simulator, unit, sim.seed),
            sim_dir / f"{name}.jsonl",
            latency_s=sim.latency_s,
            mute=sim.mute,
            busy_replies=sim.busy_replies,
            faults=Faults(garbage=sim.garbage, partial=sim.partial, drop=sim.drop, corrupt=sim.corrupt, seed=sim.seed),
            profile=profile,
        )
    return units


def address_of(dev: DeviceConfig) -> int:
    assert dev.address is not None  # checked by the config loader
    return dev.address


def unit_id_of(dev: DeviceConfig) -> int:
    assert dev.unit_id is not None  # checked by the config loader
    return dev.unit_id
