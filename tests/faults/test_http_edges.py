"""The HTTP edges, against the real daemon over raw sockets, as a hostile client finds them: 200 slowloris sockets
(half a request, then silence; or a byte every half second) are all cut at ``header_timeout_s`` and the daemon's
file descriptors come back to where they were, while a normal request is answered at once; a flood of connections
over ``max_connections`` is refused without hurting the clients already connected; a body declared 100 GB with two
bytes sent is answered 413 at once, on each route that reads a body; and envelopes a lax parser would coerce
(``ttl_s: true``, ``"5"``, ``confirm: "yes"``, id ``"nl\\n"``) are refused 422 with the field named, and nothing is
stored or run."""

from __future__ import annotations

import json
import os
import select
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.conftest import Daemon, http, wait_until

pytestmark = pytest.mark.timeout(180)

HEADER_TIMEOUT_S = 3.0
HEADERS_DONE = b"\r\n\r\n"
TRICKLE = b"GET /api/v1/stats HTTP/1.1\r\nHost: gw\r\nX-Pad: " + b"a" * 200  # never done at a byte per 0.5 s


def open_fds(d: Daemon) -> int:
    assert d.proc is not None
    return len(os.listdir(f"/proc/{d.proc.pid}/fd"))


@dataclass
class Hostile:
    """One raw client socket, and when the server closed it (None while open)."""

    sock: socket.socket
    opened: float
    trickle: bytes = b""  # sent one byte at a time, every 0.5 s
    next_byte_at: float = 0.0
    closed_at: float | None = None
    received: bytearray = field(default_factory=bytearray)


def connect(d: Daemon, first: bytes = b"", trickle: bytes = b"") -> Hostile:
    sock = socket.create_connection(("127.0.0.1", d.port), timeout=5)
    if first:
        sock.sendall(first)
    sock.setblocking(False)
    now = time.monotonic()
    return Hostile(sock, now, trickle, now)


def pump(clients: list[Hostile], until: Any, within_s: float) -> None:
    """Drive the clients (trickle bytes when due, note when the server closes one) until ``until()`` holds."""
    deadline = time.monotonic() + within_s
    while True:
        now = time.monotonic()
        open_ = [c for c in clients if c.closed_at is None]
        for c in open_:
            if c.trickle and now >= c.next_byte_at:
                try:
                    c.sock.send(c.trickle[:1])
                except (BrokenPipeError, ConnectionResetError):
                    c.closed_at = now
                    continue
                c.trickle, c.next_byte_at = c.trickle[1:], now + 0.5
        readable, _, _ = select.select([c.sock for c in open_ if c.closed_at is None], [], [], 0.05)
        for c in open_:
            if c.sock in readable and c.closed_at is None:
                try:
                    data = c.sock.recv(65536)
                except ConnectionResetError:
                    data = b""
                if data:
                    c.received += data
                else:
                    c.closed_at = time.monotonic()
        if until():
            return
        assert now < deadline, f"still open after {within_s} s: {sum(c.closed_at is None for c in clients)} sockets"


def all_closed(clients: list[Hostile]) -> Any:
    return lambda: all(c.closed_at is not None for c in clients)


def test_200_slowloris_sockets_are_cut_at_the_header_timeout_and_their_descriptors_freed(make_daemon: Any) -> None:
    d: Daemon = make_daemon(
        {"GATEWAYD_HTTP__HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S), "GATEWAYD_HTTP__MAX_CONNECTIONS": "300"}
    )
    d.start()
    assert d.post({"device": "pump1", "action": "read"}, wait=5)[0] == 200  # everything lazily opened is open
    # The POST's own connection may still be open in the daemon when this is read (closing it is the daemon's
    # next step): the sockets held below are counted from one less.
    baseline = open_fds(d)
    clients: list[Hostile] = []
    try:
        # In batches, each taken by the daemon before the next: a burst of 200 handshakes at once overflows a listen
        # backlog, and a dropped handshake is retried a second later, after this test's clock for it has started.
        for batch in range(8):
            for i in range(25):
                if batch < 4:  # half a request, then silence
                    clients.append(connect(d, b"POST /api/v1/commands HTTP/1.1\r\nHost: gw\r\nContent-Le"[: 10 + i]))
                else:  # a byte of headers every half second: never done, each byte on time
                    clients.append(connect(d, trickle=TRICKLE))
            n = len(clients)
            wait_until(lambda n=n: open_fds(d) >= baseline - 1 + n, 5, f"the daemon to hold {n} sockets")
        connected = time.monotonic()
        during = open_fds(d)

        # While they are held, a normal client is answered at once.
        started = time.monotonic()
        status, rec, _ = d.post({"device": "pump1", "action": "read"}, timeout=5)
        post_s = time.monotonic() - started
        assert status == 202, rec
        status, _ = d.get("/healthz")
        assert status == 200
        assert post_s < 1.0, post_s
        pump(clients, lambda: True, 1)  # one look at every socket
        assert time.monotonic() - connected < HEADER_TIMEOUT_S * 0.9
        assert all(c.closed_at is None for c in clients)  # all still held: nothing cut before its time

        pump(clients, all_closed(clients), HEADER_TIMEOUT_S + 5)
        took = [c.closed_at - c.opened for c in clients if c.closed_at is not None]
        assert max(took) <= HEADER_TIMEOUT_S + 2, max(took)
        assert min(took) >= HEADER_TIMEOUT_S * 0.9, min(took)
        assert not any(c.received for c in clients)  # closed without an answer
        sent = [len(TRICKLE) - len(c.trickle) for c in clients[100:]]
        assert min(sent) >= 4, min(sent)  # they were sending up to the end: their bytes did not move the deadline
        wait_until(lambda: open_fds(d) <= baseline, 5, f"the daemon's descriptors back to {baseline}")
        after = open_fds(d)
    finally:
        for c in clients:
            c.sock.close()
    print(
        f"\nslowloris: fds baseline {baseline}, during {during}, after {after}; cut after "
        f"{min(took):.2f}-{max(took):.2f} s (header_timeout_s {HEADER_TIMEOUT_S}); a POST meanwhile took "
        f"{post_s * 1000:.0f} ms; all 200 closed {time.monotonic() - connected:.2f} s after connecting"
    )
    _, metrics, _ = http("GET", f"{d.url}/metrics")
    assert "gatewayd_http_header_timeouts_total 200.0" in metrics


def request_on(sock: socket.socket, raw: bytes, within_s: float = 5.0) -> tuple[int, bytes]:
    """One request on an open socket, and its answer's status and body (Content-Length framed)."""
    sock.setblocking(True)
    sock.settimeout(within_s)
    sock.sendall(raw)
    data = b""
    while HEADERS_DONE not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed by the server: {data!r}"
        data += chunk
    head, body = data.split(HEADERS_DONE, 1)
    length = next(
        int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "closed by the server mid-answer"
        body += chunk
    return int(head.split()[1]), body


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: gw\r\n\r\n".encode()


def test_a_connection_flood_over_the_cap_is_refused_and_the_clients_already_there_keep_working(
    make_daemon: Any,
) -> None:
    cap = 16
    d: Daemon = make_daemon({"GATEWAYD_HTTP__MAX_CONNECTIONS": str(cap), "GATEWAYD_HTTP__HEADER_TIMEOUT_S": "60"})
    d.start()
    existing = socket.create_connection(("127.0.0.1", d.port), timeout=5)
    flood: list[Hostile] = []
    try:
        assert request_on(existing, get("/api/v1/devices"))[0] == 200  # a kept-alive client, before the flood
        wait_until(lambda: b"gatewayd_http_connections 1.0" in request_on(existing, get("/metrics"))[1], 5, "it alone")
        started = time.monotonic()
        flood = [connect(d) for _ in range(cap + 100)]
        refused = flood[cap - 1 :]
        # Everything past the cap is closed at once (a 503, or reset when the answer raced the close).
        pump(flood, all_closed(refused), 5)
        refused_s = max(c.closed_at - started for c in refused if c.closed_at is not None)
        for c in refused:
            if c.received:
                head, body = bytes(c.received).split(HEADERS_DONE, 1)
                assert head.startswith(b"HTTP/1.1 503 "), head
                assert json.loads(body)["error"]["code"] == "too_many_connections"
        held = [c for c in flood if c.closed_at is None]
        assert len(held) == cap - 1  # the cap counts the client already there
        # The client already connected is untouched: its requests on the same connection are answered.
        for path in ("/api/v1/devices", "/healthz", "/api/v1/stats"):
            assert request_on(existing, get(path))[0] == 200, path
        status, body = request_on(existing, get("/metrics"))
        assert status == 200
        refused_total = next(
            float(line.split()[1])
            for line in body.decode().splitlines()
            if line.startswith("gatewayd_http_connections_refused_total ")
        )
        assert refused_total == len(refused), refused_total
        assert [e["event"] for e in d.log_lines()].count("http_connections_capped") == 1
        # Once the flood goes, new clients are taken again.
        for c in flood:
            c.sock.close()
        wait_until(lambda: _answers(d), 5, "a new connection to be answered")
        wait_until(
            lambda: "http_connections_below_cap" in [e["event"] for e in d.log_lines()], 5, "the cap's recovery log"
        )
    finally:
        existing.close()
        for c in flood:
            c.sock.close()
    print(f"\nflood: {len(refused)} connections over a cap of {cap} all closed within {refused_s * 1000:.0f} ms")


def _answers(d: Daemon) -> bool:
    try:
        return d.get("/healthz")[0] == 200
    except OSError:
        return False


FORM = "application/x-www-form-urlencoded"


@pytest.mark.parametrize(
    ("path", "ctype"), [("/api/v1/commands", "application/json"), ("/ui/command", FORM), ("/login", FORM)]
)
def test_a_body_declared_huge_with_two_bytes_sent_is_answered_413_at_once(
    make_daemon: Any, path: str, ctype: str
) -> None:
    d: Daemon = make_daemon()
    d.start()
    with socket.create_connection(("127.0.0.1", d.port), timeout=5) as sock:
        started = time.monotonic()
        status, body = request_on(
            sock,
            f"POST {path} HTTP/1.1\r\nHost: gw\r\nContent-Type: {ctype}\r\n"
            "Content-Length: 100000000000\r\n\r\nab".encode(),
            within_s=1.0,
        )
        took = time.monotonic() - started
    error = json.loads(body)["error"]
    assert status == 413 and error["code"] == "payload_too_large", (status, body)
    assert error["details"] == {"max_bytes": 65536}
    assert took < 1.0
    print(f"\n{path}: 413 after {took * 1000:.1f} ms")


COERCIBLE = [
    ({"id": "edge-ttl-true", "device": "pump1", "action": "start", "ttl_s": True}, "ttl_s", "edge-ttl-true"),
    ({"id": "edge-ttl-str", "device": "pump1", "action": "start", "ttl_s": "5"}, "ttl_s", "edge-ttl-str"),
    ({"id": "edge-yes", "device": "relay1", "action": "on", "confirm": "yes"}, "confirm", "edge-yes"),
    ({"id": "nl\n", "device": "pump1", "action": "start"}, "id", "nl"),
    ({"id": "edge-dev", "device": "pump1 ", "action": "start"}, "device", "edge-dev"),
    ({"text": "start the pump", "id": "nl\n"}, "id", "nl"),
    ({"text": "start the pump", "id": "edge-text-yes", "confirm": "yes"}, "confirm", "edge-text-yes"),
    ({"text": "start the pump", "id": "edge-text-ttl", "ttl_s": True}, "ttl_s", "edge-text-ttl"),
]


def test_values_a_lax_parser_would_coerce_are_refused_422_and_nothing_is_stored_or_run(make_daemon: Any) -> None:
    d: Daemon = make_daemon()
    d.start()
    status, stats = d.get("/api/v1/stats")
    counts = stats["commands"]
    sim = {device: d.sim_log(device) for device in ("pump1", "relay1")}
    for body, field_name, stored_as in COERCIBLE:
        status, answer, _ = d.post(body)
        assert status == 422, (body, status, answer)
        error = answer["error"]
        assert error["code"] == "validation_failed", (body, error)
        assert [e["field"] for e in error["details"]["errors"]] == [field_name], (body, error)
        assert d.get(f"/api/v1/commands/{stored_as}")[0] == 404, body  # nothing stored, under either id
    assert d.get("/api/v1/stats")[1]["commands"] == counts
    assert {device: d.sim_log(device) for device in sim} == sim  # nothing ran
    # The same commands, sent as they should be, are taken.
    status, rec, _ = d.post({"id": "nl", "device": "pump1", "action": "read", "ttl_s": 5}, wait=5)
    assert status == 200 and rec["state"] == "succeeded" and rec["ttl_s"] == 5
