"""Simulated Modbus TCP devices on loopback, answered by pymodbus's own TCP server.

    gateway ── TCP ── ModbusTcpSimulator (127.0.0.1:port) ── TCP ── pymodbus ModbusTcpServer (127.0.0.1:another)

The simulator is the device's network side, as :class:`~gatewayd.devices.modbus_sim.ModbusSimulator`'s bridge is a
serial line's: it accepts the gateway's connections, frames each request (an MBAP frame; or an RTU frame with its
CRC for RTU over TCP, as a serial server passes them), drops it when its unit is not there or is muted (a gateway
whose RS-485 unit is silent), hands it to the server and carries the server's reply back after the unit's latency
and through the unit's :class:`~gatewayd.devices.simulator.Faults` (:meth:`~gatewayd.devices.modbus_sim.ModbusUnit.
on_wire`): noise before it, cut short, lost, or with a wrong header (MBAP) or CRC (RTU). The units are the RTU
simulator's: the same models, execution logs, refusals and "busy" answers.

What only a network does, the simulator does too: :meth:`refuse` stops listening (connection refused, as a host
whose Modbus service is down or full answers), :meth:`accept` listens again on the same port, :meth:`disconnect`
drops every open connection (a device rebooting; mid-request if one is in flight) and :meth:`inject` writes noise
into them. A request whose MBAP header is not one (a protocol id other than 0, an impossible length) ends its
connection, as a device closes a connection it cannot read.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Mapping
from types import TracebackType
from typing import Literal

import structlog
from pymodbus.framer import FramerType
from pymodbus.server import ModbusTcpServer

from gatewayd.devices.modbus_codec import frame_length, mbap_length, take_rtu_request
from gatewayd.devices.modbus_sim import ModbusUnit
from gatewayd.tasks import TaskOwner

log = structlog.get_logger("gatewayd.simulator")


class NotModbus(Exception):
    """What the gateway sent cannot be a Modbus TCP frame."""


class ModbusTcpSimulator:
    """Modbus units behind one simulated host: pymodbus's TCP server, the gateway connecting to :attr:`port`."""

    def __init__(
        self,
        name: str,
        units: Mapping[int, ModbusUnit],
        *,
        framer: Literal["socket", "rtu"] = "socket",
        host: str = "127.0.0.1",
        port: int = 0,
        server_timeout_s: float = 1.0,
        byte_at_a_time: bool = False,
    ):
        """``port`` 0: a free one, chosen when the simulator starts. ``byte_at_a_time``: every byte of a reply is
        sent on its own (TCP_NODELAY), as a slow serial server forwards what its UART receives."""
        for unit_id, unit in units.items():
            if unit_id != unit.unit:
                raise ValueError(f"unit {unit.name} has id {unit.unit}, listed under {unit_id}")
        self.name = name
        self.units = dict(units)
        self.framer = framer
        self.host = host
        self.port = port
        self.server_timeout_s = server_timeout_s
        self.byte_at_a_time = byte_at_a_time
        self.requests = 0  # whole requests framed from the gateway's side
        self.accepted = 0  # connections accepted
        self._server: ModbusTcpServer | None = None
        self._server_port = 0
        self._listener: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._tasks = TaskOwner(f"sim:{name}")

    async def __aenter__(self) -> ModbusTcpSimulator:
        await self._tasks.open()
        try:
            server = ModbusTcpServer(
                [unit.sim_device() for unit in self.units.values()],
                framer=FramerType.SOCKET if self.framer == "socket" else FramerType.RTU,
                address=(self.host, 0),
            )
            self._server = server
            await server.serve_forever(background=True)
            listening = server.transport
            assert isinstance(listening, asyncio.Server)
            self._server_port = int(listening.sockets[0].getsockname()[1])
            await self.accept()
        except BaseException:
            await self._close()
            raise
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._close()

    async def _close(self) -> None:
        await self.refuse()
        await self._tasks.close()
        server, self._server = self._server, None
        if server is not None:
            await server.shutdown()  # type: ignore[no-untyped-call]
        for unit in self.units.values():
            unit.log.close()

    def device_names(self) -> list[str]:
        return [f"{u.name}@{u.unit}" for u in self.units.values()]

    @property
    def connections(self) -> int:
        return len(self._connections)

    # --- the network -------------------------------------------------------------------------------------------

    async def accept(self) -> None:
        """Listen (again) for the gateway's connections, on the same port as before."""
        if self._listener is not None:
            return
        self._listener = await asyncio.start_server(self._accepted, self.host, self.port)
        self.port = int(self._listener.sockets[0].getsockname()[1])

    async def refuse(self) -> None:
        """Stop listening and drop every connection: the gateway's next attempt is refused."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        await self.disconnect()

    async def disconnect(self, *, reset: bool = False) -> None:
        """Drop every open connection, with a FIN, or with ``reset`` a RST, as a device rebooting does; a request
        in flight gets no reply."""
        for task, writer in list(self._connections.items()):
            task.cancel()
            if reset:
                writer.transport.abort()
            else:
                writer.close()
        await asyncio.gather(*self._connections, return_exceptions=True)

    def inject(self, noise: bytes) -> None:
        """Raw bytes into every open connection, between replies."""
        for writer in self._connections.values():
            writer.write(noise)

    def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        task = self._tasks.spawn(f"conn{self.accepted}", self._serve(reader, writer))
        self._connections[task] = writer
        task.add_done_callback(lambda t: self._connections.pop(t, None))

    # --- requests ----------------------------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection: its requests one at a time, each over a connection of its own to the server."""
        upstream: asyncio.StreamWriter | None = None
        try:
            server_reader, upstream = await asyncio.open_connection(self.host, self._server_port)
            rx = bytearray()
            while data := await reader.read(4096):
                rx += data
                while (request := self._take_request(rx)) is not None:
                    await self._answer(request, server_reader, upstream, writer)
        except (ConnectionError, asyncio.IncompleteReadError, NotModbus):
            pass  # the gateway or the server went, or the gateway sent what no device reads: the connection ends
        finally:
            writer.close()
            if upstream is not None:
                upstream.close()

    def _take_request(self, rx: bytearray) -> bytes | None:
        if self.framer == "rtu":
            return take_rtu_request(rx)
        length = mbap_length(rx)
        if length == 0:
            raise NotModbus
        if length is None or len(rx) < length:
            return None
        request = bytes(rx[:length])
        del rx[:length]
        return request

    async def _answer(
        self,
        request: bytes,
        server_reader: asyncio.StreamReader,
        upstream: asyncio.StreamWriter,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.requests += 1
        unit = self.units.get(request[6] if self.framer == "socket" else request[0])
        if unit is None or unit.mute:
            return  # as a gateway whose unit is silent, or a device asked for a unit it is not
        unit.requests += 1
        upstream.write(request)
        try:
            async with asyncio.timeout(self.server_timeout_s):
                reply = await self._read_reply(server_reader)
        except TimeoutError:
            log.warning("modbus_simulator_server_silent", simulator=self.name, unit=unit.unit)
            raise ConnectionResetError from None  # its late reply would follow the next request: start again
        wire = await unit.deliver(reply, mbap=self.framer == "socket")
        if self.byte_at_a_time:
            for i in range(len(wire)):
                writer.write(wire[i : i + 1])
                await writer.drain()
                await asyncio.sleep(0)
        elif wire:
            writer.write(wire)
            await writer.drain()

    async def _read_reply(self, server: asyncio.StreamReader) -> bytes:
        """One reply from pymodbus's server, framed by its header."""
        if self.framer == "socket":
            head = await server.readexactly(6)
            length = mbap_length(head)
            assert length, "pymodbus's server sent a frame that is not MBAP"
            return head + await server.readexactly(length - 6)
        head = await server.readexactly(3)  # every RTU reply is 5 bytes or more
        length = frame_length(head, request=False)
        assert length, "pymodbus's server sent a frame of a function this module cannot frame"
        return head + await server.readexactly(length - 3)
