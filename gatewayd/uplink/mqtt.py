"""The MQTT uplink (aiomqtt) and store-and-forward.

One supervised task, ``link``, connects, serves the session, and reconnects for as long as the broker stays away;
the daemon starts and works without one. While an outage is young (``reconnect_fast_for_s``) the pauses between
attempts stay short (at most ``reconnect_base_s``, jittered), so a broker that restarts is found again within about
that; past it they grow, capped at ``reconnect_cap_s``. A session runs three tasks:

- ``receive``: commands from ``gatewayd/{id}/cmd`` (QoS 1), taken concurrently and acknowledged (PUBACK) in order,
  each only after it is committed: the client is told "accepted" exactly when the durability contract holds.
  :mod:`gatewayd.uplink.intake` has the rules (what is refused, what is left to the broker, the rate limits).
  The session is persistent (``clean_session = false``): what is not acknowledged is delivered again next time.
- ``live``: telemetry from memory (the recorder's write-behind, :mod:`gatewayd.telemetry.recorder`), published as it
  comes and settled with the recorder when the broker acknowledges it; readings never touch the disk while this
  keeps pace. It starts first: after a reconnect, live readings are on the wire before any backlog.
- ``drain``: the outbox (results, events, telemetry that was written), in (priority, arrival) order, beside the live
  readings, paced by the broker's acknowledgements (:class:`~gatewayd.uplink.pacing.AckWindow`) and optionally
  capped by a token bucket (``drain_messages_per_s``). It looks at the head of the outbox again whenever a row is
  committed, so a new result goes ahead of the telemetry backlog. A row is deleted only after the broker's PUBACK,
  in batches, without an fsync of its own (a delete lost to a power cut sends the row again; it never loses one).
  Rows the broker acknowledged but the store could not delete yet (the disk full) are remembered and deleted first,
  not sent again; the drain waits for that, and the session goes on.

A PUBACK missing ``puback_timeout_s`` ends the session: a link that stopped carrying data is detected in seconds,
not after 1.5 keepalives. The retained ``status`` topic says ``online`` while connected; the broker publishes the
last will ``offline`` when the connection drops, and we publish it ourselves on a clean stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import ssl
import time
from collections.abc import Callable, Coroutine, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

import aiomqtt
import structlog

from gatewayd.commands.service import CommandService
from gatewayd.config.models import MqttSection
from gatewayd.config.profiles import Profile
from gatewayd.errors import GatewayError, StoreUnavailable
from gatewayd.observability.metrics import UPLINK_CONNECTED, UPLINK_DRAIN_WINDOW, UPLINK_PUBLISHED, counter
from gatewayd.resilience.bucket import TokenBucket
from gatewayd.resilience.classify import Verdict
from gatewayd.resilience.errors import DeadlineExceeded, RetryExhausted
from gatewayd.resilience.retry import RetryPolicy
from gatewayd.store import outbox
from gatewayd.tasks import TaskOwner, wait_set
from gatewayd.telemetry import batching
from gatewayd.telemetry.recorder import Held, Recorder
from gatewayd.uplink import paho
from gatewayd.uplink.discovery import discovery_messages
from gatewayd.uplink.intake import Intake, LinkLost
from gatewayd.uplink.outbox import Outbox
from gatewayd.uplink.pacing import AckWindow

if TYPE_CHECKING:
    from gatewayd.interpret.service import InterpretService

log = structlog.get_logger("gatewayd.uplink")

_RECONNECT_ATTEMPTS = 2**31  # a broker may stay away for weeks: the schedule never gives up
_IDLE_POLL_S = 1.0  # the outbox is also looked at this often when nothing woke the drain
_STORE_RETRY_S = 1.0  # sent rows that could not be deleted (the disk full) are tried again this often
# Acknowledged rows are deleted in batches: when this many are waiting, or the oldest waited this long, or the drain
# has nothing in flight. One transaction for hundreds of rows, instead of one per round trip.
_DELETE_BATCH = 512
_DELETE_EVERY_S = 0.25
_FETCH_AHEAD = 4  # rows read ahead from the outbox: this many windows' worth


def _broker_verdict(err: BaseException) -> Verdict:
    """Connecting: refused, unreachable, timed out, even bad credentials (fixed on the broker while we wait) may
    clear; the schedule keeps trying and the outage is logged once."""
    return Verdict(True, None, "mqtt_connect")


class Uplink:
    def __init__(
        self,
        cfg: MqttSection,
        gateway_id: str,
        box: Outbox,
        service: CommandService,
        recorder: Recorder,
        devices: Callable[[], Mapping[str, Profile]],
        *,
        interpret: InterpretService | None = None,
        environ: Mapping[str, str] | None = None,
    ):
        self.cfg = cfg
        self.gateway_id = gateway_id
        self.base = f"gatewayd/{gateway_id}"
        self.client_id = cfg.client_id or f"gatewayd-{gateway_id}"
        self._box = box
        self._service = service
        self._recorder = recorder
        self._devices = devices
        self.intake = Intake(
            cfg,
            client_id=self.client_id,
            box=box,
            service=service,
            recorder=recorder,
            devices=devices,
            interpret=interpret,
        )
        self._settled = asyncio.Event()  # the first session subscribed, or the first connection attempt failed
        self.subscribed = False
        if cfg.enabled:
            paho.check()  # at start, not at the first command: the installed aiomqtt has what the uplink uses
        self._environ = os.environ if environ is None else environ
        self._tasks = TaskOwner("uplink")
        self._wake = asyncio.Event()
        self._bucket = (
            TokenBucket(cfg.drain_burst, cfg.drain_messages_per_s, name="uplink.drain")
            if cfg.drain_messages_per_s
            else None
        )
        # Reconnecting: short pauses while the outage is young, growing ones once it lasts.
        self._reconnect_fast = RetryPolicy(
            max_attempts=_RECONNECT_ATTEMPTS,
            base_s=cfg.reconnect_base_s,
            multiplier=1.0,
            cap_s=cfg.reconnect_base_s,
            jitter="full",
            name="mqtt",
            classifier=_broker_verdict,
            quiet=True,
        )
        self._reconnect = RetryPolicy(
            max_attempts=_RECONNECT_ATTEMPTS,
            base_s=cfg.reconnect_base_s,
            cap_s=cfg.reconnect_cap_s,
            jitter="full",
            name="mqtt",
            classifier=_broker_verdict,
            quiet=True,
        )
        self._down_since: float | None = None  # monotonic: when the current outage began
        self._drop = asyncio.Event()  # set by outage(): the session ends at once
        self._held_until = 0.0
        self.connected = False
        self.since = time.time()
        self.last_error: str | None = None
        self.connects = 0
        self.published = 0  # records the broker acknowledged: outbox rows and live readings
        self.published_live = 0
        self._sent: list[outbox.Key] = []  # outbox rows the broker acknowledged, not deleted yet
        self._sent_since: float | None = None  # when the oldest of them was acknowledged
        self._delete_failing = False
        self.window = AckWindow(cfg.max_inflight, minimum=max(1, cfg.max_inflight // 10))
        self._drain_inflight: dict[outbox.Key, float] = {}  # rows in messages awaiting their PUBACK
        self._drain_messages = 0  # those messages
        self._live_inflight = 0
        self._batch: batching.BatchMode = recorder.batch
        self._batch_max = recorder.batch_max
        box.listeners.append(self.wake)  # rows added, by whichever component: a result, an event, a reading

    def wake(self) -> None:
        self._wake.set()

    async def outage(self, seconds: float) -> None:
        """An operator's broker_down test: drop the connection now and stay away for ``seconds``."""
        self._held_until = time.monotonic() + seconds
        self._drop.set()
        await asyncio.sleep(seconds)

    def status(self) -> dict[str, Any]:
        return {
            "enabled": self.cfg.enabled,
            "broker": f"{self.cfg.host}:{self.cfg.port}",
            "connected": self.connected,
            "since": self.since,
            "last_error": self.last_error,
            "connects": self.connects,
            "published": self.published,
            "published_live": self.published_live,
            "drain": {
                "window": self.window.size,
                "in_flight": self._drain_messages,
                "ack_base_ms": None if self.window.base_s is None else round(self.window.base_s * 1000, 3),
                "cuts": self.window.cuts,
            },
            "live_in_flight": self._live_inflight,
            "commands_received": self.intake.received,
            "commands_taking": self.intake.taking,
            "commands_left_to_broker": self.intake.left_to_broker,
            "commands_refused_unannounced": self.intake.suppressed,
            "intake_open": self.intake.is_open,
            "subscribed": self.subscribed,
        }

    async def __aenter__(self) -> Uplink:
        UPLINK_CONNECTED.set(0)
        await self._tasks.open()
        if self.cfg.enabled:
            self._tasks.spawn("link", self._link())
        else:
            log.info("mqtt_disabled")
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._tasks.close()

    # --- connection ------------------------------------------------------------------------------------------

    def _new_client(self) -> aiomqtt.Client:
        password = None
        if self.cfg.password_env:
            password = self._environ.get(self.cfg.password_env)
            if password is None:
                log.warning("mqtt_password_missing", variable=self.cfg.password_env)
        tls_context = None
        tls = self.cfg.tls
        if tls is not None:
            tls_context = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
            if tls.cert_file is not None and tls.key_file is not None:
                tls_context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
        client = aiomqtt.Client(
            self.cfg.host,
            self.cfg.port,
            identifier=self.client_id,
            username=self.cfg.username,
            password=password,
            keepalive=self.cfg.keepalive_s,
            clean_session=False,  # the broker keeps our subscription and queues commands while we are away
            will=aiomqtt.Will(f"{self.base}/status", b"offline", qos=1, retain=True),
            tls_context=tls_context,
            timeout=self.cfg.puback_timeout_s,
            # The drain's window and as many live messages again: live readings never queue inside paho behind a
            # full window of backlog.
            max_inflight_messages=2 * self.cfg.max_inflight,
        )
        # Acknowledge commands ourselves, after the commit (aiomqtt has no public API for it: see uplink/paho.py).
        paho.manual_acks(client)
        # aiomqtt logs a warning for every publish made while more than 10 await their PUBACK; the drain and the live
        # readings keep up to max_inflight each in flight by design (plus status), so only more is worth a warning.
        client.pending_calls_threshold = 2 * self.cfg.max_inflight + 10
        return client

    async def _connect(self) -> aiomqtt.Client:
        client = self._new_client()
        closed = paho.watch_close(client)
        try:
            await client.__aenter__()
        except (aiomqtt.MqttError, OSError) as err:
            failure: BaseException = err
            if closed:  # the broker hung up before its CONNACK (a TLS alert, a proxy): say so, not "timed out"
                failure = aiomqtt.MqttError(f"the broker closed the connection before accepting it ({closed[0]})")
            self._down(f"cannot connect to {self.cfg.host}:{self.cfg.port}: {failure}")
            if closed or _refused(err):  # the broker answered no: ready now, offline; a slow connect may still come
                self._settled.set()
            raise failure from None
        return client

    def _down(self, reason: str) -> None:
        if self.connected or self.last_error is None:
            log.warning("mqtt_disconnected" if self.connected else "mqtt_unavailable", reason=reason)
            self.since = time.time()
        if self._down_since is None:
            self._down_since = time.monotonic()
        self.connected = False
        self.last_error = reason
        UPLINK_CONNECTED.set(0)

    async def _reconnected(self) -> aiomqtt.Client:
        """A connected client. The first attempt at once; then, for the first reconnect_fast_for_s of the outage,
        short pauses (the fast schedule gives up at that deadline), and growing ones from then on."""
        if self._down_since is None:
            with contextlib.suppress(aiomqtt.MqttError, OSError):
                return await self._connect()  # a failure is recorded by _connect (_down): the outage begins
        since = self._down_since if self._down_since is not None else time.monotonic()
        deadline = since + self.cfg.reconnect_fast_for_s
        if time.monotonic() < deadline:
            with contextlib.suppress(RetryExhausted, DeadlineExceeded):
                return await self._reconnect_fast.call(self._connect, deadline=deadline)
        return await self._reconnect.call(self._connect)

    async def _link(self) -> None:
        while True:
            held = self._held_until - time.monotonic()
            if held > 0:
                await asyncio.sleep(held)
            self._drop.clear()
            try:
                client = await self._reconnected()
            except RetryExhausted:
                continue
            self.connects += 1
            self.connected, self.since = True, time.time()
            self._down_since = None
            UPLINK_CONNECTED.set(1)
            log.info("mqtt_connected", broker=f"{self.cfg.host}:{self.cfg.port}", client_id=self.client_id)
            reason = "session ended"
            try:
                try:
                    await self._session(client)
                except* (aiomqtt.MqttError, LinkLost, OSError, GatewayError) as group:
                    reason = "; ".join(str(e) for e in _leaves(group))
            except asyncio.CancelledError:
                await self._goodbye(client)
                raise
            self.subscribed = False
            self._down(reason)
            with contextlib.suppress(Exception):  # the connection is already broken; closing is best effort
                await client.__aexit__(None, None, None)

    async def _goodbye(self, client: aiomqtt.Client) -> None:
        """A clean stop: say offline ourselves (the will only fires on a broken connection), then disconnect."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2):
                await client.publish(f"{self.base}/status", b"offline", qos=1, retain=True)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2):
                await client.__aexit__(None, None, None)
        self.connected = False
        UPLINK_CONNECTED.set(0)

    async def _session(self, client: aiomqtt.Client) -> None:
        await client.publish(f"{self.base}/status", b"online", qos=1, retain=True)
        await client.subscribe(f"{self.base}/cmd", qos=1)
        if self.cfg.ha_discovery:
            for topic, payload in discovery_messages(
                self.gateway_id, self.base, self.cfg.discovery_prefix, self._devices()
            ):
                await client.publish(topic, payload, qos=1, retain=True)
        self.subscribed = True
        self._settled.set()
        publish = functools.partial(self._publish_now, client)
        live_first = asyncio.Event()  # the readings that waited are on the wire: the backlog may follow
        self._recorder.link(True)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._live(client, live_first), name="gatewayd[uplink].live")
                tg.create_task(self.intake.serve(client, publish), name="gatewayd[uplink].receive")
                tg.create_task(self._drain(client, live_first), name="gatewayd[uplink].drain")
                tg.create_task(self._dropped(), name="gatewayd[uplink].outage")
        finally:
            self._recorder.link(False)

    async def _dropped(self) -> None:
        await self._drop.wait()
        raise LinkLost("operator test: broker_down")

    # --- commands in -----------------------------------------------------------------------------------------

    def open_intake(self) -> None:
        """The gateway is ready: commands from the broker are taken from now on."""
        self.intake.open()

    def close_intake(self) -> None:
        """Stopping: no command is taken any more; the broker keeps the rest for the next start."""
        self.intake.close()

    async def wait_settled(self, timeout_s: float) -> bool:
        """At start-up: until the first session has subscribed to the cmd topic (so a command published from now
        on reaches us), or the first connection attempt failed (the broker is away: offline is a normal state), or
        ``timeout_s`` passed. True if subscribed."""
        if not self.cfg.enabled:
            return False
        await wait_set(self._settled, timeout_s)
        return self.subscribed

    async def _publish_now(self, client: aiomqtt.Client, topic: str, payload: bytes) -> None:
        await client.publish(f"{self.base}/{topic}", payload, qos=1)

    # --- live telemetry out ---------------------------------------------------------------------------------

    async def _live(self, client: aiomqtt.Client, first: asyncio.Event) -> None:
        """Readings from memory as they come, up to max_inflight messages awaiting their PUBACK; the recorder is
        told of each outcome (a failure gives the readings back to it, to be sent again or written)."""
        recorder = self._recorder
        room = asyncio.Event()
        limit = self.cfg.max_inflight
        # Taken from the recorder and not settled yet: a task cancelled before it ran (the session ending) never
        # reaches its finally, and its readings are given back below.
        unsettled: dict[int, list[Held]] = {}

        async def publish(message: batching.Message, taken: list[Held]) -> None:
            self._live_inflight += 1
            ok = False
            try:
                await client.publish(f"{self.base}/{message.topic}", message.payload, qos=self.cfg.telemetry_qos)
                ok = True
            except (aiomqtt.MqttError, OSError) as err:
                raise LinkLost(f"publish failed: {err}") from err  # ends the session: the TaskGroup stops the rest
            finally:
                self._live_inflight -= 1
                unsettled.pop(id(taken), None)
                recorder.settle_live(taken, ok)
                if ok:
                    self.published += len(taken)
                    self.published_live += len(taken)
                room.set()

        try:
            async with asyncio.TaskGroup() as tg:
                while True:
                    free = limit - self._live_inflight
                    if free <= 0:
                        room.clear()
                        await room.wait()
                        continue
                    if not recorder.live_ready.is_set():
                        first.set()
                        await recorder.live_ready.wait()
                        if first.is_set() and recorder.batch_wait_s:
                            await asyncio.sleep(recorder.batch_wait_s)  # the polls ending now go out together
                        continue
                    taken = recorder.take_live(free if self._batch == "off" else free * self._batch_max)
                    rows = [h.row for h in taken]
                    for message in batching.messages(rows, self._batch, self._batch_max):
                        carried = [taken[i] for i in message.items]
                        unsettled[id(carried)] = carried
                        tg.create_task(publish(message, carried))
                    await asyncio.sleep(0)  # the tasks hand their messages to paho, in order, before anything else
                    first.set()
        except* LinkLost as group:
            raise group.exceptions[0] from None
        finally:
            for carried in unsettled.values():
                recorder.settle_live(carried, False)

    # --- outbox out ------------------------------------------------------------------------------------------

    async def _drain(self, client: aiomqtt.Client, live_first: asyncio.Event) -> None:
        await live_first.wait()
        acked = asyncio.Event()
        self._drain_inflight.clear()
        self._drain_messages = 0

        async def publish(message: batching.Message, rows: list[outbox.OutboxRow]) -> None:
            sent = time.monotonic()
            qos = self.cfg.telemetry_qos if message.telemetry else 1
            try:
                await client.publish(f"{self.base}/{message.topic}", message.payload, qos=qos)
            except (aiomqtt.MqttError, OSError) as err:
                raise LinkLost(f"publish failed: {err}") from err
            finally:
                self._drain_messages -= 1
                for row in rows:
                    self._drain_inflight.pop(row.key, None)
                acked.set()
            self.window.acked(time.monotonic() - sent)
            if not self._sent:
                self._sent_since = time.monotonic()
            self._sent.extend(row.key for row in rows)
            self.published += len(rows)
            for row in rows:
                counter(UPLINK_PUBLISHED, row.kind).inc()

        try:
            async with asyncio.TaskGroup() as tg:
                await self._drain_loop(tg, publish, acked)
        except* LinkLost as group:
            raise group.exceptions[0] from None

    async def _drain_loop(
        self,
        tg: asyncio.TaskGroup,
        publish: Callable[[batching.Message, list[outbox.OutboxRow]], Coroutine[Any, Any, None]],
        acked: asyncio.Event,
    ) -> None:
        """Keep the window full: read ahead, send as acknowledgements free room, delete what was acknowledged."""
        per_message = 1 if self._batch == "off" else self._batch_max
        ahead: list[outbox.OutboxRow] = []  # read from the outbox, not sent yet
        # The last read found everything there was: nothing to read again until a commit wakes the drain (every
        # insert into the outbox does) or the idle look is due. No read of the database per acknowledgement.
        exhausted = False
        while True:
            self._sent.extend(self._recorder.take_acked_stored())
            busy = self._drain_messages > 0
            if self._sent and self._delete_due(busy) and not await self._forget_sent():
                await asyncio.sleep(_STORE_RETRY_S)  # sending more now would send these rows again
                continue
            if self._wake.is_set():  # something was committed: a result may go ahead of what was read
                self._wake.clear()
                ahead, exhausted = [], False
            window = self.window.size
            UPLINK_DRAIN_WINDOW.set(window)
            free = window - self._drain_messages
            if free > 0 and not ahead and not exhausted:
                limit = window * per_message * _FETCH_AHEAD
                ahead = await self._read_ahead(limit)
                exhausted = len(ahead) < limit
            if free <= 0 or not ahead:
                if not await self._idle(acked, busy=busy or bool(self._sent)):
                    exhausted = False  # nothing happened for a while: look again
                continue
            candidates = ahead[: free * per_message]
            chosen = batching.messages(candidates, self._batch, self._batch_max)[:free]
            taken = {i for message in chosen for i in message.items}
            ahead = [r for i, r in enumerate(candidates) if i not in taken] + ahead[len(candidates) :]
            for message in chosen:
                if self._bucket is not None:
                    await self._bucket.acquire()
                rows = [candidates[i] for i in message.items]
                for row in rows:
                    self._drain_inflight[row.key] = time.monotonic()
                self._drain_messages += 1
                tg.create_task(publish(message, rows))
            await asyncio.sleep(0)

    async def _read_ahead(self, limit: int) -> list[outbox.OutboxRow]:
        """The next rows to send, leaving out those in flight, acknowledged and not deleted, or being sent live."""
        skip = {*self._drain_inflight, *self._sent, *self._recorder.sending_stored}

        rows = await self._box.fetch(limit, skip=skip)
        # Sent, acknowledged, or written while in flight live, while it was being read.
        return [
            r
            for r in rows
            if r.key not in self._drain_inflight
            and r.key not in self._recorder.sending_stored
            and r.key not in self._sent
        ]

    async def _idle(self, acked: asyncio.Event, *, busy: bool) -> bool:
        """Until an acknowledgement, a commit (the wake), or the next delete or look at the outbox is due. False
        when nothing came."""
        acked.clear()
        waits = [asyncio.ensure_future(acked.wait()), asyncio.ensure_future(self._wake.wait())]
        try:
            done, _ = await asyncio.wait(
                waits, timeout=_DELETE_EVERY_S if busy else _IDLE_POLL_S, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for w in waits:
                w.cancel()
        return bool(done)

    def _delete_due(self, busy: bool) -> bool:
        since = self._sent_since
        return (
            not busy or len(self._sent) >= _DELETE_BATCH or since is None or time.monotonic() - since >= _DELETE_EVERY_S
        )

    async def _forget_sent(self) -> bool:
        """Delete the rows the broker acknowledged (one transaction, no fsync of its own). False while the store
        cannot (the disk full): they stay remembered, and are not sent again, until it can."""
        keys = list(self._sent)
        try:
            await self._box.delete(keys)
        except StoreUnavailable as err:
            if not self._delete_failing:
                log.warning("outbox_delete_failed", rows=len(self._sent), code=err.code, error=err.message)
                self._delete_failing = True
            return False
        if self._delete_failing:
            log.info("outbox_delete_recovered", rows=len(self._sent))
            self._delete_failing = False
        del self._sent[: len(keys)]
        self._sent_since = time.monotonic() if self._sent else None
        return True


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    """The exceptions in a group, nested groups (the live and drain tasks' own) opened."""
    out: list[BaseException] = []
    for e in group.exceptions:
        out.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out


_AWAY = ("refused", "unreachable", "name or service not known", "name resolution", "no route to host")


def _refused(err: BaseException) -> bool:
    """Whether a failed connect says the broker is not there (refused, unreachable, an unknown name), rather than
    slow (a timeout): only then does start-up stop waiting for the first subscription. aiomqtt turns the OSError
    into an MqttError carrying its text."""
    if isinstance(err, ConnectionRefusedError):
        return True
    text = str(err).lower()
    return any(word in text for word in _AWAY)
