"""The page's live side on the real daemon, without a browser: the event stream, the hour's history, and a prompt
stop while streams are open."""

from __future__ import annotations

import http.client
import json
import signal
import time
from typing import Any

from tests.conftest import Daemon

FAST = {"GATEWAYD_HTTP__HISTORY_INTERVAL_S": "0.2", "GATEWAYD_HTTP__LIVE_INTERVAL_S": "0.2"}


class Stream:
    """A server-sent event stream read with the standard library."""

    def __init__(self, d: Daemon, timeout: float = 5.0):
        self.conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=timeout)
        self.conn.request("GET", "/api/v1/events/stream", headers={"Accept": "text/event-stream"})
        self.resp = self.conn.getresponse()
        assert self.resp.status == 200 and self.resp.headers["Content-Type"] == "text/event-stream"

    def next(self, deadline: float) -> tuple[str, Any] | None:
        """The next event (name, data), or None when the stream ends."""
        event, data = "", ""
        while time.monotonic() < deadline:
            line = self.resp.fp.readline()
            if not line:
                return None
            text = line.decode().rstrip("\n")
            if text.startswith("event: "):
                event = text[7:]
            elif text.startswith("data: "):
                data = text[6:]
            elif text == "" and event:
                return event, json.loads(data)
        raise AssertionError("no event in time")

    def until(self, wanted: str, timeout: float = 5.0, match: Any = None) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            got = self.next(deadline)
            assert got is not None, f"the stream ended before a {wanted} event"
            if got[0] == wanted and (match is None or match(got[1])):
                return got[1]

    def close(self) -> None:
        self.conn.close()


def test_the_stream_starts_with_the_state_then_pushes_results_and_samples(make_daemon: Any) -> None:
    d: Daemon = make_daemon(FAST)
    d.start()
    stream = Stream(d)
    try:
        first = stream.until("status", timeout=2)
        assert first["status"]["phase"] == "running"
        assert {x["name"] for x in first["devices"]} == {"pump1", "sensor1", "relay1", "meter1", "relays1"}
        status, _, _ = d.post({"id": "live-1", "device": "relay1", "action": "on"})
        assert status == 202
        done = stream.until("command", match=lambda c: c["id"] == "live-1")
        assert done["state"] == "succeeded" and done["result"] == {"state": "on"}
        sample = stream.until("history", match=lambda s: s["finished"] >= 1)
        assert sample["latency_p50_ms"] is not None and sample["failed"] == 0
        later = stream.until("status", match=lambda s: s["commands_accepted"] >= 1)
        relay = next(x for x in later["devices"] if x["name"] == "relay1")
        assert relay["state"] == {"state": "on"} and relay["last_seen"] is not None
    finally:
        stream.close()
    status, history = d.get("/api/v1/history")
    assert status == 200 and history["interval_s"] == 0.2
    assert sum(s["finished"] for s in history["samples"]) == 1 and history["error_rate"]["rate"] == 0.0


def test_open_streams_do_not_hold_up_a_stop(make_daemon: Any) -> None:
    d: Daemon = make_daemon(FAST)
    d.start()
    streams = [Stream(d, timeout=10) for _ in range(3)]
    for s in streams:
        s.until("status", timeout=2)
    started = time.monotonic()
    d.send_signal(signal.SIGTERM)
    for s in streams:
        deadline = time.monotonic() + 5
        while s.next(deadline) is not None:  # events already on their way, then the end of the stream
            pass
        s.close()
    assert d.wait_exit(timeout=5) == 0
    assert time.monotonic() - started < 2.0  # not the HTTP server's 2 s grace for open connections
