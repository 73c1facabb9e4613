"""The serial bus over a real pseudo-terminal, against a simulator that misbehaves: bytes one at a time, noise
between frames, a megabyte of garbage, wrong CRCs, frames cut short, lost replies, a device flooding telemetry.
Whatever the line does, the bus does not crash, its receive buffer stays bounded, a transaction either gets its
own reply or ends in DeviceTimeout (never someone else's reply), and a flooding device is throttled without
slowing the others down."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import structlog

from gatewayd.config.models import SerialBusConfig
from gatewayd.devices.framing import MAX_FRAME, Decoder, Frame, Kind
from gatewayd.devices.serial_bus import SerialBus
from gatewayd.devices.simulator import Faults, PtySimulator, SimulatedDevice, main
from gatewayd.errors import DeviceRejected, DeviceTimeout
from gatewayd.observability.metrics import REGISTRY
from gatewayd.telemetry import MemorySink


def _cfg(**overrides: Any) -> SerialBusConfig:
    settings: dict[str, Any] = {
        "port": "set-at-open",
        "response_timeout_s": 0.15,
        "reconnect_base_s": 0.01,
        "reconnect_cap_s": 0.05,
        **overrides,
    }
    return SerialBusConfig(**settings)


@asynccontextmanager
async def _line(
    tmp_path: Path, faults: dict[int, Faults], cfg: SerialBusConfig | None = None, **line: Any
) -> AsyncIterator[tuple[PtySimulator, SerialBus]]:
    devices = {
        address: SimulatedDevice(f"pump{address}", "pump", tmp_path / f"pump{address}.jsonl", faults=f)
        for address, f in faults.items()
    }
    async with PtySimulator("hostile", devices, **line) as sim:
        async with SerialBus("hostile", cfg or _cfg(), sim.port) as bus:
            assert bus.availability.available
            yield sim, bus


def _executed(tmp_path: Path, address: int = 1) -> list[str]:
    path = tmp_path / f"pump{address}.jsonl"
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


async def _run(bus: SerialBus, n: int, address: int = 1) -> tuple[int, int]:
    """``n`` set_speed transactions; each gets its own reply (checked) or DeviceTimeout. (succeeded, timed out)"""
    ok = timed_out = 0
    for i in range(n):
        command_id = f"c{address}-{i}"
        try:
            reply = await bus.transact(address, {"id": command_id, "action": "set_speed", "params": {"percent": i}})
        except DeviceTimeout:
            timed_out += 1
            continue
        assert reply["id"] == command_id, reply
        assert reply["result"]["speed"] == i, reply
        ok += 1
    return ok, timed_out


class CountingDecoder(Decoder):
    """The real decoder, counting what the port handed it: proof that the bytes did arrive one by one."""

    reads = 0
    read_bytes = 0

    def feed(self, data: bytes) -> list[Frame]:
        self.reads += 1
        self.read_bytes += len(data)
        return super().feed(data)


async def test_byte_at_a_time(tmp_path: Path) -> None:
    # A frame written a byte at a time by a simulator in this process, on a loaded machine, can take longer than
    # the default 0.15 s to arrive: the reply timeout here is not what is tested.
    async with _line(tmp_path, {1: Faults()}, _cfg(response_timeout_s=1.0), byte_at_a_time=True) as (_, bus):
        bus.decoder = decoder = CountingDecoder()
        assert await _run(bus, 20) == (20, 0)
    assert decoder.dropped == 0 and decoder.frames == 20
    # Each byte is a write of its own: the frames reached the decoder in pieces (how many bytes a read finds
    # waiting depends on how loaded the machine is, so only that they came in pieces is checked).
    assert decoder.reads > 2 * decoder.frames, (decoder.reads, decoder.read_bytes)


async def test_garbage_between_frames_and_a_megabyte_of_it(tmp_path: Path) -> None:
    cfg = _cfg(response_timeout_s=2.0)  # the megabyte is queued ahead of the reply
    async with _line(tmp_path, {1: Faults(garbage=1.0, garbage_max=64, seed=3)}, cfg) as (sim, bus):
        assert await _run(bus, 20) == (20, 0)
        assert sim.devices[1].faulted["garbage"] == 20

        rng = random.Random(7)
        sim.inject(rng.randbytes(1 << 20) + b"\n")  # random bytes: a newline every 256 bytes or so
        sim.inject(b"\xaa" * (1 << 20) + b"\n")  # no newline at all: the worst case for a line buffer
        sim.inject(b":01" * 200_000 + b"\n")  # frame starts, over and over
        reply = await bus.transact(1, {"id": "after", "action": "read", "params": {}})
        assert reply["id"] == "after"
        assert bus.decoder.peak_buffered <= MAX_FRAME, bus.decoder.peak_buffered
        assert bus.decoder.buffered == 0
        assert bus.decoder.dropped > 1000


async def test_a_burst_without_a_newline_costs_the_frame_after_it_only(tmp_path: Path) -> None:
    async with _line(tmp_path, {1: Faults()}) as (sim, bus):
        # The frame that follows shares the burst's over-long line and is discarded with it; the next one is not.
        sim.inject(b"\x00\xff" * 1000)
        with pytest.raises(DeviceTimeout):
            await bus.transact(1, {"id": "lost", "action": "read", "params": {}})
        assert (await bus.transact(1, {"id": "next", "action": "read", "params": {}}))["id"] == "next"
        assert bus.decoder.peak_buffered <= MAX_FRAME


async def test_corrupted_crc_ends_in_timeout_never_a_wrong_reply(tmp_path: Path) -> None:
    async with _line(tmp_path, {1: Faults(corrupt=0.3, seed=11)}) as (sim, bus):
        ok, timed_out = await _run(bus, 30)
        corrupted = sim.devices[1].faulted["corrupt"]
        assert 0 < corrupted < 30
        assert (ok, timed_out) == (30 - corrupted, corrupted)
        assert bus.decoder.last_error == "checksum mismatch"
        assert bus.availability.available


async def test_partial_frames_lose_only_the_frame_cut_short(tmp_path: Path) -> None:
    async with _line(tmp_path, {1: Faults(partial=0.3, seed=5)}) as (sim, bus):
        ok, timed_out = await _run(bus, 30)
        cut = sim.devices[1].faulted["partial"]
        assert 0 < cut < 30
        assert (ok, timed_out) == (30 - cut, cut)


async def test_lost_replies_time_out_and_a_repeat_is_answered_without_acting_twice(tmp_path: Path) -> None:
    async with _line(tmp_path, {1: Faults(drop=0.3, seed=2)}) as (sim, bus):
        attempts = 0
        for i in range(20):
            payload = {"id": f"d{i}", "action": "set_speed", "params": {"percent": i}}
            while True:
                attempts += 1
                try:
                    reply = await bus.transact(1, payload)
                    break
                except DeviceTimeout:
                    continue  # the same id again, as the dispatcher's retry sends it
            assert reply["id"] == f"d{i}" and reply["result"]["speed"] == i
        assert attempts - 20 == sim.devices[1].faulted["drop"] > 0
        assert bus.timeouts == attempts - 20
    assert _executed(tmp_path) == [f"d{i}" for i in range(20)], "each command ran once"


async def test_every_fault_at_once_byte_by_byte(tmp_path: Path) -> None:
    faults = Faults(garbage=0.3, partial=0.1, drop=0.1, corrupt=0.1, telemetry_hz=50, seed=9)
    # Each reply lost costs a whole timeout; 0.5 s (not 0.15) so that a reply trickling in byte by byte on a loaded
    # machine is not taken for one.
    cfg = _cfg(response_timeout_s=0.5, inbound_frames_per_s=1000, inbound_burst=1000)
    async with _line(tmp_path, {1: faults, 2: dataclasses.replace(faults, seed=10)}, cfg, byte_at_a_time=True) as (
        sim,
        bus,
    ):
        for address in (1, 2):
            ok, timed_out = await _run(bus, 15, address=address)
            lost = sim.devices[address].faulted
            # Noise before a frame costs nothing; a reply dropped, corrupted or cut short is that one timeout.
            assert timed_out == lost["drop"] + lost["corrupt"] + lost["partial"], (ok, timed_out, lost)
            assert ok > 0 and lost["garbage"] > 0
        assert bus.unsolicited[1] > 0 and bus.unsolicited[2] > 0
        assert bus.availability.available and bus.opens == 1
        assert bus.decoder.peak_buffered <= MAX_FRAME


async def test_a_flooding_device_is_throttled_while_another_keeps_answering(tmp_path: Path) -> None:
    rate, burst, flood_s = 20.0, 10, 1.5
    cfg = _cfg(response_timeout_s=0.5, inbound_frames_per_s=rate, inbound_burst=burst)
    dropped_metric: Callable[[], float] = lambda: (  # noqa: E731
        REGISTRY.get_sample_value("gatewayd_serial_inbound_dropped_total", {"bus": "hostile"}) or 0.0
    )
    metric_before = dropped_metric()
    with structlog.testing.capture_logs() as logs:
        opened = time.monotonic()
        async with _line(tmp_path, {1: Faults(telemetry_hz=10 * rate), 2: Faults()}, cfg) as (sim, bus):
            latencies: list[float] = []
            i = 0
            while time.monotonic() - opened < flood_s:
                started = time.monotonic()
                reply = await bus.transact(2, {"id": f"q{i}", "action": "read", "params": {}})
                latencies.append(time.monotonic() - started)
                assert reply["id"] == f"q{i}"
                i += 1
                await asyncio.sleep(0.01)
            flooder = sim.devices[1]
            flooder.faults = dataclasses.replace(flooder.faults, telemetry_hz=0)
            flooded_s = time.monotonic() - opened
            await asyncio.sleep(0.1)  # the last frames in flight
            delivered, dropped = bus.unsolicited[1], bus.inbound_dropped[1]
            await asyncio.sleep(burst * 0.5 / rate)  # the bucket refills to half, the end of throttling
            await bus.transact(2, {"id": "after", "action": "read", "params": {}})  # a frame: the end is noticed

    sent = flooder.telemetry_sent
    expected = burst + rate * flooded_s
    assert sent > 8 * rate * flooded_s * 0.8, sent  # the device did flood, at about 10x
    assert dropped > 0 and delivered + dropped == sent, (delivered, dropped, sent)
    assert 0.7 * expected <= delivered <= 1.2 * expected + 2, (delivered, expected)
    assert dropped_metric() - metric_before == dropped
    assert i > 30 and max(latencies) < 0.1, (i, max(latencies))
    assert bus.inbound_dropped[2] == 0

    throttling = [e for e in logs if e["event"].startswith("serial_inbound_")]
    assert [(e["event"], e["address"]) for e in throttling] == [
        ("serial_inbound_throttled", 1),
        ("serial_inbound_unthrottled", 1),
    ], throttling
    assert throttling[1]["dropped"] == dropped


async def test_turnaround_pauses_between_transactions(tmp_path: Path) -> None:
    async with _line(tmp_path, {1: Faults()}, _cfg(turnaround_s=0.05)) as (_, bus):
        started = time.monotonic()
        await bus.transact(1, {"id": "first", "action": "read", "params": {}})
        first = time.monotonic() - started
        for i in range(4):
            await bus.transact(1, {"id": f"t{i}", "action": "read", "params": {}})
        total = time.monotonic() - started
    assert first < 0.05, first
    assert total >= 4 * 0.05, total


@pytest.mark.parametrize(
    "bad",
    [["--drop", "1.5"], ["--garbage-max", "0"], ["--telemetry-hz", "-1"], ["--baudrate", "10"], ["--byte-pause", "-1"]],
)
def test_simulator_cli_refuses_bad_fault_flags(tmp_path: Path, bad: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--link", str(tmp_path / "l"), "--sim-dir", str(tmp_path), *bad])
    assert exc.value.code == 2


def test_faults_are_validated() -> None:
    with pytest.raises(ValueError):
        Faults(corrupt=-0.1)


async def test_an_alarm_gets_through_while_the_same_device_floods_readings(tmp_path: Path) -> None:
    """Telemetry and events have a bucket each: the one alarm a flooding node sends right after a reading is not
    dropped with the readings over the limit."""
    rate, burst = 20.0, 10
    node = SimulatedDevice("node1", "sensor_node", tmp_path / "node1.jsonl", faults=Faults(telemetry_hz=10 * rate))
    sink = MemorySink(maxlen=10_000)
    cfg = _cfg(response_timeout_s=0.5, inbound_frames_per_s=rate, inbound_burst=burst)
    async with PtySimulator("hostile", {1: node}) as sim, SerialBus("hostile", cfg, sim.port, sink=sink) as bus:
        bus.names[1] = "node1"  # records are kept for the devices the bus knows
        deadline = time.monotonic() + 3
        while bus.inbound_dropped[1] < 10 * burst:  # well into the throttling
            assert time.monotonic() < deadline, bus.inbound_dropped
            await asyncio.sleep(0.02)
        await bus.transact(1, {"id": "alarm", "action": "set_alarm", "params": {"above_c": -40}})
        await asyncio.sleep(0.3)
        await bus.transact(1, {"id": "again", "action": "set_alarm", "params": {"above_c": -30}})  # a new alarm
        await asyncio.sleep(0.3)
        dropped = bus.inbound_dropped[1]
    events = [(r.event, r.data["above_c"]) for r in sink if r.kind == "event"]
    assert events == [("temperature_alarm", -40.0), ("temperature_alarm", -30.0)], events
    assert dropped > 10 * burst  # the readings were throttled all along


async def test_a_reply_naming_another_command_is_never_taken_as_its_answer(tmp_path: Path) -> None:
    """A device (or a late reply whose sequence number has come round again) answers with the right address and
    sequence number but another command's id: that is not this command's success. The request waits for its own
    reply, or times out; a NAK stays a refusal whatever its id (PROTOCOL.md)."""
    master, slave = os.openpty()
    answers: list[list[Frame]] = []  # what the fake device writes back for each request, in order
    decoder = Decoder()
    loop = asyncio.get_running_loop()

    def on_request() -> None:
        for request in decoder.feed(os.read(master, 4096)):
            for reply in answers.pop(0) if answers else []:
                os.write(master, dataclasses.replace(reply, address=request.address, seq=request.seq).to_bytes())

    loop.add_reader(master, on_request)

    def bad() -> float:
        labels = {"bus": "mismatch", "reason": "mismatched_reply"}
        return REGISTRY.get_sample_value("gatewayd_serial_bad_frames_total", labels) or 0.0

    before = bad()
    try:
        async with SerialBus("mismatch", _cfg(response_timeout_s=0.3), os.ttyname(slave)) as bus:
            stale = Frame(1, 0, Kind.REPLY, {"id": "earlier", "result": {"speed": 99}})
            mine = Frame(1, 0, Kind.REPLY, {"id": "c1", "result": {"speed": 1}})
            answers.append([stale, mine])  # the stale one first, then its own
            reply = await bus.transact(1, {"id": "c1", "action": "set_speed", "params": {"percent": 1}})
            assert reply == {"id": "c1", "result": {"speed": 1}}
            answers.append([stale])  # only someone else's: never a success
            with pytest.raises(DeviceTimeout):
                await bus.transact(1, {"id": "c2", "action": "set_speed", "params": {"percent": 2}})
            refusal = Frame(1, 0, Kind.NAK, {"id": None, "code": "bad_request", "message": "cannot read it"})
            answers.append([refusal])
            with pytest.raises(DeviceRejected):
                await bus.transact(1, {"id": "c3", "action": "set_speed", "params": {"percent": 3}})
        assert bad() - before == 2
    finally:
        loop.remove_reader(master)
        os.close(master)
        os.close(slave)


async def test_a_gateway_that_did_not_run_past_the_reply_timeout_listens_again(tmp_path: Path) -> None:
    """The process is stopped right after a request goes out (SIGSTOP, a paused VM), for three reply timeouts; the
    device (simulated in this process, so frozen too) answers soon after it runs again. That is not a silent
    device: the gateway listens once more and takes the answer. A device that is silent while the gateway runs
    still times out after one timeout."""
    master, slave = os.openpty()
    decoder = Decoder()
    loop = asyncio.get_running_loop()
    answer = {"on": True}

    def on_request() -> None:
        for request in decoder.feed(os.read(master, 4096)):
            if not answer["on"]:
                continue
            time.sleep(0.9)  # the whole process stopped: nothing runs, no timer, no read
            reply = Frame(request.address, request.seq, Kind.REPLY, {"id": request.payload["id"], "result": {}})
            loop.call_later(0.05, os.write, master, reply.to_bytes())  # the device answers once it runs again

    loop.add_reader(master, on_request)
    try:
        async with SerialBus("frozen", _cfg(response_timeout_s=0.3), os.ttyname(slave)) as bus:
            reply = await bus.transact(1, {"id": "c1", "action": "set_speed", "params": {"percent": 1}})
            assert reply["id"] == "c1"
            answer["on"] = False
            started = time.monotonic()
            with pytest.raises(DeviceTimeout):
                await bus.transact(1, {"id": "c2", "action": "set_speed", "params": {"percent": 2}})
            assert time.monotonic() - started < 0.3 * 3  # silence while running: one timeout, not two
    finally:
        loop.remove_reader(master)
        os.close(master)
        os.close(slave)
