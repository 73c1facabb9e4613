"""Which failures are worth retrying, and how long the other side asked us to wait: decided here and nowhere else.

:func:`classify` takes an exception (and, for HTTP, the status and headers) and returns a :class:`Verdict`:
transient or permanent, plus an optional delay hint from the server. The order of evidence is: an explicit
``x-should-retry`` header, then the HTTP status, then gatewayd's own error split, then the network and OS error
families. Anything unrecognised is permanent: retrying a bug (``KeyError``) only multiplies it.
"""

from __future__ import annotations

import errno
import math
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime

import aiohttp

from gatewayd.errors import GatewayError
from gatewayd.resilience.errors import CircuitOpenError, RateLimited, RetryExhausted

Wall = Callable[[], float]

_TRANSIENT_ERRNOS = frozenset(
    {
        errno.ECONNRESET,
        errno.ECONNREFUSED,
        errno.ECONNABORTED,
        errno.EPIPE,
        errno.ETIMEDOUT,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ENETDOWN,
        errno.ENETRESET,
        errno.EHOSTDOWN,
        errno.EAGAIN,
        errno.EBUSY,  # a serial port held by another process, a busy device node
        errno.EADDRNOTAVAIL,  # out of ephemeral ports: frees up as connections close
    }
)


@dataclass(frozen=True, slots=True)
class Verdict:
    transient: bool
    hint_s: float | None = None  # the server's requested pause; only ever set on a transient verdict
    reason: str = ""


def classify_status(status: int) -> bool:
    """True when an HTTP status is worth retrying: timeouts, conflicts, rate limits and server errors (529 too)."""
    return status in (408, 409, 429) or 500 <= status <= 599


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is not None:
        return value
    for key, candidate in headers.items():  # a plain dict with the server's spelling ("Retry-After")
        if key.lower() == name:
            return candidate
    return None


def should_retry_header(headers: Mapping[str, str]) -> bool | None:
    """The server's explicit ``x-should-retry: true|false``, which overrides what the status would say."""
    value = _header(headers, "x-should-retry")
    if value is None:
        return None
    value = value.strip().lower()
    if value == "true":
        return True
    if value == "false":
        return False
    return None


def _seconds(text: str, scale: float = 1.0) -> float | None:
    try:
        value = float(text.strip()) * scale
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def retry_hint(headers: Mapping[str, str], *, now: Wall = time.time) -> float | None:
    """Seconds the server asked us to wait: ``retry-after-ms``, else ``Retry-After`` as seconds or an HTTP date.

    The millisecond header wins because it is the more precise of the two when a server sends both. Negative,
    non-finite and unparseable values are ignored (None), as is a date already in the past. ``now`` is the wall
    clock, needed only for the date form.
    """
    ms = _header(headers, "retry-after-ms")
    if ms is not None:
        hint = _seconds(ms, 0.001)
        if hint is not None:
            return hint
    value = _header(headers, "retry-after")
    if value is None:
        return None
    hint = _seconds(value)
    if hint is not None:
        return hint
    try:
        when = parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000" means UTC with no claim about local time
        when = when.replace(tzinfo=UTC)
    delta = when.timestamp() - now()
    return delta if delta >= 0 else None


class HttpStatusError(GatewayError):
    """An upstream HTTP error answer, raised by our HTTP clients so :func:`classify` can read the status,
    ``x-should-retry`` and the retry hints.

    ``http_status`` is the upstream's status; ``status`` is what we answer our own client: 504 when the upstream
    timed out, 503 when it was transiently unavailable, 502 otherwise. ``transient`` follows :func:`classify`.
    """

    code = "upstream_http_error"
    status = 502

    def __init__(self, http_status: int, headers: Mapping[str, str] | None = None, message: str | None = None):
        self.http_status = http_status
        self.headers: dict[str, str] = {k.lower(): v for k, v in (headers or {}).items()}
        explicit = should_retry_header(self.headers)
        self.transient = classify_status(http_status) if explicit is None else explicit
        if http_status in (408, 504):
            self.status = 504
        elif self.transient:
            self.status = 503
        super().__init__(
            message or f"upstream answered HTTP {http_status}",
            details={"http_status": http_status, "transient": self.transient},
        )


def classify(
    exc: BaseException,
    *,
    status: int | None = None,
    headers: Mapping[str, str] | None = None,
    now: Wall = time.time,
) -> Verdict:
    """Transient or permanent, with the server's delay hint when it gave one. ``status``/``headers`` override
    what the exception carries (for callers that hold a response rather than an exception)."""
    if not isinstance(exc, Exception):
        # CancelledError, KeyboardInterrupt, SystemExit: a request to stop, never a failure to retry.
        return Verdict(False, None, "not_an_error")
    if status is None and headers is None:
        if isinstance(exc, HttpStatusError):
            status, headers = exc.http_status, exc.headers
        elif isinstance(exc, aiohttp.ClientResponseError):
            status, headers = exc.status, exc.headers
    if headers is not None:
        explicit = should_retry_header(headers)
        if explicit is not None:
            return Verdict(explicit, retry_hint(headers, now=now) if explicit else None, "x-should-retry")
    if status is not None:
        transient = classify_status(status)
        hint = retry_hint(headers, now=now) if transient and headers is not None else None
        return Verdict(transient, hint, f"http_{status}")
    if isinstance(exc, GatewayError):
        hint = exc.retry_after_s if isinstance(exc, RateLimited | CircuitOpenError | RetryExhausted) else None
        if hint is not None and not hint >= 0:  # NaN or negative: no usable hint, as for a header (inf is kept)
            hint = None
        return Verdict(exc.transient, hint if exc.transient else None, exc.code)
    if isinstance(exc, aiohttp.ClientSSLError):
        return Verdict(False, None, "tls")  # a certificate does not fix itself between attempts
    if isinstance(exc, aiohttp.ClientConnectionError | aiohttp.ClientPayloadError):
        return Verdict(True, None, "connection")  # ServerTimeoutError is a ClientConnectionError too
    if isinstance(exc, TimeoutError):  # asyncio.TimeoutError is the builtin since 3.11
        return Verdict(True, None, "timeout")
    if isinstance(exc, socket.gaierror):
        # EAI_AGAIN is "no DNS right now" (link down); other resolver errors say the name itself is wrong.
        return Verdict(exc.errno == socket.EAI_AGAIN, None, "dns")
    if isinstance(exc, ConnectionError):
        return Verdict(True, None, "connection")
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return Verdict(True, None, f"errno_{errno.errorcode.get(exc.errno, exc.errno)}")
    return Verdict(False, None, "unclassified")
