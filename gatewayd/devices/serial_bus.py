"""A serial bus speaking the gatewayd line protocol, on pyserial-asyncio-fast in the daemon's one event loop.

The bus carries one transaction at a time: a request goes out, and the bus waits for the reply with the same
address and sequence number (or the response timeout). Frames are built and parsed by ``framing`` (no I/O);
this module only moves bytes.

The port may come and go (a USB adapter unplugged, a simulator restarted): one supervised task, the bus's
``link``, opens the port, reads it until it disappears, and reopens it on the daemon's one retry policy (capped,
fully jittered backoff, for as long as it takes). Availability is state: it goes down once, with the reason,
when the port is lost, and up once when it is back; transactions in flight fail with ``DeviceUnavailable``.

What a device sends on its own (``T`` telemetry, ``E`` events) goes through token buckets per address
(``inbound_frames_per_s``, ``inbound_burst``), so one chattering device cannot flood the outbox or starve the
loop; frames over it are dropped and counted, and the throttling is logged once when it starts and once when it
ends. Telemetry and events have a bucket each: a flood of readings must not take with it the rare event (an
alarm) that the device sends right after one of them. Replies to our requests never go through them. Admitted
frames become records in the telemetry sink (the outbox), stamped with the monotonic time they arrived.

A line that is not a valid frame (noise, a bad CRC, a reply cut short) is dropped and counted by its reason
(``gatewayd_serial_bad_frames_total{bus,reason}``); a noisy line is logged once, then summarised at most once a
minute, so a bad cable cannot fill the journal.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import Counter
from types import TracebackType
from typing import Any, Protocol

import serial_asyncio_fast
import structlog

from gatewayd.config.models import SerialBusConfig
from gatewayd.config.profiles import Profile
from gatewayd.devices.base import Availability
from gatewayd.devices.framing import Decoder, Frame, Kind
from gatewayd.devices.line import Line
from gatewayd.errors import DeviceBusy, DeviceRejected, DeviceTimeout, DeviceUnavailable, ProtocolError
from gatewayd.observability.metrics import SERIAL_BAD_FRAMES, SERIAL_INBOUND_DROPPED, counter
from gatewayd.resilience.bucket import BucketSpec, TokenBucket
from gatewayd.resilience.classify import Verdict, classify
from gatewayd.resilience.clock import REAL_CLOCK, Clock
from gatewayd.resilience.errors import RetryExhausted
from gatewayd.resilience.keyed import KeyedLimiter
from gatewayd.resilience.retry import RetryPolicy
from gatewayd.tasks import TaskOwner
from gatewayd.telemetry import MemorySink, Record, TelemetrySink

log = structlog.get_logger("gatewayd.serial")

# A port may stay unplugged for weeks; the schedule never gives up (and restarts if it ever counts this far).
_REOPEN_ATTEMPTS = 2**31
# A throttled device is back to normal once its bucket has refilled this far (a fraction of the burst): an
# exact "allowed again" test would flap, and log, on every frame of a steady flood.
_THROTTLE_END_LEVEL = 0.5
# Bad frames are logged at most this often per bus (the metric counts every one).
_BAD_FRAME_LOG_S = 60.0


def port_verdict(err: BaseException) -> Verdict:
    """Opening a port: any OS-level failure (no such file, EIO, EBUSY, permission while udev catches up) may
    clear when the adapter is plugged back in. ``serial.SerialException`` is an ``OSError`` too."""
    if isinstance(err, OSError):
        return Verdict(True, None, "serial_port")
    return classify(err)


class LineSettings(Protocol):
    """What a serial bus's and a Modbus TCP connection's settings share: how often the line may be used, and how
    a link that went away is opened again."""

    @property
    def transactions_per_s(self) -> float | None: ...
    @property
    def transactions_burst(self) -> int: ...
    @property
    def reconnect_base_s(self) -> float: ...
    @property
    def reconnect_cap_s(self) -> float: ...


def reopen_policy(bus: str, cfg: LineSettings, clock: Clock) -> RetryPolicy:
    """How a bus of either protocol, or a Modbus TCP connection, reopens a port that went away: capped, fully
    jittered, for as long as it takes, and quiet (availability logs the outage once; a long unplug must not write
    two lines a second)."""
    return RetryPolicy(
        max_attempts=_REOPEN_ATTEMPTS,
        base_s=cfg.reconnect_base_s,
        cap_s=cfg.reconnect_cap_s,
        jitter="full",
        name=f"bus:{bus}",
        clock=clock,
        classifier=port_verdict,
        quiet=True,
    )


def transaction_bucket(bus: str, cfg: LineSettings, clock: Clock) -> TokenBucket | None:
    """The bus's limit on requests put on the line (``transactions_per_s``), or None. Every request takes a token
    once it has its turn on the line, before it is sent: none bypasses it (the line does not know priorities),
    but a critical command has its turn first, so it takes the next token."""
    if cfg.transactions_per_s is None:
        return None
    return TokenBucket(cfg.transactions_burst, cfg.transactions_per_s, name=f"bus:{bus}.transactions", clock=clock)


class SerialBus:
    def __init__(
        self,
        name: str,
        cfg: SerialBusConfig,
        port: str,
        *,
        clock: Clock = REAL_CLOCK,
        sink: TelemetrySink | None = None,
    ):
        self.name = name
        self.cfg = cfg
        self.port = port
        self.sink: TelemetrySink = sink if sink is not None else MemorySink()
        self.names: dict[int, str] = {}  # address -> device name, for the records of unsolicited frames
        self.availability = Availability(f"bus:{name}", since=0)
        self.decoder = Decoder(on_drop=self._bad_frame)
        self._bad_unlogged: Counter[str] = Counter()  # bad frames by reason since the last log line
        self._bad_logged_at: float | None = None
        self.transactions = 0
        self.timeouts = 0
        self.opens = 0
        self.unsolicited: Counter[int] = Counter()  # delivered, by address
        self.inbound_dropped: Counter[int] = Counter()  # over the inbound rate, by address
        self._clock = clock
        # One transaction at a time, most urgent first, none sent after its command's deadline (gatewayd.devices.line).
        self._line = Line(f"bus {name}", clock, transaction_bucket(name, cfg, clock))
        self._inbound = KeyedLimiter(
            BucketSpec(cfg.inbound_burst, cfg.inbound_frames_per_s),
            name=f"serial.{name}.inbound",
            max_keys=512,  # two keys per address (telemetry, events): the bound is never reached
            clock=clock,
        )
        self._dropped_metric = counter(SERIAL_INBOUND_DROPPED, name)
        # (address, "telemetry" | "event") -> frames dropped since its throttling started
        self._throttled: dict[tuple[int, str], int] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._seq = itertools.cycle(range(256))
        # (address, seq) -> the reply's future and the command id the reply must echo
        self._pending: dict[tuple[int, int], tuple[asyncio.Future[Frame], Any]] = {}
        self._tasks = TaskOwner(f"{name}")
        self._reopen = reopen_policy(name, cfg, clock)

    async def __aenter__(self) -> SerialBus:
        await self._tasks.open()
        try:
            # One attempt now, so a port that is there is open (and the bus available) when the daemon is ready.
            # A missing adapter must not stop the daemon: the bus is unavailable, says why, and keeps trying.
            reader: asyncio.StreamReader | None
            try:
                reader = await self._open()
            except OSError:
                reader = None
            self._tasks.spawn("link", self._link(reader))
        except BaseException:
            await self._tasks.close()
            raise
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._tasks.close()
        writer, self._writer = self._writer, None
        self._fail_pending(DeviceUnavailable(f"bus {self.name} closed"))
        await _close(writer)

    async def _open(self) -> asyncio.StreamReader:
        try:
            reader, writer = await serial_asyncio_fast.open_serial_connection(
                url=self.port,
                baudrate=self.cfg.baudrate,
                bytesize=self.cfg.bytesize,
                parity=self.cfg.parity,
                stopbits=self.cfg.stopbits,
            )
        except OSError as err:
            reason = str(err) if self.port in str(err) else f"cannot open {self.port}: {err}"  # pyserial names it
            self.availability.down(reason)  # logged on the first failure of an outage only
            raise
        self._writer = writer
        self.decoder = Decoder(on_drop=self._bad_frame)  # a stub cut by the unplug must not prefix a new frame
        self.opens += 1
        log.info("serial_opened", bus=self.name, port=self.port, baudrate=self.cfg.baudrate, opens=self.opens)
        self.availability.up()
        return reader

    async def _link(self, reader: asyncio.StreamReader | None) -> None:
        """Open, read until the port goes, close, reopen: for the life of the bus. Nothing escapes but
        cancellation, so a port that misbehaves never takes the daemon down."""
        while True:
            if reader is None:
                try:
                    reader = await self._reopen.call(self._open)
                except RetryExhausted:
                    continue  # after 2**31 attempts: start the schedule again
                except Exception as err:  # not an OS error: the port's name or settings are wrong, not its presence
                    self.availability.down(f"cannot open {self.port}: {err}")
                    log.error("serial_open_abandoned", bus=self.name, port=self.port, error=str(err))
                    return
            reason = await self._receive(reader)
            reader = None
            writer, self._writer = self._writer, None
            self.availability.down(reason)
            self._fail_pending(DeviceUnavailable(f"bus {self.name}: {reason}", details={"bus": self.name}))
            await _close(writer)

    async def _receive(self, reader: asyncio.StreamReader) -> str:
        """Feed frames to their transactions until the port closes; returns why it did."""
        try:
            while data := await reader.read(4096):
                for frame in self.decoder.feed(data):
                    self._on_frame(frame)
        except OSError as err:  # serial.SerialException, EIO from a pty whose other side closed
            return f"read failed: {err}"
        except Exception as err:  # a bug in a frame handler must cost a reconnect, not the daemon
            log.exception("serial_receive_failed", bus=self.name)
            return f"receive failed: {err!r}"
        return "port closed"

    def _bad_frame(self, reason: str, message: str) -> None:
        counter(SERIAL_BAD_FRAMES, self.name, reason).inc()
        self._bad_unlogged[reason] += 1
        now = self._clock.monotonic()
        if self._bad_logged_at is None or now - self._bad_logged_at >= _BAD_FRAME_LOG_S:
            log.warning(
                "serial_bad_frames", bus=self.name, reason=reason, error=message, dropped=dict(self._bad_unlogged)
            )
            self._bad_unlogged.clear()
            self._bad_logged_at = now

    def _on_frame(self, frame: Frame) -> None:
        if frame.kind in (Kind.REPLY, Kind.NAK):
            key = (frame.address, frame.seq)
            waiting = self._pending.get(key)
            if waiting is not None and frame.kind is Kind.REPLY and frame.payload.get("id") != waiting[1]:
                # Address and sequence number match, the command does not: a late reply to an earlier request
                # whose number has come round again, or another device answering at this address. It is never
                # taken as this command's answer (a success the device never gave); the request waits on for
                # its own reply, or times out. (A NAK is a refusal whatever its id, as PROTOCOL.md says: refusing
                # is always safe.)
                self._bad_frame(
                    "mismatched_reply",
                    f"reply from address {frame.address} seq {frame.seq} names command {frame.payload.get('id')!r}, "
                    f"the request was {waiting[1]!r}",
                )
                return
            self._pending.pop(key, None)
            if waiting is not None and not waiting[0].done():
                waiting[0].set_result(frame)
            else:
                log.debug("serial_unmatched_reply", bus=self.name, address=frame.address, seq=frame.seq)
        elif self._admit(frame.address, "event" if frame.kind is Kind.EVENT else "telemetry"):
            self.unsolicited[frame.address] += 1
            self._record(frame)
        if self._throttled:
            self._end_throttling()

    def _record(self, frame: Frame) -> None:
        device = self.names.get(frame.address)
        if device is None:  # a device the configuration does not know: kept out of the outbox
            log.debug("serial_unknown_address", bus=self.name, address=frame.address, kind=frame.kind.name.lower())
            return
        mono = self._clock.monotonic()
        if frame.kind is Kind.TELEMETRY:
            self.sink.put(Record.telemetry(device, frame.payload, mono=mono))
            return
        data = dict(frame.payload)
        name = data.pop("event", None)
        severity = data.pop("severity", "info")
        self.sink.put(
            Record.of_event(
                device,
                name if isinstance(name, str) and name else "event",
                data,
                severity=severity if severity in ("info", "warning", "critical") else "info",
                mono=mono,
            )
        )

    def _admit(self, address: int, kind: str) -> bool:
        """The inbound rate limit of one address and kind of frame: False (and counted) for a frame over it."""
        if self._inbound.try_acquire(_inbound_key(address, kind)).allowed:
            return True
        self.inbound_dropped[address] += 1
        self._dropped_metric.inc()
        dropped = self._throttled.get((address, kind))
        if dropped is None:
            dropped = 0
            log.warning(
                "serial_inbound_throttled",
                bus=self.name,
                address=address,
                kind=kind,
                frames_per_s=self.cfg.inbound_frames_per_s,
                burst=self.cfg.inbound_burst,
            )
        self._throttled[(address, kind)] = dropped + 1
        return False

    def _end_throttling(self) -> None:
        """Checked on every frame while a device is throttled, so the end is logged even if it went quiet."""
        threshold = self.cfg.inbound_burst * _THROTTLE_END_LEVEL
        for (address, kind), dropped in list(self._throttled.items()):
            if self._inbound.peek(_inbound_key(address, kind)).remaining >= threshold:
                del self._throttled[(address, kind)]
                log.info("serial_inbound_unthrottled", bus=self.name, address=address, kind=kind, dropped=dropped)

    def reset_counters(self) -> int:
        """An operator's reset: the inbound limits start full again and the counters from zero."""
        cleared = self._inbound.clear()
        self._throttled.clear()
        self.unsolicited.clear()
        self.inbound_dropped.clear()
        self.transactions = self.timeouts = 0
        return cleared

    def _fail_pending(self, err: Exception) -> None:
        pending, self._pending = self._pending, {}
        for fut, _id in pending.values():
            if not fut.done():
                fut.set_exception(err)

    async def _reply(self, fut: asyncio.Future[Frame], address: int, sent_at: float) -> Frame:
        """The reply, within the response timeout of the gateway listening.

        When the process itself did not run for longer than the timeout while it waited (SIGSTOP, a paused VM, a
        machine stalled for seconds), the device's silence was not measured: nothing read the port meanwhile, and
        a device simulated in this process could not answer at all. Then it listens once more, for the timeout,
        instead of reporting a device that did not answer (and may have acted) as silent."""
        timeout = self.cfg.response_timeout_s
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(fut)
        except TimeoutError:
            overslept = loop.time() - sent_at - timeout
            if overslept < timeout:
                fut.cancel()
                raise
        log.warning(
            "serial_reply_wait_extended",
            bus=self.name,
            address=address,
            not_running_s=round(overslept, 2),
            effect=f"the gateway did not run for longer than the {timeout:g} s reply timeout: listening once more",
        )
        async with asyncio.timeout(timeout):
            return await fut

    async def transact(self, address: int, payload: dict[str, Any]) -> dict[str, Any]:
        """Send one request and return the reply's payload. One transaction at a time on the bus, the most urgent
        first; :class:`DeadlinePassed` (never sent) if the command's deadline passes before it can go out."""
        async with self._line.turn() as call:
            writer = self._writer
            if writer is None or writer.is_closing() or not self.availability.available:
                raise DeviceUnavailable(
                    f"bus {self.name} is unavailable: {self.availability.last_error}",
                    details={"bus": self.name},
                )
            seq = next(self._seq)
            loop = asyncio.get_running_loop()
            started = loop.time()
            fut: asyncio.Future[Frame] = loop.create_future()
            self._pending[(address, seq)] = (fut, payload.get("id"))
            try:
                wire = Frame(address, seq, Kind.REQUEST, payload).to_bytes()
                self._line.sent(call)  # the last look at the deadline: from here on, the device may act
                writer.write(wire)
                await writer.drain()
                reply = await self._reply(fut, address, loop.time())
            except TimeoutError:
                self.timeouts += 1
                raise DeviceTimeout(
                    f"no reply from address {address} on {self.name} within {self.cfg.response_timeout_s:g} s",
                    details={"bus": self.name, "address": address},
                ) from None
            except OSError as err:  # serial.SerialException; ConnectionResetError from drain() once the port went
                raise DeviceUnavailable(
                    f"bus {self.name}: write failed: {err}", details={"bus": self.name, "address": address}
                ) from err
            finally:
                self._pending.pop((address, seq), None)
                if self.cfg.turnaround_s:
                    self._line.free_at = self._clock.monotonic() + self.cfg.turnaround_s
            self.transactions += 1
            log.debug(
                "serial_transaction",
                bus=self.name,
                address=address,
                seq=seq,
                reply=reply.kind.name.lower(),
                ms=round((loop.time() - started) * 1000, 2),
            )
        if reply.kind is Kind.NAK:
            if reply.payload.get("code") == "busy":  # not a refusal: the device asks us to come back shortly
                raise DeviceBusy(
                    str(reply.payload.get("message", "device busy")), details={"address": address, "bus": self.name}
                )
            raise DeviceRejected(
                str(reply.payload.get("message", "refused by device")),
                details={"device_code": reply.payload.get("code"), "address": address},
            )
        return reply.payload


def _inbound_key(address: int, kind: str) -> str:
    """The inbound limiter's key: the address for telemetry (the common case), ``<address>:event`` for events."""
    return str(address) if kind == "telemetry" else f"{address}:{kind}"


async def _close(writer: asyncio.StreamWriter | None) -> None:
    """Close a port and wait until it is closed. ``abort``, not ``close``: close would first drain the tty
    (``tcdrain`` in a worker thread), which can block for good on a port whose other end is gone."""
    if writer is None:
        return
    if not writer.transport.is_closing():  # a transport that hit a read or write error closes itself
        writer.transport.abort()
    with contextlib.suppress(Exception):  # the error that closed it was already reported as the reason
        await writer.wait_closed()


class SerialDevice:
    """A device at one address on a serial bus."""

    def __init__(self, name: str, profile: Profile, bus: SerialBus, address: int):
        self.name = name
        self.profile = profile
        self.bus = bus
        self.address = address
        self.last_result: dict[str, Any] | None = None

    @property
    def availability(self) -> Availability:
        return self.bus.availability

    async def execute(self, command_id: str, action: str, params: dict[str, Any]) -> dict[str, Any]:
        reply = await self.bus.transact(self.address, {"id": command_id, "action": action, "params": params})
        if reply.get("id") != command_id:
            raise ProtocolError(f"reply for {reply.get('id')!r} does not match command {command_id!r}")
        result = reply.get("result")
        if not isinstance(result, dict):
            raise ProtocolError("reply has no result object")
        self.last_result = result
        return result

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "serial",
            "bus": self.bus.name,
            "port": self.bus.port,
            "address": self.address,
            "state": self.last_result,
        }
