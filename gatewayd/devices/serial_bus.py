"""A serial bus speaking the gatewayd line protocol, on pyserial-asyncio-fast in the daemon's one event loop.

The bus carries one transaction at a time: a request goes out, and the bus waits for the reply with the same
address and sequence number (or the response timeout). Frames are built and parsed by ``framing`` (no I/O);
this module only moves bytes.
"""

from __future__ import annotations

import asyncio
import itertools
from types import TracebackType
from typing import Any

import serial
import serial_asyncio_fast
import structlog

from gatewayd.config.models import SerialBusConfig
from gatewayd.config.profiles import Profile
from gatewayd.devices.base import Availability
from gatewayd.devices.framing import Decoder, Frame, Kind
from gatewayd.errors import DeviceBusy, DeviceRejected, DeviceTimeout, DeviceUnavailable, ProtocolError
from gatewayd.tasks import TaskOwner

log = structlog.get_logger("gatewayd.serial")


class SerialBus:
    def __init__(self, name: str, cfg: SerialBusConfig, port: str):
        self.name = name
        self.cfg = cfg
        self.port = port
        self.availability = Availability(f"bus:{name}", since=0)
        self.decoder = Decoder()
        self.transactions = 0
        self.timeouts = 0
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()
        self._seq = itertools.cycle(range(256))
        self._pending: dict[tuple[int, int], asyncio.Future[Frame]] = {}
        self._tasks = TaskOwner(f"{name}")

    async def __aenter__(self) -> SerialBus:
        await self._tasks.open()
        try:
            reader, self._writer = await serial_asyncio_fast.open_serial_connection(
                url=self.port, baudrate=self.cfg.baudrate
            )
        except (serial.SerialException, OSError) as err:
            # A missing adapter must not stop the daemon: the bus is unavailable and says why.
            self.availability.down(f"cannot open {self.port}: {err}")
            return self
        self.availability.up()
        self._tasks.spawn("rx", self._receive(reader))
        log.info("serial_opened", bus=self.name, port=self.port, baudrate=self.cfg.baudrate)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._tasks.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._fail_pending(DeviceUnavailable(f"bus {self.name} closed"))

    async def _receive(self, reader: asyncio.StreamReader) -> None:
        try:
            while data := await reader.read(4096):
                for frame in self.decoder.feed(data):
                    self._on_frame(frame)
            reason = "port closed"
        except (serial.SerialException, OSError) as err:
            reason = f"read failed: {err}"
        self.availability.down(reason)
        self._fail_pending(DeviceUnavailable(f"bus {self.name}: {reason}"))

    def _on_frame(self, frame: Frame) -> None:
        if frame.kind in (Kind.REPLY, Kind.NAK):
            fut = self._pending.pop((frame.address, frame.seq), None)
            if fut is not None and not fut.done():
                fut.set_result(frame)
            else:
                log.debug("serial_unmatched_reply", bus=self.name, address=frame.address, seq=frame.seq)
        else:
            log.info(
                "serial_unsolicited",
                bus=self.name,
                address=frame.address,
                kind=frame.kind.name.lower(),
                payload=frame.payload,
            )

    def _fail_pending(self, err: Exception) -> None:
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(err)

    async def transact(self, address: int, payload: dict[str, Any]) -> dict[str, Any]:
        """Send one request and return the reply's payload. One transaction at a time on the bus."""
        async with self._lock:
            writer = self._writer
            if writer is None or not self.availability.available:
                raise DeviceUnavailable(
                    f"bus {self.name} is unavailable: {self.availability.last_error}",
                    details={"bus": self.name},
                )
            seq = next(self._seq)
            loop = asyncio.get_running_loop()
            started = loop.time()
            fut: asyncio.Future[Frame] = loop.create_future()
            self._pending[(address, seq)] = fut
            try:
                writer.write(Frame(address, seq, Kind.REQUEST, payload).to_bytes())
                await writer.drain()
                reply = await asyncio.wait_for(fut, self.cfg.response_timeout_s)
            except TimeoutError:
                self.timeouts += 1
                raise DeviceTimeout(
                    f"no reply from address {address} on {self.name} within {self.cfg.response_timeout_s:g} s",
                    details={"bus": self.name, "address": address},
                ) from None
            except (serial.SerialException, OSError) as err:
                raise DeviceUnavailable(f"bus {self.name}: write failed: {err}") from err
            finally:
                self._pending.pop((address, seq), None)
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
