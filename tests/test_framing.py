"""The line protocol's framing, pure: bytes in, frames out, through hostile input."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from gatewayd.devices.framing import MAX_FRAME, Decoder, Frame, Kind, crc16


def test_crc_check_value() -> None:
    assert crc16(b"123456789") == 0x29B1  # CRC-16/CCITT-FALSE


def test_round_trip_and_wire_format() -> None:
    frame = Frame(0x01, 0x05, Kind.REQUEST, {"id": "a", "action": "start", "params": {}})
    wire = frame.to_bytes()
    assert wire.startswith(b":0105Q{") and wire.endswith(b"\n")
    body = wire[1 : wire.rindex(b"*")]
    assert wire[-5:-1] == f"{crc16(body):04X}".encode()
    assert Frame.from_line(wire[:-1]) == frame
    assert Frame.from_line(wire[:-1] + b"\r") == frame  # CRLF senders


def test_one_byte_at_a_time_with_noise_between_frames() -> None:
    frames = [Frame(a, s, Kind.REPLY, {"id": f"c{s}", "result": {"v": s}}) for a, s in [(1, 0), (2, 255), (7, 9)]]
    stream = b"\x00\xffnoise" + frames[0].to_bytes() + b"\n\n  " + frames[1].to_bytes() + b"@@" + frames[2].to_bytes()
    decoder = Decoder()
    out = []
    for byte in stream:
        out += decoder.feed(bytes([byte]))
    assert out == frames
    assert decoder.dropped == 0


def test_corrupted_frames_are_dropped_and_counted_and_the_next_one_survives() -> None:
    good = Frame(1, 1, Kind.REPLY, {"id": "x", "result": {}}).to_bytes()
    flipped = bytearray(good)
    flipped[10] ^= 0x01
    decoder = Decoder()
    out = decoder.feed(bytes(flipped) + good)
    assert out == [Frame.from_line(good[:-1])]
    assert decoder.dropped == 1 and decoder.last_error == "checksum mismatch"


def test_a_frame_cut_off_by_a_restarting_sender_does_not_hide_the_next() -> None:
    good = Frame(3, 4, Kind.TELEMETRY, {"t": 21.5}).to_bytes()
    decoder = Decoder()
    assert decoder.feed(good[:12] + good) == [Frame.from_line(good[:-1])]


def test_oversized_line_is_discarded_without_unbounded_buffering() -> None:
    decoder = Decoder()
    for _ in range(100):
        assert decoder.feed(b":" + b"A" * 1000) == []
        assert len(decoder._buf) <= MAX_FRAME
    good = Frame(1, 2, Kind.EVENT, {"e": "door"}).to_bytes()
    assert decoder.feed(b"\n" + good) == [Frame.from_line(good[:-1])]
    assert decoder.dropped == 1


def test_frame_too_large_to_send_is_refused() -> None:
    try:
        Frame(1, 1, Kind.REQUEST, {"blob": "x" * MAX_FRAME}).to_bytes()
    except ValueError as err:
        assert "limit" in str(err)
    else:
        raise AssertionError("an oversized frame must not be sent")


payloads = st.dictionaries(
    st.text(max_size=8),
    st.one_of(st.integers(-(10**6), 10**6), st.text(max_size=20), st.booleans(), st.none()),
    max_size=4,
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    decoder = Decoder()
    for frame in decoder.feed(data):
        assert isinstance(frame, Frame)  # anything that decodes passed its CRC
    assert len(decoder._buf) <= MAX_FRAME + len(data)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 247), st.integers(0, 255), st.sampled_from(list(Kind)), payloads), max_size=6),
    st.lists(st.binary(max_size=30).filter(lambda b: b"\n" not in b), min_size=7, max_size=7),
    st.integers(1, 64),
)
def test_frames_separated_by_noise_lines_all_arrive(
    items: list[tuple[int, int, Kind, dict[str, object]]], noise: list[bytes], chunk: int
) -> None:
    frames = [Frame(a, s, k, p) for a, s, k, p in items]
    stream = b"".join(n + b"\n" + f.to_bytes() for n, f in zip(noise, frames, strict=False))
    decoder = Decoder()
    out: list[Frame] = []
    for i in range(0, len(stream), chunk):
        out += decoder.feed(stream[i : i + chunk])
    assert out == frames


def test_random_bit_errors_never_deliver_a_wrong_frame() -> None:
    rng = random.Random(7)
    sent = [Frame(1, i % 256, Kind.REPLY, {"id": f"cmd-{i}", "result": {"n": i}}) for i in range(400)]
    stream = bytearray(b"".join(f.to_bytes() for f in sent))
    for _ in range(150):
        stream[rng.randrange(len(stream))] ^= 1 << rng.randrange(8)
    got = Decoder().feed(bytes(stream))
    assert got and all(frame in sent for frame in got)  # some are lost, none is invented
