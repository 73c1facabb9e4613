"""What a :class:`~gatewayd.devices.modbus.ModbusBus` talks through: a serial port (Modbus RTU on RS-485), or a TCP
connection (Modbus TCP; or Modbus RTU frames carried over TCP by a serial server, "RTU over TCP").

The bus owns everything a line needs whatever carries it: one transaction at a time in priority order, deadlines,
the transaction rate, timeouts, error translation, availability and reconnects. A link only builds pymodbus's
client for its medium, connects it (saying why not when it cannot), finds the reply to a request among the bytes
received, and says whether replies carry a transaction id.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient, ModbusBaseClient
from pymodbus.framer import FramerType

from gatewayd.config.models import SerialBusConfig
from gatewayd.devices.modbus_codec import find_mbap_reply, find_reply

TracePacket = Callable[[bool, bytes], bytes]
TraceConnect = Callable[[bool], None]

# A peer that vanished without closing (a cable pulled, a device powered off) leaves a TCP connection that looks
# open. The kernel finds out: keepalive probes after this much idle time, and a request whose bytes stay
# unacknowledged this long ends the connection (TCP_USER_TIMEOUT), so the bus reconnects instead of timing out for
# ever against a dead socket.
KEEPALIVE_IDLE_S = 10
KEEPALIVE_INTERVAL_S = 5
KEEPALIVE_PROBES = 3
UNACKNOWLEDGED_S = 20


class ModbusLink(Protocol):
    @property
    def where(self) -> str:
        """The port or host:port, for logs and errors."""

    @property
    def transaction_ids(self) -> bool:
        """Replies carry their request's transaction id (Modbus TCP's MBAP header): a late reply cannot pass for
        the next request's, so the line need not be kept quiet after a timeout."""

    def client(
        self, name: str, timeout: float, trace_packet: TracePacket, trace_connect: TraceConnect
    ) -> ModbusBaseClient:
        """pymodbus's client, with its own retries and reconnects off (the bus has its own) and its reply timeout
        ``timeout`` (never the first to fire: the bus's decides)."""

    async def connect(self, client: ModbusBaseClient) -> str | None:
        """Open the port or connection: None when it is open, else why not."""

    def find_reply(self, data: bytes | bytearray, request: bytes | bytearray) -> tuple[int, int] | None:
        """Where the reply to ``request`` lies in ``data``, or None until a complete one has arrived."""

    def describe(self) -> dict[str, Any]:
        """What a device on this link shows of it, and the bus logs when it opens."""


@dataclass(frozen=True)
class SerialLink:
    """An RS-485 (or RS-232) port speaking Modbus RTU."""

    port: str
    cfg: SerialBusConfig

    @property
    def where(self) -> str:
        return self.port

    @property
    def transaction_ids(self) -> bool:
        return False

    def client(
        self, name: str, timeout: float, trace_packet: TracePacket, trace_connect: TraceConnect
    ) -> AsyncModbusSerialClient:
        return AsyncModbusSerialClient(
            self.port,
            framer=FramerType.RTU,
            baudrate=self.cfg.baudrate,
            bytesize=self.cfg.bytesize,
            parity=self.cfg.parity,
            stopbits=self.cfg.stopbits,
            name=name,
            reconnect_delay=0,
            timeout=timeout,
            retries=0,
            trace_packet=trace_packet,
            trace_connect=trace_connect,
        )

    async def connect(self, client: ModbusBaseClient) -> str | None:
        return None if await client.connect() else _why_not_open(self.port)

    def find_reply(self, data: bytes | bytearray, request: bytes | bytearray) -> tuple[int, int] | None:
        return find_reply(data, request)

    def describe(self) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "transport": "modbus_rtu",
            "port": self.port,
            "baudrate": cfg.baudrate,
            "framing": f"{cfg.bytesize}{cfg.parity}{cfg.stopbits}",
        }


def _why_not_open(port: str) -> str:
    """pymodbus reports a failed open as False, without the error; name the usual causes."""
    try:
        os.stat(port)  # follows a by-id link: a dangling one is "no such file"
    except OSError as err:
        return f"cannot open {port}: {err.strerror}"
    if not os.access(port, os.R_OK | os.W_OK):
        return f"cannot open {port}: permission denied"
    return f"cannot open {port} (in use by another process, or not a serial port)"


@dataclass(frozen=True)
class TcpLink:
    """A TCP connection to a Modbus TCP device or gateway (``framer = "socket"``), or to a serial server that
    carries Modbus RTU frames as they are (``framer = "rtu"``)."""

    host: str
    port: int
    framer: Literal["socket", "rtu"] = "socket"
    connect_timeout_s: float = 3.0

    @property
    def where(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def transaction_ids(self) -> bool:
        return self.framer == "socket"

    def client(
        self, name: str, timeout: float, trace_packet: TracePacket, trace_connect: TraceConnect
    ) -> AsyncModbusTcpClient:
        return AsyncModbusTcpClient(
            self.host,
            port=self.port,
            framer=FramerType.SOCKET if self.framer == "socket" else FramerType.RTU,
            name=name,
            reconnect_delay=0,
            # Also pymodbus's connect timeout: the link's own, shorter, decides that (see connect).
            timeout=max(timeout, self.connect_timeout_s + 1),
            retries=0,
            trace_packet=trace_packet,
            trace_connect=trace_connect,
        )

    async def connect(self, client: ModbusBaseClient) -> str | None:
        """pymodbus reports a failed connection as False and drops the error; the error is noted on its way out
        (refused, unreachable, an unknown name), and an attempt nobody answers is given up after
        ``connect_timeout_s``."""
        errors: list[OSError] = []
        # pymodbus's internals (3.16): another version without them still connects, saying less when it cannot.
        create = getattr(client.ctx, "call_create", None)
        if create is not None:

            async def noting_the_error() -> Any:
                try:
                    return await create()
                except OSError as err:
                    errors.append(err)
                    raise

            client.ctx.call_create = noting_the_error
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                connected = await client.connect()
        except TimeoutError:
            return f"cannot connect to {self.where}: no answer within {self.connect_timeout_s:g} s"
        if not connected:
            if not errors:
                return f"cannot connect to {self.where}"
            return f"cannot connect to {self.where}: {_reason(errors[0])}"
        transport = getattr(client.ctx, "transport", None)
        sock = None if transport is None else transport.get_extra_info("socket")
        if sock is not None:
            _watch_for_a_dead_peer(sock)
        return None

    def find_reply(self, data: bytes | bytearray, request: bytes | bytearray) -> tuple[int, int] | None:
        return find_mbap_reply(data, request) if self.framer == "socket" else find_reply(data, request)

    def describe(self) -> dict[str, Any]:
        return {
            "transport": "modbus_tcp" if self.framer == "socket" else "modbus_rtu_over_tcp",
            "host": self.host,
            "port": self.port,
        }


def _reason(err: OSError) -> str:
    """ "Connection refused", "No route to host", "Name or service not known": asyncio words a failed connection
    as "Connect call failed (address)", which says less than the errno."""
    if isinstance(err, socket.gaierror) or not err.errno or err.errno < 0:
        return err.strerror or str(err)
    return os.strerror(err.errno)


def _watch_for_a_dead_peer(sock: socket.socket) -> None:
    """Keepalive and a bound on unacknowledged data (Linux), so a silent peer's connection ends (see above);
    Modbus requests are small and sent one at a time, so Nagle's delay only slows them."""
    options = [
        (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
        (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S),
        (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL_S),
        (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES),
        (socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, UNACKNOWLEDGED_S * 1000),
    ]
    for level, option, value in options:
        with contextlib.suppress(OSError):  # a kernel without one keeps its default
            sock.setsockopt(level, option, value)
