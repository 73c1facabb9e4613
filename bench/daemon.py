"""The real daemon as the benchmarks run it, and what /proc and its log say of it. Imported by command_path.py,
footprint.py and soak.py (their own directory is on ``sys.path``). Linux only (/proc, prctl)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import aiohttp
from report import BenchError

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "config.toml"
STOP_TIMEOUT_S = 30.0  # systemd/gatewayd.service's TimeoutStopSec
LOG_TAIL_LINES = 40


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- /proc readings ------------------------------------------------------------------------------------------------


def _proc_field(pid: int, file: str, key: str) -> str:
    """What follows ``key:`` in /proc/<pid>/<file> (status, smaps_rollup: one ``Key: value`` a line)."""
    for line in Path(f"/proc/{pid}/{file}").read_text(encoding="ascii").splitlines():
        name, _, value = line.partition(":")
        if name == key:
            return value
    raise BenchError(f"/proc/{pid}/{file} has no {key}")


def proc_status_mib(pid: int, key: str) -> float:
    """A ``VmXxx`` line of /proc/<pid>/status (reported in kB) in MiB."""
    return int(_proc_field(pid, "status", key).split()[0]) / 1024


def proc_threads(pid: int) -> int:
    return int(_proc_field(pid, "status", "Threads"))


def proc_pss_mib(pid: int) -> float:
    """Proportional set size: private pages plus a share of those mapped by other processes too (libraries)."""
    return int(_proc_field(pid, "smaps_rollup", "Pss").split()[0]) / 1024


def proc_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def proc_write_bytes(pid: int | str = "self") -> int:
    """Bytes a process has caused to be written to storage (``write_bytes`` of ``/proc/<pid>/io``)."""
    for line in Path(f"/proc/{pid}/io").read_text(encoding="ascii").splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise RuntimeError(f"no write_bytes in /proc/{pid}/io")


def proc_cpu_s(pid: int) -> float:
    """User plus system CPU time of a process, in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    fields = stat.rsplit(")", 1)[1].split()  # the command name may contain spaces; fields[0] is field 3 (state)
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


# --- the daemon ----------------------------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child before exec: the kernel kills the daemon if the benchmark dies without cleaning up."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def knows(root: Path, section_field: str) -> bool:
    """Whether the config models of the tree at ``root`` have a field of that name: an override a baseline commit
    does not know would stop its daemon at start (unknown keys are refused)."""
    return f"    {section_field}:" in (root / "gatewayd" / "config" / "models.py").read_text(encoding="utf-8")


class Daemon:
    """One ``python -m gatewayd run --config config.toml`` with its own data directory and loopback HTTP port, never
    outliving the ``async with``. ``env`` adds the run's overrides (``GATEWAYD_SECTION__KEY``, ``NOTIFY_SOCKET``) to
    the ones every run needs; ``stop_timeout_s`` is how long ``stop()`` waits for the exit after SIGTERM."""

    def __init__(
        self,
        workdir: Path,
        env: Mapping[str, str] | None = None,
        stop_timeout_s: float = STOP_TIMEOUT_S,
        root: Path = ROOT,
        config: Path | None = None,
    ):
        self.root = root  # the source tree the daemon runs from: this one, or an earlier commit's (a baseline)
        self.config = config or root / "config.toml"  # the tree's bundled config unless a benchmark brings its own
        self.data_dir = workdir / "data"
        self.log_path = workdir / "daemon.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_env = dict(env or {})
        self.stop_timeout_s = stop_timeout_s
        self.proc: asyncio.subprocess.Process | None = None
        self.spawned_mono = 0.0  # monotonic time just before the process was spawned

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def environment(self) -> dict[str, str]:
        # Only this run's overrides: inherited GATEWAYD_* variables or a systemd socket would change what is measured.
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("GATEWAYD_") and k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
        }
        env.update(
            {
                "GATEWAYD_HTTP__HOST": "127.0.0.1",
                "GATEWAYD_HTTP__PORT": str(self.port),
                "GATEWAYD_GATEWAY__DATA_DIR": str(self.data_dir),
                "PYTHONPATH": os.pathsep.join(p for p in (str(self.root), env.get("PYTHONPATH", "")) if p),
            }
        )
        env.update(self.extra_env)
        return env

    async def __aenter__(self) -> Daemon:
        with self.log_path.open("wb") as log:
            self.spawned_mono = time.monotonic()
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "gatewayd",
                "run",
                "--config",
                str(self.config),
                cwd=self.root,
                env=self.environment(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches the benchmark only; it stops the daemon itself
                preexec_fn=_die_with_parent,
            )
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    async def wait_ready(self, session: aiohttp.ClientSession, timeout_s: float) -> float:
        """Seconds from the spawn until /readyz answers 200."""
        assert self.proc is not None
        deadline = self.spawned_mono + timeout_s
        while True:
            if self.proc.returncode is not None:
                raise BenchError(f"the daemon exited with code {self.proc.returncode} before it was ready")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(f"{self.url}/readyz", timeout=aiohttp.ClientTimeout(total=1.0)) as resp:
                    if resp.status == 200:
                        return time.monotonic() - self.spawned_mono
            if time.monotonic() >= deadline:
                raise BenchError(f"the daemon did not answer 200 on /readyz within {timeout_s:g} s")
            await asyncio.sleep(0.01)

    async def stop(self) -> tuple[int, float]:
        """SIGTERM; the exit code and the seconds it took. BenchError if it does not exit within stop_timeout_s."""
        assert self.proc is not None
        sent = time.monotonic()
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(self.proc.wait(), self.stop_timeout_s)
        except TimeoutError:
            raise BenchError(f"the daemon did not exit within {self.stop_timeout_s:g} s of SIGTERM") from None
        return code, time.monotonic() - sent

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError as err:
            return f"(no daemon log: {err})"
        return "\n".join(f"    | {line}" for line in text.splitlines()[-lines:]) or "    | (empty)"


# --- the daemon's log ----------------------------------------------------------------------------------------------


@dataclass
class LogScan:
    warnings: int = 0
    errors: int = 0
    not_json: int = 0
    events: Counter[str] = field(default_factory=Counter)  # "level event" -> count, warning and above only


def scan_log(path: Path) -> LogScan:
    scan = LogScan()
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            level = str(entry.get("level", "")).lower()
            event = str(entry.get("event", "?"))
        except (ValueError, AttributeError):
            scan.not_json += 1
            scan.events[f"stderr {line.strip()[:100]}"] += 1
            continue
        if level == "warning":
            scan.warnings += 1
        elif level in ("error", "critical", "exception"):
            scan.errors += 1
        else:
            continue
        scan.events[f"{level} {event}"] += 1
    return scan
