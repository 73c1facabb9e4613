"""GPIO through gpiozero's MockFactory: outputs, PWM, and input edges turned into events on the event loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gatewayd.config.models import DeviceConfig
from gatewayd.config.profiles import Profile
from gatewayd.devices.gpio import GpioController, GpioInput, GpioOutput, GpioPwm
from gatewayd.errors import DeviceRejected
from tests.conftest import Daemon

OUTPUT = Profile.model_validate({"name": "relay", "kind": "gpio_output", "actions": {"on": {}, "off": {}}})
PWM = Profile.model_validate(
    {
        "name": "dimmer",
        "kind": "gpio_pwm",
        "actions": {"on": {}, "off": {}, "set": {"params": {"percent": {"type": "float", "min": 0, "max": 100}}}},
    }
)
BUTTON = Profile.model_validate(
    {"name": "button", "kind": "gpio_input", "actions": {"read": {"actuates": False}}, "input": {"bounce_s": None}}
)


def _cfg(pin: int) -> DeviceConfig:
    return DeviceConfig(profile="x", pin=pin)


@pytest.fixture
async def controller() -> AsyncIterator[GpioController]:
    async with GpioController(mock=True) as ctl:
        assert ctl.factory is not None
        yield ctl


async def test_output_drives_its_pin_and_starts_released(controller: GpioController) -> None:
    relay = GpioOutput("relay1", OUTPUT, _cfg(17), controller)
    await relay.open()
    pin = controller.factory.pin(17)
    assert relay.availability.available and pin.state == 0
    assert await relay.execute("c1", "on", {}) == {"state": "on"}
    assert pin.state == 1
    assert await relay.execute("c2", "off", {}) == {"state": "off"}
    assert pin.state == 0
    await relay.close()


async def test_pwm_output_sets_the_duty_cycle(controller: GpioController) -> None:
    dimmer = GpioPwm("dimmer1", PWM, _cfg(18), controller)
    await dimmer.open()
    pin = controller.factory.pin(18)
    assert pin.state == 0
    assert await dimmer.execute("c1", "set", {"percent": 40}) == {"state": "on", "percent": 40.0}
    assert pin.state == pytest.approx(0.4)
    assert (await dimmer.execute("c2", "off", {}))["percent"] == 0.0
    assert pin.state == 0
    with pytest.raises(DeviceRejected):
        await dimmer.execute("c3", "blink", {})
    await dimmer.close()


async def test_input_edges_become_events_on_the_loop(controller: GpioController) -> None:
    button = GpioInput("button1", BUTTON, _cfg(4), controller)
    seen: list[tuple[dict[str, Any], bool]] = []
    loop_thread = threading.get_ident()
    got = asyncio.Event()

    def listener(event: dict[str, Any]) -> None:
        seen.append((event, threading.get_ident() == loop_thread))
        got.set()

    button.listeners.append(listener)
    await button.open()
    assert await button.execute("r1", "read", {}) == {"state": "inactive", "edges": 0, "last_event": None}
    pin = controller.factory.pin(4)

    # Pressed: the contact pulls the pin low (pull-up wiring). The edge happens on another thread.
    await controller.call(pin.drive_low)
    await asyncio.wait_for(got.wait(), 2)
    got.clear()
    await controller.call(pin.drive_high)
    await asyncio.wait_for(got.wait(), 2)

    assert [e["event"] for e, _ in seen] == ["pressed", "released"]
    assert all(on_loop for _, on_loop in seen), "listeners run on the event loop, not gpiozero's thread"
    assert seen[0][0]["at"] <= seen[1][0]["at"]
    assert await button.execute("r2", "read", {}) == {"state": "inactive", "edges": 2, "last_event": "released"}
    await button.close()


async def test_an_unavailable_factory_marks_the_device_down_without_raising() -> None:
    async with GpioController(mock=False, pin_factory="pigpio") as ctl:  # no pigpiod here: the factory fails
        button = GpioInput("button1", BUTTON, _cfg(4), ctl)
        await button.open()
        assert not button.availability.available
        assert button.availability.last_error == "no GPIO pin factory"


def test_profiles_of_each_gpio_kind_are_checked() -> None:
    with pytest.raises(ValueError, match="gpio_input profiles support the actions"):
        Profile.model_validate({"name": "b", "kind": "gpio_input", "actions": {"on": {}}})
    with pytest.raises(ValueError, match="takes one parameter, percent"):
        Profile.model_validate({"name": "d", "kind": "gpio_pwm", "actions": {"set": {}}})


def test_the_daemon_runs_inputs_and_pwm_outputs_on_mock_pins(make_daemon: Any) -> None:
    d: Daemon = make_daemon(
        {
            "GATEWAYD_DEVICES__DOOR1__PROFILE": "gpio_button",
            "GATEWAYD_DEVICES__DOOR1__PIN": "4",
            "GATEWAYD_DEVICES__FAN1__PROFILE": "gpio_pwm_dimmer",
            "GATEWAYD_DEVICES__FAN1__PIN": "18",
        }
    )
    d.start()
    status, rec, _ = d.post({"device": "fan1", "action": "set", "params": {"percent": 35}}, wait=5)
    assert status == 200 and rec["result"] == {"state": "on", "percent": 35.0}, rec
    status, rec, _ = d.post({"device": "door1", "action": "read"}, wait=5)
    assert status == 200 and rec["result"] == {"state": "inactive", "edges": 0, "last_event": None}, rec
    status, body, _ = d.post({"device": "door1", "action": "on"})
    assert status == 422 and body["error"]["details"]["errors"][0]["field"] == "action"  # an input has no outputs
    _, devices = d.get("/api/v1/devices")
    kinds = {dev["name"]: dev["kind"] for dev in devices["devices"]}
    assert kinds["door1"] == kinds["fan1"] == "gpio" and all(dev["available"] for dev in devices["devices"])
