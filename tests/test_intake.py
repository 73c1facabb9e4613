"""The MQTT command intake in-process: concurrency, PUBACK order, what is refused and what is left to the broker.

The client is a stand-in for aiomqtt's (a queue of ``aiomqtt.Message`` and paho's ``ack``), the command service a
stand-in whose commits the test releases one by one; the end-to-end behaviour against a real Mosquitto is in
tests/faults/test_mqtt_intake.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import aiomqtt
import pytest

from gatewayd.commands.model import State
from gatewayd.config.models import MqttSection
from gatewayd.errors import QueueFull, ShuttingDown, StorageFull, StoreUnavailable
from gatewayd.telemetry.sink import Record
from gatewayd.uplink.intake import Intake

DEVICES = {"pump1": object(), "relay1": object()}


class FakeClient:
    """What the intake uses of aiomqtt's client: ``messages`` and paho's ``ack``."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[aiomqtt.Message] = asyncio.Queue()
        self.acks: list[int] = []
        self._client = SimpleNamespace(ack=lambda mid, qos: self.acks.append(mid))
        self._mid = 0

    @property
    def messages(self) -> AsyncIterator[aiomqtt.Message]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[aiomqtt.Message]:
        while True:
            yield await self.queue.get()

    def send(self, body: Any, *, qos: int = 1, retain: bool = False, raw: bytes | None = None) -> int:
        self._mid += 1
        payload = raw if raw is not None else json.dumps(body).encode()
        self.queue.put_nowait(aiomqtt.Message("gatewayd/gw/cmd", payload, qos, retain, self._mid, None))
        return self._mid


class FakeService:
    """Commits when the test says so (``release``); raises what the test queued for an id."""

    def __init__(self) -> None:
        self.gates: dict[str, asyncio.Event] = {}
        self.raises: dict[str, list[BaseException]] = {}
        self.raises_late: dict[str, BaseException] = {}  # raised once its gate is set
        self.committed: list[str] = []
        self.storage_full = False
        self.boot_id = "boot"

    def gate(self, command_id: str) -> asyncio.Event:
        return self.gates.setdefault(command_id, asyncio.Event())

    async def submit(self, body: dict[str, Any], *, source: str) -> tuple[Any, bool]:
        command_id = body["id"]
        errors = self.raises.get(command_id)
        if errors:
            raise errors.pop(0)
        await self.gate(command_id).wait()
        if command_id in self.raises_late:
            raise self.raises_late[command_id]
        self.committed.append(command_id)
        return SimpleNamespace(id=command_id, state=State.QUEUED), True


class FakeRecorder:
    def __init__(self) -> None:
        self.events: list[Record] = []
        self.stamper = SimpleNamespace(synced=False)

    def put(self, record: Record) -> None:
        self.events.append(record)

    def message_now(self, record: Record) -> tuple[str, bytes]:
        return "events", json.dumps({"event": record.event, "data": record.data}).encode()


class Harness:
    def __init__(self, **cfg: Any) -> None:
        self.client = FakeClient()
        self.service = FakeService()
        self.recorder = FakeRecorder()
        self.published: list[tuple[str, bytes]] = []
        self.intake = Intake(
            MqttSection(**cfg),
            client_id="gw",
            box=None,  # type: ignore[arg-type]  # only a replay of a finished command writes
            service=self.service,  # type: ignore[arg-type]
            recorder=self.recorder,  # type: ignore[arg-type]
            devices=lambda: DEVICES,  # type: ignore[arg-type, return-value]
        )

    async def publish(self, topic: str, payload: bytes) -> None:
        self.published.append((topic, payload))

    def rejections(self) -> dict[str, str]:
        return {str(r.data.get("id")): r.data["code"] for r in self.recorder.events if r.event == "command_rejected"}


@pytest.fixture
async def h() -> AsyncIterator[Harness]:
    harness = Harness()
    harness.intake.open()
    task = asyncio.create_task(harness.intake.serve(harness.client, harness.publish))  # type: ignore[arg-type]
    yield harness
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def until(predicate: Any, what: str, within_s: float = 2.0) -> None:
    """Poll a condition the intake makes true from its own tasks (a fixed sleep would pass when merely slow)."""
    try:
        async with asyncio.timeout(within_s):
            while not predicate():  # noqa: ASYNC110 - the condition is the fakes' state, not an event of theirs
                await asyncio.sleep(0.001)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


def cmd(command_id: str, **extra: Any) -> dict[str, Any]:
    return {"id": command_id, "device": "pump1", "action": "read", **extra}


async def test_commands_are_taken_concurrently_and_acknowledged_in_arrival_order(h: Harness) -> None:
    mids = [h.client.send(cmd(f"c{i}")) for i in range(5)]
    await until(lambda: h.intake.taking == 5, "all five being taken at once")
    for i in (4, 2, 3, 1):  # committed out of order: none may be acknowledged before c0 is
        h.service.gate(f"c{i}").set()
    await until(lambda: len(h.service.committed) == 4, "four commits")
    await asyncio.sleep(0.01)
    assert h.client.acks == []
    h.service.gate("c0").set()
    await until(lambda: len(h.client.acks) == 5, "five acks")
    assert h.client.acks == mids


async def test_a_critical_command_is_taken_when_every_ordinary_slot_is_held() -> None:
    h = Harness(intake_concurrency=3)
    h.intake.open()
    task = asyncio.create_task(h.intake.serve(h.client, h.publish))  # type: ignore[arg-type]
    try:
        for i in range(6):
            h.client.send(cmd(f"slow{i}"))
        h.client.send(cmd("estop", priority="critical"))
        h.service.gate("estop").set()
        await until(lambda: "estop" in h.service.committed, "the critical command committed")
        assert h.service.committed == ["estop"]  # while all three ordinary slots are still held
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_closed_intake_leaves_messages_to_the_broker_without_ending_the_session(h: Harness) -> None:
    h.service.raises["late"] = [ShuttingDown("stopping")]
    h.service.gate("first").set()
    first = h.client.send(cmd("first"))
    await until(lambda: h.client.acks == [first], "first acked")
    h.client.send(cmd("late"))  # the service refuses it: shutting down
    await until(lambda: h.intake.left_to_broker == 1, "left to the broker")
    h.intake.close()
    h.client.send(cmd("after-close"))
    await until(lambda: h.intake.left_to_broker == 2, "the next one too")
    assert h.client.acks == [first]
    assert "after-close" not in h.service.gates  # never taken


async def test_a_store_that_cannot_commit_holds_the_message_and_tries_again(h: Harness) -> None:
    h.service.raises["held"] = [StoreUnavailable("stalled"), StoreUnavailable("stalled")]
    h.service.gate("held").set()
    mid = h.client.send(cmd("held"))
    await until(lambda: h.client.acks == [mid], "acked once committed", within_s=5)
    assert h.service.committed == ["held"]


async def test_retained_non_finite_and_buggy_messages_are_refused_typed_and_acknowledged(h: Harness) -> None:
    retained = h.client.send(cmd("ret"), retain=True)
    nan = h.client.send(None, raw=b'{"id":"nan","device":"pump1","action":"set_speed","params":{"percent":NaN}}')
    inf = h.client.send(None, raw=b'{"id":"inf","device":"pump1","action":"set_speed","params":{"percent":1e999}}')
    h.service.raises["bug"] = [RuntimeError("a bug")]
    bug = h.client.send(cmd("bug"))
    h.service.gate("after").set()
    after = h.client.send(cmd("after"))
    await until(lambda: len(h.client.acks) == 5, "five acks")
    assert h.client.acks == [retained, nan, inf, bug, after]
    assert h.rejections() == {
        "ret": "retained_command",
        "nan": "bad_request",
        "inf": "bad_request",
        "bug": "internal_error",
    }
    assert h.service.committed == ["after"]


async def test_refusals_events_keep_the_order_of_the_commands_however_long_each_took(h: Harness) -> None:
    h.service.raises_late["slow"] = QueueFull("the pump's queue is full")
    h.client.send(cmd("slow"))  # refused once its gate opens, after the two below
    h.client.send(None, raw=b"{not json")
    h.client.send(cmd("ret"), retain=True)
    await until(lambda: h.intake.taking == 1, "the two quick refusals done")
    assert h.recorder.events == [] and h.client.acks == []  # both wait behind the first
    h.service.gate("slow").set()
    await until(lambda: len(h.client.acks) == 3, "three acks")
    assert [(r.data["id"], r.data["code"]) for r in h.recorder.events] == [
        ("slow", "queue_full"),
        (None, "bad_request"),
        ("ret", "retained_command"),
    ]


async def test_with_the_storage_full_a_refusal_is_published_before_its_ack(h: Harness) -> None:
    h.service.storage_full = True
    mid = h.client.send(None, raw=b'{"id":"x","device":"pump1","action":"set_speed","params":{"percent":NaN}}')
    await until(lambda: h.client.acks == [mid], "acked")
    assert len(h.published) == 1 and b"command_rejected" in h.published[0][1]
    assert h.recorder.events == []
    h.service.raises["full"] = [StorageFull("no room")]
    mid2 = h.client.send(cmd("full"))
    await until(lambda: h.client.acks == [mid, mid2], "acked")
    assert b"storage_full" in h.published[1][1]


async def test_past_the_rate_commands_are_paced_in_order_critical_ones_first_and_a_qos0_runaway_is_refused() -> None:
    h = Harness(commands_per_s=50, commands_burst=10, max_wait_s=0.2, critical_per_s=1, critical_burst=2)
    h.intake.open()
    task = asyncio.create_task(h.intake.serve(h.client, h.publish))  # type: ignore[arg-type]
    try:
        # QoS 1: the burst goes at once, the rest wait their turn however many (the broker keeps the publisher
        # from getting far ahead, or not: nothing of it is refused).
        ordinary = [f"n{i:02d}" for i in range(25)]
        for cid in ordinary:
            h.service.gate(cid).set()
            h.client.send(cmd(cid))
        critical = [f"c{i}" for i in range(4)]  # arriving last, they go ahead of every ordinary one still waiting
        for cid in critical:
            h.service.gate(cid).set()
            h.client.send(cmd(cid, priority="critical"))
        began = asyncio.get_running_loop().time()
        await until(lambda: len(h.client.acks) == 29, "every message answered")
        took = asyncio.get_running_loop().time() - began
        assert h.rejections() == {}
        assert h.service.committed == critical + ordinary
        assert took >= 19 / 50 * 0.9  # ten at once, the other nineteen paced at 50/s

        # QoS 0: nothing holds the publisher back, so what would wait past max_wait_s (10 here) is refused.
        await asyncio.sleep(0.3)  # the bucket full again
        runaway = [f"q{i:02d}" for i in range(30)]
        for cid in runaway:
            h.service.gate(cid).set()
            h.client.send(cmd(cid), qos=0)
        await until(
            lambda: len(h.service.committed) + len(h.rejections()) + h.intake.suppressed == 29 + 30,
            "every runaway taken or refused",
        )
        assert h.service.committed[29:] == runaway[:10]  # ten may wait 0.2 s at 50/s
        refused = sorted(h.rejections())  # the refusals' own events: at most their burst of 10 at once
        assert refused == runaway[10:20] and h.intake.suppressed == 10
        assert set(h.rejections().values()) == {"rate_limited"}
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_messages_before_the_intake_opens_wait_unacknowledged_and_are_taken_when_it_opens() -> None:
    h = Harness()
    task = asyncio.create_task(h.intake.serve(h.client, h.publish))  # type: ignore[arg-type]
    try:
        h.service.gate("early").set()
        mid = h.client.send(cmd("early"))
        await asyncio.sleep(0.05)
        assert h.client.acks == [] and h.service.committed == []
        h.intake.open()
        await until(lambda: h.client.acks == [mid], "taken once open")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
