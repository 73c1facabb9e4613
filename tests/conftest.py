"""Shared fixtures. The daemon is started for real (``python -m gatewayd run``) with the bundled config,
its port and data directory overridden through the environment, exactly as systemd would."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "config.toml"


# --- leaked tasks ------------------------------------------------------------------------------------------------
# An in-process test must leave no task of gatewayd's running: gatewayd owns every task it starts and closes it
# (gatewayd.tasks.TaskOwner), and a task left behind is one a long-running daemon would accumulate. pytest-asyncio
# ends each test's event loop with asyncio.Runner, which cancels what is left: that is where it is seen.
_LEAKED: list[str] = []
_cancel_all_tasks = asyncio.runners._cancel_all_tasks  # type: ignore[attr-defined]


def _ours(task: asyncio.Task[Any]) -> bool:
    """A task running gatewayd's code (libraries' own tasks, such as aiohttp lingering on a refused body, are
    theirs to end)."""
    code = getattr(task.get_coro(), "cr_code", None)
    return task.get_name().startswith("gatewayd") or (code is not None and "/gatewayd/" in code.co_filename)


def _cancel_and_record(loop: asyncio.AbstractEventLoop) -> None:
    _LEAKED.extend(f"{t.get_name()}: {t.get_coro()!r}" for t in asyncio.all_tasks(loop) if not t.done() and _ours(t))
    _cancel_all_tasks(loop)


asyncio.runners._cancel_all_tasks = _cancel_and_record  # type: ignore[attr-defined]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    _LEAKED.clear()
    result = yield
    if _LEAKED:
        leaked, _LEAKED[:] = list(_LEAKED), []
        raise AssertionError(f"{item.nodeid} left {len(leaked)} task(s) running:\n" + "\n".join(leaked[:10]))
    return result


def wait_until(predicate: Any, timeout: float = 15.0, what: str = "") -> None:
    """Wait for a condition a user would see, polling; never a fixed sleep that passes when the daemon is slow."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


# Ports handed to daemons and brokers come from below the ephemeral range, which outgoing connections draw from:
# a port picked with bind(0) is free only until the next connect() anywhere on the machine takes it (another
# worker's HTTP client, a broker reconnect), and a daemon restarted on its port later met "address already in use".
_PORTS = range(10_000, min(_ephemeral_low(), 32768))
_RANDOM = random.SystemRandom()


def free_port() -> int:
    """A loopback port free now that no outgoing connection can take: from below the ephemeral range, at random,
    so the test workers hardly ever pick the same one (and bind() says so when they do)."""
    for _ in range(500):
        port = _RANDOM.choice(_PORTS)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free loopback port in {_PORTS.start}-{_PORTS.stop - 1}")


def http(
    method: str, url: str, body: Any = None, raw: bytes | None = None, timeout: float = 30.0
) -> tuple[int, Any, dict[str, str]]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            text = resp.read()
            ctype = resp.headers.get("Content-Type", "")
            return resp.status, json.loads(text) if "json" in ctype else text.decode(), dict(resp.headers)
    except urllib.error.HTTPError as err:
        text = err.read()
        return err.code, json.loads(text) if text else None, dict(err.headers)


class Daemon:
    """One gatewayd process. Restartable on the same data directory, to test what survives."""

    def __init__(self, data_dir: Path, env: dict[str, str] | None = None, config: Path = CONFIG):
        self.data_dir = data_dir
        self.config = config
        self.port = free_port()
        self.env = {
            **os.environ,
            "GATEWAYD_HTTP__PORT": str(self.port),
            "GATEWAYD_GATEWAY__DATA_DIR": str(data_dir),
            # A port nobody listens on: a broker on this machine must not receive the tests' traffic.
            "GATEWAYD_MQTT__PORT": str(free_port()),
            # Load tests send thousands of commands from one client; the limits have tests of their own.
            "GATEWAYD_HTTP__LIMITS__ENABLED": "false",
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        if "NOTIFY_SOCKET" not in (env or {}):  # a test runner under systemd must not leak its socket
            self.env.pop("NOTIFY_SOCKET", None)
            self.env.pop("WATCHDOG_USEC", None)
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.log_path = data_dir.parent / f"{data_dir.name}-daemon.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait: bool = True, timeout: float = 30.0) -> float:
        self.starts += 1
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed right after Popen
        log.write(f"--- start {self.starts}\n".encode())
        log.flush()
        started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gatewayd", "run", "--config", str(self.config)],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        log.close()
        if wait:
            self.wait_ready(timeout)
        return time.monotonic() - started

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                status, _, _ = http("GET", f"{self.url}/readyz", timeout=1)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"daemon not ready within {timeout} s:\n{self.log_tail()}")

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"daemon did not stop within {timeout} s:\n{self.log_tail()}") from None

    def wait_exit(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"daemon did not exit within {timeout} s:\n{self.log_tail()}") from None

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def post(self, body: Any, wait: float | None = None, **kw: Any) -> tuple[int, Any, dict[str, str]]:
        suffix = f"?wait={wait}" if wait is not None else ""
        return http("POST", f"{self.url}/api/v1/commands{suffix}", body, **kw)

    def get(self, path: str) -> tuple[int, Any]:
        status, body, _ = http("GET", f"{self.url}{path}")
        return status, body

    def command(self, command_id: str) -> dict[str, Any]:
        status, body = self.get(f"/api/v1/commands/{command_id}")
        assert status == 200, body
        return dict(body)

    def _record(self, command_id: str) -> dict[str, Any] | None:
        """The command's record, or None while the daemon does not know it yet (404: one sent over MQTT is on
        its way through the broker); any other answer fails the test."""
        status, body = self.get(f"/api/v1/commands/{command_id}")
        if status == 404 and body.get("error", {}).get("code") == "unknown_command":
            return None
        assert status == 200, body
        return dict(body)

    def wait_final(self, command_id: str, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        rec: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            rec = self._record(command_id)
            if rec is not None and rec["state"] in ("succeeded", "failed", "expired", "rejected", "cancelled"):
                return rec
            time.sleep(0.05)
        raise AssertionError(f"command {command_id} not final after {timeout} s: {rec or 'never known'}")

    def wait_state(self, command_id: str, state: str, timeout: float = 10.0) -> dict[str, Any]:
        """The record once it has reached ``state`` (a transition by that name, not only the current state)."""
        found: dict[str, Any] = {}

        def reached() -> bool:
            found.update(self._record(command_id) or {})
            return any(t["state"] == state for t in found.get("transitions", []))

        wait_until(reached, timeout, f"command {command_id} to reach {state}")
        return found

    def sim_log(self, device: str = "pump1") -> list[dict[str, Any]]:
        path = self.data_dir / "sim" / f"{device}.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def executions(self, command_id: str, device: str = "pump1") -> int:
        return sum(1 for entry in self.sim_log(device) if entry["id"] == command_id)

    def log_lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


@pytest.fixture
def make_daemon(tmp_path: Path) -> Iterator[Any]:
    daemons: list[Daemon] = []

    def make(env: dict[str, str] | None = None, name: str = "data", config: Path = CONFIG) -> Daemon:
        d = Daemon(tmp_path / name, env, config)
        daemons.append(d)
        return d

    yield make
    for d in daemons:
        if d.proc is not None and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()


@pytest.fixture
def daemon(make_daemon: Any) -> Daemon:
    d: Daemon = make_daemon()
    d.start()
    return d


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Any]:
    """A real Mosquitto on a free loopback port, not started: the test decides when it is up."""
    from tests.mqtt_broker import Broker  # imports this module: not at the top

    b = Broker(tmp_path / "broker")
    yield b
    b.resume() if b.proc is not None and b.proc.poll() is None else None
    b.kill9()
