"""Disk full, on a real small filesystem (a tmpfs the test mounts; root only, as in CI): the daemon's whole data
directory lives on it, the database, its WAL and the simulators' execution logs.

1. Commands are accepted over HTTP and MQTT on a slow pump.
2. A file fills the filesystem to below the reserve ([store] min_free_bytes): new commands (HTTP, MQTT, natural
   language) are refused with ``storage_full`` (503 + Retry-After; an MQTT ``command_rejected`` event), health
   shows it, a critical command still gets in, and the accepted commands go on and their results reach the broker.
   Then the broker goes away, and the next results wait in the outbox.
3. The file takes the last free bytes: SQLite itself fails with SQLITE_FULL under the commands still running,
   and when the broker is back, the outbox cannot delete what it sent. The daemon stays up (its MQTT session
   too), answers, loses nothing, and sends nothing twice.
4. The file is deleted: the daemon recovers by itself, the held-back commands finish, new ones are accepted.
5. A start on a disk full to the last byte fails as "storage full" (exit 1, retried by systemd), not as a corrupt
   database; with room again, the restart shows that every accepted command ran exactly once and every refused
   one never ran.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon, http
from tests.mqtt_broker import GW, Broker, Subscriber, daemon_env, publish, results_by_id, wait_until

FS_SIZE = 8 * 1024 * 1024
RESERVE = 1024 * 1024
FINAL = {"succeeded", "failed", "expired", "rejected", "cancelled"}


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """The daemon's data directory on a tmpfs of FS_SIZE bytes."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs the fault suite as root)")
    mount_point = tmp_path / "data"
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={FS_SIZE},mode=0750", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], check=False)  # a process still holds a file


def fill(path: Path, leave: int) -> None:
    """Grow ``path`` until at most ``leave`` bytes are free on its filesystem (0: until ENOSPC, to the last byte)."""
    with open(path, "ab", buffering=0) as f:
        for chunk in (65536, 4096, 512, 1):
            while True:
                room = shutil.disk_usage(path.parent).free - leave
                if room <= 0:
                    return
                try:
                    f.write(b"\0" * min(chunk, room))
                except OSError:
                    break  # no room for this chunk size: try a smaller one


def storage(d: Daemon) -> dict[str, Any]:
    status, body = d.get("/api/v1/stats")
    assert status == 200, body
    return dict(body["storage"])


def pump(command_id: str, percent: int, **extra: Any) -> dict[str, Any]:
    return {"id": command_id, "device": "pump1", "action": "set_speed", "params": {"percent": percent}, **extra}


def events(sub: Subscriber, name: str) -> list[dict[str, Any]]:
    return [e for e in sub.json(f"{GW}/events") if e.get("event") == name]


def done(d: Daemon, ids: list[str]) -> int:
    return sum(d.command(c)["state"] in FINAL for c in ids)


def uplink(d: Daemon) -> dict[str, Any]:
    return dict(d.get("/api/v1/stats")[1]["uplink"])


def outbox_results(d: Daemon) -> int:
    status, body = d.get("/api/v1/outbox")
    assert status == 200, body
    return int(body["by_kind"].get("result", 0))


def log_events(d: Daemon, name: str) -> list[dict[str, Any]]:
    return [line for line in d.log_lines() if line.get("event") == name]


@pytest.mark.timeout(90)
def test_disk_full_refuses_new_work_keeps_what_was_accepted_and_recovers(
    broker: Broker, make_daemon: Any, small_fs: Path
) -> None:
    broker.start()
    env = daemon_env(
        broker,
        GATEWAYD_STORE__MIN_FREE_BYTES=str(RESERVE),
        GATEWAYD_OUTBOX__MIN_FREE_BYTES=str(2 * RESERVE),  # telemetry gives way first, as on a Pi
        # Readings are written behind: one the broker has not taken within 0.2 s is due for the outbox, and while
        # the storage is full it is dropped instead (the broker's moment away below is long enough for that).
        GATEWAYD_OUTBOX__WRITE_BEHIND_S="0.2",
        GATEWAYD_STORE__SPACE_CHECK_S="0.2",
        # Part 3 is SQLite's own writes failing at the last byte. With the WAL preallocated (the default) commits
        # overwrite it in place and go on at a full disk until a checkpoint needs room; without it each commit
        # grows the WAL and meets the wall at once, which is the path shown here.
        GATEWAYD_STORE__WAL_PREALLOCATE_FRAMES="0",
        GATEWAYD_DEVICES__PUMP1__SIMULATOR__LATENCY_S="0.6",
        GATEWAYD_SERIAL__BUS0__RESPONSE_TIMEOUT_S="3",
        GATEWAYD_MQTT__PUBACK_TIMEOUT_S="5",  # a slow PUBACK on a busy machine must not end the session here
    )
    d: Daemon = make_daemon(env)
    assert d.data_dir == small_fs
    filler = small_fs / "filler"
    with Subscriber(broker, f"{GW}/#") as sub:
        d.start(timeout=15)
        wait_until(lambda: uplink(d)["connected"], what="uplink connected")
        assert storage(d)["full"] is False

        # 1. Accepted: twelve slow commands (about 7 s of pump time) over HTTP, one over MQTT.
        accepted = [f"acc-{i}" for i in range(12)]
        for i, command_id in enumerate(accepted):
            status, body, _ = d.post(pump(command_id, 10 + i))
            assert status == 202, body
        publish(broker, f"{GW}/cmd", json.dumps(pump("acc-mqtt", 50)))
        wait_until(lambda: d.get("/api/v1/commands/acc-mqtt")[0] == 200, what="MQTT command accepted")
        accepted.append("acc-mqtt")

        # 2. Below the reserve.
        fill(filler, RESERVE // 2)
        wait_until(lambda: storage(d)["full"], timeout=5, what="storage full reported")
        status, body, headers = d.post(pump("refused-http", 20))
        assert status == 503, body
        assert body["error"]["code"] == "storage_full"
        assert "storage is full" in body["error"]["message"] and "refused" in body["error"]["message"]
        assert int(headers["Retry-After"]) >= 1
        assert body["error"]["details"]["min_free_bytes"] == RESERVE
        status, body, _ = d.post({"text": "set the pump speed to 40 percent", "id": "refused-text"})
        assert (status, body["error"]["code"]) == (503, "storage_full"), body
        publish(broker, f"{GW}/cmd", json.dumps(pump("refused-mqtt", 30)))
        sub.wait_for(lambda _m: any(e["data"]["id"] == "refused-mqtt" for e in events(sub, "command_rejected")))
        rejected = next(e for e in events(sub, "command_rejected") if e["data"]["id"] == "refused-mqtt")
        assert rejected["data"]["code"] == "storage_full" and "storage is full" in rejected["data"]["message"]
        for command_id in ("refused-http", "refused-text", "refused-mqtt"):
            assert d.get(f"/api/v1/commands/{command_id}")[0] == 404, command_id
        # Sending an accepted command again is answered from the store, not refused.
        status, body, headers = d.post(pump("acc-0", 10))
        assert status == 200 and headers.get("Idempotent-Replay") == "true", body
        # An emergency stop still gets in: critical commands may use the reserve.
        status, body, _ = d.post({"id": "crit-stop", "device": "pump1", "action": "stop", "priority": "critical"})
        assert status == 202, body
        accepted.append("crit-stop")
        # Health: alive, not ready, and why.
        status, ready, _ = http("GET", f"{d.url}/readyz")
        assert (status, ready["reason"]) == (503, "storage_full"), ready
        status, health = d.get("/healthz")
        assert status == 200 and health["storage"]["full"] is True, health
        assert health["storage"]["free_bytes"] < RESERVE
        _, metrics, _ = http("GET", f"{d.url}/metrics")
        assert "gatewayd_storage_full 1.0" in metrics
        # The accepted commands go on in the reserve, and their results reach the broker.
        wait_until(lambda: done(d, accepted) >= 3, timeout=10, what="3 done")
        first = [c for c in accepted if d.command(c)["state"] in FINAL]
        sub.wait_for(lambda _m: set(first) <= set(results_by_id(sub)), timeout=10)
        # The broker goes away for a moment: the next results wait in the outbox, in the reserve.
        broker.stop()
        # A result committed before this may have been on its way when the broker stopped: the broker can have
        # passed it on without its PUBACK reaching us, and then it is sent again (at least once). Not the others.
        before_stop = {c for c in accepted if d.command(c)["state"] in FINAL}
        wait_until(lambda: done(d, accepted) > len(before_stop), timeout=10, what="one more done")
        assert outbox_results(d) >= 1

        # 3. To the last byte: SQLite's own writes fail under the commands still running.
        fill(filler, 0)
        assert shutil.disk_usage(small_fs).free < 4096
        wait_until(lambda: storage(d)["database_full"] is not None, timeout=10, what="SQLITE_FULL seen")
        assert "database or disk is full" in storage(d)["database_full"]
        # Readings held in memory past the write-behind window must go to the disk while the broker is away, and
        # there is no room: they are dropped and counted, and nothing else stops.
        wait_until(
            lambda: 'gatewayd_telemetry_dropped_total{reason="storage_full"}' in http("GET", f"{d.url}/metrics")[1],
            timeout=10,
            what="telemetry dropped for the full disk",
        )
        # The broker is back: the waiting results are sent, but the outbox cannot delete them (a delete is a
        # write too). They are not sent again meanwhile, and the session stays up.
        broker.start()
        wait_until(lambda: log_events(d, "outbox_delete_failed"), timeout=10, what="outbox delete failing")
        connects = uplink(d)["connects"]
        time.sleep(2.0)  # the stuck state changes and deletes are retried meanwhile
        assert uplink(d)["connected"] and uplink(d)["connects"] == connects
        assert outbox_results(d) >= 1
        assert d.proc is not None and d.proc.poll() is None
        held = [c for c in accepted if d.command(c)["state"] not in FINAL]
        assert held, "every command finished before the disk was full: nothing was held back"
        status, body, _ = d.post(pump("refused-hard", 25))
        assert (status, body["error"]["code"]) == (503, "storage_full"), body
        assert http("GET", f"{d.url}/healthz")[0] == 200
        _, metrics, _ = http("GET", f"{d.url}/metrics")
        assert 'gatewayd_telemetry_dropped_total{reason="storage_full"}' in metrics

        # 4. Space returns: the daemon recovers by itself.
        filler.unlink()
        wait_until(lambda: not storage(d)["full"], timeout=10, what="storage recovered")
        assert http("GET", f"{d.url}/readyz")[0] == 200
        for command_id in accepted:
            assert d.wait_final(command_id, timeout=20)["state"] == "succeeded", command_id
        status, body, _ = d.post(pump("after-http", 60), wait=10)
        assert status == 200 and body["state"] == "succeeded", body
        publish(broker, f"{GW}/cmd", json.dumps(pump("refused-mqtt", 30)))  # the refused one, sent again
        after = [*accepted, "after-http", "refused-mqtt"]
        sub.wait_for(lambda _m: set(after) <= set(results_by_id(sub)), timeout=20)
        wait_until(lambda: outbox_results(d) == 0, timeout=10, what="outbox drained")
        results = results_by_id(sub)
    for command_id in after:
        copies = results[command_id]
        assert all(c == copies[0] for c in copies) and copies[0]["state"] == "succeeded", (command_id, copies)
        if command_id not in before_stop:  # sent once: not again while the outbox could not delete it
            assert len(copies) == 1, (command_id, copies)

    # One line per change, not per request or retry.
    assert len(log_events(d, "storage_full")) == 1
    assert len(log_events(d, "storage_recovered")) == 1
    assert len(log_events(d, "store_commit_failed")) >= 1
    assert len(log_events(d, "outbox_delete_failed")) == 1 and len(log_events(d, "outbox_delete_recovered")) == 1
    assert not log_events(d, "request_failed")
    for name in ("final_state_not_recorded", "dispatch_not_recorded"):
        ids = [line["command_id"] for line in log_events(d, name)]
        assert len(ids) == len(set(ids)), (name, ids)

    # 5. Restart: first on a disk full to the last byte, which SQLite cannot even open its WAL index on. That is
    # a failed start to be retried (exit 1, systemd restarts it), not a corrupt database to be moved aside.
    assert d.stop() == 0
    fill(filler, 0)
    d.start(wait=False)
    assert d.wait_exit(timeout=20) == 1
    failed = log_events(d, "startup_failed")
    assert [e["code"] for e in failed] == ["storage_full"], failed
    assert "not damaged" in failed[0]["error"] and "move it aside" not in failed[0]["error"]
    # With room again it starts, and nothing accepted was lost or run twice; nothing refused ever ran.
    filler.unlink()
    d.start(timeout=15)
    ran = [entry["id"] for entry in d.sim_log("pump1")]
    for command_id in after:
        assert ran.count(command_id) == 1, (command_id, ran)
        assert d.command(command_id)["state"] == "succeeded"
    for command_id in ("refused-http", "refused-text", "refused-hard"):
        assert command_id not in ran
        assert d.get(f"/api/v1/commands/{command_id}")[0] == 404
    assert d.stop() == 0
    text = d.log_path.read_text(errors="replace")
    assert "Traceback" not in text and "component_crashed" not in text
