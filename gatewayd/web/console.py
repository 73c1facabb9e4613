"""The technician's console: the status page, its assets, its live updates and hour charts, and access control.

:class:`Console` is the web server's companion component: it owns the authenticator, the history sampler and the
event hub (and their tasks), and installs their routes and middleware into the aiohttp application:

- ``GET /`` the page, rendered on the server (it works with scripts off) and brought to life by
  ``/static/gatewayd.js``; ``POST /ui/command`` the page's forms when scripts are off;
- ``GET /static/{name}`` the page's own script and style sheet (package data; nothing from elsewhere);
- ``GET /api/v1/overview`` what a ``status`` event carries, for clients that poll;
- ``GET /api/v1/history`` the hour charts' samples; ``GET /api/v1/events/stream`` server-sent events;
- ``/login``, ``/logout``, ``/api/v1/session`` (see :mod:`gatewayd.web.auth`).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import structlog
from aiohttp import web

from gatewayd.clock import REAL_CLOCK, Clock
from gatewayd.commands.model import CommandRecord, State
from gatewayd.commands.service import CommandService
from gatewayd.config.models import HttpSection
from gatewayd.errors import GatewayError
from gatewayd.observability.metrics import RATE_LIMIT_DECISIONS, RATE_LIMIT_KEYS
from gatewayd.tasks import TaskOwner
from gatewayd.telemetry.recorder import Recorder
from gatewayd.timefmt import iso
from gatewayd.web import auth, page, present
from gatewayd.web.history import History
from gatewayd.web.live import EventHub, encode

log = structlog.get_logger("gatewayd.web.console")

STATIC_DIR = Path(__file__).resolve().parent / "static"
_CONTENT_TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}

# Everything the page loads comes from this server; nothing inline runs; no other site may frame it.
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str
    etag: str


def load_assets(directory: Path = STATIC_DIR) -> dict[str, Asset]:
    assets = {}
    for path in sorted(directory.iterdir()):
        ctype = _CONTENT_TYPES.get(path.suffix)
        if ctype is None or not path.is_file():
            continue
        body = path.read_bytes()
        assets[path.name] = Asset(body, ctype, '"' + hashlib.sha256(body).hexdigest()[:20] + '"')
    return assets


class Console:
    def __init__(
        self,
        cfg: HttpSection,
        *,
        service: CommandService,
        status: Callable[[], dict[str, Any]],
        devices: Callable[[], list[dict[str, Any]]],
        recorder: Recorder | None = None,
        clock: Clock | None = None,
    ):
        self.cfg = cfg
        self.service = service
        self.status = status
        self.devices = devices
        self.recorder = recorder
        clock = clock or REAL_CLOCK
        self.auth = auth.Authenticator(cfg.auth)
        self.history = History(cfg.history_interval_s, boot_id=clock.boot_id, mono=clock.monotonic, wall=clock.wall)
        self.hub = EventHub()
        self.assets = load_assets()
        self.last_ok: dict[str, float] = {}  # device -> wall time of its last successful command
        self._tasks = TaskOwner("web")

    # --- lifecycle -----------------------------------------------------------------------------------------------

    async def __aenter__(self) -> Console:
        await self._tasks.open()
        self.service.final_listeners.append(self._on_final)
        self._tasks.spawn("history", self._sampler())
        self._tasks.spawn("live", self._ticker())
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.hub.close()  # open event streams end now, so the HTTP server's shutdown does not wait for them
        if self._on_final in self.service.final_listeners:
            self.service.final_listeners.remove(self._on_final)
        await self._tasks.close()

    def install(self, app: web.Application) -> None:
        app[CONSOLE] = self
        auth.install(app, self.auth)
        app.router.add_post("/ui/command", self.ui_command)
        app.router.add_get("/static/{name}", self.static)
        app.router.add_get("/api/v1/overview", self.overview_handler)
        app.router.add_get("/api/v1/history", self.history_handler)
        app.router.add_get("/api/v1/events/stream", self.stream_handler)

    # --- what happens ----------------------------------------------------------------------------------------------

    def _on_final(self, rec: CommandRecord) -> None:
        self.history.record_final(rec)
        if rec.state is State.SUCCEEDED:
            self.last_ok[rec.device] = rec.updated_at
        self.hub.publish("command", rec.to_api(transitions=False))

    async def _sampler(self) -> None:
        while True:
            await asyncio.sleep(self.history.interval_s)
            sample = self.history.sample(self.status())
            self.hub.publish("history", sample.to_api())

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.live_interval_s)
            if self.hub.subscribers:
                self.hub.publish("status", self.overview())

    # --- views -------------------------------------------------------------------------------------------------

    def device_views(self, status: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """The devices as the API describes them, with when each was last heard from and ``view``: the texts the
        page shows on its card (:func:`gatewayd.web.present.device_view`)."""
        now = time.time()
        per_device = ((status if status is not None else self.status()).get("queue") or {}).get("per_device") or {}
        out = []
        for device in self.devices():
            seen = [self.last_ok.get(device["name"])]
            if self.recorder is not None:
                ring = self.recorder.recent.get(device["name"])
                if ring:
                    seen.append(ring[-1].ts)
                event = self.recorder.last_event.get(device["name"])
                if event is not None:
                    seen.append(event["ts"])
            known = [s for s in seen if s is not None]
            device["last_seen"] = iso(max(known)) if known else None
            device["last_seen_ago_s"] = round(max(0.0, now - max(known)), 1) if known else None
            device["view"] = present.device_view(device, per_device.get(device["name"]), now)
            out.append(device)
        return out

    def limiters(self) -> dict[str, dict[str, float]]:
        """Every rate limiter in the daemon by name (per user, device, endpoint, ...): its decisions so far and,
        for keyed limiters, how many keys it tracks. Read from the metrics, which every limiter reports to."""
        out: dict[str, dict[str, float]] = {}
        for metric in RATE_LIMIT_DECISIONS.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    out.setdefault(sample.labels["limiter"], {})[sample.labels["outcome"]] = sample.value
        for metric in RATE_LIMIT_KEYS.collect():
            for sample in metric.samples:
                out.setdefault(sample.labels["limiter"], {})["keys"] = sample.value
        return dict(sorted(out.items()))

    def overview(self) -> dict[str, Any]:
        """The page's overview and devices, as the ``status`` event and ``GET /api/v1/overview`` carry them:
        the facts, and ``summary``, what they mean (the verdict and the overview's tiles)."""
        status = self.status()
        devices = self.device_views(status)
        error_rate = self.history.error_rate()
        return {
            "summary": present.assess(present.Facts(status, error_rate, devices, time.time())),
            "status": status,
            "error_rate": error_rate,
            "commands_accepted": self.service.accepted,
            "devices": devices,
            "limiters": self.limiters(),
        }

    # --- handlers ----------------------------------------------------------------------------------------------

    async def static(self, request: web.Request) -> web.StreamResponse:
        asset = self.assets.get(request.match_info["name"])
        if asset is None:
            raise web.HTTPNotFound()
        headers = {"ETag": asset.etag, "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
        if request.headers.get("If-None-Match") == asset.etag:
            return web.Response(status=304, headers=headers)
        return web.Response(body=asset.body, content_type=asset.content_type, headers=headers)

    async def overview_handler(self, request: web.Request) -> web.Response:
        return web.json_response(self.overview())

    async def history_handler(self, request: web.Request) -> web.Response:
        return web.json_response(self.history.to_api())

    async def stream_handler(self, request: web.Request) -> web.StreamResponse:
        return await self.hub.stream(request, [encode("status", self.overview())])

    async def page(self, request: web.Request, *, flash: str | None = None, status: int = 200) -> web.Response:
        state = request.query.get("state") or None
        if state is not None and state not in State.__members__.values():
            state = None
        device = request.query.get("device") or None
        records = await self.service.listing(state=state, device=device, limit=50)
        session = request.get("session")
        ov = self.overview()
        html = page.render(
            ov["status"],
            ov["devices"],
            [r.to_api(transitions=False) for r in records],
            principal=auth.principal_of(request),
            summary=ov["summary"],
            csrf=session.csrf if isinstance(session, auth.Session) else "",
            auth_enabled=self.auth.enabled,
            filters={"state": state or "", "device": device or ""},
            limiters=ov["limiters"],
            flash=flash,
            sent=request.query.get("sent"),
        )
        return web.Response(text=html, content_type="text/html", status=status, headers=PAGE_HEADERS)

    async def ui_command(self, request: web.Request) -> web.Response:
        """The page's forms without scripts: a form post becomes a command, then back to the page (or the page
        again with the refusal and its status)."""
        form = await auth.read_form(request)
        payload = form_payload(form, self.devices())
        try:
            rec, _created = await self.service.submit(payload, source="page", user=auth.user_of(request))
        except GatewayError as err:
            return await self.page(
                request, flash=f"refused ({err.status} {err.code}): {err.message}", status=err.status
            )
        return auth.see_other(f"/?sent={rec.id}#commands")


CONSOLE = web.AppKey("console", Console)


def _coerce(raw: str, schema: dict[str, Any]) -> Any:
    kind = schema.get("type")
    try:
        if kind == "integer":
            return int(raw)
        if kind == "number":
            return float(raw)
    except ValueError:
        return raw  # validation says what is wrong with it, with the field's name
    if kind == "boolean":
        return raw in ("on", "true", "1", "yes")
    return raw


def form_payload(form: Any, devices: list[dict[str, Any]]) -> dict[str, Any]:
    """A command from the page's form fields: ``device``, ``action``, ``p.<param>``, ``confirm``, ``priority``;
    or ``text`` for a natural-language command. Parameters take their type from the action's schema."""
    text = str(form.get("text") or "").strip()
    if text:
        return {"text": text}
    device, action = str(form.get("device") or ""), str(form.get("action") or "")
    schema: dict[str, Any] = {}
    for d in devices:
        if d["name"] == device:
            schema = (d["actions"].get(action) or {}).get("params", {}).get("properties", {})
    params: dict[str, Any] = {}
    for key in form:
        if key.startswith("p.") and str(form[key]).strip() != "":
            name = key[2:]
            params[name] = _coerce(str(form[key]).strip(), schema.get(name, {}))
    payload: dict[str, Any] = {"device": device, "action": action, "params": params}
    if form.get("confirm"):
        payload["confirm"] = True
    priority = str(form.get("priority") or "")
    if priority:
        payload["priority"] = priority
    return payload
