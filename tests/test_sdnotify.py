"""sd_notify as systemd sees it: datagrams on a real AF_UNIX socket."""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gatewayd.app.supervisor import Supervisor
from gatewayd.app.systemd import Notifier
from gatewayd.config import load_config
from tests.conftest import CONFIG, Daemon, wait_until


class NotifySocket:
    """What systemd does: bind a datagram socket and collect what the service sends, with arrival times."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def _collect(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            for field in data.decode().split("\n"):
                self.messages.append((time.monotonic(), field))

    def fields(self) -> list[str]:
        return [m for _, m in self.messages]

    def times(self, field: str) -> list[float]:
        return [t for t, m in self.messages if m == field]

    def wait_for(self, field: str, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while field not in self.fields():
            assert time.monotonic() < deadline, f"{field} not received; got {self.fields()}"
            time.sleep(0.02)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    ns = NotifySocket(tmp_path / "notify.sock")
    yield ns
    ns.close()


def test_notifier_is_silent_without_the_variable() -> None:
    assert Notifier(environ={}).notify("READY=1") is False


def test_notifier_speaks_to_abstract_sockets() -> None:
    name = f"gatewayd-test-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("\0" + name)
        notifier = Notifier(environ={"NOTIFY_SOCKET": "@" + name})
        assert notifier.notify("READY=1", "STATUS=hello")
        assert server.recv(100) == b"READY=1\nSTATUS=hello"
        notifier.close()


def test_watchdog_pid_for_another_process_disables_the_watchdog() -> None:
    n = Notifier(environ={"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"})
    assert n.watchdog_s is None
    assert Notifier(environ={"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000000"}).watchdog_s == 1.0


def test_daemon_sends_ready_watchdog_status_and_stopping(make_daemon: Any, notify_socket: NotifySocket) -> None:
    d: Daemon = make_daemon({"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "200000"})
    d.start()
    notify_socket.wait_for("READY=1")
    ready_at = notify_socket.times("READY=1")[0]

    def feeds() -> list[float]:
        return [t for t in notify_socket.times("WATCHDOG=1") if t > ready_at]

    wait_until(lambda: len(feeds()) >= 3, 5, f"three watchdog feeds: {notify_socket.fields()}")
    assert any(f.startswith("STATUS=running: 5/5 devices available") for f in notify_socket.fields())
    assert d.stop(signal.SIGTERM) == 0
    fields = notify_socket.fields()
    assert "STOPPING=1" in fields
    assert fields.index("STATUS=starting") < fields.index("READY=1") < fields.index("STOPPING=1")


async def test_a_blocked_event_loop_stops_feeding_the_watchdog(tmp_path: Path, notify_socket: NotifySocket) -> None:
    env = {"GATEWAYD_HTTP__PORT": "0", "GATEWAYD_GATEWAY__DATA_DIR": str(tmp_path / "data")}
    loaded = load_config(CONFIG, environ=env)
    sup = Supervisor(loaded, environ={"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "200000"})
    run = asyncio.create_task(sup.run(install_signals=False))
    try:
        while "READY=1" not in notify_socket.fields():  # noqa: ASYNC110 - filled by the socket's own thread
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.5)
        blocked_from = time.monotonic()
        time.sleep(1.0)  # noqa: ASYNC251 - the bug this guards against: blocking I/O on the loop
        blocked_to = time.monotonic()
        await asyncio.sleep(0.5)
    finally:
        sup.request_stop("test")
        assert await run == 0
    feeds = notify_socket.times("WATCHDOG=1")
    assert not [t for t in feeds if blocked_from + 0.05 < t < blocked_to - 0.05], "fed while the loop was blocked"
    assert any(t < blocked_from for t in feeds) and any(t > blocked_to for t in feeds)
