"""HTTP middlewares: request metrics, and per-client, per-endpoint rate limits.

Every API request takes a token from a bucket keyed by who asks (the authenticated user's name, or the client's
address) and which route they call, so one script hammering ``POST /api/v1/commands`` neither starves a
technician's page nor its own reads. Writes (POST) get a smaller allowance than reads. A refusal is a 429 with
``Retry-After`` and ``X-RateLimit-*``; allowed responses carry ``X-RateLimit-*`` too. Health, readiness and
metrics endpoints are not limited: monitoring must always get through.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import Counter, Histogram

from gatewayd.config.models import HttpLimits
from gatewayd.observability.metrics import REGISTRY
from gatewayd.resilience.bucket import BucketSpec
from gatewayd.resilience.keyed import KeyedLimiter

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

HTTP_REQUESTS = Counter(
    "gatewayd_http_requests",
    "HTTP requests answered, by route template, method and status code.",
    ["route", "method", "status"],
    registry=REGISTRY,
)
HTTP_LATENCY = Histogram(
    "gatewayd_http_request_duration_seconds",
    "Time to answer an HTTP request (to the start of the response for streams), by route template.",
    ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=REGISTRY,
)
_UNLIMITED = frozenset({"/healthz", "/readyz", "/metrics"})


def route_of(request: web.Request) -> str:
    """The route's template (``/api/v1/commands/{id}``), so a label never holds an id or a device name."""
    info = request.match_info
    route = getattr(info, "route", None)
    resource = getattr(route, "resource", None)
    if resource is None or getattr(info, "http_exception", None) is not None:
        return "unmatched"
    return str(resource.canonical)


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        route = route_of(request)
        HTTP_REQUESTS.labels(route, request.method, str(status)).inc()
        HTTP_LATENCY.labels(route).observe(time.perf_counter() - started)


class RateLimits:
    def __init__(self, cfg: HttpLimits):
        self.cfg = cfg
        self.limiter = KeyedLimiter(
            BucketSpec(cfg.read_burst, cfg.read_per_s),
            name="http",
            tiers={"write": BucketSpec(cfg.write_burst, cfg.write_per_s)},
            max_keys=cfg.max_clients * 8,
            idle_s=600,
        )

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not self.cfg.enabled or request.path in _UNLIMITED or not request.path.startswith("/api/"):
            return await handler(request)
        principal = request.get("principal")
        who = getattr(principal, "name", None) if principal is not None else None
        if who in (None, "anonymous"):
            who = f"addr:{request.remote or 'unknown'}"
        tier = "write" if request.method in ("POST", "PUT", "PATCH", "DELETE") else None
        decision = self.limiter.try_acquire(f"{who}|{request.method} {route_of(request)}", tier=tier)
        if not decision.allowed:
            raise decision.refusal(f"http {request.method} {route_of(request)} for {who}")
        response = await handler(request)
        if not response.prepared:
            response.headers.update(decision.headers())
        return response
