"""The resilience kit's errors: every refusal is a :class:`TransientError` (the same call may succeed later) and
carries when it is worth trying again, so the API can answer 429/503 with ``Retry-After``."""

from __future__ import annotations

import math
from typing import Any

from gatewayd.errors import GatewayError, TransientError

# Float noise in a computed wait (2 s coming out as 2.0000000000000036 s) must not round up to an extra second.
_NOISE_S = 1e-9


def retry_after_header(seconds: float) -> str:
    """HTTP wants whole seconds; rounding down would invite a retry that is refused again."""
    return str(max(0, math.ceil(seconds - _NOISE_S))) if math.isfinite(seconds) else "3600"


def remaining_header(remaining: float) -> str:
    """Whole requests left; a level a hair under a whole token (refill arithmetic) still counts as that token."""
    return str(max(0, math.floor(remaining + _NOISE_S)))


class RetryExhausted(TransientError):
    """A retry policy gave up. ``__cause__`` is the last underlying error; ``attempts`` how many calls were made.

    ``reason`` is one of ``attempts`` (max attempts used), ``deadline`` (the next backoff would end past the
    deadline), ``hint_too_long`` (the server asked for a longer pause than the hint cap) and
    ``hint_past_deadline`` (the server's pause ends past the deadline). ``retry_after_s`` is the server's hint
    when there was one, so it can be passed on to our own client.
    """

    code = "retry_exhausted"

    def __init__(self, name: str, attempts: int, last: BaseException, reason: str, retry_after_s: float | None = None):
        self.attempts = attempts
        self.last_error = last
        self.reason = reason
        self.retry_after_s = retry_after_s
        last_code = last.code if isinstance(last, GatewayError) else type(last).__name__
        details: dict[str, Any] = {"policy": name, "attempts": attempts, "reason": reason, "last_error": last_code}
        if retry_after_s is not None:
            details["retry_after_s"] = retry_after_s
        super().__init__(f"{name}: gave up after {attempts} attempt(s) ({reason}): {last}", details=details)
        if isinstance(last, GatewayError):
            self.status = last.status  # a device timeout stays a 504 for our own client


class DeadlineExceeded(TransientError):
    """The deadline had passed before the first attempt could start."""

    code = "deadline_exceeded"
    status = 504


class RateLimited(TransientError):
    """A limiter refused, and waiting for tokens would not fit the caller's deadline."""

    code = "rate_limited"
    status = 429

    def __init__(self, name: str, retry_after_s: float, *, limit: float, remaining: float, reset_s: float):
        self.retry_after_s = retry_after_s
        self.limit = limit
        self.remaining = remaining
        self.reset_s = reset_s
        super().__init__(
            f"{name}: rate limited, retry in {retry_after_s:.3g} s",
            details={"limiter": name, "retry_after_s": retry_after_s},
        )

    def headers(self) -> dict[str, str]:
        return {
            "Retry-After": retry_after_header(self.retry_after_s),
            "X-RateLimit-Limit": str(int(self.limit)),
            "X-RateLimit-Remaining": remaining_header(self.remaining),
            "X-RateLimit-Reset": retry_after_header(self.reset_s),
        }


class CircuitOpenError(TransientError):
    """The breaker refused the call. ``retry_at`` is on the breaker's monotonic clock."""

    code = "circuit_open"
    status = 503

    def __init__(self, name: str, retry_at: float, retry_after_s: float, *, state: str):
        self.retry_at = retry_at
        self.retry_after_s = retry_after_s
        super().__init__(
            f"{name}: circuit {state}, next probe in {retry_after_s:.3g} s",
            details={"breaker": name, "state": state, "retry_after_s": retry_after_s},
        )

    def headers(self) -> dict[str, str]:
        return {"Retry-After": retry_after_header(self.retry_after_s)}


class BulkheadFull(TransientError):
    """No slot and no room to wait (``reason="queue_full"``), or the wait ran out (``reason="wait_timeout"``)."""

    code = "bulkhead_full"
    status = 503

    def __init__(self, name: str, reason: str, *, max_concurrent: int, max_queue: int):
        self.reason = reason
        super().__init__(
            f"{name}: bulkhead full ({reason})",
            details={"bulkhead": name, "reason": reason, "max_concurrent": max_concurrent, "max_queue": max_queue},
        )
