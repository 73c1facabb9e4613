"""Live updates for the status page: server-sent events (``GET /api/v1/events/stream``).

Events are ``status`` (the overview, devices with their latest readings, queue; every ``live_interval_s``),
``command`` (a command reached its final state), ``history`` (a new sample of the hour charts) and ``resync``
(this client fell behind and events were dropped: fetch everything again). Each connection has a bounded queue,
so a slow browser costs memory only up to that bound and never slows the daemon; the page falls back to polling
the JSON API when the stream fails.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

_CLOSE = b""


def encode(event: str, data: Any) -> bytes:
    payload = json.dumps(data, separators=(",", ":"), default=str)
    return f"event: {event}\ndata: {payload}\n\n".encode()


class Subscriber:
    def __init__(self, max_queue: int):
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=max_queue)
        self.dropped = 0

    def offer(self, message: bytes) -> None:
        try:
            self.queue.put_nowait(message)
        except asyncio.QueueFull:
            # Too slow to keep up: forget what it has not read and tell it to fetch everything again.
            self.dropped += 1
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queue.put_nowait(encode("resync", {"dropped": self.dropped}))


class EventHub:
    def __init__(self, *, max_queue: int = 256, keepalive_s: float = 15.0):
        self.max_queue = max_queue
        self.keepalive_s = keepalive_s
        self._subscribers: set[Subscriber] = set()
        self.closed = False
        self.published = 0

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def publish(self, event: str, data: Any) -> None:
        if not self._subscribers:
            return
        message = encode(event, data)
        self.published += 1
        for sub in self._subscribers:
            sub.offer(message)

    def subscribe(self) -> Subscriber:
        sub = Subscriber(self.max_queue)
        self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self._subscribers.discard(sub)

    def close(self) -> None:
        """Shutting down: every stream ends now (browsers reconnect to whoever serves next)."""
        self.closed = True
        for sub in self._subscribers:
            while not sub.queue.empty():
                sub.queue.get_nowait()
            sub.queue.put_nowait(_CLOSE)

    async def stream(self, request: web.Request, first: list[bytes]) -> web.StreamResponse:
        """Serve one event stream: ``first`` (the current state), then whatever is published, until the client
        goes away or the hub closes."""
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        )
        await resp.prepare(request)
        if self.closed:
            return resp
        sub = self.subscribe()
        try:
            await resp.write(b"retry: 2000\n\n" + b"".join(first))
            while True:
                try:
                    async with asyncio.timeout(self.keepalive_s):
                        message = await sub.queue.get()
                except TimeoutError:
                    message = b": keepalive\n\n"
                if message == _CLOSE:
                    break
                await resp.write(message)
        except ConnectionResetError:
            pass  # the browser left
        finally:
            self.unsubscribe(sub)
        return resp
