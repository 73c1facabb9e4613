"""The command core in-process, without a daemon: validation against a profile, a command's deadline (within one
boot and across a reboot), and what the dispatcher does at start with commands a previous boot left open."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gatewayd.clock import SystemClock
from gatewayd.commands.dispatcher import OUTCOME_UNKNOWN, Dispatcher
from gatewayd.commands.model import CommandRecord, Priority, State, Transition
from gatewayd.commands.validate import parse_request, validate
from gatewayd.errors import UnknownDevice, ValidationFailed
from gatewayd.store import Store
from gatewayd.store import commands as sql
from tests.test_dispatcher import PROFILES, Devices, RecordingDevice

PUMPS = {"pump1": PROFILES["sim_pump"]}


def check(payload: dict[str, Any], max_ttl_s: float = 3600) -> Any:
    return validate(parse_request(payload), PUMPS, default_ttl_s=60, max_ttl_s=max_ttl_s)


def errors_of(exc: pytest.ExceptionInfo[ValidationFailed]) -> dict[str, str]:
    return {e["field"]: e["message"] for e in exc.value.details["errors"]}


# --- validation --------------------------------------------------------------------------------------------------


def test_a_valid_command_is_normalised_and_filled_in_from_its_profile() -> None:
    v = check({"device": "pump1", "action": "set_speed", "params": {"percent": 55.0}})
    assert v.params == {"percent": 55, "ramp_s": 0} and isinstance(v.params["percent"], int)
    assert v.ttl_s == 120  # the profile's default_ttl_s
    assert check({"device": "pump1", "action": "stop"}).ttl_s == 600  # the action's own
    assert check({"device": "pump1", "action": "stop", "ttl_s": 5}).ttl_s == 5  # the client's


def test_an_unknown_device_or_action_names_what_there_is() -> None:
    with pytest.raises(UnknownDevice) as dev:
        check({"device": "pump9", "action": "start"})
    assert dev.value.details["known"] == ["pump1"]
    with pytest.raises(ValidationFailed) as act:
        check({"device": "pump1", "action": "launch"})
    assert act.value.details["actions"] == ["read", "set_speed", "start", "stop"]


@pytest.mark.parametrize(
    ("params", "field", "words"),
    [
        ({"percent": "fast"}, "params.percent", "number"),
        ({"percent": True}, "params.percent", "number"),
        ({"percent": 55.5}, "params.percent", "whole number"),
        ({"percent": 101}, "params.percent", "at most 100 %"),
        ({"percent": -1}, "params.percent", "at least 0 %"),
        ({"percent": 10**400}, "params.percent", "at most 100 %"),
        ({"percent": 50, "ramp_s": float("inf")}, "params.ramp_s", "finite"),
        ({"percent": 50, "ramp_s": float("nan")}, "params.ramp_s", "finite"),
        ({}, "params.percent", "missing"),
        ({"percent": 50, "turbo": 1}, "params.turbo", "unknown parameter"),
    ],
)
def test_a_bad_parameter_is_refused_with_its_field_and_why(params: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(ValidationFailed) as exc:
        check({"device": "pump1", "action": "set_speed", "params": params})
    assert words in errors_of(exc)[field]


def test_every_problem_is_reported_at_once_and_a_long_ttl_is_one_of_them() -> None:
    with pytest.raises(ValidationFailed) as exc:
        check({"device": "pump1", "action": "set_speed", "params": {"percent": 500, "x": 1}, "ttl_s": 90}, 60)
    assert set(errors_of(exc)) == {"params.percent", "params.x", "ttl_s"}


@pytest.mark.parametrize(
    "payload",
    [
        {"device": "pump1"},
        {"device": "pump1", "action": "start", "colour": "red"},
        {"device": "pump1", "action": "start", "priority": "urgentest"},
        {"device": "pump1", "action": "start", "id": "x" * 129},
        {"device": "pump1", "action": "start", "ttl_s": -1},
        {"device": ["pump1"], "action": "start"},
    ],
)
def test_a_malformed_envelope_is_refused_before_any_profile_is_looked_at(payload: dict[str, Any]) -> None:
    with pytest.raises(ValidationFailed):
        parse_request(payload)


# --- deadlines ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SteppedClock(SystemClock):
    """The command clock with its wall and monotonic readings moved by hand."""

    shift: dict[str, float] = field(default_factory=lambda: {"wall": 0.0, "mono": 0.0})

    def wall(self) -> float:
        return time.time() + self.shift["wall"]

    def monotonic(self) -> float:
        return time.monotonic() + self.shift["mono"]


def record(
    clock: SystemClock, *, ttl_s: float = 60, created_ago_s: float = 0, boot_id: str | None = None
) -> CommandRecord:
    now, mono = clock.wall() - created_ago_s, clock.monotonic() - created_ago_s
    return CommandRecord(
        id=f"c-{ttl_s}-{created_ago_s}-{boot_id}",
        device="pump1",
        action="start",
        params={},
        priority=Priority.NORMAL,
        source="http",
        user=None,
        state=State.QUEUED,
        created_at=now,
        ttl_s=ttl_s,
        deadline_at=now + ttl_s,
        deadline_mono=mono + ttl_s,
        boot_id=clock.boot_id if boot_id is None else boot_id,
        updated_at=now,
    )


def test_within_one_boot_the_monotonic_clock_decides_and_wall_jumps_do_not_matter() -> None:
    clock = SteppedClock()
    rec = record(clock, ttl_s=60)
    clock.shift["wall"] = 86_400  # NTP arrives and moves the wall clock a day ahead
    assert rec.expired(clock) is None
    clock.shift["wall"] = -86_400  # ... or a day back
    assert rec.expired(clock) is None
    clock.shift["mono"] = 60
    assert rec.expired(clock) == "deadline passed"


def test_across_a_reboot_the_wall_clock_decides_and_a_clock_behind_the_command_expires_it() -> None:
    clock = SteppedClock(boot_id="this-boot")
    fresh = record(clock, ttl_s=60, created_ago_s=10, boot_id="last-boot")
    late = record(clock, ttl_s=60, created_ago_s=61, boot_id="last-boot")
    assert fresh.expired(clock) is None
    assert late.expired(clock) == "deadline passed"
    clock.shift["mono"] = 10**6  # the monotonic clock of another boot means nothing for these
    assert fresh.expired(clock) is None
    clock.shift["wall"] = -3600  # a Pi without an RTC, booted before NTP: the wall clock is behind the command
    why = fresh.expired(clock)
    assert why is not None and "unknown after reboot" in why


# --- what a previous boot left open -----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def restarted(
    tmp_path: Path,
    left_open: list[tuple[CommandRecord, list[State]]],
    clock: SystemClock,
    gate: asyncio.Event | None = None,
) -> AsyncIterator[tuple[Store, RecordingDevice]]:
    """A store holding ``left_open`` as the previous boot wrote them, then a dispatcher starting on it."""
    pump = RecordingDevice("pump1", PROFILES["sim_pump"])
    pump.gate = gate
    devices = Devices({"pump1": pump})
    async with Store(tmp_path / "g.db") as store:
        for rec, steps in left_open:
            t = [Transition(s, rec.created_at, rec.deadline_mono - rec.ttl_s, rec.boot_id) for s in steps]
            await store.write(lambda c, rec=rec, t=t: sql.insert(c, rec, t))
        finals: dict[str, CommandRecord] = {}
        dispatcher = Dispatcher(
            store,
            devices.devices,  # type: ignore[arg-type]
            clock=clock,
            on_final=lambda r: finals.__setitem__(r.id, r),
            sweep_interval_s=0.05,
        )
        async with dispatcher:
            yield store, pump


async def final(store: Store, command_id: str) -> CommandRecord:
    async with asyncio.timeout(5):
        while True:
            rec = await store.read(lambda c: sql.get(c, command_id))
            if rec is not None and rec.state.final:
                return rec
            await asyncio.sleep(0.01)


async def test_at_start_a_previous_boots_commands_run_only_if_the_wall_clock_says_they_are_still_due(
    tmp_path: Path,
) -> None:
    clock = SteppedClock(boot_id="this-boot")
    due = record(clock, ttl_s=60, created_ago_s=5, boot_id="last-boot")
    overdue = record(clock, ttl_s=60, created_ago_s=120, boot_id="last-boot")
    from_the_future = record(clock, ttl_s=60, created_ago_s=-600, boot_id="last-boot")  # clock went back
    sent_then_lost = record(clock, ttl_s=30, created_ago_s=40, boot_id="last-boot")
    queued = [State.RECEIVED, State.ACCEPTED, State.QUEUED]
    left = [(due, queued), (overdue, queued), (from_the_future, queued), (sent_then_lost, [*queued, State.DISPATCHED])]
    async with restarted(tmp_path, left, clock) as (store, pump):
        assert (await final(store, due.id)).state is State.SUCCEEDED
        late = await final(store, overdue.id)
        assert (late.state, late.error_code) == (State.EXPIRED, "expired")
        unknown_age = await final(store, from_the_future.id)
        assert unknown_age.state is State.EXPIRED and "unknown after reboot" in (unknown_age.error_message or "")
        # It was on the wire when the last boot ended and its deadline has passed: not sent again, and not
        # called "expired" (never executed) either: whether the device acted is unknown.
        lost = await final(store, sent_then_lost.id)
        assert (lost.state, lost.error_code) == (State.FAILED, OUTCOME_UNKNOWN)
        assert pump.executed == [due.id]


async def test_a_command_queued_behind_a_slow_one_expires_in_the_queue_and_never_reaches_the_device(
    tmp_path: Path,
) -> None:
    clock = SteppedClock()
    slow = record(clock, ttl_s=60)
    short = record(clock, ttl_s=0.3, created_ago_s=0.001)
    pump_gate = asyncio.Event()
    # Both queued at start: the slow one holds the device past the short one's deadline.
    left = [(slow, [State.QUEUED]), (short, [State.QUEUED])]
    async with restarted(tmp_path, left, clock, pump_gate) as (store, pump):
        expired = await final(store, short.id)
        assert expired.state is State.EXPIRED
        pump_gate.set()
        assert (await final(store, slow.id)).state is State.SUCCEEDED
        assert pump.executed == [slow.id]


# --- cancelling ----------------------------------------------------------------------------------------------------


async def until_dispatched(service: Any, command_id: str) -> None:
    async with asyncio.timeout(5):
        while (await service.get(command_id)).state is not State.DISPATCHED:  # noqa: ASYNC110 (a store, no event)
            await asyncio.sleep(0.01)


async def test_a_queued_command_is_cancelled_once_never_sent_and_stays_cancelled(tmp_path: Path) -> None:
    from gatewayd.errors import Conflict, UnknownCommand
    from tests.test_dispatcher import core

    async with core(tmp_path) as c:
        c.pump.gate = asyncio.Event()
        await c.service.submit({"id": "busy", "device": "pump1", "action": "start"}, source="http")
        await c.service.submit({"id": "queued", "device": "pump1", "action": "stop"}, source="http")
        await until_dispatched(c.service, "busy")
        both = await asyncio.gather(*(c.service.cancel("queued", by="ann") for _ in range(3)))
        assert {r.state for r in both} == {State.CANCELLED}
        assert both[0].error_message == "cancelled before it was sent, by ann"
        with pytest.raises(Conflict, match="may already have reached the device") as on_wire:
            await c.service.cancel("busy", by="ann")
        assert on_wire.value.details["state"] == "dispatched"
        with pytest.raises(UnknownCommand):
            await c.service.cancel("nobody-sent-this", by="ann")
        c.pump.gate.set()
        assert (await c.final("busy")).state is State.SUCCEEDED
        with pytest.raises(Conflict, match="already succeeded"):
            await c.service.cancel("busy", by="ann")
        assert c.pump.executed == ["busy"] and c.dispatcher.queued() == 0
    async with core(tmp_path) as c:  # a restart does not bring it back
        assert (await c.service.get("queued")).state is State.CANCELLED
        await asyncio.sleep(0.1)
        assert c.pump.executed == []
