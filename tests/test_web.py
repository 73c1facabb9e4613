"""The HTTP surface beyond commands: the status page, health endpoints, and the error format everywhere."""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

from tests.conftest import Daemon, http, wait_until


def test_status_page_lists_devices_and_recent_commands_escaped(make_daemon: Any) -> None:
    d: Daemon = make_daemon({"GATEWAYD_DEVICES__PUMP1__DESCRIPTION": "<script>alert(1)</script> pump"})
    d.start()
    _, rec, _ = d.post({"device": "relay1", "action": "on"}, wait=5)
    status, page, headers = http("GET", f"{d.url}/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "pump1" in page and "relay1" in page
    assert rec["id"] in page and "succeeded" in page
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "http://" not in page and "https://" not in page  # nothing from outside: works offline


def test_health_and_readiness(daemon: Daemon) -> None:
    status, body = daemon.get("/healthz")
    assert status == 200 and body["status"] == "ok" and body["healthy"] is True
    status, body = daemon.get("/readyz")
    assert status == 200 and body == {"status": "ready", "phase": "running"}


def test_not_ready_and_refusing_commands_while_draining(make_daemon: Any) -> None:
    d: Daemon = make_daemon(
        {"GATEWAYD_DEVICES__PUMP1__SIMULATOR__LATENCY_S": "1.5", "GATEWAYD_SERIAL__BUS0__RESPONSE_TIMEOUT_S": "5"}
    )
    d.start()
    d.post({"id": "long", "device": "pump1", "action": "start"})
    d.wait_state("long", "dispatched")
    d.send_signal(signal.SIGTERM)
    wait_until(lambda: d.get("/readyz")[0] == 503, 5, "/readyz to say not ready")
    status, body = d.get("/readyz")
    assert status == 503 and body["phase"] == "stopping"
    status, err, _ = d.post({"device": "relay1", "action": "on"})
    assert status == 503 and err["error"]["code"] == "shutting_down"
    assert d.wait_exit() == 0
    assert d.executions("long") == 1


def test_wait_that_runs_out_returns_the_command_as_it_stands(make_daemon: Any) -> None:
    d: Daemon = make_daemon(
        {"GATEWAYD_DEVICES__PUMP1__SIMULATOR__LATENCY_S": "1.0", "GATEWAYD_SERIAL__BUS0__RESPONSE_TIMEOUT_S": "5"}
    )
    d.start()
    started = time.monotonic()
    status, rec, _ = d.post({"device": "pump1", "action": "start"}, wait=0.3)
    assert 0.3 <= time.monotonic() - started < 1.0
    assert status == 202 and rec["state"] in ("queued", "dispatched")
    assert d.wait_final(rec["id"])["state"] == "succeeded"


def test_a_full_device_queue_refuses_normal_work_but_not_critical(make_daemon: Any) -> None:
    d: Daemon = make_daemon(
        {"GATEWAYD_DEVICES__PUMP1__SIMULATOR__LATENCY_S": "0.5", "GATEWAYD_COMMANDS__MAX_QUEUED_PER_DEVICE": "2"}
    )
    d.start()
    codes = [d.post({"device": "pump1", "action": "read"})[0] for _ in range(4)]
    assert codes[:3] == [202, 202, 202]  # one executing, two waiting
    status, err, _ = d.post({"device": "pump1", "action": "read"})
    assert status == 503 and err["error"]["code"] == "queue_full"
    status, _, _ = d.post({"device": "pump1", "action": "stop", "priority": "critical"})
    assert status == 202
    status, _, _ = d.post({"device": "relay1", "action": "on"})
    assert status == 202  # other devices are not affected
    deadline = time.monotonic() + 10  # once the queue has drained, normal work is taken again
    while d.get("/api/v1/queue")[1]["per_device"]["pump1"]["queued"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [d.post({"device": "pump1", "action": "read"})[0] for _ in range(2)] == [202, 202]


def test_wrong_method_and_concurrent_waiters(daemon: Daemon) -> None:
    status, err, headers = http("DELETE", f"{daemon.url}/api/v1/devices")
    assert status == 405 and err["error"]["code"] == "method_not_allowed" and "GET" in headers.get("Allow", "")
    # Many clients waiting on one command all get the final record.
    daemon.post({"id": "shared", "device": "pump1", "action": "read"})
    results: list[str] = []

    def waiter() -> None:
        _, again, _ = daemon.post({"id": "shared", "device": "pump1", "action": "read"}, wait=5)
        results.append(again["state"])

    threads = [threading.Thread(target=waiter) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == ["succeeded"] * 8
    assert daemon.executions("shared") == 1
