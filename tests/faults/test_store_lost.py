"""The database lost under the running daemon: deleted while commands arrive over HTTP, replaced by another file
(``mv other.sqlite3 gatewayd.sqlite3``), on a filesystem that turns read-only after a disk error.

Each time: /healthz and /readyz answer 503 with the reason within ``space_check_s`` (even with no command arriving),
sd_notify STATUS says STORE LOST, every POST after is 503 ``store_lost``, and no command gets a 202 unless it is
known and final after a restart. The deleted file is kept reachable by a hard link the test takes first: it stands
for the file the gateway had, so that "known after a restart" can be checked at all (without it, everything the
file held goes with it, whatever the gateway does). The watchdog stops being fed when a restart helps (deleted,
replaced) and goes on when it cannot (read-only); the replaced file survives the kill that follows.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon, http, wait_until
from tests.loopfs import ext4
from tests.test_sdnotify import NotifySocket

CHECK_S = 0.2  # [store] space_check_s: how often the watch looks at the file
FINAL = {"succeeded", "failed", "expired", "rejected", "cancelled"}


@dataclass
class Sent:
    id: str
    started: float  # monotonic, when the request was sent
    status: int
    code: str | None
    maybe_stored: bool = False  # refused while its commit was under way: "may have been stored"


class Load:
    """Commands to pump1 over HTTP from a thread, one after another, each remembered with its answer."""

    def __init__(self, d: Daemon, tag: str):
        self.d = d
        self.tag = tag
        self.sent: list[Sent] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            command_id = f"{self.tag}-{i}"
            action = {"action": "read"} if i % 2 else {"action": "set_speed", "params": {"percent": i % 100}}
            started = time.monotonic()
            status, body, _ = self.d.post({"id": command_id, "device": "pump1", **action})
            error = body["error"] if status >= 400 and isinstance(body, dict) else {}
            maybe = error.get("details", {}).get("stored") == "unknown"
            self.sent.append(Sent(command_id, started, status, error.get("code"), maybe))
            i += 1
            self._stop.wait(0.02)  # pacing, not waiting for anything: about the pace pump1's bus keeps up with

    def acknowledged(self) -> list[str]:
        return [s.id for s in self.sent if s.status in (200, 202)]

    def refused(self) -> list[str]:
        return [s.id for s in self.sent if s.code == "store_lost" and not s.maybe_stored]

    def maybe_stored(self) -> list[str]:
        return [s.id for s in self.sent if s.maybe_stored]


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    ns = NotifySocket(tmp_path / "notify.sock")
    yield ns
    ns.close()


def _env(notify: NotifySocket) -> dict[str, str]:
    return {
        "GATEWAYD_STORE__SPACE_CHECK_S": str(CHECK_S),
        "NOTIFY_SOCKET": str(notify.path),
        "WATCHDOG_USEC": "400000",  # fed every 0.2 s while healthy
        "GATEWAYD_SHUTDOWN__GRACE_S": "1",  # a command executing when the store went cannot record its end
    }


def _lost(d: Daemon) -> dict[str, Any] | None:
    status, body, _ = http("GET", f"{d.url}/healthz")
    if status == 200:
        return None
    assert status == 503 and body["reason"] == "store_lost", body
    return dict(body)


def _check_refusing(d: Daemon, notify: NotifySocket, reason: str, says: str) -> dict[str, Any]:
    """Everything a technician or a client sees once the store is lost."""
    health = _lost(d)
    assert health is not None
    assert health["status"] == "unhealthy" and health["healthy"] is False
    assert health["store"]["lost"]["reason"] == reason and says in health["message"], health
    status, ready, _ = http("GET", f"{d.url}/readyz")
    assert (status, ready["status"], ready["reason"]) == (503, "not_ready", "store_lost"), ready
    assert says in ready["message"]
    status, body, _ = d.post({"id": "after-lost", "device": "pump1", "action": "read"})
    assert (status, body["error"]["code"]) == (503, "store_lost"), body
    assert says in body["error"]["message"] and "restart" in body["error"]["message"]
    status, body, _ = d.post({"id": "after-lost-stop", "device": "pump1", "action": "stop", "priority": "critical"})
    assert (status, body["error"]["code"]) == (503, "store_lost"), body  # nothing at all can be kept
    _, metrics, _ = http("GET", f"{d.url}/metrics")
    assert "gatewayd_store_lost 1.0" in metrics
    label = f"STORE LOST ({reason.replace('_', ' ')}"
    wait_until(lambda: any(label in f for f in notify.fields()), 5, f"STATUS with {label}: {notify.fields()[-3:]}")
    return health


def _one_line_each(d: Daemon) -> None:
    lines = d.log_lines()
    assert len([e for e in lines if e.get("event") == "store_lost"]) == 1
    assert not [e for e in lines if e.get("event") == "request_failed" and e.get("code") == "store_lost"]


def _feeds_after(notify: NotifySocket, t: float) -> int:
    return len([x for x in notify.times("WATCHDOG=1") if x > t])


def _known_and_final(d: Daemon, acknowledged: list[str], refused: list[str], maybe: Sequence[str] = ()) -> None:
    """After the restart: every command that got a 202 is there and finishes; every refused one is unknown and
    never ran; one refused as "may have been stored" (its commit was under way) is either unknown or runs once."""
    for command_id in acknowledged:
        assert d.wait_final(command_id, timeout=60)["state"] in FINAL, command_id
        assert d.executions(command_id) <= 1, command_id
    for command_id in maybe:
        if d.get(f"/api/v1/commands/{command_id}")[0] != 404:
            assert d.wait_final(command_id, timeout=60)["state"] in FINAL, command_id
        assert d.executions(command_id) <= 1, command_id
    ran = {entry["id"] for entry in d.sim_log("pump1")}
    for command_id in [*refused, "after-lost", "after-lost-stop"]:
        assert d.get(f"/api/v1/commands/{command_id}")[0] == 404, command_id
        assert command_id not in ran, command_id


@pytest.mark.timeout(120)
def test_database_deleted_while_commands_arrive(make_daemon: Any, notify: NotifySocket, tmp_path: Path) -> None:
    # A slow pump: commands arrive faster than it takes them, so acknowledged ones are still queued at the deletion.
    d: Daemon = make_daemon({**_env(notify), "GATEWAYD_DEVICES__PUMP1__SIMULATOR__LATENCY_S": "0.05"})
    d.start(timeout=15)
    db = d.data_dir / "gatewayd.sqlite3"
    kept = tmp_path / "kept.sqlite3"
    with Load(d, "del") as load:
        wait_until(lambda: len(load.acknowledged()) >= 20, 20, "20 commands acknowledged")
        queued = [c for c in load.acknowledged() if d.command(c)["state"] == "queued"]
        os.link(db, kept)
        db.unlink()
        unlinked = time.monotonic()
        wait_until(lambda: len([s for s in load.sent if s.started > unlinked]) >= 10, 20, "10 sent after")
    # Not one command sent after the deletion is acknowledged (before: every one of them got a 202).
    after = [s for s in load.sent if s.started > unlinked]
    assert all((s.status, s.code) == (503, "store_lost") for s in after), [s for s in after if s.status != 503]
    health = _check_refusing(d, notify, "deleted", f"the database file {db} was deleted")
    assert "to open a new, empty one" in health["message"]
    # A restart opens a new database: the watchdog is no longer fed, so systemd restarts the daemon.
    lost_at = time.monotonic()
    time.sleep(1.0)  # an absence needs a window: five watchdog intervals
    assert _feeds_after(notify, lost_at) == 0, notify.fields()[-5:]
    _one_line_each(d)

    assert d.stop() == 0
    os.replace(kept, db)  # the deleted file back: nothing the gateway acknowledged may be missing from it
    d.start(timeout=15)
    _known_and_final(d, load.acknowledged(), load.refused(), load.maybe_stored())
    assert queued, "nothing was waiting at the deletion: the restart shows less than it should"
    for command_id in queued:
        assert d.executions(command_id) == 1, command_id  # held back while lost, run after the restart
    assert d.stop() == 0


@pytest.mark.timeout(120)
def test_database_replaced_by_another_file(make_daemon: Any, notify: NotifySocket, tmp_path: Path) -> None:
    """``mv other.sqlite3 gatewayd.sqlite3`` (a backup put back while the daemon runs), with no command arriving:
    the watch finds it. The daemon is then killed, as the watchdog would; the next start opens the replacement
    intact, not with the old daemon's WAL replayed into it."""
    d: Daemon = make_daemon(_env(notify))
    d.start(timeout=15)
    db = d.data_dir / "gatewayd.sqlite3"
    with Load(d, "rep") as load:
        wait_until(lambda: len(load.acknowledged()) >= 20, 20, "20 commands acknowledged")
    for command_id in load.acknowledged():
        d.wait_final(command_id, timeout=30)
    assert Path(f"{db}-wal").stat().st_size > 0  # the daemon's WAL holds pages: what a kill would leave behind
    backup = tmp_path / "backup.sqlite3"
    with sqlite3.connect(db) as src, sqlite3.connect(backup) as dst:
        src.backup(dst)  # a consistent copy: everything acknowledged so far
    os.replace(backup, db)
    replaced = time.monotonic()
    wait_until(lambda: _lost(d) is not None, 5, "/healthz 503 store_lost")
    found_after = time.monotonic() - replaced
    assert found_after < CHECK_S + 2.0, found_after
    health = _check_refusing(d, notify, "replaced", f"the database file {db} was replaced by another file")
    assert "inode" in health["store"]["lost"]["evidence"]
    wait_until(lambda: Path(f"{db}-wal").stat().st_size == 0, 5, "the old WAL truncated")
    lost_at = time.monotonic()
    time.sleep(1.0)  # an absence needs a window: five watchdog intervals
    assert _feeds_after(notify, lost_at) == 0
    _one_line_each(d)

    d.kill9()  # what the watchdog's SIGABRT does: no clean close
    d.start(timeout=15)  # StoreCorrupt (exit 2) if the old WAL were replayed into the replacement
    _known_and_final(d, load.acknowledged(), load.refused(), load.maybe_stored())
    assert http("GET", f"{d.url}/healthz")[0] == 200
    assert d.stop() == 0


@pytest.mark.timeout(120)
def test_filesystem_turned_read_only(make_daemon: Any, notify: NotifySocket, tmp_path: Path) -> None:
    """ext4 after a disk error (errors=remount-ro): writes fail with EROFS. The daemon stays up and says so, and
    keeps feeding the watchdog: a restart could not open the database there."""
    with ext4(tmp_path / "data") as fs:
        small = {"GATEWAYD_STORE__MIN_FREE_BYTES": str(1 << 20), "GATEWAYD_OUTBOX__MIN_FREE_BYTES": str(2 << 20)}
        d: Daemon = make_daemon({**_env(notify), **small})
        assert d.data_dir == fs.path
        d.start(timeout=15)
        db = d.data_dir / "gatewayd.sqlite3"
        with Load(d, "ro") as load:
            wait_until(lambda: len(load.acknowledged()) >= 20, 20, "20 commands acknowledged")
            fs.fail()
            failed = time.monotonic()
            wait_until(lambda: _lost(d) is not None, 5, "/healthz 503 store_lost")
            found_after = time.monotonic() - failed
            wait_until(lambda: len(load.refused()) >= 10, 20, "10 commands refused")
        assert found_after < CHECK_S + 2.0, found_after
        health = _check_refusing(d, notify, "read_only", f"the filesystem holding {db} turned read-only")
        assert "dmesg" in health["message"] and "Read-only file system" in health["store"]["lost"]["evidence"]
        lost_at = time.monotonic()
        wait_until(lambda: _feeds_after(notify, lost_at) >= 3, 5, "the watchdog still fed")
        _one_line_each(d)

        d.stop()
        fs.remount()  # the technician's fix
        d.start(timeout=15)
        _known_and_final(d, load.acknowledged(), load.refused(), load.maybe_stored())
        assert d.stop() == 0


def test_the_daemon_stops_cleanly_on_sigterm_with_the_store_lost(make_daemon: Any, notify: NotifySocket) -> None:
    d: Daemon = make_daemon(_env(notify))
    d.start(timeout=15)
    (d.data_dir / "gatewayd.sqlite3").unlink()
    wait_until(lambda: _lost(d) is not None, 5, "/healthz 503 store_lost")
    d.send_signal(signal.SIGTERM)
    assert d.wait_exit(timeout=20) == 0
    text = d.log_path.read_text(errors="replace")
    assert "Traceback" not in text and "component_crashed" not in text
