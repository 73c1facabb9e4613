"""The HTTP edges a hostile or sloppy client finds, tested in-process and fast: what the command envelope refuses
instead of coercing (true as 1 second, "yes" as confirmation, an id trimmed of its newline), and the server's own
limits on a real socket (a deadline for request headers, a cap on connections, a declared body over the limit
refused before it is read). tests/faults/test_http_edges.py drives the real daemon the same way, at volume."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from gatewayd.commands.validate import parse_request
from gatewayd.config.models import HttpSection
from gatewayd.errors import ValidationFailed
from gatewayd.interpret.service import parse_text_request
from gatewayd.web.connections import HTTP_CONNECTIONS_REFUSED, HTTP_HEADER_TIMEOUTS, Connections, listen
from gatewayd.web.console import Console
from gatewayd.web.server import WebContext, build_app

COMMAND = {"device": "pump1", "action": "read"}


def refused_fields(parse: Any, payload: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ValidationFailed) as caught:
        parse(payload)
    return {e["field"]: e["message"] for e in caught.value.details["errors"]}


@pytest.mark.parametrize(
    ("value", "quoted"), [(True, "true"), (False, "false"), ("5", '"5"'), ("1e3", '"1e3"'), ([5], "[5]")]
)
def test_ttl_s_must_be_a_json_number_not_a_boolean_or_a_string(value: Any, quoted: str) -> None:
    errors = refused_fields(parse_request, {**COMMAND, "ttl_s": value})
    assert errors == {"ttl_s": f"must be a number of seconds, not {quoted}"}
    assert [parse_request({**COMMAND, "ttl_s": n}).ttl_s for n in (5, 0.25)] == [5.0, 0.25]  # numbers still are


@pytest.mark.parametrize("value", ["yes", "true", "on", 1, 0, None])
def test_confirm_must_be_the_literal_true_or_false(value: Any) -> None:
    errors = refused_fields(parse_request, {**COMMAND, "confirm": value})
    assert list(errors) == ["confirm"] and errors["confirm"].startswith("must be true or false, not ")
    assert [parse_request({**COMMAND, "confirm": b}).confirm for b in (True, False)] == [True, False]


@pytest.mark.parametrize("value", ["nl\n", " nl", "nl ", "\tnl", "nl\r\n", "n l"])
def test_an_id_is_taken_exactly_as_sent_or_refused(value: Any) -> None:
    errors = refused_fields(parse_request, {**COMMAND, "id": value})
    assert list(errors) == ["id"] and "exactly as sent" in errors["id"]
    assert parse_request({**COMMAND, "id": "a.b_c:d-1"}).id == "a.b_c:d-1"


@pytest.mark.parametrize("field", ["device", "action"])
@pytest.mark.parametrize("value", ["pump1 ", " pump1", "pump1\n", "\u00a0pump1", 1])
def test_a_name_is_a_string_without_whitespace_around_it(field: str, value: Any) -> None:
    errors = refused_fields(parse_request, {**COMMAND, field: value})
    if value == 1:
        assert errors == {field: "must be a string, not 1"}
    else:
        assert errors == {field: f"must not begin or end with whitespace, got {json.dumps(value)}"}


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"id": "nl\n"}, "id"),
        ({"confirm": "yes"}, "confirm"),
        ({"confirm": 1}, "confirm"),
        ({"ttl_s": True}, "ttl_s"),
        ({"ttl_s": "5"}, "ttl_s"),
    ],
)
def test_natural_language_requests_follow_the_same_rules(extra: dict[str, Any], field: str) -> None:
    errors = refused_fields(lambda p: parse_text_request(p, 500), {"text": "read the pump", **extra})
    assert list(errors) == [field], errors
    # The words and the user's name are still trimmed: prose, and a rate-limit key.
    request = parse_text_request({"text": " read the pump\n", "user": " alice ", "id": "nl", "confirm": True}, 500)
    assert (request.text, request.user, request.id, request.confirm) == ("read the pump", "alice", "nl", True)


# --- the server, on a real socket --------------------------------------------------------------------------------

HEADERS_DONE = b"\r\n\r\n"


@contextlib.asynccontextmanager
async def serving(*, max_connections: int = 64, header_timeout_s: float = 30.0) -> AsyncIterator[Server]:
    """The daemon's HTTP application (every middleware, the console's routes) behind the daemon's listener, with
    no command service: these requests are answered, or refused, before one would be needed. ``GET /slow``
    answers after a second."""
    connections = Connections(max_connections=max_connections, header_timeout_s=header_timeout_s)
    ctx = WebContext(None, None, dict, 1.0)  # type: ignore[arg-type]
    console = Console(HttpSection(), service=None, status=dict, devices=list)  # type: ignore[arg-type]
    app = build_app(ctx, LIMIT, None, console, connections)

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(1.0)
        return web.json_response({"slow": True})

    app.router.add_get("/slow", slow)
    # A short shutdown: a refused body is still being drained by aiohttp (its lingering_time) after the client left.
    runner = web.AppRunner(app, access_log=None, handle_signals=False, auto_decompress=False, shutdown_timeout=0.5)
    await runner.setup()
    assert runner.server is not None
    listener = await listen(connections, runner.server, "127.0.0.1", 0)
    srv = Server(int(listener.sockets[0].getsockname()[1]), connections)
    try:
        yield srv
    finally:
        for writer in srv.clients:
            writer.transport.abort()
        listener.close()
        await runner.cleanup()


LIMIT = 65536


@dataclasses.dataclass
class Server:
    port: int
    connections: Connections
    clients: list[asyncio.StreamWriter] = dataclasses.field(default_factory=list)

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A client connection, aborted when the server stops if the test has not closed it."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.clients.append(writer)
        return reader, writer


async def read_answer(reader: asyncio.StreamReader, within_s: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    async with asyncio.timeout(within_s):
        head = await reader.readuntil(HEADERS_DONE)
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(lines[0].split()[1]), headers, body


async def closed_by_server(reader: asyncio.StreamReader, within_s: float) -> bytes:
    """What the server sent before it closed the connection (b"" for nothing); fails if it is still open after
    ``within_s``."""
    try:
        async with asyncio.timeout(within_s):
            return await reader.read()
    except ConnectionResetError:
        return b""


def close(writer: asyncio.StreamWriter) -> None:
    writer.transport.abort()


GET = b"GET /api/v1/openapi.json HTTP/1.1\r\nHost: gw\r\n\r\n"


async def test_a_client_that_never_completes_its_headers_is_disconnected_at_the_deadline() -> None:
    timeout_s = 0.5
    before = HTTP_HEADER_TIMEOUTS._value.get()
    async with serving(header_timeout_s=timeout_s) as srv:
        loop = asyncio.get_running_loop()
        started = loop.time()
        silent = await srv.connect()  # connects, sends nothing
        partial = await srv.connect()  # half a request line, then nothing
        partial[1].write(b"GET /api/v1/openapi.json HT")
        trickle = await srv.connect()  # slowloris: a byte of headers every 0.1 s, for ever
        sent = 0

        async def trickling() -> None:
            nonlocal sent
            for byte in (GET[:-2] + b"X-Pad: " + b"a" * 1000).decode():
                trickle[1].write(byte.encode())
                sent += 1
                await asyncio.sleep(0.1)

        feeder = asyncio.create_task(trickling())
        try:
            for reader, _ in (silent, partial, trickle):
                assert await closed_by_server(reader, timeout_s + 1.5) == b""  # no answer: just closed
            took = loop.time() - started
        finally:
            feeder.cancel()
            for _, writer in (silent, partial, trickle):
                close(writer)
        assert timeout_s * 0.9 <= took < timeout_s + 1.5, took
        assert sent >= 4  # it kept sending, and each byte did not move the deadline
        assert HTTP_HEADER_TIMEOUTS._value.get() - before == 3
        await wait_for(lambda: srv.connections.open == 0, 2.0)


async def test_a_kept_alive_connection_has_the_same_deadline_for_its_next_request() -> None:
    timeout_s = 0.5
    async with serving(header_timeout_s=timeout_s) as srv:
        loop = asyncio.get_running_loop()
        stalls, idle = await srv.connect(), await srv.connect()
        for _ in range(4):  # requests one after another, each well within the deadline: all answered
            for reader, writer in (stalls, idle):
                writer.write(GET)
                status, headers, _ = await read_answer(reader)
                assert status == 200 and headers.get("connection", "").lower() != "close"
            await asyncio.sleep(timeout_s / 2)  # four rounds: longer in all than one deadline
        answered = loop.time()
        stalls[1].write(b"GET /api/v1/openapi.json HTTP/1.1\r\nHo")  # the next request starts, then stalls
        for reader, writer in (stalls, idle):
            assert await closed_by_server(reader, timeout_s + 1.5) == b""
            close(writer)
        assert loop.time() - answered < timeout_s + 1.5
        await wait_for(lambda: srv.connections.open == 0, 2.0)


async def test_a_request_being_handled_is_not_cut_by_the_header_deadline() -> None:
    async with serving(header_timeout_s=0.3) as srv:  # /slow takes a second: over three deadlines
        reader, writer = await srv.connect()
        writer.write(b"GET /slow HTTP/1.1\r\nHost: gw\r\n\r\n")
        status, _, body = await read_answer(reader)
        assert (status, json.loads(body)) == (200, {"slow": True})
        close(writer)


async def test_connections_over_the_cap_are_refused_at_once_and_the_open_ones_keep_working() -> None:
    before = HTTP_CONNECTIONS_REFUSED._value.get()
    async with serving(max_connections=4) as srv:
        held = [await srv.connect() for _ in range(4)]
        for reader, writer in held:
            writer.write(GET)
            assert (await read_answer(reader))[0] == 200
        assert srv.connections.open == 4
        flood = [await srv.connect() for _ in range(20)]
        for reader, writer in flood:
            answer = await closed_by_server(reader, 2.0)  # a 503 and closed, or (the request unread) reset
            if answer:
                head, body = answer.split(HEADERS_DONE, 1)
                assert head.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1" in head
                assert json.loads(body)["error"]["code"] == "too_many_connections"
            close(writer)
        assert HTTP_CONNECTIONS_REFUSED._value.get() - before == 20
        for reader, writer in held:  # the connections already open are untouched
            writer.write(GET)
            assert (await read_answer(reader))[0] == 200
        close(held.pop()[1])
        await wait_for(lambda: srv.connections.open == 3, 2.0)
        reader, writer = await srv.connect()  # room again: taken
        writer.write(GET)
        assert (await read_answer(reader))[0] == 200
        close(writer)
        for _, writer in held:
            close(writer)


BODY_ROUTES = ["/api/v1/commands", "/ui/command", "/login", "/logout", "/api/v1/admin/reset", "/nowhere"]


@pytest.mark.parametrize("path", BODY_ROUTES)
async def test_a_declared_body_over_the_limit_is_refused_413_before_it_is_read(path: str) -> None:
    async with serving() as srv:
        reader, writer = await srv.connect()
        loop = asyncio.get_running_loop()
        started = loop.time()
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            "Content-Length: 100000000000\r\n\r\nab".encode()
        )
        status, headers, body = await read_answer(reader, within_s=1.0)
        assert loop.time() - started < 1.0
        assert status == 413 and headers["connection"].lower() == "close"
        error = json.loads(body)["error"]
        assert error["code"] == "payload_too_large" and error["details"] == {"max_bytes": LIMIT}
        close(writer)


@pytest.mark.parametrize(
    ("path", "ctype"), [("/api/v1/commands", "application/json"), ("/ui/command", "application/x-www-form-urlencoded")]
)
async def test_a_chunked_body_that_grows_past_the_limit_is_refused_413(path: str, ctype: str) -> None:
    async with serving() as srv:
        reader, writer = await srv.connect()
        head = f"POST {path} HTTP/1.1\r\nHost: gw\r\nContent-Type: {ctype}\r\nTransfer-Encoding: chunked\r\n\r\n"
        writer.write(head.encode())
        chunk = b"a" * 8192
        for _ in range(LIMIT // len(chunk) + 2):
            writer.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        status, _, body = await read_answer(reader)
        error = json.loads(body)["error"]
        assert status == 413 and error["code"] == "payload_too_large" and error["details"] == {"max_bytes": LIMIT}
        close(writer)


async def wait_for(predicate: Any, within_s: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not predicate():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.02)
