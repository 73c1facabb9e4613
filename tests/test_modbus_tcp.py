"""Modbus TCP, and Modbus RTU over TCP, against pymodbus's own TCP server on loopback (behind the simulator's
network side): the RTU bus's tests where TCP has the same faults (exceptions, silent units, noise, replies cut
short, lost or garbled, late replies, the transaction rate), and what only a network does: a host that refuses, a
connection dropped mid-request, an attempt nobody answers, reconnects with capped jitter. The MBAP codec too."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from gatewayd.config import load_config
from gatewayd.config.loader import LoadedConfig
from gatewayd.config.models import ModbusTcpConfig
from gatewayd.devices.line import CALL, Call, DeadlinePassed
from gatewayd.devices.manager import DeviceManager
from gatewayd.devices.modbus import ModbusBus
from gatewayd.devices.modbus_codec import find_mbap_reply, mbap_length
from gatewayd.devices.modbus_link import UNACKNOWLEDGED_S, TcpLink
from gatewayd.devices.modbus_sim import ModbusUnit, Sdm120Model
from gatewayd.devices.modbus_tcp_sim import ModbusTcpSimulator
from gatewayd.devices.simulator import Faults
from gatewayd.errors import DeviceBusy, DeviceRejected, DeviceTimeout, DeviceUnavailable
from gatewayd.resilience.clock import REAL_CLOCK, Clock, FakeClock
from tests.conftest import ROOT, Daemon
from tests.test_bus_limits import most_in_any_window
from tests.test_modbus import (
    GHOST,
    METER_SETUP,
    PLANT_AT_POWER_UP,
    EventSink,
    PlantModel,
    _device,
    _exchange,
    _in_flight,
    _log,
    _plant,
    _quick_profiles,
    _replies_lost_after_noise,
)
from tests.test_modbus_profiles import assert_problems
from tests.test_serial_hotplug import _availability_events, _becomes

Framer = Literal["socket", "rtu"]
FRAMERS = ["socket", "rtu"]


def _cfg(**overrides: Any) -> ModbusTcpConfig:
    settings: dict[str, Any] = {
        "host": "127.0.0.1",
        "response_timeout_s": 0.4,
        "connect_timeout_s": 1.0,
        "reconnect_base_s": 0.01,
        "reconnect_cap_s": 0.05,
        **overrides,
    }
    return ModbusTcpConfig(**settings)


def _bus(port: int, cfg: ModbusTcpConfig, framer: Framer = "socket", clock: Clock = REAL_CLOCK) -> ModbusBus:
    link = TcpLink(cfg.host, port, framer, cfg.connect_timeout_s)
    return ModbusBus("tcp", cfg, link, clock=clock)


@asynccontextmanager
async def _host(
    units: dict[int, ModbusUnit],
    cfg: ModbusTcpConfig | None = None,
    framer: Framer = "socket",
    *,
    clock: Clock = REAL_CLOCK,
    **sim: Any,
) -> AsyncIterator[tuple[ModbusTcpSimulator, ModbusBus]]:
    async with ModbusTcpSimulator("tcp", units, framer=framer, **sim) as host:
        async with _bus(host.port, cfg or _cfg(), framer, clock) as bus:
            assert bus.availability.available
            yield host, bus


# --- the mapping, end to end --------------------------------------------------------------------------------------


@pytest.mark.parametrize("framer", FRAMERS)
async def test_writes_and_merged_reads_over_tcp(tmp_path: Path, framer: Framer) -> None:
    async with _host({1: _plant(tmp_path)}, framer=framer) as (host, bus), _device(bus) as dev:
        await dev.execute("c1", "start", {})
        assert (await dev.execute("c2", "set_speed", {"percent": 55.5}))["raw"] == 555
        await dev.execute("c3", "set_setpoint", {"celsius": -12.25})
        await dev.execute("c4", "set_counter", {"n": 70_000})
        before = bus.transactions
        values = await dev.execute("r1", "read", {})
        assert bus.transactions - before == 7, "touching points share a request, as on RTU"
        written = {"running": True, "speed": 55.5, "setpoint": -12.25, "counter": 70_000}
        assert values == {**PLANT_AT_POWER_UP, **written}
        described = dev.describe()
        transport = "modbus_tcp" if framer == "socket" else "modbus_rtu_over_tcp"
        assert described["transport"] == transport and described["port"] == host.port
        assert described["host"] == "127.0.0.1" and described["address"] == 1
    assert [e["action"] for e in _log(tmp_path / "plant1.jsonl")] == [
        "start",
        "set_speed",
        "set_setpoint",
        "set_counter",
    ]


async def test_exception_replies_become_typed_errors_over_tcp(tmp_path: Path) -> None:
    refuse = {950: 3, 960: 11, 970: 4}
    units = {
        1: _plant(tmp_path, model=PlantModel(refuse)),
        2: _plant(tmp_path, 2, busy_replies=2),
        3: ModbusUnit("meter3", 3, Sdm120Model(3), tmp_path / "meter3.jsonl"),
    }
    async with _host(units) as (_, bus), _device(bus) as dev, _device(bus, 2) as busy:
        with pytest.raises(DeviceRejected) as rejected:
            await dev.execute("v", "set_speed", {"percent": 95})
        assert rejected.value.details["exception_code"] == 3 and not rejected.value.transient
        with pytest.raises(DeviceRejected) as failed:
            await dev.execute("f", "set_speed", {"percent": 97})
        assert failed.value.details["exception_code"] == 4
        with pytest.raises(DeviceTimeout) as behind_gateway:
            await dev.execute("g", "set_speed", {"percent": 96})
        assert behind_gateway.value.details["exception_code"] == 11, "a gateway's unit that did not answer"
        with pytest.raises(DeviceRejected) as illegal_address:
            await _device(bus, profile=GHOST).execute("a", "read", {})
        assert illegal_address.value.details["exception_code"] == 2
        with pytest.raises(DeviceRejected) as illegal_function:
            await _device(bus, 3, profile=METER_SETUP).execute("m", "set_address_fc6", {})
        assert illegal_function.value.details["exception_code"] == 1
        for attempt in range(2):
            with pytest.raises(DeviceBusy):
                await busy.execute(f"b{attempt}", "start", {})
        assert await busy.execute("b2", "start", {}) == {"table": "coil", "address": 0, "value": True}
        assert bus.availability.available and bus.opens == 1, "an exception is an answer, not a broken connection"
    assert _log(tmp_path / "plant1.jsonl") == [], "refused writes are not performed"


async def test_a_silent_unit_behind_a_gateway_times_out_while_its_neighbour_answers(tmp_path: Path) -> None:
    units = {1: _plant(tmp_path, mute=True), 2: _plant(tmp_path, 2)}
    async with _host(units) as (host, bus), _device(bus) as mute, _device(bus, 2) as neighbour:
        with pytest.raises(DeviceTimeout) as silent:
            await mute.execute("m", "read_speed", {})
        assert silent.value.details == {"bus": "tcp", "unit": 1, "function": 3}
        started = time.monotonic()
        assert await neighbour.execute("n", "read_mode", {}) == {"mode": 7}
        assert time.monotonic() - started < 0.2, "transaction ids: no quiet line is kept after a timeout"
        with pytest.raises(DeviceTimeout):
            await _device(bus, 9).execute("x", "start", {})
        assert bus.timeouts == 2 and bus.availability.available and host.accepted == 1


# --- a hostile peer ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("framer", FRAMERS)
async def test_noise_before_every_reply_costs_nothing(tmp_path: Path, framer: Framer) -> None:
    unit = _plant(tmp_path, faults=Faults(garbage=1.0, garbage_max=64, seed=3))
    async with _host({1: unit}, framer=framer) as (_, bus), _device(bus) as dev:
        assert await _exchange(dev, 15) == (30, 0)
        assert bus.timeouts == 0
    assert unit.faulted["garbage"] == 30


@pytest.mark.parametrize("framer", FRAMERS)
@pytest.mark.parametrize("fault", ["partial", "corrupt", "drop"])
async def test_replies_cut_short_garbled_or_lost_end_in_timeouts_never_in_wrong_values(
    tmp_path: Path, framer: Framer, fault: str
) -> None:
    """A corrupt MBAP reply has a wrong transaction id, protocol id, length, unit or function (TCP carries no CRC):
    each is told from the reply; the connection is kept, and the next request is answered."""
    unit = _plant(tmp_path, faults=Faults(**{fault: 0.3}, seed=5))  # type: ignore[arg-type]
    async with _host({1: unit}, _cfg(response_timeout_s=0.25), framer) as (host, bus), _device(bus) as dev:
        answered, timed_out = await _exchange(dev, 12)
        assert bus.opens == 1 and host.accepted == 1
    assert 0 < unit.faulted[fault] < 24
    assert (answered, timed_out) == (24 - unit.spoiled, unit.spoiled)


async def test_every_fault_at_once_byte_by_byte(tmp_path: Path) -> None:
    faults = Faults(garbage=0.3, garbage_max=32, partial=0.1, drop=0.1, corrupt=0.1, seed=9)
    unit = _plant(tmp_path, faults=faults)
    async with _host({1: unit}, _cfg(response_timeout_s=0.25), byte_at_a_time=True) as (_, bus), _device(bus) as dev:
        answered, timed_out = await _exchange(dev, 12)
        assert bus.availability.available and bus.opens == 1
    assert timed_out == unit.spoiled > 0 and answered == 24 - timed_out


async def test_a_burst_of_noise_between_requests_costs_at_most_one_reply(tmp_path: Path) -> None:
    async with _host({1: _plant(tmp_path)}) as (host, bus), _device(bus) as dev:
        host.inject(bytes(range(256)) * 16)  # with every transaction id's bytes, unit id and function code in it
        assert await _replies_lost_after_noise(dev) <= 1


@pytest.mark.parametrize("framer", FRAMERS)
async def test_a_late_reply_is_never_taken_for_the_next_requests(tmp_path: Path, framer: Framer) -> None:
    """Modbus TCP: the late reply carries the last request's transaction id and is passed over at once. RTU over
    TCP has no transaction id: the line is kept quiet for a response timeout after the miss, as on RS-485."""
    timeout = 0.3
    unit = _plant(tmp_path)
    async with _host({1: unit}, _cfg(response_timeout_s=timeout), framer) as (_, bus), _device(bus) as dev:
        await dev.execute("w", "set_speed", {"percent": 11.1})
        unit.latency_s = timeout + 0.1
        with pytest.raises(DeviceTimeout):
            await dev.execute("late", "read_speed", {})
        unit.latency_s = 0.0
        # The same shape as the late reply (one holding register): only its transaction id, or the quiet line,
        # tells them apart.
        assert await dev.execute("next", "read_speed", {}) == {"speed": 11.1}
        assert await dev.execute("next2", "read_mode", {}) == {"mode": 7}, "not 111, the late speed"
        assert bus.timeouts == 1


async def test_a_request_over_tcp_waits_no_quiet_line_after_a_timeout_but_rtu_over_tcp_does(tmp_path: Path) -> None:
    for framer, quiet in (("socket", [0.0]), ("rtu", [0.2])):
        clock = FakeClock()
        units = {1: _plant(tmp_path), 2: _plant(tmp_path, 2, mute=True)}
        cfg = _cfg(response_timeout_s=0.2)
        async with _host(units, cfg, framer, clock=clock) as (_, bus), _device(bus) as dev, _device(bus, 2) as mute:
            with pytest.raises(DeviceTimeout):
                await mute.execute("m", "read_mode", {})
            await dev.execute("after", "read_mode", {})
        assert [s for s in clock.sleeps if s > 0] == pytest.approx([q for q in quiet if q > 0]), framer


# --- what only a network does ----------------------------------------------------------------------------------


@pytest.mark.parametrize("reset", [False, True])
async def test_a_connection_dropped_mid_request_fails_it_at_once_and_comes_back(tmp_path: Path, reset: bool) -> None:
    model = PlantModel()
    unit = _plant(tmp_path, model=model)
    cfg = _cfg(response_timeout_s=1.0)
    with structlog.testing.capture_logs() as logs:
        async with _host({1: unit}, cfg) as (host, bus), _device(bus) as dev:
            await dev.execute("first", "set_speed", {"percent": 1})
            pending = await _in_flight(dev, unit, model)
            dropped_at = time.monotonic()
            await host.disconnect(reset=reset)
            with pytest.raises(DeviceUnavailable):
                await pending
            assert time.monotonic() - dropped_at < 0.5, "not after the 1 s response timeout"
            unit.latency_s = 0.0
            await _becomes(bus.availability, True)
            assert await dev.execute("after", "read_speed", {}) == {"speed": 1}
            assert bus.opens == 2 and host.accepted == 2
    assert _availability_events(logs, "bus:tcp") == ["device_available", "device_unavailable", "device_available"]


async def test_a_host_that_refuses_is_unavailable_saying_why_until_it_listens_again(tmp_path: Path) -> None:
    with structlog.testing.capture_logs() as logs:
        async with ModbusTcpSimulator("tcp", {1: _plant(tmp_path)}) as host:
            await host.refuse()
            async with _bus(host.port, _cfg()) as bus, _device(bus) as dev:
                assert not bus.availability.available
                assert bus.availability.last_error == f"cannot connect to 127.0.0.1:{host.port}: Connection refused"
                with pytest.raises(DeviceUnavailable):
                    await dev.execute("early", "read_mode", {})
                await asyncio.sleep(0.3)  # many attempts, all refused: one log line for the outage
                await host.accept()
                listening = time.monotonic()
                await _becomes(bus.availability, True)
                assert time.monotonic() - listening < 0.5, "the pause between attempts is capped at 0.05 s"
                assert await dev.execute("m", "read_mode", {}) == {"mode": 7}
                # A host whose service stops while the gateway is connected: dropped, then refused.
                await host.refuse()
                await _becomes(bus.availability, False)
                with pytest.raises(DeviceUnavailable):
                    await dev.execute("down", "read_mode", {})
                await host.accept()
                await _becomes(bus.availability, True)
                assert await dev.execute("back", "read_mode", {}) == {"mode": 7}
    assert _availability_events(logs, "bus:tcp") == [
        "device_unavailable",
        "device_available",
        "device_unavailable",
        "device_available",
    ]


class CountingClock(FakeClock):
    """A fake clock that tells when ``n`` pauses have been taken."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n
        self.reached = asyncio.Event()

    async def sleep(self, seconds: float) -> None:
        await super().sleep(seconds)
        if len(self.sleeps) >= self.n:
            self.reached.set()


async def test_reconnect_pauses_are_jittered_and_capped(tmp_path: Path) -> None:
    clock = CountingClock(40)
    cfg = _cfg(reconnect_base_s=0.05, reconnect_cap_s=2.0)
    async with ModbusTcpSimulator("tcp", {1: _plant(tmp_path)}) as host:
        await host.refuse()
        async with _bus(host.port, cfg, clock=clock) as bus:
            async with asyncio.timeout(10):
                await clock.reached.wait()  # forty refused attempts, in no time on the fake clock
            await host.accept()
            await _becomes(bus.availability, True)
    pauses = clock.sleeps[:40]
    assert max(pauses) <= 2.0, "capped"
    late = pauses[10:]  # past the doubling: each pause drawn from [0, cap]
    assert len({round(p, 6) for p in late}) > 20, "full jitter: no two hosts' gateways retry in step"
    assert sum(late) / len(late) == pytest.approx(1.0, abs=0.4), "uniform on [0, cap] averages half the cap"


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")
async def test_an_ipv6_host_is_reached_and_named_in_brackets(tmp_path: Path) -> None:
    async with ModbusTcpSimulator("tcp", {1: _plant(tmp_path)}, host="::1") as host:
        cfg = _cfg(host="::1")
        async with _bus(host.port, cfg) as bus, _device(bus) as dev:
            assert await dev.execute("m", "read_mode", {}) == {"mode": 7}
            assert bus.link.where == f"[::1]:{host.port}"


async def test_an_attempt_nobody_answers_gives_up_after_the_connect_timeout(tmp_path: Path) -> None:
    """A listener whose queue is full lets SYNs go unanswered (Linux drops them), as a host that is off does."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = []
        try:
            for _ in range(4):  # the accept queue (backlog 0 holds one) and the SYN queue fill up
                s = socket.socket()
                s.setblocking(False)
                s.connect_ex(("127.0.0.1", port))
                fillers.append(s)
            await asyncio.sleep(0.1)
            started = time.monotonic()
            async with _bus(port, _cfg(connect_timeout_s=0.3)) as bus:
                took = time.monotonic() - started
                assert not bus.availability.available
                assert bus.availability.last_error == f"cannot connect to 127.0.0.1:{port}: no answer within 0.3 s"
            assert 0.25 <= took < 1.0
        finally:
            for s in fillers:
                s.close()


async def test_the_connection_watches_for_a_peer_that_vanished(tmp_path: Path) -> None:
    async with _host({1: _plant(tmp_path)}) as (_, bus):
        assert bus._client is not None
        sock = bus._client.ctx.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == UNACKNOWLEDGED_S * 1000
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


async def test_the_tcp_connection_keeps_to_its_transaction_rate(tmp_path: Path) -> None:
    rate, burst, n = 10.0, 3, 23
    clock = FakeClock(start=500.0)
    cfg = _cfg(transactions_per_s=rate, transactions_burst=burst)
    sent: list[float] = []
    async with _host({1: _plant(tmp_path)}, cfg, clock=clock) as (_, bus), _device(bus) as dev:
        for i in range(n):
            assert await dev.execute(f"r{i}", "read_mode", {}) == {"mode": 7}
            sent.append(clock.monotonic())
    assert sent[:burst] == [500.0] * burst
    assert sent[-1] - sent[0] == pytest.approx((n - burst) / rate, abs=1e-9)
    assert most_in_any_window(sent, 1.0) <= burst + rate


async def test_commands_take_the_connection_most_urgent_first_and_none_goes_out_after_its_deadline(
    tmp_path: Path,
) -> None:
    """A TCP connection is the same line as an RS-485 bus (gatewayd.devices.line): while a slow read holds it, the
    commands waiting go out critical first, then by priority; one whose deadline passes while it waits is refused
    at its deadline, never sent, and the device never performs it."""
    model = PlantModel()
    unit = _plant(tmp_path, model=model)
    async with _host({1: unit}, _cfg(response_timeout_s=2.0)) as (_, bus), _device(bus) as dev:
        holding = await _in_flight(dev, unit, model)  # a read the unit has, its reply 0.5 s away
        queued_at = time.monotonic()
        orders = [  # in the order they arrive
            (Call("low", 3, None), "set_speed", {"percent": 3}),
            (Call("normal", 2, None), "set_speed", {"percent": 2}),
            (Call("stale", 2, queued_at + 0.15), "set_speed", {"percent": 9}),
            (Call("critical", 0, None), "stop", {}),
        ]
        tasks = {}
        for call, action, params in orders:
            token = CALL.set(call)  # as the dispatcher runs a command (the task copies the context)
            try:
                tasks[call.command_id] = asyncio.create_task(dev.execute(call.command_id, action, params))
            finally:
                CALL.reset(token)
        with pytest.raises(DeadlinePassed):
            await tasks.pop("stale")
        assert time.monotonic() - queued_at < 0.4, "refused at its deadline, not when the connection came free"
        await holding
        unit.latency_s = 0.0
        await asyncio.gather(*tasks.values())
    assert {call.command_id: call.sent for call, _, _ in orders} == {
        "low": True,
        "normal": True,
        "stale": False,
        "critical": True,
    }
    assert [(e["action"], e["values"]) for e in _log(tmp_path / "plant1.jsonl")] == [
        ("stop", [False]),
        ("set_speed", [20]),
        ("set_speed", [30]),
    ], "the critical stop first, then by priority; the stale 9 % never reached the unit"


async def test_a_request_that_is_not_modbus_tcp_ends_the_connection(tmp_path: Path) -> None:
    """The simulator's side: a device closes a connection whose bytes are not MBAP frames."""
    async with ModbusTcpSimulator("tcp", {1: _plant(tmp_path)}) as host:
        reader, writer = await asyncio.open_connection("127.0.0.1", host.port)
        writer.write(b"GET / HTTP/1.0\r\n\r\n")
        await writer.drain()
        async with asyncio.timeout(2):
            assert await reader.read() == b""
        writer.close()


# --- the MBAP codec ----------------------------------------------------------------------------------------------


def _mbap(tid: int, unit: int, pdu: bytes) -> bytes:
    return struct.pack(">HHHB", tid, 0, len(pdu) + 1, unit) + pdu


READ2 = _mbap(7, 1, bytes([3, 0, 10, 0, 2]))  # read holding 10, 2 registers
REPLY2 = _mbap(7, 1, bytes([3, 4, 0, 1, 0, 2]))


def test_mbap_frame_lengths_from_headers() -> None:
    assert mbap_length(REPLY2[:5]) is None
    assert mbap_length(REPLY2) == len(REPLY2) == 13
    assert mbap_length(b"\x00\x01\x00\x01\x00\x06") == 0, "protocol id 1 is not Modbus"
    assert mbap_length(b"\x00\x01\x00\x00\x01\x00") == 0, "longer than any frame"


@given(st.binary(max_size=300))
def test_the_mbap_reply_is_found_after_any_noise(noise: bytes) -> None:
    data = noise + REPLY2
    found = find_mbap_reply(data, READ2)
    assert found is not None and data[found[0] : found[1]] == REPLY2


def test_no_mbap_reply_until_complete_and_consistent() -> None:
    assert find_mbap_reply(REPLY2[:-1], READ2) is None
    for bad in (
        _mbap(6, 1, bytes([3, 4, 0, 1, 0, 2])),  # another transaction: a late reply
        _mbap(7, 2, bytes([3, 4, 0, 1, 0, 2])),  # another unit
        _mbap(7, 1, bytes([4, 4, 0, 1, 0, 2])),  # another function
        _mbap(7, 1, bytes([3, 2, 0, 1])),  # another count
        REPLY2[:2] + b"\x00\x01" + REPLY2[4:],  # protocol id 1
        REPLY2[:4] + b"\x00\x08" + REPLY2[6:] + b"\x00",  # a length that disagrees with the byte count
    ):
        assert find_mbap_reply(bad, READ2) is None, bad.hex()
    refused = _mbap(7, 1, bytes([0x83, 2]))
    assert find_mbap_reply(b"\xff" + refused, READ2) == (1, 1 + len(refused))
    write = _mbap(9, 1, bytes([6, 0, 10, 2, 43]))
    assert find_mbap_reply(write, write) == (0, len(write)), "a single write's reply echoes it"


# --- configuration and the device manager ------------------------------------------------------------------------


def test_check_config_for_modbus_tcp_connections_and_their_devices(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        f'[gateway]\nprofiles_dir = "{ROOT}/hardware/profiles"\n'
        '[serial.rtu]\nport = "/dev/ttyUSB1"\nprotocol = "modbus_rtu"\n'
        '[serial.rs485]\nport = "/dev/ttyUSB2"\nprotocol = "modbus_rtu"\n'
        '[modbus_tcp.rtu]\nhost = "10.0.0.1"\n'
        '[modbus_tcp.plc]\nhost = "10.0.0.5"\n'
        '[modbus_tcp.server]\nhost = "serial-server.local"\nport = 4001\nframer = "rtu"\n'
        '[devices.meter_ok]\nprofile = "eastron_sdm120"\nbus = "plc"\nunit_id = 1\n'
        '[devices.meter_with_address]\nprofile = "eastron_sdm120"\nbus = "plc"\naddress = 2\n'
        '[devices.pump_on_tcp]\nprofile = "sim_pump"\nbus = "plc"\nunit_id = 3\n'
        '[devices.meter_twice]\nprofile = "eastron_sdm120"\nbus = "plc"\nunit_id = 1\n'
        '[devices.meter_255]\nprofile = "eastron_sdm120"\nbus = "server"\nunit_id = 255\n'
        '[devices.meter_on_rtu]\nprofile = "eastron_sdm120"\nbus = "rs485"\naddress = 1\nunit_id = 4\n'
        '[devices.meter_lost]\nprofile = "eastron_sdm120"\nbus = "nowhere"\nunit_id = 1\n'
    )
    assert_problems(
        cfg,
        "modbus_tcp.rtu: [serial.rtu] has this name: devices name their bus, once",
        "devices.meter_with_address.address: a device on a Modbus TCP connection has a unit_id, not an address",
        "devices.meter_with_address.unit_id: a device on a Modbus TCP connection needs a unit_id",
        "devices.pump_on_tcp.bus: profile 'sim_pump' speaks gatewayd, but 'plc' is a Modbus TCP connection",
        "devices.meter_twice.unit_id: unit id 1 on plc is used by meter_ok",
        "devices.meter_255.unit_id: RTU over TCP reaches units on RS-485: a unit_id is an address, 1 to 247",
        "devices.meter_on_rtu.unit_id: unit_id is for Modbus TCP connections: give an address",
        "devices.meter_lost.bus: unknown bus 'nowhere' (no [serial.nowhere] or [modbus_tcp.nowhere])",
    )


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({"host": "10.0.0.5 ; rm"}, "String should match pattern"),
        ({"host": "plc", "port": 0}, "greater than or equal to 1"),
        ({"host": "plc", "framer": "ascii"}, "Input should be 'socket' or 'rtu'"),
        ({"host": "plc", "reconnect_base_s": 2, "reconnect_cap_s": 1}, "reconnect_cap_s must not be less"),
        ({"host": "plc", "response_timeout_s": 0}, "greater than 0"),
    ],
)
def test_connection_settings_are_checked(settings: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        ModbusTcpConfig(**settings)
    connection = ModbusTcpConfig(host="plc")
    assert (connection.port, connection.framer, connection.transactions_per_s) == (502, "socket", None)
    assert connection.simulated("mock") and not connection.simulated("hardware")


async def test_the_same_profiles_over_tcp_and_rtu_over_tcp_in_mock_mode(tmp_path: Path) -> None:
    """The RTU meter and relay board's profiles, unchanged, on a Modbus TCP gateway and a serial server."""
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        f'[gateway]\nmode = "mock"\ndata_dir = "{tmp_path}"\nprofiles_dir = "{_quick_profiles(tmp_path)}"\n'
        '[modbus_tcp.gateway]\nhost = "192.0.2.10"\n'
        '[modbus_tcp.serial_server]\nhost = "192.0.2.11"\nport = 4001\nframer = "rtu"\n'
        '[devices.meter]\nprofile = "eastron_sdm120"\nbus = "gateway"\nunit_id = 1\n'
        '[devices.valves]\nprofile = "waveshare_relay8"\nbus = "serial_server"\nunit_id = 2\n'
        "[devices.valves.simulator]\ngarbage = 0.5\nseed = 4\n"
    )
    loaded = load_config(cfg, environ={})
    sink = EventSink()
    async with DeviceManager(loaded, sink=sink) as manager:
        assert set(manager.tcp_simulators) == {"gateway", "serial_server"} and not manager.simulators
        records = await sink.until(lambda r: {"meter", "valves"} <= {rec.device for rec in r})
        meter = next(r for r in records if r.device == "meter").data
        assert set(meter) == set(loaded.profiles["eastron_sdm120"].telemetry) and 215 <= meter["voltage"] <= 245
        valves = manager.devices["valves"]
        await valves.execute("c1", "on3", {})
        assert (await valves.execute("c2", "read", {}))["relay3"] is True
        described = {d["name"]: d for d in manager.describe()}
        assert described["meter"]["transport"] == "modbus_tcp" and described["meter"]["available"]
        assert described["valves"]["transport"] == "modbus_rtu_over_tcp" and described["valves"]["address"] == 2
        assert described["meter"]["port"] == manager.tcp_simulators["gateway"].port, "mock mode: the loopback host"
        assert manager.tcp_simulators["serial_server"].units[2].faulted["garbage"] > 0, "its simulator settings"
    assert [e["action"] for e in _log(tmp_path / "sim" / "valves.jsonl")] == ["on3"]


# --- the shipped TCP profiles, end to end in mock mode ----------------------------------------------------------

EXAMPLE = ROOT / "hardware" / "examples" / "modbus_tcp.toml"


def _example(tmp_path: Path) -> LoadedConfig:
    environ = {
        "GATEWAYD_GATEWAY__DATA_DIR": str(tmp_path),
        "GATEWAYD_GATEWAY__PROFILES_DIR": str(_quick_profiles(tmp_path)),
    }
    return load_config(EXAMPLE, environ=environ)


def _float32_words(value: float) -> list[int]:
    data = struct.pack(">f", value)
    return [int.from_bytes(data[:2], "big"), int.from_bytes(data[2:], "big")]


async def test_each_tcp_profile_is_polled_and_commanded_end_to_end_in_mock_mode(tmp_path: Path) -> None:
    """hardware/examples/modbus_tcp.toml: the three-phase meter behind a gateway, the inverter, the I/O module, and
    the single-phase meter over RTU over TCP, each read through its profile (units, scaling, word order) and its
    writable actions performed by the simulated device."""
    loaded = _example(tmp_path)
    sink = EventSink()
    names = {"mains", "pv", "pumphouse_io", "workshop_meter"}
    async with DeviceManager(loaded, sink=sink) as manager:
        records = await sink.until(lambda r: names <= {rec.device for rec in r})
        first = {name: next(r.data for r in records if r.device == name) for name in names}
        for name in names:
            assert set(first[name]) == set(manager.devices[name].profile.telemetry), name

        mains, pv, io = (manager.devices[n] for n in ("mains", "pv", "pumphouse_io"))
        m = first["mains"]
        assert all(215 <= m[f"voltage_l{n}"] <= 245 for n in (1, 2, 3))
        for n in (1, 2, 3):  # one request reads a phase's values together: they agree (totals come in another)
            va = m[f"voltage_l{n}"] * m[f"current_l{n}"]
            assert m[f"apparent_power_l{n}"] == pytest.approx(va, rel=1e-5)
            assert m[f"power_l{n}"] == pytest.approx(va * m[f"power_factor_l{n}"], rel=1e-5)
        assert 49.9 <= m["frequency"] <= 50.1 and m["import_energy"] > 48_000 and m["max_power_demand"] >= 0
        assert mains.describe()["points"]["voltage_l1"]["unit"] == "V"
        await mains.execute("d1", "set_demand_period", {"minutes": 15})
        with pytest.raises(DeviceRejected) as odd:
            await mains.execute("d2", "set_demand_period", {"minutes": 7})  # not one of the meter's periods
        assert odd.value.details["exception_code"] == 3
        await mains.execute("d3", "reset_max_demand", {})

        p = first["pv"]
        assert 0 <= p["ac_power"] <= 8200 and p["state"] in (2, 4) and p["connected"] == 1
        assert p["power_limit"] == 100.0 and p["power_limit_enabled"] == 0 and p["energy"] >= 12_345_678
        assert 380 <= p["voltage_l1_l2"] <= 425 and p["ac_current"] == pytest.approx(3 * p["current_l1"], rel=1e-5)
        await pv.execute("p1", "set_power_limit", {"percent": 10})
        await pv.execute("p2", "limit_on", {})
        limited = await pv.execute("p3", "read", {})
        assert limited["state"] == 5 and limited["ac_power"] <= 820 + 1e-3, "throttled to 10 % of 8.2 kW"
        assert limited["power_limit"] == 10.0 and limited["power_limit_enabled"] == 1
        await pv.execute("p4", "set_limit_timeout", {"seconds": 1})
        await pv.execute("p5", "limit_on", {})  # the timeout runs from the limit's last write
        await asyncio.sleep(1.1)
        assert (await pv.execute("p6", "read", {}))["power_limit_enabled"] == 0, "lifted when its timeout ran out"
        await pv.execute("p7", "disconnect", {})
        off = await pv.execute("p8", "read", {})
        assert (off["state"], off["ac_power"], off["connected"]) == (8, 0.0, 0)
        await pv.execute("p9", "connect", {})

        i = first["pumphouse_io"]
        assert all(4 <= i[f"ai{ch}"] <= 20 for ch in range(4)) and i["ai3"] == 4.0, "4-20 mA; AI 3 reads its bottom"
        assert all(0 <= i[f"ai{ch}"] <= 10 for ch in range(4, 8))
        assert [i[f"ai{ch}_type"] for ch in range(8)] == [0x0180] * 4 + [0x0148] * 4
        assert (i["do0"], i["do1"]) == (False, False)
        assert io.describe()["points"]["ai0"]["unit"] == "mA" and io.describe()["points"]["ai4"]["unit"] == "V"
        await io.execute("o1", "on1", {})
        assert (await io.execute("o2", "read", {}))["do0"] is True
        await io.execute("o3", "off1", {})

        assert 215 <= first["workshop_meter"]["voltage"] <= 245
        described = {d["name"]: d for d in manager.describe()}
        assert all(d["available"] and d["kind"] == "modbus" for d in described.values())
        assert described["workshop_meter"]["transport"] == "modbus_rtu_over_tcp"

    writes = {name: _log(tmp_path / "sim" / f"{name}.jsonl") for name in ("mains", "pv", "pumphouse_io")}
    assert [(e["action"], e["function"], e["address"], e["values"]) for e in writes["mains"]] == [
        ("set_demand_period", 16, 0x0002, _float32_words(15.0)),
        ("reset_max_demand", 16, 0xF010, [0]),
    ], "Eastron's set-up registers take function 16 only, and a period it does not have is refused"
    assert [(e["action"], e["address"], e["values"]) for e in writes["pv"]] == [
        ("set_power_limit", 40242, [1000]),
        ("limit_on", 40246, [1]),
        ("set_limit_timeout", 40244, [1]),
        ("limit_on", 40246, [1]),
        ("disconnect", 40241, [0]),
        ("connect", 40241, [1]),
    ]
    assert [e["action"] for e in writes["pumphouse_io"]] == ["on1", "off1"]


def test_the_example_config_runs_in_the_daemon(make_daemon: Any, tmp_path: Path) -> None:
    daemon: Daemon = make_daemon({"GATEWAYD_GATEWAY__PROFILES_DIR": str(_quick_profiles(tmp_path))}, config=EXAMPLE)
    daemon.start()
    status, devices = daemon.get("/api/v1/devices")
    assert status == 200
    assert {d["name"]: (d["available"], d["transport"]) for d in devices["devices"]} == {
        "mains": (True, "modbus_tcp"),
        "pv": (True, "modbus_tcp"),
        "pumphouse_io": (True, "modbus_tcp"),
        "workshop_meter": (True, "modbus_rtu_over_tcp"),
    }
    status, rec, _ = daemon.post(
        {"id": "limit-40", "device": "pv", "action": "set_power_limit", "params": {"percent": 40}}, wait=5
    )
    assert status == 200 and rec["state"] == "succeeded", rec
    assert rec["result"] == {"table": "holding", "address": 40242, "value": 40, "raw": 4000}
    status, refused, _ = daemon.post({"device": "pv", "action": "connect"})
    assert status == 422 and "confirm" in json.dumps(refused), "putting generation back on the grid must be meant"
    assert [e["values"] for e in daemon.sim_log("pv")] == [[4000]]
