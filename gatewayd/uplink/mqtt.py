"""The MQTT uplink (aiomqtt) and store-and-forward.

One supervised task, ``link``, connects, serves the session, and reconnects with capped, jittered backoff for as
long as the broker stays away; the daemon starts and works without one. A session runs two tasks:

- ``receive``: commands from ``gatewayd/{id}/cmd`` (QoS 1), taken concurrently and acknowledged (PUBACK) in order,
  each only after it is committed: the client is told "accepted" exactly when the durability contract holds.
  :mod:`gatewayd.uplink.intake` has the rules (what is refused, what is left to the broker, the rate limits).
  The session is persistent (``clean_session = false``): what is not acknowledged is delivered again next time.
- ``drain``: the outbox, in (priority, arrival) order, at a pace set by an upstream token bucket. A row is
  deleted only after the broker's PUBACK. A PUBACK missing ``puback_timeout_s`` ends the session: a link that
  stopped carrying data is detected in seconds, not after 1.5 keepalives. Rows the broker acknowledged but the
  store could not delete yet (the disk full) are remembered and deleted first, not sent again; the drain waits
  for that, and the session goes on.

The retained ``status`` topic says ``online`` while connected; the broker publishes the last will ``offline``
when the connection drops, and we publish it ourselves on a clean stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import ssl
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

import aiomqtt
import structlog

from gatewayd.commands.service import CommandService
from gatewayd.config.models import MqttSection
from gatewayd.config.profiles import Profile
from gatewayd.errors import GatewayError, StoreUnavailable
from gatewayd.observability.metrics import UPLINK_CONNECTED, UPLINK_PUBLISHED, counter
from gatewayd.resilience.bucket import TokenBucket
from gatewayd.resilience.classify import Verdict
from gatewayd.resilience.errors import RetryExhausted
from gatewayd.resilience.retry import RetryPolicy
from gatewayd.store import Store, outbox
from gatewayd.tasks import TaskOwner
from gatewayd.telemetry.recorder import Recorder
from gatewayd.uplink import paho
from gatewayd.uplink.discovery import discovery_messages
from gatewayd.uplink.intake import Intake, LinkLost

if TYPE_CHECKING:
    from gatewayd.interpret.service import InterpretService

log = structlog.get_logger("gatewayd.uplink")

_RECONNECT_ATTEMPTS = 2**31  # a broker may stay away for weeks: the schedule never gives up
_IDLE_POLL_S = 1.0  # the outbox is also looked at this often when nothing woke the drain
_STORE_RETRY_S = 1.0  # sent rows that could not be deleted (the disk full) are tried again this often


def _broker_verdict(err: BaseException) -> Verdict:
    """Connecting: refused, unreachable, timed out, even bad credentials (fixed on the broker while we wait) may
    clear; the schedule keeps trying and the outage is logged once."""
    return Verdict(True, None, "mqtt_connect")


class Uplink:
    def __init__(
        self,
        cfg: MqttSection,
        gateway_id: str,
        store: Store,
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
        self._store = store
        self._service = service
        self._recorder = recorder
        self._devices = devices
        self.intake = Intake(
            cfg,
            client_id=self.client_id,
            store=store,
            service=service,
            recorder=recorder,
            devices=devices,
            wake_drain=self.wake,
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
        self._reconnect = RetryPolicy(
            max_attempts=_RECONNECT_ATTEMPTS,
            base_s=cfg.reconnect_base_s,
            cap_s=cfg.reconnect_cap_s,
            jitter="full",
            name="mqtt",
            classifier=_broker_verdict,
            quiet=True,
        )
        self._drop = asyncio.Event()  # set by outage(): the session ends at once
        self._held_until = 0.0
        self.connected = False
        self.since = time.time()
        self.last_error: str | None = None
        self.connects = 0
        self.published = 0
        self._sent: list[int] = []  # outbox rows the broker acknowledged, not deleted yet (the store failing)
        self._delete_failing = False
        recorder.listeners.append(self.wake)
        service.final_listeners.append(lambda _rec: self.wake())

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
            max_inflight_messages=self.cfg.max_inflight,
        )
        # Acknowledge commands ourselves, after the commit (aiomqtt has no public API for it: see uplink/paho.py).
        paho.manual_acks(client)
        # aiomqtt logs a warning for every publish made while more than 10 await their PUBACK; the drain keeps up to
        # max_inflight in flight by design (plus status and events), so only more than that is worth a warning.
        client.pending_calls_threshold = self.cfg.max_inflight + 10
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
        self.connected = False
        self.last_error = reason
        UPLINK_CONNECTED.set(0)

    async def _link(self) -> None:
        while True:
            held = self._held_until - time.monotonic()
            if held > 0:
                await asyncio.sleep(held)
            self._drop.clear()
            try:
                client = await self._reconnect.call(self._connect)
            except RetryExhausted:
                continue
            self.connects += 1
            self.connected, self.since = True, time.time()
            UPLINK_CONNECTED.set(1)
            log.info("mqtt_connected", broker=f"{self.cfg.host}:{self.cfg.port}", client_id=self.client_id)
            reason = "session ended"
            try:
                try:
                    await self._session(client)
                except* (aiomqtt.MqttError, LinkLost, OSError, GatewayError) as group:
                    reason = "; ".join(str(e) for e in group.exceptions)
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
            await asyncio.wait_for(client.publish(f"{self.base}/status", b"offline", qos=1, retain=True), 2)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.__aexit__(None, None, None), 2)
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
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.intake.serve(client, publish), name="gatewayd[uplink].receive")
            tg.create_task(self._drain(client), name="gatewayd[uplink].drain")
            tg.create_task(self._dropped(), name="gatewayd[uplink].outage")

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
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._settled.wait(), timeout_s)
        return self.subscribed

    async def _publish_now(self, client: aiomqtt.Client, topic: str, payload: bytes) -> None:
        await client.publish(f"{self.base}/{topic}", payload, qos=1)

    # --- outbox out ------------------------------------------------------------------------------------------

    async def _drain(self, client: aiomqtt.Client) -> None:
        while True:
            if self._sent and not await self._forget_sent():
                await asyncio.sleep(_STORE_RETRY_S)  # sending more now would send these rows again
                continue
            self._wake.clear()  # before looking: a row committed after the look wakes the next wait
            rows = await self._store.read(lambda c: outbox.fetch(c, self.cfg.max_inflight))
            if not rows:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), _IDLE_POLL_S)
                continue
            acked, failures = await self._publish(client, rows)
            if acked:
                self._sent.extend(acked)
                self.published += len(acked)
                await self._forget_sent()
            if failures:
                raise LinkLost(f"publish failed: {failures[0]}")

    async def _forget_sent(self) -> bool:
        """Delete the rows the broker acknowledged. False while the store cannot (the disk full): they stay
        remembered, and are not sent again, until it can."""
        try:
            await self._store.write(functools.partial(outbox.delete, ids=list(self._sent)))
        except StoreUnavailable as err:
            if not self._delete_failing:
                log.warning("outbox_delete_failed", rows=len(self._sent), code=err.code, error=err.message)
                self._delete_failing = True
            return False
        if self._delete_failing:
            log.info("outbox_delete_recovered", rows=len(self._sent))
            self._delete_failing = False
        self._sent.clear()
        self._recorder.update_stats(await self._store.read(lambda c: outbox.stats(c, by_kind=False)))
        return True

    async def _publish(
        self, client: aiomqtt.Client, rows: list[outbox.OutboxRow]
    ) -> tuple[list[int], list[BaseException]]:
        """Publish rows and wait for their PUBACKs: the ids acknowledged and the errors of the others. Messages
        go out in order (each task hands its message to paho when it first runs, in creation order) and are
        acknowledged concurrently, up to max_inflight at a time."""
        acked: list[int] = []
        failures: list[BaseException] = []

        async def one(row: outbox.OutboxRow) -> None:
            qos = self.cfg.telemetry_qos if row.kind == "telemetry" else 1
            try:
                await client.publish(f"{self.base}/{row.topic}", row.message(), qos=qos)
            except (aiomqtt.MqttError, OSError) as err:
                failures.append(err)
                return
            acked.append(row.id)
            counter(UPLINK_PUBLISHED, row.kind).inc()

        async with asyncio.TaskGroup() as tg:
            for row in rows:
                if self._bucket is not None:
                    await self._bucket.acquire()
                tg.create_task(one(row))
        return acked, failures


_AWAY = ("refused", "unreachable", "name or service not known", "name resolution", "no route to host")


def _refused(err: BaseException) -> bool:
    """Whether a failed connect says the broker is not there (refused, unreachable, an unknown name), rather than
    slow (a timeout): only then does start-up stop waiting for the first subscription. aiomqtt turns the OSError
    into an MqttError carrying its text."""
    if isinstance(err, ConnectionRefusedError):
        return True
    text = str(err).lower()
    return any(word in text for word in _AWAY)
