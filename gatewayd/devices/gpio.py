"""GPIO outputs through gpiozero. gpiozero is blocking and not thread-safe, so every call runs on one
dedicated thread, never on the event loop. Mock mode uses gpiozero's MockFactory, a Pi uses its default.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any

import structlog

from gatewayd.config.models import DeviceConfig
from gatewayd.config.profiles import Profile
from gatewayd.devices.base import Availability
from gatewayd.errors import DeviceRejected, DeviceUnavailable

log = structlog.get_logger("gatewayd.gpio")


class GpioController:
    """Owns the pin factory and the thread every gpiozero call runs on."""

    def __init__(self, mock: bool):
        self.mock = mock
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
        if self.mock:
            from gpiozero.pins.mock import MockFactory

            return MockFactory()
        from gpiozero import Device

        return Device._default_pin_factory()

    async def call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)


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
        await self._controller.call(device.on if action == "on" else device.off)
        self._state = await self._controller.call(self._read)
        return {"state": self._state}

    def _read(self) -> str:
        return "on" if self._device is not None and self._device.value else "off"

    def describe(self) -> dict[str, Any]:
        return {"kind": "gpio", "pin": self.pin, "state": {"state": self._state}}
