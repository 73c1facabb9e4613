"""Commands from ``gatewayd/{id}/cmd``: taken concurrently, bounded, rate-limited, acknowledged in order.

Each message is handed to a task of its own, so a command waiting for its commit, or a natural-language one
waiting for the provider chain, does not hold up the next one: an emergency stop published behind them is
committed and queued at once. At most ``[mqtt] intake_concurrency`` commands are being taken at a time, and
critical ones have a few slots of their own (``_CRITICAL_SLOTS``) that ordinary traffic cannot fill.

PUBACKs follow the durability contract and MQTT's ordering rule: a command is acknowledged only once it is
committed (or refused for good, its ``command_rejected`` event on its way), and acknowledgements go out in the
order the messages arrived (MQTT 3.1.1 section 4.6), each as soon as it and everything before it are settled.
Refusals' events are put in the outbox at the same moment, so they too keep the order of the commands.

What is never acknowledged, so the broker keeps it for the next session (ours is persistent):
- a message that arrives while intake is closed: before the gateway is ready, and from the moment it stops
  (SIGTERM). The session goes on meanwhile; there is no reconnect loop;
- a command the store cannot take for a reason that is not the sender's (the store stalled or lost, not full):
  it is tried again every ``_STORE_RETRY_S`` while intake is open, and left to the broker when it closes.

Paced: commands are taken at most ``commands_per_s`` a second (burst ``commands_burst``), in the order they
arrived, so one runaway publisher cannot grow the queues and the store faster than that, while a backlog the
broker kept for us during an outage is taken in full, only spread out. A message waiting for its turn holds no
slot and no task, and is not acknowledged. Critical commands are not paced behind ordinary ones: they take a
token from the shared bucket, or from a reserve of their own (``critical_per_s``, ``critical_burst``); past that
they wait at the head of the line.

Refused, acknowledged, answered with a typed ``command_rejected`` event on ``events``:
- a retained message (``retained_command``): the broker replays a retained message to every new subscription,
  so it would run again at every restart and reconnect, an order of unknown age;
- a QoS 0 message that would wait longer than ``max_wait_s`` for its turn (``rate_limited``): a publisher far
  ahead of the rate with nothing holding it back, not a backlog (a QoS 1 one waits however long: the broker keeps
  it for its publisher), and anything past ``_MAX_HELD`` messages held at once. These refusals are themselves
  bounded: past ``commands_per_s`` a second their events are left out, counted, and the count rides on the next
  one (``suppressed``), so a flood cannot fill the outbox with refusals instead;
- anything else a sender got wrong (bad JSON, unknown device, invalid parameters, a full queue, the storage
  full), as over HTTP.

A bug while taking one command is logged with its traceback, answered ``internal_error`` and acknowledged: a
message the daemon cannot take must never become a crash loop (the broker would deliver it to every restart).
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiomqtt
import structlog

from gatewayd.commands.model import CommandRecord
from gatewayd.commands.service import CommandService
from gatewayd.commands.validate import decode_json
from gatewayd.config.models import MqttSection
from gatewayd.config.profiles import Profile
from gatewayd.errors import (
    BadRequest,
    GatewayError,
    PayloadTooLarge,
    RetainedCommand,
    ShuttingDown,
    StorageFull,
    StoreUnavailable,
)
from gatewayd.interpret.errors import InterpretUnavailable
from gatewayd.observability.metrics import UPLINK_COMMANDS, counter
from gatewayd.resilience.bucket import TokenBucket
from gatewayd.resilience.errors import RateLimited
from gatewayd.store import outbox
from gatewayd.tasks import wait_set
from gatewayd.telemetry.recorder import Recorder
from gatewayd.telemetry.sink import Record
from gatewayd.uplink import paho
from gatewayd.uplink.outbox import Outbox

if TYPE_CHECKING:
    from gatewayd.interpret.service import InterpretService

log = structlog.get_logger("gatewayd.uplink")

_CRITICAL_SLOTS = 4  # commands being taken at once that only critical ones may use
# Messages held at once, waiting for their turn or being taken. A broker need not wait for our acknowledgements
# before it sends more (Mosquitto sent 2,000 unacknowledged QoS 1 commands at once), so this bound, not the
# broker, keeps memory in check: a waiting message costs about a kilobyte. Past it, a message is refused.
_MAX_HELD = 10_000
_STORE_RETRY_S = 1.0

Publish = Callable[[str, bytes], Awaitable[None]]  # (topic below the prefix, payload), QoS 1, awaited to PUBACK


class LinkLost(Exception):
    """The session cannot go on (a PUBACK did not come, a refusal could not be published): reconnect."""


@dataclass
class _Message:
    """One message from the cmd topic, looked at before it is taken."""

    message: aiomqtt.Message
    body: dict[str, Any] | None = None
    refusal: GatewayError | None = None
    command_id: str | None = None
    device: str = "gateway"  # a configured device, else "gateway": rejection events are attributed to it
    critical: bool = False
    event: Record | None = None  # its command_rejected event, put in the outbox when it is settled, in order
    now: tuple[str, bytes] | None = None  # ... or that event to publish at once (the storage full)
    done: asyncio.Future[bool] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    # ^ resolved when it is settled: True to acknowledge it, False to leave it to the broker


class Intake:
    def __init__(
        self,
        cfg: MqttSection,
        *,
        client_id: str,
        box: Outbox,
        service: CommandService,
        recorder: Recorder,
        devices: Callable[[], Mapping[str, Profile]],
        interpret: InterpretService | None = None,
    ):
        self.cfg = cfg
        self._client_id = client_id
        self._box = box
        self._service = service
        self._recorder = recorder
        self._devices = devices
        self.interpret = interpret
        self._open = asyncio.Event()  # set while commands are taken
        self._closed = False
        self._bucket = TokenBucket(cfg.commands_burst, cfg.commands_per_s, name="mqtt.commands")
        self._critical = TokenBucket(cfg.critical_burst, cfg.critical_per_s, name="mqtt.commands.critical")
        self._waiting: deque[_Message] = deque()  # looked at, not taken yet, in arrival order, critical ones first
        self._critical_waiting = 0  # at the head of the line
        self._running = 0  # being taken in the ordinary slots (intake_concurrency)
        self._running_critical = 0  # ... in the critical ones
        self._wake = asyncio.Event()  # a message came to wait, or a slot came free
        self._line_limit = max(cfg.commands_burst, int(cfg.commands_per_s * cfg.max_wait_s))
        # Refusals for the rate get their events at the same rate at most; the rest are counted.
        self._refusals = TokenBucket(cfg.commands_burst, cfg.commands_per_s, name="mqtt.refusal_events")
        self.suppressed = 0  # rate_limited refusals whose event was left out, in all
        self._suppressed_since = 0  # ... since the last event that was published
        self.received = 0
        self.left_to_broker = 0  # not acknowledged: intake closed, or the store could not take it
        self._store_failing = False

    def open(self) -> None:
        """The gateway is ready: take the commands the broker has been holding, and the new ones."""
        if not self._closed:
            self._open.set()

    def close(self) -> None:
        """Stopping: take no new message and leave the rest to the broker; commands being taken finish."""
        self._closed = True
        self._open.clear()

    @property
    def is_open(self) -> bool:
        return self._open.is_set()

    @property
    def taking(self) -> int:
        """Messages held: waiting for their turn or being taken."""
        return len(self._waiting) + self._running + self._running_critical

    # --- a session -------------------------------------------------------------------------------------------

    async def serve(self, client: aiomqtt.Client, publish: Publish) -> None:
        """Take the session's messages until it ends (cancelled with it; a command being committed still reaches
        the dispatcher: CommandService.submit shields its commit)."""
        order: deque[_Message] = deque()  # QoS 1 and 2, in arrival order

        def settle(m: _Message) -> None:
            """Its refusal's event (so events keep the order of the commands), then its PUBACK."""
            if m.done.cancelled() or m.done.exception() is not None:
                return
            if m.event is not None:
                self._recorder.put(m.event)
            if m.done.result():
                paho.ack(client, m.message)

        def settled(_fut: asyncio.Future[bool] | None = None) -> None:
            while order and order[0].done.done():
                settle(order.popleft())

        await self._open.wait()  # messages wait in the client's queue meanwhile, unacknowledged
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._feed(tg, publish), name="gatewayd[uplink].feeder")
                async for message in client.messages:
                    if not self._open.is_set():
                        self.left_to_broker += 1
                        counter(UPLINK_COMMANDS, "left_to_broker").inc()
                        continue
                    self.received += 1
                    m = self._look(message)
                    if message.qos > 0:
                        order.append(m)
                        m.done.add_done_callback(settled)
                    else:
                        m.done.add_done_callback(functools.partial(_settle_one, settle, m))
                    if m.refusal is None:
                        self._wait(m)
                    elif self._note(m, m.refusal):
                        m.done.set_result(True)
                    else:  # the storage full: its event published at once, before its PUBACK
                        tg.create_task(self._refuse(m, publish), name="gatewayd[uplink].refusal")
        finally:
            # The session ended: what waited comes again when the broker delivers it again.
            for m in self._waiting:
                m.done.cancel()
            self._waiting.clear()
            self._critical_waiting = 0

    def _look(self, message: aiomqtt.Message) -> _Message:
        """Parse, and refuse what can be refused at once: synchronously and cheaply, taking no slot."""
        m = _Message(message)
        try:
            body = _parse(message.payload, self.cfg.max_payload_bytes)
            if isinstance(body.get("id"), str):
                m.command_id = body["id"]
            if isinstance(body.get("device"), str) and body["device"] in self._devices():
                # Only a configured device: the recorder keeps each device's last event in memory, and a name
                # from every bad payload would grow that without bound.
                m.device = body["device"]
            m.critical = isinstance(body.get("priority"), str) and body["priority"].lower() == "critical"
            if message.retain:
                raise RetainedCommand(
                    "a retained command is refused: the broker replays it at every subscription, so it would run "
                    "again at every restart and reconnect; publish commands with retain=false (clear this one "
                    "with an empty retained message on the topic)"
                )
            if self.taking >= _MAX_HELD:
                raise RateLimited("mqtt.commands (busy)", 1.0, limit=_MAX_HELD, remaining=0, reset_s=1.0)
            if message.qos == 0 and not m.critical and len(self._waiting) >= self._line_limit:
                # Nothing holds a QoS 0 publisher back: one this far ahead of the rate is refused, not queued.
                wait_s = len(self._waiting) / self.cfg.commands_per_s
                raise RateLimited(self._bucket.name, wait_s, limit=self.cfg.commands_per_s, remaining=0, reset_s=wait_s)
            m.body = body
        except GatewayError as err:
            m.refusal = err
            if m.command_id is None and isinstance(err, BadRequest):
                m.command_id = _salvage_id(message.payload)
        return m

    def _wait(self, m: _Message) -> None:
        if m.critical:  # behind the critical ones already waiting, ahead of every other
            self._waiting.insert(self._critical_waiting, m)
            self._critical_waiting += 1
        else:
            self._waiting.append(m)
        self._wake.set()

    async def _feed(self, tg: asyncio.TaskGroup, publish: Publish) -> None:
        """Start the waiting messages, head first, as slots come free and the bucket allows."""
        while True:
            head = self._waiting[0] if self._waiting else None
            critical_slot = False
            if head is not None and self._running >= self.cfg.intake_concurrency:
                critical_slot = head.critical and self._running_critical < _CRITICAL_SLOTS
                if not critical_slot:
                    head = None  # no slot for it: wait for one to come free
            wait_s: float | None = None
            if head is not None:
                decision = self._bucket.try_acquire()
                allowed = decision.allowed or (head.critical and self._critical.try_acquire().allowed)
                if not allowed:
                    head, wait_s = None, decision.wait_s  # or sooner, if a critical one comes to the head
            if head is None:
                self._wake.clear()
                await wait_set(self._wake, wait_s)
                continue
            self._waiting.popleft()
            if head.critical:
                self._critical_waiting -= 1
            if critical_slot:
                self._running_critical += 1
            else:
                self._running += 1
            tg.create_task(self._run(head, critical_slot, publish), name="gatewayd[uplink].command")

    async def _run(self, m: _Message, critical_slot: bool, publish: Publish) -> None:
        try:
            m.done.set_result(await self._submit(m, publish))
        except BaseException:
            m.done.cancel()
            raise
        finally:
            if critical_slot:
                self._running_critical -= 1
            else:
                self._running -= 1
            self._wake.set()

    async def _refuse(self, m: _Message, publish: Publish) -> None:
        try:
            await self._publish_now(m, publish)
        except BaseException:
            m.done.cancel()
            raise
        m.done.set_result(True)

    async def _submit(self, m: _Message, publish: Publish) -> bool:
        assert m.body is not None
        while True:
            try:
                if "text" in m.body:  # natural language, as over HTTP: interpreted, then the same durable submit
                    if self.interpret is None:
                        raise InterpretUnavailable(
                            "natural-language commands are turned off ([interpret] enabled = false)"
                        )
                    # No principal on MQTT: whoever the broker lets publish here is trusted to command, and a
                    # body "user" is their unverified label (the interpreter keys its allowance by this uplink).
                    client = f"mqtt:{self._client_id}"
                    rec, created, _ = await self.interpret.submit(m.body, source="mqtt", client=client, principal=None)
                else:
                    rec, created = await self._service.submit(m.body, source="mqtt")
            except StorageFull as err:
                await self._rejected(m, err, publish)  # logged once, when the storage filled up
                return True
            except ShuttingDown:
                self._left(m, "shutting down")
                return False
            except StoreUnavailable as err:
                # Not committed, and not for anything the sender did. Held, unacknowledged, and tried again: a
                # reconnect would only bring the same message back at once.
                if not self._open.is_set():
                    self._left(m, err.message)
                    return False
                if not self._store_failing:
                    self._store_failing = True
                    log.warning("mqtt_command_not_committed", command_id=_clip(m.command_id), error=err.message)
                await asyncio.sleep(_STORE_RETRY_S)
                continue
            except GatewayError as err:
                await self._rejected(m, err, publish)
                return True
            except Exception as err:
                # A bug, not the sender's doing (HTTP answers 500 for the same): logged with its traceback, the
                # sender told, the message acknowledged.
                log.error("mqtt_command_failed", command_id=_clip(m.command_id), error=type(err).__name__, exc_info=err)
                internal = GatewayError(
                    "internal error (logged); look the command up by its id to see whether it was accepted",
                    details={"type": type(err).__name__},
                )
                await self._rejected(m, internal, publish)
                return True
            self._store_failing = False
            if created:
                counter(UPLINK_COMMANDS, "accepted").inc()
            else:
                counter(UPLINK_COMMANDS, "duplicate").inc()
                log.info("mqtt_command_duplicate", command_id=rec.id, state=rec.state.value)
                if rec.state.final:
                    await self._republish(rec, publish)
            return True

    def _left(self, m: _Message, why: str) -> None:
        self.left_to_broker += 1
        counter(UPLINK_COMMANDS, "left_to_broker").inc()
        log.debug("mqtt_command_left_to_broker", command_id=_clip(m.command_id), reason=why)

    def _note(self, m: _Message, err: GatewayError) -> bool:
        """Count and log a refusal and make its ``command_rejected`` event: ``m.event``, for the outbox with the
        PUBACK (True); or, while the storage is full, ``m.now`` to publish at once, before the PUBACK (False: the
        outbox would have no room for it, or eat the reserve). Never raises: a refusal cannot end the daemon."""
        counter(UPLINK_COMMANDS, "rejected").inc()
        if isinstance(err, RateLimited) and not self._refusals.try_acquire().allowed:
            self.suppressed += 1
            self._suppressed_since += 1
            counter(UPLINK_COMMANDS, "rejected_unannounced").inc()
            if self._suppressed_since == 1:
                log.warning("mqtt_refusals_suppressed", reason="more refusals a second than commands_per_s")
            return True
        if not isinstance(err, StorageFull):
            log.warning(
                "mqtt_command_rejected", command_id=_clip(m.command_id), code=err.code, error=_clip(err.message)
            )
        try:
            data = _clip({"id": m.command_id, **err.to_dict()})
            if self._suppressed_since:
                data["suppressed"] = self._suppressed_since  # refusals since the last event that had no event
                self._suppressed_since = 0
            record = Record.of_event(m.device, "command_rejected", data, severity="warning")
            if not isinstance(err, StorageFull) and not self._service.storage_full:
                m.event = record
                return True
            m.now = self._recorder.message_now(record)
        except Exception as bug:  # shaping the event failed: the message is still answered for
            log.error("mqtt_rejection_failed", command_id=_clip(m.command_id), exc_info=bug)
            return True
        return False

    async def _rejected(self, m: _Message, err: GatewayError, publish: Publish) -> None:
        """:meth:`_note`, and the event published now when it cannot wait for the outbox."""
        if self._note(m, err):
            return
        await self._publish_now(m, publish)

    async def _publish_now(self, m: _Message, publish: Publish) -> None:
        assert m.now is not None
        try:
            await publish(*m.now)
        except (aiomqtt.MqttError, OSError) as lost:
            raise LinkLost(f"a command's refusal could not be published: {lost}") from lost

    async def _republish(self, rec: CommandRecord, publish: Publish) -> None:
        """A command sent again after it finished: its result again, through the outbox (at once when full)."""
        row = outbox.result_row(
            rec, mono=time.monotonic(), boot_id=self._service.boot_id, synced=self._recorder.stamper.synced
        )
        try:
            await self._box.add([row])  # the uplink is woken by it
        except StorageFull:
            try:
                await publish(row.topic, row.message())
            except (aiomqtt.MqttError, OSError) as lost:
                raise LinkLost(f"a result could not be published: {lost}") from lost
            return


def _parse(payload: Any, limit: int) -> dict[str, Any]:
    if isinstance(payload, str):
        payload = payload.encode()
    if not isinstance(payload, bytes | bytearray):
        raise BadRequest("the command payload is empty")
    if len(payload) > limit:
        raise PayloadTooLarge(f"the command is {len(payload)} bytes; the limit is {limit}", details={"limit": limit})
    body = decode_json(payload, "the command")
    if not isinstance(body, dict):
        raise BadRequest("the command must be a JSON object")
    return body


def _settle_one(settle: Callable[[_Message], None], m: _Message, _fut: asyncio.Future[bool]) -> None:
    settle(m)


def _salvage_id(payload: Any) -> str | None:
    """The id of a command refused for JSON that Python reads but JSON does not allow (NaN, 1e999, a lone
    surrogate), so that its sender can tell which command the refusal is about. Nothing else is taken from it."""
    if not isinstance(payload, bytes | bytearray) or len(payload) > 65536:
        return None
    try:
        body = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    found = body.get("id") if isinstance(body, dict) else None
    return found if isinstance(found, str) and _ID.fullmatch(found) else None


_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_CLIP_CHARS = 200  # of any string a rejection echoes back (an id, a parameter's value, a message quoting them)
_CLIP_ITEMS = 20  # of any list or object in it


def _clip(value: Any) -> Any:
    """A rejection event echoes what the sender got wrong, not all of it: up to 64 KiB of someone's junk in
    every event would cost the outbox, the broker and the daemon's memory for nothing."""
    if isinstance(value, str):
        return value if len(value) <= _CLIP_CHARS else value[:_CLIP_CHARS] + "..."
    if isinstance(value, dict):
        return {_clip(str(k)): _clip(v) for k, v in list(value.items())[:_CLIP_ITEMS]}
    if isinstance(value, list | tuple):
        return [_clip(v) for v in value[:_CLIP_ITEMS]]
    return value
