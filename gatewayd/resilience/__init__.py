"""The resilience kit: one retry policy, one token bucket (keyed, sliding-window and adaptive variants), one
circuit breaker and one bulkhead, on an injected clock, with their state persisted across restarts.

Every other component uses these; none writes its own loop of ``sleep`` and ``try``.
"""

from gatewayd.resilience.adaptive import AdaptiveRate
from gatewayd.resilience.breaker import CircuitBreaker, CircuitState, Permit, StateChange
from gatewayd.resilience.bucket import CRITICAL, NORMAL, BucketSpec, Decision, TokenBucket
from gatewayd.resilience.bulkhead import Bulkhead
from gatewayd.resilience.classify import HttpStatusError, Verdict, classify, classify_status, retry_hint
from gatewayd.resilience.clock import REAL_CLOCK, Clock, FakeClock
from gatewayd.resilience.errors import BulkheadFull, CircuitOpenError, DeadlineExceeded, RateLimited, RetryExhausted
from gatewayd.resilience.keyed import KeyedLimiter
from gatewayd.resilience.retry import RetryPolicy
from gatewayd.resilience.state import Persistent, ResilienceState
from gatewayd.resilience.window import SlidingWindowLimiter

__all__ = [
    "CRITICAL",
    "NORMAL",
    "REAL_CLOCK",
    "AdaptiveRate",
    "BucketSpec",
    "Bulkhead",
    "BulkheadFull",
    "CircuitBreaker",
    "CircuitOpenError",
    "CircuitState",
    "Clock",
    "DeadlineExceeded",
    "Decision",
    "FakeClock",
    "HttpStatusError",
    "KeyedLimiter",
    "Permit",
    "Persistent",
    "RateLimited",
    "ResilienceState",
    "RetryExhausted",
    "RetryPolicy",
    "SlidingWindowLimiter",
    "StateChange",
    "TokenBucket",
    "Verdict",
    "classify",
    "classify_status",
    "retry_hint",
]
