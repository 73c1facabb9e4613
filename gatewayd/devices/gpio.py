"""GPIO through gpiozero: outputs (relay, LED), PWM outputs (dimmer, fan, valve positioner) and digital inputs
(button, reed or float switch, PIR) whose edges become events.

gpiozero is blocking and not thread-safe, so every call runs on one dedicated thread, never on the event loop;
input edges arrive on gpiozero's own thread and are handed to the loop with ``call_soon_threadsafe``. The pin
factory is chosen in ``[gpio] pin_factory``: ``auto`` is gpiozero's MockFactory (with PWM-capable mock pins) in mock
mode and gpiozero's default on a Pi (lgpio on Bookworm); ``lgpio``, ``rpigpio``, ``pigpio``, ``native`` and
``mock`` name one outright.
"""

from __future__ import annotations

import asyncio
import importlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any

import structlog

from gatewayd.config.models import DeviceConfig
from gatewayd.config.profiles import Profile
from gatewayd.devices.base import Availability
from gatewayd.devices.line import sending
from gatewayd.errors import DeviceRejected, DeviceUnavailable

log = structlog.get_logger("gatewayd.gpio")


class GpioController:
    """Owns the pin factory and the thread every gpiozero call runs on."""

    def __init__(self, mock: bool, pin_factory: str = "auto"):
        self.mock = mock
        self.pin_factory = pin_factory
        self.factory: Any = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gatewayd-gpio")

    async def __aenter__(self) -> GpioController:
        try:
            self.factory = await self.call(self._make_factory)
        except Exception as err:  # no GPIO on this machine: the pins are unavailable, the daemon goes on
            log.error("gpio_unavailable", error=str(err))
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.factory is not None:
            await self.call(self.factory.close)
        self._executor.shutdown(wait=True)

    def _make_factory(self) -> Any:
        name = self.pin_factory
        if name == "mock" or (name == "auto" and self.mock):
            from gpiozero.pins.mock import MockFactory, MockPWMPin

            return MockFactory(pin_class=MockPWMPin)  # PWM-capable, and digital in and out like any mock pin
        if name == "auto":
            from gpiozero import Device

            return Device._default_pin_factory()
        module, cls = _FACTORIES[name]
        return getattr(importlib.import_module(module), cls)()

    async def call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)


_FACTORIES = {
    "lgpio": ("gpiozero.pins.lgpio", "LGPIOFactory"),
    "rpigpio": ("gpiozero.pins.rpigpio", "RPiGPIOFactory"),
    "pigpio": ("gpiozero.pins.pigpio", "PiGPIOFactory"),
    "native": ("gpiozero.pins.native", "NativeFactory"),
}


class GpioOutput:
    """A relay or LED on one output pin. It starts released (off): the safe state after a restart."""

    def __init__(self, name: str, profile: Profile, cfg: DeviceConfig, controller: GpioController):
        assert cfg.pin is not None
        self.name = name
        self.profile = profile
        self.pin = cfg.pin
        self.active_high = cfg.active_high
        self.availability = Availability(name, since=0)
        self._controller = controller
        self._device: Any = None
        self._state: str | None = None

    async def open(self) -> None:
        if self._controller.factory is None:
            self.availability.down("no GPIO pin factory")
            return
        try:
            self._device = await self._controller.call(self._make)
        except Exception as err:  # gpiozero raises its own family (PinInUse, BadPinFactory, ...)
            self.availability.down(f"cannot open GPIO {self.pin}: {err}")
            return
        self._state = await self._controller.call(self._read)
        self.availability.up()

    def _make(self) -> Any:
        from gpiozero import DigitalOutputDevice

        return DigitalOutputDevice(
            self.pin, active_high=self.active_high, initial_value=False, pin_factory=self._controller.factory
        )

    async def close(self) -> None:
        if self._device is not None:
            await self._controller.call(self._device.close)
            self._device = None

    async def execute(self, command_id: str, action: str, params: dict[str, Any]) -> dict[str, Any]:
        device = self._device
        if device is None:
            raise DeviceUnavailable(f"GPIO {self.pin} is unavailable: {self.availability.last_error}")
        if action not in ("on", "off"):
            raise DeviceRejected(f"GPIO output has no action {action!r}")
        # on/off set an absolute state, so repeating one after a crash cannot act twice.
        sending()
        await self._controller.call(device.on if action == "on" else device.off)
        self._state = await self._controller.call(self._read)
        return {"state": self._state}

    def _read(self) -> str:
        return "on" if self._device is not None and self._device.value else "off"

    def describe(self) -> dict[str, Any]:
        return {"kind": "gpio", "pin": self.pin, "state": {"state": self._state}}


class GpioPwm(GpioOutput):
    """A PWM output (LED dimmer, fan, proportional valve): on, off, and set percent. Starts at 0 %."""

    def _make(self) -> Any:
        from gpiozero import PWMOutputDevice

        return PWMOutputDevice(
            self.pin,
            active_high=self.active_high,
            initial_value=0,
            frequency=self.profile.pwm_frequency_hz,
            pin_factory=self._controller.factory,
        )

    async def execute(self, command_id: str, action: str, params: dict[str, Any]) -> dict[str, Any]:
        device = self._device
        if device is None:
            raise DeviceUnavailable(f"GPIO {self.pin} is unavailable: {self.availability.last_error}")
        if action == "set":
            value = float(params["percent"]) / 100
        elif action in ("on", "off"):
            value = 1.0 if action == "on" else 0.0
        else:
            raise DeviceRejected(f"PWM output has no action {action!r}")
        # An absolute level, so repeating it after a crash cannot act twice.
        sending()
        await self._controller.call(setattr, device, "value", value)
        self._state = await self._controller.call(self._read)
        return self._result()

    def _read(self) -> str:
        return "on" if self._device is not None and self._device.value > 0 else "off"

    def _result(self) -> dict[str, Any]:
        percent = round(self._device.value * 100, 1) if self._device is not None else None
        return {"state": self._state, "percent": percent}

    def describe(self) -> dict[str, Any]:
        return {"kind": "gpio", "pin": self.pin, "state": self._result()}


EdgeListener = Callable[[dict[str, Any]], None]


class GpioInput:
    """A digital input. Each edge (debounced by ``input.bounce_s``) becomes an event: logged as ``gpio_edge`` with
    the profile's event name, counted, kept as the device's state, and passed to ``listeners`` (the telemetry
    outbox). The one action, ``read``, returns the level and the edge count."""

    def __init__(self, name: str, profile: Profile, cfg: DeviceConfig, controller: GpioController):
        assert cfg.pin is not None
        self.name = name
        self.profile = profile
        self.pin = cfg.pin
        self.availability = Availability(name, since=0)
        self.listeners: list[EdgeListener] = []
        self.edges = 0
        self.last_event: dict[str, Any] | None = None
        self._controller = controller
        self._device: Any = None
        self._active: bool | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self._controller.factory is None:
            self.availability.down("no GPIO pin factory")
            return
        try:
            self._device = await self._controller.call(self._make)
        except Exception as err:
            self.availability.down(f"cannot open GPIO {self.pin}: {err}")
            return
        self._active = bool(await self._controller.call(lambda: self._device.is_active))
        self.availability.up()

    def _make(self) -> Any:
        from gpiozero import DigitalInputDevice

        spec = self.profile.input
        device = DigitalInputDevice(
            self.pin, pull_up=spec.pull_up, bounce_time=spec.bounce_s or None, pin_factory=self._controller.factory
        )
        device.when_activated = lambda: self._from_thread(True)
        device.when_deactivated = lambda: self._from_thread(False)
        return device

    def _from_thread(self, active: bool) -> None:
        """On gpiozero's thread: stamp the edge now, handle it on the loop."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._edge, active, time.time(), time.monotonic())

    def _edge(self, active: bool, at: float, mono: float) -> None:
        if active == self._active:
            return  # a repeat of the level we have (a bounce that got through): not an edge
        self._active = active
        self.edges += 1
        spec = self.profile.input
        event = {
            "device": self.name,
            "event": spec.active_event if active else spec.inactive_event,
            "active": active,
            "at": at,
            "mono": mono,
            "edges": self.edges,
        }
        self.last_event = event
        log.info("gpio_edge", device=self.name, pin=self.pin, edge=event["event"], active=active)
        for listener in list(self.listeners):
            try:
                listener(event)
            except Exception:
                log.exception("gpio_edge_listener_failed", device=self.name)

    async def close(self) -> None:
        if self._device is not None:
            await self._controller.call(self._device.close)
            self._device = None

    async def execute(self, command_id: str, action: str, params: dict[str, Any]) -> dict[str, Any]:
        if self._device is None:
            raise DeviceUnavailable(f"GPIO {self.pin} is unavailable: {self.availability.last_error}")
        if action != "read":
            raise DeviceRejected(f"a GPIO input has no action {action!r}")
        return self._state()

    def _state(self) -> dict[str, Any]:
        return {
            "state": None if self._active is None else ("active" if self._active else "inactive"),
            "edges": self.edges,
            "last_event": None if self.last_event is None else self.last_event["event"],
        }

    def describe(self) -> dict[str, Any]:
        return {"kind": "gpio", "pin": self.pin, "state": self._state()}
