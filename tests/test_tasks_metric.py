"""``gatewayd_asyncio_tasks``: the asyncio tasks alive in the daemon's loop, the figure the soak (bench/soak.py)
watches for a leak. It follows what is running, here and in a live daemon, and goes back down when work ends."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

from gatewayd.observability.collector import GatewayCollector
from tests.conftest import Daemon


def _tasks_in(text: str) -> float:
    match = re.search(r"^gatewayd_asyncio_tasks (\S+)$", text, re.MULTILINE)
    assert match is not None, "gatewayd_asyncio_tasks missing from the exposition"
    return float(match.group(1))


async def test_the_gauge_counts_the_loops_unfinished_tasks_even_when_scraped_from_a_thread() -> None:
    registry = CollectorRegistry()
    registry.register(GatewayCollector(lambda: None, lambda: None))
    before = _tasks_in(generate_latest(registry).decode())
    assert before == len(asyncio.all_tasks())

    gate = asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        for i in range(5):
            tg.create_task(gate.wait(), name=f"waiter{i}")
        await asyncio.sleep(0)
        assert _tasks_in(generate_latest(registry).decode()) == before + 5
        # A scrape from another thread (no running loop there) still counts this loop's tasks; to_thread itself
        # runs no task of its own here, it awaits a future.
        assert _tasks_in((await asyncio.to_thread(generate_latest, registry)).decode()) == before + 5
        gate.set()
    assert _tasks_in(generate_latest(registry).decode()) == before


def _open_stream(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(b"GET /api/v1/events/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, "the daemon closed the stream before its headers"
        head += chunk
    assert head.startswith(b"HTTP/1.1 200"), head[:200]
    return sock


def test_a_live_daemon_reports_its_tasks_and_they_go_back_down_when_streams_close(make_daemon: Any) -> None:
    d: Daemon = make_daemon({"GATEWAYD_HTTP__LIVE_INTERVAL_S": "0.2"})
    d.start()

    def tasks() -> float:
        status, text = d.get("/metrics")
        assert status == 200
        return _tasks_in(text)

    baseline = tasks()
    assert baseline >= 10  # the components' own tasks: buses, dispatcher, recorder, uplink, web, ...
    streams = [_open_stream(d.port) for _ in range(4)]
    try:
        assert tasks() >= baseline + 4  # each open page holds at least its connection's task
    finally:
        for sock in streams:
            sock.close()
    # A closed stream is noticed at its next write (a status event every 0.2 s here) and its tasks end.
    deadline = time.monotonic() + 10
    while (now := tasks()) > baseline and time.monotonic() < deadline:
        time.sleep(0.1)
    assert now <= baseline, f"{now} tasks 10 s after the streams closed, {baseline} before they opened"
