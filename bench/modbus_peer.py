"""pymodbus's RTU server answering N units behind a pty, as a process of its own (bench/telemetry.py's field bus).

    .venv/bin/python bench/modbus_peer.py --link /tmp/x/bus1.tty [--units 10] [--registers 10]

pymodbus's server opens its port by path, and so does the gateway, so two pty pairs are joined by a byte bridge:

    gateway -- pty (published as --link) -- bridge -- pty -- pymodbus ModbusSerialServer

Each unit (addresses 1..N) holds ``--registers`` holding registers from address 0. Register 0 counts the reads the
unit has answered (modulo 65536): every poll of a unit carries a number of its own, so the benchmark tells a sample
lost from one delivered twice. The other registers hold ``unit * 100 + index``. No line time is simulated (a pty
moves bytes as fast as the kernel does), as with socat. The process runs until SIGTERM; its CPU time is not the
gateway's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import tty
from pathlib import Path

from pymodbus.server import ModbusSerialServer
from pymodbus.simulator import DataType, SimData, SimDevice

_READ_HOLDING = 3


def unit_device(unit: int, registers: int) -> SimDevice:
    values = [0] + [unit * 100 + i for i in range(1, registers)]

    async def on_access(function: int, start: int, address: int, count: int, cells: list[int], written: object) -> None:
        if function == _READ_HOLDING and written is None and address <= 0 < address + count:
            cells[-start] = (cells[-start] + 1) & 0xFFFF  # the live list pymodbus answers from: this read carries it
        return

    holding = [SimData(0, values=values, datatype=DataType.REGISTERS)]
    placeholder_bits = [SimData(0, values=[False] * 16, datatype=DataType.BITS)]
    placeholder_regs = [SimData(0, values=[0], datatype=DataType.REGISTERS)]
    return SimDevice(unit, simdata=(placeholder_bits, placeholder_bits, holding, placeholder_regs), action=on_access)


def _raw_pty() -> tuple[int, int]:
    master, slave = os.openpty()
    tty.setraw(master)
    tty.setraw(slave)
    os.set_blocking(master, False)
    return master, slave


def publish(link: Path, target: str) -> None:
    """The link appears whole or not at all: the gateway may be looking for it."""
    tmp = link.with_name(link.name + ".new")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    tmp.symlink_to(target)
    tmp.replace(link)


def unpublish(link: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        link.unlink()


async def serve(link: Path, units: int, registers: int, baudrate: int) -> None:
    loop = asyncio.get_running_loop()
    server_master, server_slave = _raw_pty()
    gateway_master, gateway_slave = _raw_pty()

    def pump(src: int, dst: int) -> None:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            data = os.read(src, 65536)
            if data:
                os.write(dst, data)

    loop.add_reader(gateway_master, pump, gateway_master, server_master)
    loop.add_reader(server_master, pump, server_master, gateway_master)
    server = ModbusSerialServer(
        [unit_device(u, registers) for u in range(1, units + 1)],
        port=os.ttyname(server_slave),
        baudrate=baudrate,
    )
    await server.serve_forever(background=True)
    publish(link, os.ttyname(gateway_slave))
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        unpublish(link)
        await server.shutdown()  # type: ignore[no-untyped-call]
        for fd in (server_master, gateway_master):
            loop.remove_reader(fd)
        for fd in (server_master, server_slave, gateway_master, gateway_slave):
            os.close(fd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--link", type=Path, required=True, help="path of the symlink to the gateway's pty")
    parser.add_argument("--units", type=int, default=10)
    parser.add_argument("--registers", type=int, default=10)
    parser.add_argument("--baudrate", type=int, default=115200)
    args = parser.parse_args(argv)
    if not 1 <= args.units <= 247 or not 1 <= args.registers <= 125:
        parser.error("units 1-247, registers 1-125")
    logging.getLogger("pymodbus").setLevel(logging.ERROR)
    asyncio.run(serve(args.link, args.units, args.registers, args.baudrate))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
