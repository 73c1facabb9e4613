"""Modbus devices on a line, through pymodbus's async clients in the daemon's one loop: an RS-485 bus speaking
Modbus RTU, or a TCP connection speaking Modbus TCP (or RTU frames over TCP, to a serial server). What differs
between them, the port and its framing, is the bus's link (:mod:`gatewayd.devices.modbus_link`); everything else is
this module's, the same for both.

:class:`ModbusBus` is the line: one transaction at a time, each within ``response_timeout_s``, ``turnaround_s``
apart, at most ``transactions_per_s`` (a token bucket from the resilience kit). It opens the port or connection,
and when it goes away (a USB adapter unplugged, a host that closed the connection or refuses it) opens it again on
the daemon's one retry policy, exactly as :class:`~gatewayd.devices.serial_bus.SerialBus` does: quietly, with
capped full jitter, for as long as it takes; availability goes down once and up once per outage, and a request in
flight fails at once as unavailable. pymodbus's own retries and reconnects are turned off (``retries=0``,
``reconnect_delay=0``): they would fight ours.

pymodbus's RTU decoder drops everything it holds when a candidate frame fails its CRC, so noise before a reply
costs the reply; its TCP decoder waits for ever behind a header it cannot read. The bus hands it only the reply it
waits for, found by the link (:func:`~gatewayd.devices.modbus_codec.find_reply`, :func:`~gatewayd.devices.
modbus_codec.find_mbap_reply`) through pymodbus's ``trace_packet`` hook. After an RTU reply that never came (or
never decoded) the line is left quiet for one more response timeout before the next request, as libmodbus's error
recovery does: RTU replies carry no transaction id, and a late answer to the last request must not be taken for the
next one's. Modbus TCP replies carry the request's transaction id, so a late one is simply passed over.

Errors, translated at this boundary: exception 6 (device busy) is :class:`DeviceBusy`; 11 (a gateway's target did
not answer) is :class:`DeviceTimeout`; every other exception code is :class:`DeviceRejected`, with the code in its
details; no reply, a bad CRC or header, noise or a reply that cannot answer the request (another count, another
echo) is :class:`DeviceTimeout`; a port or connection that is gone is :class:`DeviceUnavailable`.

:class:`ModbusDevice` is one unit on the bus, mapped by its profile (``hardware/MODBUS.md``): actions write a coil
or holding register or read telemetry points, and a poller records every point each ``poll_interval_s``. Modbus has
no command id; writes set absolute values, so one repeated after a lost reply or a crash is harmless.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Protocol

import structlog
from pymodbus.client import ModbusBaseClient
from pymodbus.constants import ExcCodes
from pymodbus.exceptions import ConnectionException, ModbusIOException
from pymodbus.pdu import ModbusPDU

from gatewayd.config.profiles import BIT_TABLES, ModbusAction, Profile
from gatewayd.devices.base import Availability
from gatewayd.devices.line import Line
from gatewayd.devices.modbus_codec import READ_FUNCTION, ReadBlock, Value, encode_registers, plan_reads
from gatewayd.devices.modbus_codec import to_raw as modbus_to_raw
from gatewayd.devices.modbus_link import ModbusLink
from gatewayd.devices.serial_bus import LineSettings, reopen_policy, transaction_bucket
from gatewayd.errors import (
    DeviceBusy,
    DeviceRejected,
    DeviceTimeout,
    DeviceUnavailable,
    GatewayError,
    ValidationFailed,
)
from gatewayd.resilience.clock import REAL_CLOCK, Clock
from gatewayd.resilience.errors import RetryExhausted
from gatewayd.resilience.retry import RetryPolicy
from gatewayd.tasks import TaskOwner
from gatewayd.telemetry import Record, TelemetrySink

log = structlog.get_logger("gatewayd.modbus")

# pymodbus logs each failed reopen of a vanished port at warning, twice a second for as long as it is gone; the bus
# reports the outage once, through availability. Its errors (a simulated unit's model that raised) still show.
logging.getLogger("pymodbus").setLevel(logging.ERROR)

# A unit that stops answering is polled less often, up to this: on a shared RS-485 line each unanswered poll
# costs two response timeouts of everyone's time.
POLL_BACKOFF_CAP_S = 60.0

_BUSY = ExcCodes.DEVICE_BUSY
_GATEWAY_NO_RESPONSE = ExcCodes.GATEWAY_NO_RESPONSE


def _exception_name(code: int) -> str:
    try:
        return ExcCodes(code).name.lower()
    except ValueError:
        return "unknown"


class ModbusSettings(LineSettings, Protocol):
    """What a Modbus bus needs of its settings: a serial bus's ([serial.<name>]) or a TCP connection's
    ([modbus_tcp.<name>]) have it all."""

    @property
    def response_timeout_s(self) -> float: ...
    @property
    def turnaround_s(self) -> float: ...


class ModbusBus:
    """One line speaking Modbus, as master (client): an RS-485 bus, or a TCP connection."""

    def __init__(self, name: str, cfg: ModbusSettings, link: ModbusLink, *, clock: Clock = REAL_CLOCK):
        self.name = name
        self.cfg = cfg
        self.link = link
        self.port = link.where
        self.availability = Availability(f"bus:{name}", since=0)
        self.transactions = 0  # requests that got a reply (an exception reply included)
        self.timeouts = 0
        self.opens = 0
        self._clock = clock
        # One transaction at a time, commands before polls and the most urgent first, none sent after its
        # command's deadline (gatewayd.devices.line).
        self._line = Line(f"bus {name}", clock, transaction_bucket(name, cfg, clock))
        self._client: ModbusBaseClient | None = None
        self._lost = asyncio.Event()  # the open port or connection went away (a fresh one per open)
        self._request: bytes | None = None  # the request whose reply is being waited for, as sent
        self._inflight: asyncio.Timeout | None = None
        self._tasks = TaskOwner(name)
        self._reopen = reopen_policy(name, cfg, clock)

    async def __aenter__(self) -> ModbusBus:
        await self._tasks.open()
        try:
            # One attempt now, so a port that is there is open when the daemon is ready; a missing adapter makes
            # the bus unavailable (saying why) and the link keeps trying.
            try:
                await self._open()
                opened = True
            except OSError:
                opened = False
            self._tasks.spawn("link", self._link(opened))
        except BaseException:
            await self._tasks.close()
            self._close_client()
            raise
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._tasks.close()
        self._close_client()

    # --- the port ------------------------------------------------------------------------------------------------

    async def _open(self) -> None:
        lost = asyncio.Event()
        client = self.link.client(
            f"gatewayd[{self.name}]",
            # pymodbus's own reply timeout never fires first: the bus's, which the link can cut short, decides.
            2 * self.cfg.response_timeout_s + 1,
            self._filter_reply,
            lambda up: None if up else self._port_lost(lost),
        )
        cancelling = _cancelling()
        why_not = await self.link.connect(client)
        if _cancelling() > cancelling:  # see _cancelling
            client.close()
            raise asyncio.CancelledError
        if why_not is not None:
            client.close()
            self.availability.down(why_not)  # logged on the first failure of an outage only
            raise OSError(why_not)
        self._client, self._lost = client, lost
        self.opens += 1
        log.info("modbus_opened", bus=self.name, **self.link.describe(), opens=self.opens)
        self.availability.up()

    def _port_lost(self, lost: asyncio.Event) -> None:
        """pymodbus saw the port fail or the connection close: wake the link, and end a transaction in flight now
        rather than at its timeout."""
        lost.set()
        if self._inflight is not None and lost is self._lost:
            self._inflight.reschedule(asyncio.get_running_loop().time())

    async def _link(self, opened: bool) -> None:
        """Open, wait until the port goes, close, reopen: for the life of the bus."""
        while True:
            if not opened:
                try:
                    await self._reopen.call(self._open)
                except RetryExhausted:
                    continue  # after 2**31 attempts: start the schedule again
                except Exception as err:  # not an OS error: the port's name or settings are wrong
                    self.availability.down(f"cannot open {self.port}: {err}")
                    log.error("modbus_open_abandoned", bus=self.name, port=self.port, error=str(err))
                    return
            await self._lost.wait()
            opened = False
            self._close_client()
            self.availability.down(f"{self.port}: closed or gone")

    def _close_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    # --- transactions --------------------------------------------------------------------------------------------

    def _filter_reply(self, sending: bool, data: bytes) -> bytes:
        """pymodbus's ``trace_packet``: called with each request as it goes out, and with everything received since
        then. Hand its decoder the reply to that request only, once it is complete; until then nothing, so it
        keeps waiting."""
        if sending:
            if self._inflight is not None:
                self._request = data
            return data
        request = self._request
        if request is None:
            return b""  # nothing asked: a late reply or noise, dropped when the next request goes out
        found = self.link.find_reply(data, request)
        return b"" if found is None else data[found[0] : found[1]]

    async def _transact(
        self, unit: int, function: int, what: str, call: Callable[[ModbusBaseClient], Awaitable[ModbusPDU]]
    ) -> ModbusPDU:
        """One request and its reply, or a typed error. Exception replies are returned, not raised."""
        details = {"bus": self.name, "unit": unit, "function": function}
        async with self._line.turn() as turn:
            client, lost = self._client, self._lost
            if client is None or lost.is_set() or not self.availability.available:
                raise DeviceUnavailable(
                    f"bus {self.name} is unavailable: {self.availability.last_error}", details={"bus": self.name}
                )
            answered = False
            self._inflight = timeout = asyncio.timeout(self.cfg.response_timeout_s)
            cancelling = _cancelling()
            self._line.sent(turn)  # the last look at the command's deadline: from here on, the unit may act
            try:
                async with timeout:
                    reply = await call(client)
                if _cancelling() > cancelling:  # see _cancelling
                    raise asyncio.CancelledError
                answered = True
            except TimeoutError:
                if lost.is_set():
                    raise DeviceUnavailable(f"bus {self.name}: {self.port} went away", details=details) from None
                self.timeouts += 1
                raise DeviceTimeout(
                    f"no reply from unit {unit} on {self.name} to {what} within {self.cfg.response_timeout_s:g} s",
                    details=details,
                ) from None
            except ModbusIOException as err:  # a reply pymodbus could not decode: as good as none
                self.timeouts += 1
                raise DeviceTimeout(f"no valid reply from unit {unit} on {self.name}: {err}", details=details) from err
            except ConnectionException as err:
                raise DeviceUnavailable(f"bus {self.name}: {err}", details=details) from err
            finally:
                self._request = self._inflight = None
                quiet = self.cfg.turnaround_s
                if not answered and not self.link.transaction_ids:  # a late reply must not pass for the next one's
                    quiet = max(quiet, self.cfg.response_timeout_s)
                self._line.free_at = self._clock.monotonic() + quiet
            self.transactions += 1
        if reply.isError():
            code = reply.exception_code
            name = _exception_name(code)
            message = f"unit {unit} on {self.name} answered {what} with exception {code} ({name})"
            if code == _BUSY:  # not a refusal: the device asks to be asked again shortly
                raise DeviceBusy(message, details={**details, "exception_code": code})
            if code == _GATEWAY_NO_RESPONSE:  # a Modbus gateway's downstream unit did not answer
                raise DeviceTimeout(message, details={**details, "exception_code": code})
            raise DeviceRejected(message, details={**details, "exception_code": code, "exception": name})
        return reply

    async def read(self, unit: int, table: str, address: int, count: int) -> list[int] | list[bool]:
        """``count`` bits (coil, discrete) or registers (holding, input) from ``address``. The reply's byte count
        was matched to the request before pymodbus decoded it (:meth:`_filter_reply`)."""
        calls: dict[str, Callable[[ModbusBaseClient], Awaitable[ModbusPDU]]] = {
            "coil": lambda c: c.read_coils(address, count=count, device_id=unit),
            "discrete": lambda c: c.read_discrete_inputs(address, count=count, device_id=unit),
            "holding": lambda c: c.read_holding_registers(address, count=count, device_id=unit),
            "input": lambda c: c.read_input_registers(address, count=count, device_id=unit),
        }
        reply = await self._transact(unit, READ_FUNCTION[table], f"read {table} {address}+{count}", calls[table])
        if table in BIT_TABLES:
            return [bool(b) for b in reply.bits[:count]]  # whole bytes of bits arrive: the rest is padding
        return list(reply.registers)

    async def write_coil(self, unit: int, address: int, value: bool, *, function: int = 5) -> None:
        """One coil. Its reply echoes the write (address and value, or address and count), matched before
        pymodbus decoded it."""
        what = f"write coil {address}"
        if function == 15:
            await self._transact(unit, 15, what, lambda c: c.write_coils(address, [value], device_id=unit))
        else:
            await self._transact(unit, 5, what, lambda c: c.write_coil(address, value, device_id=unit))

    async def write_registers(self, unit: int, address: int, registers: list[int], *, function: int = 6) -> None:
        """One register with function 6, or several with 16. The reply's echo was matched, as for a coil."""
        what = f"write holding {address}+{len(registers)}"
        if function == 6:
            if len(registers) != 1:
                raise ValueError("function 6 writes one register")
            await self._transact(unit, 6, what, lambda c: c.write_register(address, registers[0], device_id=unit))
        else:
            await self._transact(unit, 16, what, lambda c: c.write_registers(address, registers, device_id=unit))


def _cancelling() -> int:
    """Pending cancellations of the running task. pymodbus waits with ``asyncio.wait_for``, which on Python 3.11
    returns a result that is ready when a cancellation arrives and drops the cancellation (fixed in 3.12): a bus
    closing would then go on reconnecting for ever. Compared before and after each pymodbus call, it tells us to
    raise the cancellation ourselves."""
    task = asyncio.current_task()
    return 0 if task is None else task.cancelling()


class ModbusDevice:
    """One unit on a Modbus bus (an RS-485 address, 1-247, or a unit id on a TCP connection, 0-255), mapped by a
    ``modbus_rtu`` profile: the profile maps registers, whatever carries the requests."""

    def __init__(
        self,
        name: str,
        profile: Profile,
        bus: ModbusBus,
        unit: int,
        sink: TelemetrySink,
        *,
        clock: Clock = REAL_CLOCK,
    ):
        self.name = name
        self.profile = profile
        self.bus = bus
        self.unit = unit
        self.sink = sink
        self.values: dict[str, Value] = {}  # the latest reading of each telemetry point
        self.last_result: dict[str, Any] | None = None
        self.polls = 0
        self.poll_failures = 0  # consecutive
        self.last_poll_error: str | None = None
        self._plans: dict[tuple[str, ...], tuple[Profile, tuple[ReadBlock, ...]]] = {}
        self._clock = clock
        self._tasks = TaskOwner(name)

    async def __aenter__(self) -> ModbusDevice:
        await self._tasks.open()
        if self.profile.poll_interval_s is not None and self.profile.telemetry:
            self._tasks.spawn("poll", self._poll())
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._tasks.close()

    @property
    def availability(self) -> Availability:
        return self.bus.availability

    async def execute(self, command_id: str, action: str, params: dict[str, Any]) -> dict[str, Any]:
        """Run one action. ``command_id`` does not travel: Modbus has no field for it (see the module doc)."""
        spec = self.profile.actions.get(action)
        if spec is None or spec.modbus is None:
            raise DeviceRejected(f"{self.name} has no action {action!r}", details={"action": action})
        m = spec.modbus
        if m.read is not None:
            names = list(self.profile.telemetry) if m.read == "telemetry" else list(m.read)
            result: dict[str, Any] = await self.read_points(names)
        else:
            result = await self._write(m, params)
        self.last_result = result
        return result

    async def _write(self, m: ModbusAction, params: dict[str, Any]) -> dict[str, Any]:
        assert m.address is not None
        value = m.value if m.param is None else params.get(m.param)
        if m.write == "coil":
            if not isinstance(value, bool):
                raise ValidationFailed(f"coil {m.address} takes true or false, not {value!r}")
            await self.bus.write_coil(self.unit, m.address, value, function=m.function_code)
            # The unit echoed the write: a point that reads this coil now holds the value, without waiting for
            # the next poll (a board's channel shows "on" as soon as it is on).
            for name, point in self.profile.telemetry.items():
                if point.modbus is not None and point.modbus.table == "coil" and point.modbus.address == m.address:
                    self.values[name] = value
            return {"table": "coil", "address": m.address, "value": value}
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValidationFailed(f"holding register {m.address} takes a number, not {value!r}")
        try:
            raw = modbus_to_raw(value, m.register_type, m.scale, m.offset)
            registers = encode_registers(raw, m.register_type, m.word_order)
        except ValueError as err:  # the profile's parameter range keeps this from happening
            raise ValidationFailed(f"{value!r} cannot be written to holding register {m.address}: {err}") from err
        await self.bus.write_registers(self.unit, m.address, registers, function=m.function_code)
        return {"table": "holding", "address": m.address, "value": value, "raw": raw}

    async def read_points(self, names: list[str]) -> dict[str, Value]:
        """The engineering values of the named telemetry points, read in as few requests as they allow. The plan is
        made again when the profile changes (a reload, SIGHUP, may have remapped them), not at every poll."""
        key = tuple(names)
        cached = self._plans.get(key)
        if cached is not None and cached[0] is self.profile:
            plan = cached[1]
        else:
            wanted = set(names)
            plan = plan_reads({n: p for n, p in self.profile.telemetry.items() if n in wanted})
            if len(self._plans) >= 16:  # a few shapes: the poll's, and the read actions'
                self._plans.clear()
            self._plans[key] = (self.profile, plan)
        values: dict[str, Value] = {}
        for block in plan:
            values.update(await self._read_block(block))
        self.values.update(values)
        return {name: values[name] for name in names}

    async def _read_block(self, block: ReadBlock) -> dict[str, Value]:
        data = await self.bus.read(self.unit, block.table, block.address, block.count)
        return block.values(data)

    async def _poll(self) -> None:
        """Read every point each ``poll_interval_s`` and put one record with all of them into the sink. A poll that
        fails (the unit silent, or refusing) records nothing; the failures are logged when they start and when they
        end, and the unit is asked less often meanwhile. An unavailable bus is reported by the bus."""
        next_at = self._clock.monotonic()
        while True:
            names = list(self.profile.telemetry)
            try:
                await self.read_points(names)
            except DeviceUnavailable:
                pass
            except GatewayError as err:
                self.poll_failures += 1
                self.last_poll_error = err.message
                if self.poll_failures == 1:
                    log.warning("modbus_poll_failing", device=self.name, error=err.code, message=err.message)
            else:
                self.polls += 1
                self.sink.put(Record.telemetry(self.name, {n: self.values[n] for n in names}))
                if self.poll_failures:
                    log.info("modbus_poll_recovered", device=self.name, failed_polls=self.poll_failures)
                    self.poll_failures = 0
            interval = self.profile.poll_interval_s or POLL_BACKOFF_CAP_S
            # After n failed polls in a row the pause is interval * 2^(n-1), up to the cap (one miss costs nothing
            # more): the one retry policy's schedule, without jitter.
            slow_down = RetryPolicy(base_s=interval, cap_s=max(interval, POLL_BACKOFF_CAP_S), jitter="none")
            next_at += slow_down.backoff(max(0, self.poll_failures - 1))
            now = self._clock.monotonic()
            if next_at < now:  # a slow bus or a stalled loop: carry on from now rather than poll back to back
                next_at = now
            await self._clock.sleep(next_at - now)

    def describe(self) -> dict[str, Any]:
        telemetry = {
            name: {"value": self.values.get(name), "unit": point.unit} for name, point in self.profile.telemetry.items()
        }
        return {
            "kind": "modbus",
            "bus": self.bus.name,
            **self.bus.link.describe(),
            "address": self.unit,
            "state": dict(self.values) if self.values else self.last_result,
            "points": telemetry,  # each telemetry point with its unit (the latest reading is "telemetry")
            "poll": {
                "interval_s": self.profile.poll_interval_s,
                "polls": self.polls,
                "failing": self.poll_failures,
                "last_error": self.last_poll_error,
            },
        }
