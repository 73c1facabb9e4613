"""Prometheus metrics of the natural-language interpreter, in the daemon's one registry (served at ``/metrics``).

Labels are provider names from the configuration and outcomes from short fixed lists, never texts or users.
Breaker states are the resilience kit's ``gatewayd_breaker_state{breaker="provider:<name>"}`` and
``{breaker="interpret:connectivity"}``; retries are ``gatewayd_retry_attempts_total{policy="provider:<name>"}``.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from gatewayd.observability.metrics import REGISTRY

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

REQUESTS = Counter(
    "gatewayd_interpret_requests",
    "Natural-language requests, by how they were answered (provider, cache, local, not_understood, error).",
    ["outcome"],
    registry=REGISTRY,
)
LATENCY = Histogram(
    "gatewayd_interpret_latency_seconds",
    "Time to interpret one request, by how it was answered (provider, cache, local, not_understood).",
    ["outcome"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
CACHE_LOOKUPS = Counter(
    "gatewayd_interpret_cache_lookups", "Prompt cache lookups, by result (hit, miss).", ["result"], registry=REGISTRY
)
CACHE_SAVED = Counter(
    "gatewayd_interpret_cache_cost_saved",
    "What the answers served from the prompt cache cost when they were bought (budget currency).",
    registry=REGISTRY,
)
PROVIDER_CALLS = Counter(
    "gatewayd_interpret_provider_calls",
    "HTTP calls to LLM providers, by outcome (answered, declined, unusable, transient, permanent).",
    ["provider", "outcome"],
    registry=REGISTRY,
)
PROVIDER_SKIPS = Counter(
    "gatewayd_interpret_provider_skipped",
    "Providers passed over without a call, by reason (circuit_open, offline, budget, rate_limited, deadline, ...).",
    ["provider", "reason"],
    registry=REGISTRY,
)
PROVIDER_LATENCY = Histogram(
    "gatewayd_interpret_provider_latency_seconds",
    "Latency of provider calls that returned an answer.",
    ["provider"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
PROVIDER_HEALTHY = Gauge(
    "gatewayd_interpret_provider_healthy",
    "Result of the last token-free health check: 1 healthy, 0 not.",
    ["provider"],
    registry=REGISTRY,
)
TOKENS = Counter(
    "gatewayd_interpret_tokens",
    "Tokens billed by providers, by direction (in, out).",
    ["provider", "direction"],
    registry=REGISTRY,
)
SPEND = Counter(
    "gatewayd_interpret_spend", "Provider spend (tokens times configured prices).", ["provider"], registry=REGISTRY
)
SPEND_TODAY = Gauge(
    "gatewayd_interpret_spend_today",
    "Provider spend in the current UTC day, against the daily budget.",
    registry=REGISTRY,
)
