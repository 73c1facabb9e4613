"""What a :class:`~gatewayd.devices.modbus.ModbusBus` talks through: a serial port (Modbus RTU on RS-485), or a TCP
connection (Modbus TCP; or Modbus RTU frames carried over TCP by a serial server, "RTU over TCP").

The bus owns everything a line needs whatever carries it: one transaction at a time in priority order, deadlines,
the transaction rate, timeouts, error translation, availability and reconnects. A link only builds pymodbus's
client for its medium, connects it (saying why not when it cannot), finds the reply to a request among the bytes
received, and says whether replies carry a transaction id.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from pymodbus.client import AsyncModbusSerialClient, ModbusBaseClient
from pymodbus.framer import FramerType

from gatewayd.config.models import SerialBusConfig
from gatewayd.devices.modbus_codec import find_reply

TracePacket = Callable[[bool, bytes], bytes]
TraceConnect = Callable[[bool], None]


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
