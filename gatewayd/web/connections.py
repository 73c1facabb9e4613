"""The HTTP server's connections: how many may be open at once, and how long a client may take to send a request's
headers. aiohttp does neither: it accepts every connection, and a client that sends half a request line and then
nothing holds its socket and file descriptor until aiohttp's keep-alive timer runs out: an hour by default, and
before aiohttp 3.14.4 that timer is not even started until a first request has been answered.

Every accepted socket goes through :class:`Connections`, which wraps aiohttp's protocol for it in a
:class:`_Guard`:

- A cap: with ``max_connections`` open, a new connection is answered a short 503 and closed at once, its file
  descriptor freed, rather than queued without bound; the connections already open are not touched. Refusals are
  counted (``gatewayd_http_connections_refused_total``) and logged once when the cap is reached, and once when the
  count is back under three quarters of it.
- A deadline for request headers: from the moment a connection opens, and again from the end of each answer on a
  kept-alive connection, the client has ``header_timeout_s`` to deliver a request's complete headers, however it
  spreads the bytes (a byte every second does not extend it). Past it the connection is closed without an answer
  (``gatewayd_http_header_timeouts_total``). This also closes a kept-alive connection left idle that long. While a
  request is being handled there is no deadline: a handler that waits (``?wait=``, the event stream) is not cut.

That the headers are complete is learnt from the application rather than by parsing the bytes a second time:
aiohttp hands a request to the application, and so to :meth:`Connections.middleware` (the first middleware), only
once its headers are parsed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web
from prometheus_client import Counter, Gauge

from gatewayd.observability.metrics import REGISTRY

log = structlog.get_logger("gatewayd.web")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ProtocolFactory = Callable[[], asyncio.Protocol]

HTTP_CONNECTIONS = Gauge("gatewayd_http_connections", "HTTP connections open now.", registry=REGISTRY)
HTTP_CONNECTIONS_REFUSED = Counter(
    "gatewayd_http_connections_refused",
    "HTTP connections refused at once because [http] max_connections were already open.",
    registry=REGISTRY,
)
HTTP_HEADER_TIMEOUTS = Counter(
    "gatewayd_http_header_timeouts",
    "HTTP connections closed because a request's headers were not complete within [http] header_timeout_s "
    "(of the connection opening, or of the previous answer on a kept-alive connection).",
    registry=REGISTRY,
)


def _refusal(max_connections: int) -> bytes:
    body = json.dumps(
        {
            "error": {
                "code": "too_many_connections",
                "message": f"the gateway already has {max_connections} connections open; try again shortly",
                "details": {"max_connections": max_connections},
            }
        }
    ).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
        f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class Connections:
    def __init__(self, *, max_connections: int, header_timeout_s: float):
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self.refused = 0
        self._refusal = _refusal(max_connections)
        # By aiohttp's protocol, which is what a request knows of its connection (request.protocol). A guard is
        # counted from the moment it is made: asyncio calls connection_made a loop iteration later, and one
        # iteration can accept a hundred sockets.
        self._guards: dict[asyncio.BaseProtocol, _Guard] = {}
        self._capped = False
        self._refused_before_cap = 0

    @property
    def open(self) -> int:
        return len(self._guards)

    def factory(self, inner: ProtocolFactory) -> ProtocolFactory:
        """The protocol factory for ``loop.create_server``, around aiohttp's (``runner.server``)."""

        def make() -> asyncio.Protocol:
            if len(self._guards) >= self.max_connections:
                self._refuse()
                return _Refused(self._refusal)
            protocol = inner()
            guard = _Guard(self, protocol)
            self._guards[protocol] = guard
            HTTP_CONNECTIONS.set(len(self._guards))
            return guard

        return make

    def _refuse(self) -> None:
        if not self._capped:  # logged once when the cap is reached, once when well below it again
            self._capped = True
            self._refused_before_cap = self.refused
            log.warning("http_connections_capped", max_connections=self.max_connections)
        self.refused += 1
        HTTP_CONNECTIONS_REFUSED.inc()

    def _closed(self, guard: _Guard) -> None:
        self._guards.pop(guard.inner, None)
        HTTP_CONNECTIONS.set(len(self._guards))
        if self._capped and len(self._guards) <= self.max_connections * 3 // 4:
            self._capped = False
            log.info(
                "http_connections_below_cap",
                open=len(self._guards),
                refused=self.refused - self._refused_before_cap,
            )

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        guard = self._guards.get(request.protocol)
        if guard is None:  # a connection made elsewhere (aiohttp's test client)
            return await handler(request)
        guard.request_started()
        try:
            return await handler(request)
        finally:
            guard.request_finished()


class _Guard(asyncio.Protocol):
    """One connection: aiohttp's protocol inside, everything passed through, and a deadline for request headers
    around it while no request is being handled."""

    def __init__(self, owner: Connections, inner: asyncio.Protocol):
        self.owner = owner
        self.inner = inner
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._handling = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._arm()
        self.inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._transport = None
        self.owner._closed(self)
        self.inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def request_started(self) -> None:
        self._handling += 1
        self._disarm()

    def request_finished(self) -> None:
        self._handling -= 1
        if self._handling == 0 and self._transport is not None and not self._transport.is_closing():
            self._arm()  # the next request's headers are due within header_timeout_s of this answer

    def _arm(self) -> None:
        self._disarm()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.owner.header_timeout_s, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        HTTP_HEADER_TIMEOUTS.inc()
        # abort, not close: close would wait to flush a previous answer to a client that may never read it.
        transport.abort()


class _Refused(asyncio.Protocol):
    """A connection over the cap: a 503 and closed, before anything is read from it."""

    def __init__(self, answer: bytes):
        self._answer = answer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(self._answer)
        transport.close()

    def data_received(self, data: bytes) -> None:
        pass


async def listen(connections: Connections, inner: ProtocolFactory, host: str, port: int) -> asyncio.Server:
    """A listening socket whose connections go through ``connections`` to ``inner`` (aiohttp's runner.server).
    The backlog is aiohttp's TCPSite's (asyncio's own is 100): a burst of connections waits in the kernel for a
    moment rather than having its handshakes dropped and retried a second later."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(connections.factory(inner), host, port, reuse_address=True, backlog=128)
