"""aiohttp: the JSON API, /healthz, /readyz and the status page. Every error has one shape::

{"error": {"code": "...", "message": "...", "details": {...}}}
"""

from __future__ import annotations

import asyncio
import math
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gatewayd.commands.model import State
from gatewayd.commands.service import CommandService
from gatewayd.commands.validate import decode_json
from gatewayd.config.models import HttpSection
from gatewayd.devices.manager import DeviceManager
from gatewayd.errors import (
    BadRequest,
    Forbidden,
    GatewayError,
    NotFound,
    PayloadTooLarge,
    StorageFull,
    StoreLost,
    StoreUnavailable,
)
from gatewayd.interpret.errors import InterpretUnavailable
from gatewayd.interpret.service import Answer
from gatewayd.observability.metrics import REGISTRY
from gatewayd.resilience import CircuitOpenError, RateLimited
from gatewayd.telemetry.recorder import Recorder
from gatewayd.timefmt import iso
from gatewayd.web import auth, crosssite, openapi
from gatewayd.web.connections import Connections, listen
from gatewayd.web.console import CONSOLE, Console
from gatewayd.web.limits import RateLimits, metrics_middleware

if TYPE_CHECKING:
    from gatewayd.app.operator import Operator
    from gatewayd.commands.scheduler import Scheduler
    from gatewayd.interpret.service import InterpretService

log = structlog.get_logger("gatewayd.web")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class WebContext:
    service: CommandService
    devices: DeviceManager
    status: Callable[[], dict[str, Any]]  # the supervisor's view: phase, uptime, store, queue
    max_wait_s: float
    breaker_state: Callable[[str], dict[str, Any] | None] = lambda _name: None  # the dispatcher's, per device
    recorder: Recorder | None = None  # recent telemetry and the outbox
    operator: Operator | None = None  # config, reset, fault scenarios
    interpret: InterpretService | None = None  # natural-language commands, when [interpret] is enabled
    scheduler: Scheduler | None = None  # what the gateway sends by itself later (max on-time, on-periods)


def error_response(err: GatewayError, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": err.to_dict()}, status=err.status, headers=headers)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large", 400: "bad_request"}


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except GatewayError as err:
        if err.status >= 500 and not isinstance(err, StorageFull | StoreLost):  # each logged once, when it begins
            log.warning("request_failed", path=request.path, code=err.code, error=err.message)
        # A refusal says when to come back: Retry-After (and X-RateLimit-* for a rate limit).
        headers = err.headers() if isinstance(err, RateLimited | CircuitOpenError | StorageFull) else None
        response = error_response(err, headers)
        if isinstance(err, PayloadTooLarge):
            response.force_close()  # the rest of the body is not read: this connection cannot carry another request
        return response
    except web.HTTPRequestEntityTooLarge:  # aiohttp's client_max_size, where a form or a chunked body is read
        response = error_response(too_large(request.app[MAX_BODY]))
        response.force_close()
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "http_error")
        body = {"error": {"code": code, "message": exc.reason, "details": {"path": request.path}}}
        headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
        return web.json_response(body, status=exc.status, headers=headers)
    except Exception:
        log.exception("request_crashed", path=request.path, method=request.method)
        body = {"error": {"code": "internal_error", "message": "internal error (logged)", "details": {}}}
        return web.json_response(body, status=500)


def _ctx(request: web.Request) -> WebContext:
    ctx: WebContext = request.app[CTX]
    return ctx


CTX = web.AppKey("ctx", WebContext)
MAX_BODY = web.AppKey("max_body", int)


def too_large(limit: int, what: str = "the request body") -> PayloadTooLarge:
    return PayloadTooLarge(f"{what} exceeds {limit} bytes", details={"max_bytes": limit})


@web.middleware
async def body_limit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A body declared larger than ``max_body_bytes`` is refused before a byte of it is read, on every route
    (before access control, which reads a form's CSRF field): a client that declares 100 GB and sends two bytes
    is answered at once, not waited on. A body of undeclared length (chunked) is cut where it passes the limit,
    by aiohttp's ``client_max_size``, wherever it is read."""
    limit = request.app[MAX_BODY]
    declared = request.content_length
    if declared is not None and declared > limit:
        raise too_large(limit, f"the declared body ({declared} bytes)")
    return await handler(request)


async def _json_body(request: web.Request) -> Any:
    limit = request.app[MAX_BODY]
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise too_large(limit) from None
    raw = _decoded(raw, request.headers.get("Content-Encoding", ""), limit)
    if not raw.strip():
        raise BadRequest("the request body is empty; send a JSON object")
    return decode_json(raw, "the request body")


def _decoded(raw: bytes, encoding: str, limit: int) -> bytes:
    """A body sent with ``Content-Encoding: gzip`` or ``deflate``, decoded here, to at most ``limit`` bytes and only
    if the stream is whole. aiohttp's own decoding is off (``auto_decompress=False``): it answered some broken
    streams with a plain-text 400 before any handler ran, and took a stream cut short for the whole body."""
    name = encoding.strip().lower()
    if name in ("", "identity"):
        return raw
    if name not in ("gzip", "x-gzip", "deflate"):
        message = f"Content-Encoding {encoding!r} is not supported: send gzip, deflate or none"
        raise BadRequest(message, details={"encoding": encoding})
    stream = zlib.decompressobj(16 + zlib.MAX_WBITS if "gzip" in name else zlib.MAX_WBITS)
    try:
        out = stream.decompress(raw, limit + 1)
    except zlib.error as err:
        raise BadRequest(f"the request body is not {name}: {err}", details={"encoding": encoding}) from None
    if len(out) > limit:
        raise too_large(limit, "the request body, once decoded,")
    if not stream.eof or stream.unused_data:
        raise BadRequest(f"the request body is not a whole {name} stream", details={"encoding": encoding})
    return out


def _query_float(request: web.Request, name: str, lo: float, hi: float) -> float | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or not lo <= value <= hi:
        raise BadRequest(f"{name} must be a number from {lo:g} to {hi:g}", details={"field": name, "value": raw})
    return value


async def post_command(request: web.Request) -> web.Response:
    ctx = _ctx(request)
    wait_s = _query_float(request, "wait", 0, ctx.max_wait_s)
    payload = await _json_body(request)
    source = "cli" if request.headers.get("X-Gatewayd-Client") == "cli" else "http"
    headers: dict[str, str] = {}
    if isinstance(payload, dict) and "text" in payload:  # natural language: interpreted, then submitted
        if ctx.interpret is None:
            raise InterpretUnavailable("natural-language commands are turned off ([interpret] enabled = false)")
        result = await ctx.interpret.handle(
            payload, source=source, client=request.remote or "", principal=auth.user_of(request)
        )
        if isinstance(result, Answer):  # a question about state: answered, nothing stored or run
            return web.json_response(result.body, status=200, headers=result.headers)
        rec, created, headers = result.record, result.created, result.headers
    else:
        rec, created = await ctx.service.submit(payload, source=source, user=auth.user_of(request))
    if wait_s:
        rec = await ctx.service.wait(rec.id, wait_s)
    headers["Location"] = f"/api/v1/commands/{rec.id}"
    if not created:
        headers["Idempotent-Replay"] = "true"
    status = 200 if rec.state.final or not created else 202
    return web.json_response(rec.to_api(), status=status, headers=headers)


async def get_command(request: web.Request) -> web.Response:
    rec = await _ctx(request).service.get(request.match_info["id"])
    return web.json_response(rec.to_api())


async def cancel_command(request: web.Request) -> web.Response:
    """Cancel a command still waiting in its queue: 200 with the cancelled record, 409 once it may be on the wire
    or is finished (with its state), 404 for an unknown id."""
    who = auth.user_of(request) or request.remote or "http"
    rec = await _ctx(request).service.cancel(request.match_info["id"], by=who)
    return web.json_response(rec.to_api())


async def list_schedule(request: web.Request) -> web.Response:
    """What the gateway will send by itself: ``?all=1`` adds the fired and cancelled ones (newest first)."""
    scheduler = _ctx(request).scheduler
    if scheduler is None:
        return web.json_response({"scheduled": []})
    every = request.query.get("all") in ("1", "true")
    rows = await scheduler.listing(open_only=not every, device=request.query.get("device"))
    return web.json_response({"scheduled": rows})


async def list_commands(request: web.Request) -> web.Response:
    state = request.query.get("state")
    if state is not None and state not in State.__members__.values():
        raise BadRequest("unknown state", details={"field": "state", "states": [s.value for s in State]})
    limit = _query_float(request, "limit", 1, 1000)
    records = await _ctx(request).service.listing(
        state=state, device=request.query.get("device"), limit=int(limit or 50)
    )
    return web.json_response({"commands": [r.to_api(transitions=False) for r in records]})


def _devices(ctx: WebContext) -> list[dict[str, Any]]:
    devices = ctx.devices.describe()
    recorder = ctx.recorder
    scheduler = ctx.scheduler
    for device in devices:
        device["breaker"] = ctx.breaker_state(device["name"])
        if scheduler is not None:  # the switch-offs to come: "off at 14:03:10 (max on-time)"
            device["scheduled"] = [
                {**r.to_api(iso), "due_in_s": round(scheduler.left_s(r), 1) if r.state == "armed" else None}
                for r in scheduler.open
                if r.device == device["name"]
            ]
        if recorder is not None:
            ring = recorder.recent.get(device["name"])
            device["telemetry"] = None if not ring else {"at": iso(ring[-1].ts), "values": ring[-1].values}
            event = recorder.last_event.get(device["name"])
            device["last_event"] = None if event is None else {**event, "ts": iso(event["ts"])}
    return devices


async def device_telemetry(request: web.Request) -> web.Response:
    """The device's recent readings, oldest first (what the status page charts)."""
    ctx = _ctx(request)
    name = request.match_info["name"]
    if name not in ctx.devices.devices:
        raise NotFound(f"no device named {name!r}", details={"device": name}, code="unknown_device")
    ring = ctx.recorder.recent.get(name, ()) if ctx.recorder is not None else ()
    return web.json_response({"device": name, "readings": [{"at": iso(r.ts), "values": r.values} for r in ring]})


async def outbox(request: web.Request) -> web.Response:
    recorder = _ctx(request).recorder
    if recorder is None:
        raise StoreUnavailable("the outbox is not open")
    stats = await recorder.box.refresh()
    return web.json_response(
        {**stats.to_api(recorder.stamper.now()), "pending": recorder.pending, "telemetry": recorder.status()}
    )


async def list_devices(request: web.Request) -> web.Response:
    return web.json_response({"devices": _devices(_ctx(request))})


async def get_device(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    for device in _devices(_ctx(request)):
        if device["name"] == name:
            return web.json_response(device)
    raise NotFound(f"no device named {name!r}", details={"device": name}, code="unknown_device")


_ROLES = {"viewer": 0, "operator": 1, "admin": 2}


def require_role(request: web.Request, role: str) -> None:
    """Refuse a request whose principal (set by the access-control middleware) lacks ``role``. Without access
    control (no principal on the request) the daemon listens on loopback only and everything is allowed."""
    principal = request.get("principal")
    if principal is None:
        return
    if _ROLES.get(getattr(principal, "role", ""), -1) < _ROLES[role]:
        raise Forbidden(f"this needs the {role} role", details={"role": role})


def _operator(request: web.Request) -> Operator:
    operator = _ctx(request).operator
    if operator is None:
        raise StoreUnavailable("operator commands are not available yet")
    require_role(request, "admin")
    return operator


async def admin_config(request: web.Request) -> web.Response:
    return web.json_response(_operator(request).config())


async def admin_reset(request: web.Request) -> web.Response:
    return web.json_response(_operator(request).reset())


async def admin_test(request: web.Request) -> web.Response:
    operator = _operator(request)
    duration = _query_float(request, "duration_s", 0.1, 120) or 5.0
    return web.json_response(await operator.run(request.match_info["scenario"], duration))


async def providers(request: web.Request) -> web.Response:
    """The natural-language interpreter: providers' health, breakers, limits, spend; cache and local rules."""
    interpret = _ctx(request).interpret
    if interpret is None:
        return web.json_response({"enabled": False, "providers": []})
    return web.json_response(await interpret.describe())


async def queue(request: web.Request) -> web.Response:
    return web.json_response(_ctx(request).status()["queue"])


async def stats(request: web.Request) -> web.Response:
    ctx = _ctx(request)
    status = ctx.status()
    status["commands"] = await ctx.service.counts()
    return web.json_response(status)


async def healthz(request: web.Request) -> web.Response:
    """Unhealthy: the loop or the store stuck, or the store's file lost (``reason: store_lost``, and why)."""
    status = _ctx(request).status()
    healthy = status["healthy"]
    body: dict[str, Any] = {"status": "ok" if healthy else "unhealthy"}
    lost = (status.get("store") or {}).get("lost")
    if lost is not None:
        body.update(reason="store_lost", message=lost["message"])
    return web.json_response({**body, **status}, status=200 if healthy else 503)


async def readyz(request: web.Request) -> web.Response:
    """Ready = taking new commands: not while starting (until the uplink has subscribed, or found the broker away)
    or stopping, nor while the storage is full (alive then, and /healthz says so: a restart would not free the
    disk), nor once the store's file is lost."""
    service = _ctx(request).service
    status = _ctx(request).status()
    body: dict[str, Any] = {"status": "ready", "phase": status["phase"]}
    lost = (status.get("store") or {}).get("lost")
    if not service.accepting or status["phase"] != "running":
        body["status"] = "not_ready"
    elif lost is not None:
        body.update(status="not_ready", reason="store_lost", message=lost["message"], store_lost=lost)
    elif service.storage_full:
        body.update(status="not_ready", reason="storage_full", storage=status["storage"])
    return web.json_response(body, status=200 if body["status"] == "ready" else 503)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition of every gatewayd metric (retries, limiters, breakers, bulkheads, process)."""
    body = generate_latest(REGISTRY)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def status_page(request: web.Request) -> web.Response:
    return await request.app[CONSOLE].page(request)


async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(openapi.document())


def build_app(
    ctx: WebContext,
    max_body_bytes: int,
    limits: RateLimits | None = None,
    console: Console | None = None,
    connections: Connections | None = None,
) -> web.Application:
    # The cross-site check is here, for every route, with or without access control: after the body limit (a body
    # declared too large is refused first, unread) and before access control (a forged request costs no scrypt).
    middlewares = [metrics_middleware, errors_middleware, body_limit_middleware, crosssite.middleware]
    if connections is not None:
        middlewares.insert(0, connections.middleware)  # first: no header deadline while a request is handled
    app = web.Application(middlewares=middlewares, client_max_size=max_body_bytes)
    app[CTX] = ctx
    app[MAX_BODY] = max_body_bytes
    if console is not None:
        console.install(app)  # access control (middleware), login, the page's assets, live events, history
    if limits is not None:
        app.middlewares.append(limits.middleware)  # after access control: the limits key on who is asking
    app.router.add_get("/", status_page)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/v1/openapi.json", openapi_json)
    app.router.add_post("/api/v1/commands", post_command)
    app.router.add_get("/api/v1/commands", list_commands)
    app.router.add_get("/api/v1/commands/{id}", get_command)
    app.router.add_post("/api/v1/commands/{id}/cancel", cancel_command)
    app.router.add_get("/api/v1/devices", list_devices)
    app.router.add_get("/api/v1/devices/{name}", get_device)
    app.router.add_get("/api/v1/devices/{name}/telemetry", device_telemetry)
    app.router.add_get("/api/v1/outbox", outbox)
    app.router.add_get("/api/v1/queue", queue)
    app.router.add_get("/api/v1/schedule", list_schedule)
    app.router.add_get("/api/v1/providers", providers)
    app.router.add_get("/api/v1/stats", stats)
    app.router.add_get("/api/v1/admin/config", admin_config)
    app.router.add_post("/api/v1/admin/reset", admin_reset)
    app.router.add_post("/api/v1/admin/test/{scenario}", admin_test)
    return app


class WebServer:
    def __init__(self, cfg: HttpSection, ctx: WebContext):
        self.cfg = cfg
        self.ctx = ctx
        self.port: int | None = None
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.Server | None = None
        self.connections = Connections(max_connections=cfg.max_connections, header_timeout_s=cfg.header_timeout_s)
        self.console = Console(
            cfg,
            service=ctx.service,
            status=ctx.status,
            devices=lambda: _devices(ctx),
            recorder=ctx.recorder,
        )

    async def __aenter__(self) -> WebServer:
        app = build_app(self.ctx, self.cfg.max_body_bytes, RateLimits(self.cfg.limits), self.console, self.connections)
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=2.0, auto_decompress=False
        )
        await self._runner.setup()
        assert self._runner.server is not None
        # Our own listening socket rather than a web.TCPSite: every connection goes through self.connections
        # (the cap, the header deadline) on its way to aiohttp.
        try:
            self._listener = await listen(self.connections, self._runner.server, self.cfg.host, self.cfg.port)
        except OSError as err:
            await self._runner.cleanup()
            raise GatewayError(
                f"cannot listen on {self.cfg.host}:{self.cfg.port}: {err.strerror or err}", code="listen_failed"
            ) from err
        sockets = self._listener.sockets
        self.port = int(sockets[0].getsockname()[1]) if sockets else self.cfg.port
        await self.console.__aenter__()  # its tasks start once listening: a failed start leaves none behind
        log.info("http_listening", host=self.cfg.host, port=self.port, auth=self.cfg.auth.enabled)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.console.__aexit__(et, e, tb)
        if self._listener is not None:
            self._listener.close()  # no new connections; the runner's cleanup asks the open ones to finish
            self._listener = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
