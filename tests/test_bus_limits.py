"""Per-bus settings shared by both bus kinds, on the line-protocol bus: the transaction rate (a token bucket on
an injected clock, so the schedule is exact and nothing sleeps for real) and the character framing handed to the
port. The Modbus bus has the same tests in test_modbus.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import serial

from gatewayd.config.models import SerialBusConfig
from gatewayd.devices.serial_bus import SerialBus
from gatewayd.devices.simulator import PtySimulator, SimulatedDevice
from gatewayd.resilience.clock import FakeClock


def most_in_any_window(times: list[float], window_s: float) -> int:
    """The largest number of ``times`` inside any half-open window of ``window_s``."""
    return max(sum(1 for t in times if start <= t < start + window_s) for start in times)


async def test_the_line_protocol_bus_keeps_to_its_transaction_rate(tmp_path: Path) -> None:
    rate, burst, n = 10.0, 3, 23
    clock = FakeClock(start=1000.0)
    cfg = SerialBusConfig(port="x", transactions_per_s=rate, transactions_burst=burst)
    devices = {1: SimulatedDevice("pump1", "pump", tmp_path / "pump1.jsonl")}
    sent: list[float] = []
    async with PtySimulator("rate", devices) as sim, SerialBus("rate", cfg, sim.port, clock=clock) as bus:
        for i in range(n):
            reply = await bus.transact(1, {"id": f"r{i}", "action": "read", "params": {}})
            assert reply["id"] == f"r{i}"
            sent.append(clock.monotonic())  # the fake clock moves only while the bucket makes a request wait
    assert sent[:burst] == [1000.0] * burst, "the burst goes at once"
    assert sent[-1] - sent[0] == pytest_approx((n - burst) / rate), "then one request per 1/rate"
    assert most_in_any_window(sent, 1.0) <= burst + rate
    assert all(b - a >= 1 / rate - 1e-9 for a, b in zip(sent[burst:], sent[burst + 1 :], strict=False))


async def test_without_a_rate_the_line_protocol_bus_never_waits(tmp_path: Path) -> None:
    clock = FakeClock()
    devices = {1: SimulatedDevice("pump1", "pump", tmp_path / "pump1.jsonl")}
    async with (
        PtySimulator("free", devices) as sim,
        SerialBus("free", SerialBusConfig(port="x"), sim.port, clock=clock) as bus,
    ):
        for i in range(20):
            await bus.transact(1, {"id": f"f{i}", "action": "read", "params": {}})
    assert clock.sleeps == [] and clock.monotonic() == 0.0


async def test_the_line_protocol_bus_opens_its_port_with_the_configured_framing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Speed and stop bits on a real pty. Linux refuses parity and 7-bit characters on a pty (EINVAL), so for those
    pyserial's open is watched: the bus must hand it the configured framing."""
    devices = {1: SimulatedDevice("pump1", "pump", tmp_path / "pump1.jsonl")}
    cfg = SerialBusConfig(port="x", baudrate=9600, stopbits=2)
    async with PtySimulator("framed", devices) as sim, SerialBus("framed", cfg, sim.port) as bus:
        assert bus._writer is not None
        port = bus._writer.transport.serial  # type: ignore[attr-defined]
        assert (port.baudrate, port.bytesize, port.parity, port.stopbits) == (9600, 8, "N", 2)
        assert (await bus.transact(1, {"id": "x", "action": "read", "params": {}}))["id"] == "x"

    opened: list[dict[str, Any]] = []
    real_open = serial.serial_for_url

    def watched_open(url: str, *args: Any, **kwargs: Any) -> Any:
        opened.append(kwargs)
        return real_open(url, *args, **{**kwargs, "bytesize": 8, "parity": "N"})

    monkeypatch.setattr(serial, "serial_for_url", watched_open)
    cfg = SerialBusConfig(port="x", baudrate=19200, bytesize=7, parity="E", stopbits=1)
    devices = {1: SimulatedDevice("pump1", "pump", tmp_path / "pump1.jsonl")}
    async with PtySimulator("framed", devices) as sim, SerialBus("framed", cfg, sim.port) as bus:
        assert bus.availability.available
    assert [(k["baudrate"], k["bytesize"], k["parity"], k["stopbits"]) for k in opened] == [(19200, 7, "E", 1)]


def pytest_approx(value: float) -> object:
    return pytest.approx(value, abs=1e-9)
