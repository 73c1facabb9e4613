"""Bad input at volume on a serial bus, into the real daemon: thousands of generated lines (random bytes, valid frames
with a bit flipped, cut short, duplicated, oversize, with a wrong CRC, with a right CRC over broken JSON, blank
lines) written onto bus0's line by the simulated devices' pseudo-terminal, interleaved with valid frames and with
the replies to commands sent meanwhile. The daemon's bus0 opens a pty whose other end is the real simulator
(gatewayd.devices.simulator), run by this test so that it can also put bytes on the line.

Shown: the process never dies and the bus never reopens; every bad line is counted, exactly, under a typed reason
(``gatewayd_serial_bad_frames_total{bus,reason}``) and logged without flooding the log; every valid frame among
them arrives, in order; the commands sent during the barrage and after it succeed."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from gatewayd.devices.framing import MAX_FRAME, REASONS, crc16
from gatewayd.devices.simulator import Faults, PtySimulator, SimulatedDevice
from tests.conftest import Daemon

pytestmark = pytest.mark.timeout(300)

PROBE_ADDRESS = 1  # pump1: its simulator sends no telemetry of its own, so every T frame from 01 is ours
FOREIGN = st.integers(16, 247)  # addresses no configured device has: frames from them are ignored, not bad


class ThreadedSimulator:
    """The simulator behind bus0 (pump1 at 1, sensor1 at 2), on an event loop of its own in a thread, with the
    daemon's execution logs (``Daemon.executions`` reads them). ``inject`` puts bytes on the line between two of
    its own writes, never inside a reply."""

    def __init__(self, sim_dir: Path, link: Path):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="bus0-simulator", daemon=True)
        devices = {
            1: SimulatedDevice("pump1", "pump", sim_dir / "pump1.jsonl"),
            2: SimulatedDevice("sensor1", "sensor_node", sim_dir / "sensor1.jsonl", faults=Faults(seed=2)),
        }
        self.sim = PtySimulator("bus0", devices, link=link)

    def __enter__(self) -> ThreadedSimulator:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.sim.__aenter__(), self.loop).result(10)
        return self

    def __exit__(self, *exc: Any) -> None:
        asyncio.run_coroutine_threadsafe(self.sim.__aexit__(None, None, None), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def inject(self, data: bytes) -> None:
        self.loop.call_soon_threadsafe(self.sim.inject, data)


# --- lines ---------------------------------------------------------------------------------------------------------


@dataclass
class Line:
    """Bytes for the wire (whole lines: they end with a newline), the bad lines among them as the protocol counts
    them, and the probe numbers of the valid T frames from PROBE_ADDRESS they carry, in order."""

    data: bytes
    bad: int
    probes: list[int]


Recipe = Callable[[Callable[[], int]], Line]  # given a source of fresh probe numbers


def frame(address: int, seq: int, kind: str, body: bytes) -> bytes:
    """A frame with a correct CRC over whatever body it is given (Frame.to_bytes only builds valid ones)."""
    head = f"{address:02X}{seq:02X}{kind}".encode() + body
    return b":" + head + b"*" + f"{crc16(head):04X}".encode() + b"\n"


def compact(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=True).encode()  # as Frame.to_bytes writes it


def probe_frame(n: int, extra: dict[str, Any] | None = None, seq: int = 0) -> bytes:
    """A T frame from pump1's address carrying probe number ``n``; over 512 bytes if ``extra`` is large."""
    return frame(PROBE_ADDRESS, seq, "T", compact({"probe": n, **(extra or {})}))


payloads = st.dictionaries(
    st.text(max_size=6),
    # Finite numbers only: a frame with Infinity is not JSON (RFC 8259) and is counted malformed, not ignored.
    st.one_of(
        st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12), st.booleans(), st.none()
    ),
    max_size=3,
)
# Valid frames of every kind from addresses nobody has: what the near misses below are made from.
base_frames = st.builds(
    lambda a, s, k, p: frame(a, s, k, compact(p)), FOREIGN, st.integers(0, 255), st.sampled_from("QRNTE"), payloads
).filter(lambda b: len(b) <= MAX_FRAME)


@st.composite
def noise(draw: st.DrawFn) -> Recipe:
    data = draw(st.binary(min_size=1, max_size=700)).replace(b"\n", b"")
    blank = not data.strip(b"\r\x00 ")  # only CRs, spaces or NULs: idle noise, not counted
    return lambda _probe: Line(data + b"\n", 0 if blank else 1, [])


@st.composite
def flipped(draw: st.DrawFn) -> Recipe:
    """One bit flipped anywhere but in the line feed and the '*' (a flip there ends or moves the line)."""
    wire = bytearray(draw(base_frames))
    star = wire.rindex(b"*")
    pos = draw(st.integers(0, len(wire) - 2).filter(lambda i: i != star))
    old = wire[pos]
    wire[pos] ^= 1 << draw(st.integers(0, 7))
    if wire[pos] == 0x0A:
        wire[pos] = old ^ 0x80
    # The CRC's hex digits may be either case (PROTOCOL.md): 'A' <-> 'a' in them leaves the frame valid.
    case_swap = pos > star and chr(old) in "ABCDEF" and chr(wire[pos]) == chr(old).lower()
    return lambda _probe: Line(bytes(wire), 0 if case_swap else 1, [])


@st.composite
def wrong_crc(draw: st.DrawFn) -> Recipe:
    wire = draw(base_frames)
    star = wire.rindex(b"*")
    crc = int(wire[star + 1 : star + 5], 16) ^ draw(st.integers(1, 0xFFFF))
    return lambda _probe: Line(wire[: star + 1] + f"{crc:04X}".encode() + b"\n", 1, [])


@st.composite
def cut_short(draw: st.DrawFn) -> Recipe:
    """A frame cut short. Ended by a line feed it is a bad line; with no line feed, its stub prefixes the next
    frame on the same line, which is still taken (the stub is noise before a frame, not counted)."""
    wire = draw(base_frames)
    stub = wire[: draw(st.integers(1, len(wire) - 2))]
    if draw(st.booleans()):
        return lambda _probe: Line(stub + b"\n", 1, [])

    def then_probe(probe: Callable[[], int]) -> Line:
        n = probe()
        line = stub + probe_frame(n)
        if len(line) > MAX_FRAME:
            return Line(line, 1, [])  # too long as a whole: the frame after the stub goes with it
        return Line(line, 0, [n])

    return then_probe


@st.composite
def duplicated(draw: st.DrawFn) -> Recipe:
    """A frame sent twice: on one line (the second copy is taken, the first is noise before it), or on two."""
    same_line = draw(st.booleans())

    def make(probe: Callable[[], int]) -> Line:
        n = probe()
        wire = probe_frame(n)
        return Line(wire[:-1] + wire, 0, [n]) if same_line else Line(wire + wire, 0, [n, n])

    return make


@st.composite
def oversize(draw: st.DrawFn) -> Recipe:
    """A frame with a right CRC, over 512 bytes: dropped as too long, however valid it is otherwise."""
    body = compact({"probe": -1, "pad": "x" * draw(st.integers(MAX_FRAME, 3 * MAX_FRAME))})
    return lambda _probe: Line(frame(PROBE_ADDRESS, 0, "T", body), 1, [])


@st.composite
def right_crc_wrong_inside(draw: st.DrawFn) -> Recipe:
    """The CRC is right, what it covers is not a frame: bad JSON, JSON with what RFC 8259 does not allow (NaN,
    Infinity, 1e999, an unpaired surrogate), not an object, not UTF-8, an unknown kind, an address that is not
    hex."""
    address, kind, body = draw(
        st.sampled_from(
            [
                ("01", "T", b'{"probe":'),
                ("01", "T", b"[1,2,3]"),
                ("01", "T", b'"text"'),
                ("01", "T", b'{"a":"\xff\xfe"}'),
                ("01", "T", b"{'a': 1}"),
                ("01", "X", b'{"probe":1}'),
                ("01", "q", b'{"probe":1}'),
                ("ZZ", "T", b'{"probe":1}'),
                ("1", "T", b'{"probe":1}'),
                ("01", "T", b"{" + b'"a":[' * 60 + b"]" * 60 + b"}"),  # unbalanced, deep
                ("01", "T", b'{"probe":NaN}'),
                ("01", "T", b'{"probe":1,"t":Infinity}'),
                ("01", "T", b'{"probe":1,"t":-Infinity}'),
                ("01", "T", b'{"probe":1,"t":1e999}'),
                ("01", "R", b'{"probe":1,"speed":-1E400}'),
                ("01", "T", b'{"probe":1,"name":"\\ud800"}'),
            ]
        )
    )
    head = f"{address}00{kind}".encode() + body
    wire = b":" + head + b"*" + f"{crc16(head):04X}".encode() + b"\n"
    return lambda _probe: Line(wire, 1, [])


@st.composite
def blank(draw: st.DrawFn) -> Recipe:
    data = draw(st.sampled_from([b"\n", b"\r\n", b"\x00\x00\n", b"   \r\n", b"\r\r\r\n"]))
    return lambda _probe: Line(data, 0, [])


@st.composite
def valid(draw: st.DrawFn) -> Recipe:
    """A valid T frame from pump1's address (the probes), in the forms the protocol allows; or a valid frame from
    an address nobody has (ignored, not bad)."""
    form = draw(st.sampled_from(["plain", "plain", "crlf", "lowercase_crc", "noise_before", "deep", "foreign"]))
    extra = draw(payloads.filter(lambda p: "probe" not in p))
    seq = draw(st.integers(0, 255))
    noise_before = draw(st.binary(max_size=20).map(lambda b: b.replace(b"\n", b"").replace(b":", b"")))
    foreign = draw(base_frames)

    def make(probe: Callable[[], int]) -> Line:
        if form == "foreign":
            return Line(foreign, 0, [])
        n = probe()
        if form == "deep":  # nested 40 deep, well within 512 bytes: a valid frame
            wire = frame(PROBE_ADDRESS, seq, "T", b'{"probe":%d,"deep":' % n + b"[" * 40 + b"]" * 40 + b"}")
        else:
            wire = probe_frame(n, extra, seq)
        if form == "crlf":
            wire = wire[:-1] + b"\r\n"
        elif form == "lowercase_crc":
            wire = wire[:-5] + wire[-5:].lower()
        elif form == "noise_before":
            wire = noise_before + wire
        if len(wire) > MAX_FRAME:
            return Line(wire, 1, [])
        return Line(wire, 0, [n])

    return make


lines = st.one_of(
    noise(),
    flipped(),
    wrong_crc(),
    cut_short(),
    duplicated(),
    oversize(),
    right_crc_wrong_inside(),
    blank(),
    valid(),
    valid(),
)


# --- the daemon's side -----------------------------------------------------------------------------------------------


def bad_frames(d: Daemon) -> Counter[str]:
    status, text = d.get("/metrics")
    assert status == 200
    out: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        if family.name == "gatewayd_serial_bad_frames":
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels["bus"] == "bus0":
                    out[sample.labels["reason"]] = int(sample.value)
    return out


def probes_received(d: Daemon) -> list[int]:
    status, body = d.get("/api/v1/devices/pump1/telemetry")
    assert status == 200
    return [r["values"]["probe"] for r in body["readings"] if "probe" in r["values"]]


def test_thousands_of_bad_lines_on_the_bus_are_counted_by_reason_and_cost_nothing_else(
    make_daemon: Any, tmp_path: Path
) -> None:
    link = tmp_path / "bus0.tty"
    d: Daemon = make_daemon(
        {
            "GATEWAYD_SERIAL__BUS0__SIMULATE": "false",
            "GATEWAYD_SERIAL__BUS0__PORT": str(link),
            "GATEWAYD_SERIAL__BUS0__RESPONSE_TIMEOUT_S": "5",  # the barrage is queued ahead of some replies
            "GATEWAYD_SERIAL__BUS0__INBOUND_FRAMES_PER_S": "100000",  # the inbound limit has tests of its own
            "GATEWAYD_SERIAL__BUS0__INBOUND_BURST": "100000",
            "GATEWAYD_TELEMETRY__RECENT_PER_DEVICE": "10000",  # every probe stays in the device's readings
        }
    )
    counter = iter(range(1, 10**9))
    expected_probes: list[int] = []
    expected_bad = 0
    n = 0
    total_lines = 0
    with ThreadedSimulator(d.data_dir / "sim", link) as sim:
        d.start()
        started = time.monotonic()

        @settings(
            max_examples=150,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
        )
        @given(st.lists(lines, min_size=15, max_size=40))
        def barrage(recipes: list[Recipe]) -> None:
            nonlocal n, expected_bad, total_lines
            n += 1
            before = bad_frames(d)
            made = [recipe(lambda: next(counter)) for recipe in recipes]
            total_lines += len(made)
            half = len(made) // 2
            for line in made[:half]:
                sim.inject(line.data)
            # A command goes out while the second half is put on the line: its reply lands among the bad lines.
            answer: list[Any] = []
            command = threading.Thread(
                target=lambda: answer.append(
                    d.post(
                        {"id": f"s{n}", "device": "pump1", "action": "set_speed", "params": {"percent": n % 101}},
                        wait=10,
                    )
                )
            )
            command.start()
            for line in made[half:]:
                sim.inject(line.data)
            command.join(15)
            status, rec, _ = answer[0]
            assert status == 200 and rec["state"] == "succeeded" and rec["result"]["speed"] == n % 101, rec
            # A fence: this request goes out after every injected byte, so its reply comes after them.
            status, rec, _ = d.post({"id": f"f{n}", "device": "pump1", "action": "read"}, wait=10)
            assert status == 200 and rec["state"] == "succeeded", rec
            after = bad_frames(d)
            delta = after - before
            bad = sum(line.bad for line in made)
            assert sum(delta.values()) == bad, (delta, bad, [line.data[:80] for line in made])
            assert set(delta) <= set(REASONS), delta
            probes = [p for line in made for p in line.probes]
            expected_probes.extend(probes)
            if probes:
                assert probes_received(d)[-len(probes) :] == probes
            expected_bad += bad

        barrage()
        took = time.monotonic() - started

        # After all of it: a command to each device on the bus still succeeds, and nothing was lost or invented.
        for device in ("pump1", "sensor1"):
            status, rec, _ = d.post({"id": f"after-{device}", "device": device, "action": "read"}, wait=10)
            assert status == 200 and rec["state"] == "succeeded", rec
        assert probes_received(d) == expected_probes
        totals = bad_frames(d)
        assert sum(totals.values()) == expected_bad
        assert d.executions("after-pump1") == 1 and all(d.executions(f"s{i}") == 1 for i in range(1, n + 1))
    print(
        f"\nserial: {total_lines} lines in {n} bursts in {took:.1f} s; {expected_bad} bad, counted by reason "
        f"{dict(totals)}; {len(expected_probes)} valid frames among them all arrived"
    )
    assert d.proc is not None and d.proc.poll() is None
    assert total_lines >= 2000 and expected_bad >= 1000
    assert set(totals) == set(REASONS), totals  # every reason occurred, each counted under its own name
    logs = d.log_lines()
    assert [e["bus"] for e in logs if e["event"] == "serial_opened"] == ["bus0"], "the bus never reopened"
    assert not [e for e in logs if e["event"] in ("serial_receive_failed", "component_crashed")]
    logged = [e for e in logs if e["event"] == "serial_bad_frames" and e["bus"] == "bus0"]
    assert 1 <= len(logged) <= 1 + took / 60, len(logged)  # logged, not once per bad line
    assert logged[0]["reason"] in REASONS
