"""The page's hour of history, its live event hub, and the script-less form's payloads, without a daemon."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gatewayd.commands.model import CommandRecord, Priority, State
from gatewayd.web.console import form_payload
from gatewayd.web.history import History, latency_s
from gatewayd.web.live import EventHub, encode

BOOT = "boot-a"


class Clocks:
    def __init__(self) -> None:
        self.mono = 1000.0
        self.wall = 1_800_000_000.0

    def advance(self, s: float) -> None:
        self.mono += s
        self.wall += s


def record(state: State, *, accepted_mono: float, accepted_wall: float, boot_id: str = BOOT) -> CommandRecord:
    ttl = 60.0
    return CommandRecord(
        id=f"c{accepted_mono}",
        device="pump1",
        action="start",
        params={},
        priority=Priority.NORMAL,
        source="http",
        user=None,
        state=state,
        created_at=accepted_wall,
        ttl_s=ttl,
        deadline_at=accepted_wall + ttl,
        deadline_mono=accepted_mono + ttl,
        boot_id=boot_id,
        updated_at=accepted_wall,
    )


def status(queued: int = 0, in_flight: int = 0, rows: int | None = 0) -> dict[str, Any]:
    return {"queue": {"queued": queued, "in_flight": in_flight}, "outbox": None if rows is None else {"rows": rows}}


def test_latency_is_monotonic_within_a_boot_and_wall_clock_across_boots() -> None:
    rec = record(State.SUCCEEDED, accepted_mono=100.0, accepted_wall=5000.0)
    # The wall clock stepped back an hour (NTP on a Pi without an RTC): the monotonic reading is what counts.
    assert latency_s(rec, mono_now=100.25, wall_now=5000.25 - 3600, boot_id=BOOT) == pytest.approx(0.25)
    assert latency_s(rec, mono_now=3.0, wall_now=5002.0, boot_id="boot-b") == pytest.approx(2.0)
    assert latency_s(rec, mono_now=3.0, wall_now=4000.0, boot_id="boot-b") == 0.0  # never negative


def test_a_sample_counts_what_finished_in_its_interval_and_the_depths_at_its_end() -> None:
    t = Clocks()
    history = History(10, boot_id=BOOT, mono=lambda: t.mono, wall=lambda: t.wall)
    for i, (state, took) in enumerate(
        [(State.SUCCEEDED, 0.010), (State.SUCCEEDED, 0.020), (State.FAILED, 0.030), (State.SUCCEEDED, 0.040)]
    ):
        rec = record(state, accepted_mono=t.mono, accepted_wall=t.wall)
        t.advance(took)
        history.record_final(rec)
        t.advance(1 + i)
    rec = record(State.EXPIRED, accepted_mono=t.mono - 500, accepted_wall=t.wall - 500)
    history.record_final(rec)
    t.advance(10 - t.mono % 10)
    s = history.sample(status(queued=3, in_flight=1, rows=42))
    assert (s.finished, s.failed, s.queued, s.in_flight, s.outbox_rows) == (5, 2, 3, 1, 42)
    assert s.latency_p50_ms == pytest.approx(30.0, abs=0.1)
    assert s.latency_p95_ms is not None and s.latency_p95_ms > 400_000  # the expired one waited 500 s
    api = s.to_api()
    assert api["throughput_per_min"] == pytest.approx(5 * 60 / s.interval_s) and api["at"].endswith("Z")
    t.advance(10)
    empty = history.sample(status(rows=None))  # the next interval starts from nothing
    assert (empty.finished, empty.failed, empty.latency_p50_ms, empty.outbox_rows) == (0, 0, None, None)
    assert empty.interval_s == pytest.approx(10)
    assert [x.finished for x in history.samples] == [5, 0]


def test_the_ring_holds_one_hour_and_the_error_rate_a_window() -> None:
    t = Clocks()
    history = History(600, boot_id=BOOT, mono=lambda: t.mono, wall=lambda: t.wall)
    assert history.samples.maxlen == 6
    assert history.error_rate()["rate"] is None  # nothing finished: no rate, not 0 %
    for n in range(8):
        history.record_final(record(State.FAILED if n == 7 else State.SUCCEEDED, accepted_mono=t.mono, accepted_wall=0))
        t.advance(600)
        history.sample(status())
    assert len(history.samples) == 6 and history.to_api()["window_s"] == 3600
    recent = history.error_rate(window_s=1200)  # the last two samples: one success, one failure
    assert (recent["finished"], recent["failed"], recent["rate"]) == (2, 1, 0.5)
    history.record_final(record(State.CANCELLED, accepted_mono=t.mono, accepted_wall=0))  # not an error
    assert history.error_rate(window_s=1200)["rate"] == pytest.approx(1 / 3, abs=1e-4)


def test_a_history_needs_a_positive_interval() -> None:
    with pytest.raises(ValueError):
        History(0)


async def test_the_hub_bounds_a_slow_reader_and_closes_every_stream() -> None:
    hub = EventHub(max_queue=3)
    hub.publish("status", {"ignored": True})  # nobody listens: nothing is encoded
    assert hub.published == 0
    fast, slow = hub.subscribe(), hub.subscribe()
    for n in range(3):
        hub.publish("command", {"n": n})
        assert await asyncio.wait_for(fast.queue.get(), 1) == encode("command", {"n": n})
    hub.publish("command", {"n": 3})  # the slow one's queue is full: it is told to resync instead
    assert slow.dropped == 1 and slow.queue.qsize() == 1
    assert slow.queue.get_nowait() == b'event: resync\ndata: {"dropped":1}\n\n'
    hub.close()
    assert fast.queue.get_nowait() == b"" and hub.closed
    hub.unsubscribe(fast)
    hub.unsubscribe(slow)
    assert hub.subscribers == 0


DEVICES = [
    {
        "name": "pump1",
        "actions": {
            "set_speed": {
                "params": {"properties": {"percent": {"type": "integer"}, "ramp_s": {"type": "number"}}},
            },
            "start": {"params": {"properties": {}}},
        },
    }
]


def test_form_fields_become_a_typed_command() -> None:
    form = {"device": "pump1", "action": "set_speed", "p.percent": "40", "p.ramp_s": "", "csrf_token": "x"}
    assert form_payload(form, DEVICES) == {"device": "pump1", "action": "set_speed", "params": {"percent": 40}}
    form = {"device": "pump1", "action": "set_speed", "p.percent": "fast", "p.ramp_s": "1.5", "priority": "high"}
    assert form_payload(form, DEVICES) == {
        "device": "pump1",
        "action": "set_speed",
        "params": {"percent": "fast", "ramp_s": 1.5},  # left as typed: validation names the field
        "priority": "high",
    }
    assert form_payload({"device": "pump1", "action": "start", "confirm": "on"}, DEVICES)["confirm"] is True
    assert form_payload({"text": "  start the pump ", "device": "pump1"}, DEVICES) == {"text": "start the pump"}
