"""Which failures the retry policy retries, what the server asked us to wait, and what our refusals tell clients.

Classification is checked through :meth:`RetryPolicy.call`, the way every caller meets it: a transient error is
called again, a permanent one is called once and comes back unchanged.
"""

from __future__ import annotations

import asyncio
import errno
import math
import socket
import ssl
import uuid
from email.utils import formatdate

import aiohttp
import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gatewayd.errors import (
    DeviceBusy,
    DeviceRejected,
    DeviceTimeout,
    DeviceUnavailable,
    ValidationFailed,
)
from gatewayd.observability.metrics import REGISTRY
from gatewayd.resilience import (
    CircuitOpenError,
    FakeClock,
    HttpStatusError,
    RateLimited,
    RetryPolicy,
    classify,
    retry_hint,
)
from gatewayd.resilience.errors import retry_after_header

WALL = 1_700_000_000.0  # a fixed wall clock, for Retry-After dates


def unique_name() -> str:
    return f"test-classify-{uuid.uuid4().hex[:8]}"


def attempts(policy: str, outcome: str) -> float:
    value = REGISTRY.get_sample_value("gatewayd_retry_attempts_total", {"policy": policy, "outcome": outcome})
    return 0.0 if value is None else value


def response_error(status: int, headers: dict[str, str] | None = None) -> aiohttp.ClientResponseError:
    """What ``resp.raise_for_status()`` raises: the status and the response's case-insensitive headers."""
    url = URL("http://upstream.test/v1/answer")
    request = aiohttp.RequestInfo(url, "GET", CIMultiDictProxy(CIMultiDict()), url)
    return aiohttp.ClientResponseError(
        request, (), status=status, message="upstream error", headers=CIMultiDictProxy(CIMultiDict(headers or {}))
    )


def label(err: BaseException) -> str:
    if isinstance(err, HttpStatusError):
        return f"http-{err.http_status}"
    if isinstance(err, aiohttp.ClientResponseError):
        return f"response-{err.status}"
    return f"{type(err).__name__}-{err}"


class FailsOnce:
    """An async call that raises ``error`` the first time and answers ``"ok"`` after that."""

    def __init__(self, error: BaseException):
        self.error = error
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        await asyncio.sleep(0)  # a suspension point, as real I/O has
        if self.calls == 1:
            raise self.error
        return "ok"


TRANSIENT = [
    TimeoutError(),
    ConnectionResetError(errno.ECONNRESET, "connection reset by peer"),
    ConnectionRefusedError(errno.ECONNREFUSED, "connection refused"),
    BrokenPipeError(errno.EPIPE, "broken pipe"),
    aiohttp.ClientConnectionError("connection lost"),
    aiohttp.ServerDisconnectedError(),
    OSError(errno.EBUSY, "device or resource busy"),
    socket.gaierror(socket.EAI_AGAIN, "temporary failure in name resolution"),
    DeviceTimeout("pump1 did not answer"),
    DeviceUnavailable("pump1 is offline"),
    DeviceBusy("device busy"),
    *(HttpStatusError(status) for status in (408, 409, 429, 500, 502, 503, 504, 529, 599)),
    response_error(503),
    response_error(429),
]

PERMANENT = [
    ValidationFailed("speed must be 0..100"),
    DeviceRejected("pump1 refused: unknown register"),
    *(HttpStatusError(status) for status in (400, 401, 403, 404, 422)),
    response_error(404),
    ssl.SSLCertVerificationError(1, "certificate verify failed"),
    ssl.SSLError(1, "wrong version number"),
    socket.gaierror(socket.EAI_NONAME, "name or service not known"),
    OSError(errno.ENOENT, "no such file"),
    KeyError("speed"),  # a bug: retrying it only multiplies it
    ValueError("bad literal"),
]


@pytest.mark.parametrize("error", TRANSIENT, ids=label)
async def test_transient_errors_are_retried(error: BaseException) -> None:
    clock = FakeClock()
    name = unique_name()
    call = FailsOnce(error)
    policy = RetryPolicy(max_attempts=3, jitter="none", clock=clock, name=name)
    assert await policy.call(call) == "ok"
    assert call.calls == 2
    assert len(clock.sleeps) == 1
    assert attempts(name, "transient") == 1
    assert attempts(name, "success") == 1
    assert classify(error).transient


@pytest.mark.parametrize("error", PERMANENT, ids=label)
async def test_permanent_errors_are_raised_unchanged_after_one_call(error: BaseException) -> None:
    clock = FakeClock()
    name = unique_name()
    call = FailsOnce(error)
    policy = RetryPolicy(max_attempts=5, clock=clock, name=name)
    with pytest.raises(type(error)) as info:
        await policy.call(call)
    assert info.value is error
    assert call.calls == 1
    assert clock.sleeps == []
    assert attempts(name, "permanent") == 1
    assert attempts(name, "transient") == 0
    assert not classify(error).transient


def test_cancellation_is_a_request_to_stop_not_a_failure() -> None:
    verdict = classify(asyncio.CancelledError())
    assert not verdict.transient
    assert verdict.hint_s is None


@pytest.mark.parametrize(
    "error",
    [
        HttpStatusError(400, {"X-Should-Retry": "true"}),
        HttpStatusError(422, {"x-should-retry": " TRUE "}),
        response_error(400, {"X-SHOULD-RETRY": "true"}),
    ],
    ids=["http-error", "padded-upper-value", "aiohttp-response"],
)
async def test_should_retry_true_makes_a_client_error_retryable(error: BaseException) -> None:
    call = FailsOnce(error)
    policy = RetryPolicy(max_attempts=3, clock=FakeClock(), name=unique_name())
    assert await policy.call(call) == "ok"
    assert call.calls == 2


@pytest.mark.parametrize(
    "error",
    [
        HttpStatusError(503, {"x-should-retry": "false"}),
        HttpStatusError(429, {"X-Should-Retry": "False", "Retry-After": "1"}),
        response_error(503, {"X-Should-Retry": "false"}),
    ],
    ids=["http-error", "rate-limit-with-hint", "aiohttp-response"],
)
async def test_should_retry_false_wins_over_a_retryable_status(error: BaseException) -> None:
    clock = FakeClock()
    call = FailsOnce(error)
    policy = RetryPolicy(max_attempts=3, clock=clock, name=unique_name())
    with pytest.raises(type(error)) as info:
        await policy.call(call)
    assert info.value is error
    assert call.calls == 1
    assert clock.sleeps == []


def test_should_retry_header_is_read_case_insensitively_from_a_plain_dict() -> None:
    err = RuntimeError("response held by the caller")
    assert classify(err, status=400, headers={"X-Should-Retry": "true"}).transient
    assert not classify(err, status=503, headers={"X-SHOULD-RETRY": "false"}).transient
    # An unreadable value is no instruction: the status decides.
    assert classify(err, status=503, headers={"x-should-retry": "maybe"}).transient
    assert not classify(err, status=400, headers={"x-should-retry": "yes please"}).transient


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "1.5"}, 1.5),
        ({"retry-after": "120"}, 120.0),
        ({"Retry-After": formatdate(WALL + 30, usegmt=True)}, 30.0),
        ({"Retry-After": formatdate(WALL + 90, localtime=False)}, 90.0),
        ({"retry-after-ms": "250"}, 0.25),
        ({"Retry-After-Ms": "1500"}, 1.5),
        ({"Retry-After": "7", "retry-after-ms": "250"}, 0.25),
        ({"Retry-After": "7", "retry-after-ms": "soon"}, 7.0),  # an unreadable ms header leaves the other
    ],
)
def test_retry_hint_reads_seconds_dates_and_milliseconds(headers: dict[str, str], expected: float) -> None:
    assert retry_hint(headers, now=lambda: WALL) == pytest.approx(expected)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Retry-After": "soon"},
        {"Retry-After": ""},
        {"Retry-After": "-5"},
        {"Retry-After": "NaN"},
        {"Retry-After": "inf"},
        {"retry-after-ms": "-250"},
        {"retry-after-ms": "nan"},
        {"Retry-After": formatdate(WALL - 60, usegmt=True)},  # already past
        {"Retry-After": "Mon, 99 Foo 2030 25:61:00 GMT"},
    ],
)
def test_unusable_retry_hints_are_ignored(headers: dict[str, str]) -> None:
    assert retry_hint(headers, now=lambda: WALL) is None


def test_a_hint_comes_only_with_a_retryable_verdict() -> None:
    hinted = HttpStatusError(503, {"Retry-After": "3"})
    assert classify(hinted).hint_s == 3.0
    refused = HttpStatusError(400, {"Retry-After": "3"})
    assert classify(refused).hint_s is None


def test_our_own_refusals_carry_their_wait_as_a_hint() -> None:
    limited = RateLimited("api", 2.5, limit=10, remaining=0, reset_s=4.0)
    opened = CircuitOpenError("device:pump1", retry_at=130.0, retry_after_s=30.0, state="open")
    assert (classify(limited).transient, classify(limited).hint_s) == (True, 2.5)
    assert (classify(opened).transient, classify(opened).hint_s) == (True, 30.0)


@pytest.mark.parametrize("wait", [math.nan, -1.0])
def test_an_unusable_wait_on_our_own_refusal_is_no_hint(wait: float) -> None:
    limited = RateLimited("api", wait, limit=10, remaining=0, reset_s=0.0)
    verdict = classify(limited)
    assert verdict.transient
    assert verdict.hint_s is None


@pytest.mark.parametrize(
    ("http_status", "our_status", "transient"),
    [
        (408, 504, True),
        (504, 504, True),
        (503, 503, True),
        (429, 503, True),
        (500, 503, True),
        (409, 503, True),
        (400, 502, False),
        (401, 502, False),
        (404, 502, False),
        (422, 502, False),
    ],
)
def test_http_status_error_maps_the_upstream_status_for_our_client(
    http_status: int, our_status: int, transient: bool
) -> None:
    err = HttpStatusError(http_status)
    assert err.status == our_status
    assert err.transient is transient
    assert err.to_dict()["details"] == {"http_status": http_status, "transient": transient}


def test_http_status_error_follows_the_should_retry_header() -> None:
    retry_anyway = HttpStatusError(400, {"X-Should-Retry": "true"})
    assert retry_anyway.transient
    assert retry_anyway.status == 503
    do_not_retry = HttpStatusError(503, {"X-Should-Retry": "false"})
    assert not do_not_retry.transient
    assert do_not_retry.status == 502


@pytest.mark.parametrize(
    ("seconds", "header"),
    [(0.2, "1"), (1.0, "1"), (1.01, "2"), (0.0, "0"), (-3.0, "0"), (math.inf, "3600"), (math.nan, "3600")],
)
def test_retry_after_header_rounds_up_to_whole_seconds(seconds: float, header: str) -> None:
    assert retry_after_header(seconds) == header


def test_refusals_answer_with_retry_after_headers() -> None:
    limited = RateLimited("api", 0.4, limit=10, remaining=0, reset_s=2.5)
    assert limited.status == 429
    assert limited.headers() == {
        "Retry-After": "1",
        "X-RateLimit-Limit": "10",
        "X-RateLimit-Remaining": "0",
        "X-RateLimit-Reset": "3",
    }
    opened = CircuitOpenError("device:pump1", retry_at=100.0, retry_after_s=12.2, state="open")
    assert opened.status == 503
    assert opened.headers() == {"Retry-After": "13"}
