"""A web page on another site cannot change anything: every state-changing route, listed from the application's own
router, refuses a request a browser made on another site's behalf (403 ``csrf_failed``), and a JSON route refuses a
body a page could send without a preflight (415 ``unsupported_media_type``), with access control off and on. The
page's own requests and programs (curl, the CLI) still get through."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any, cast
from urllib.parse import urlencode

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gatewayd.config.models import HttpSection
from gatewayd.web import crosssite
from gatewayd.web.console import Console
from gatewayd.web.server import WebContext, build_app, errors_middleware
from tests.conftest import ROOT, Daemon
from tests.webauth import auth_env, bearer, login, raw

# What each path parameter is filled with: the request that would do the most harm if it got through.
FILL = {"scenario": "serial_unplug", "id": "x", "name": "pump1"}
SET_SPEED = {"device": "pump1", "action": "set_speed", "params": {"percent": 100}}
FORM = "application/x-www-form-urlencoded"
SIMPLE_TYPES = ["text/plain", FORM, "multipart/form-data; boundary=x", "text/plain; charset=utf-8"]
FOREIGN = [
    {"Origin": "null"},  # a sandboxed iframe, a data: URL, a page with Referrer-Policy: no-referrer
    {"Origin": "http://evil.example"},
    {"Origin": "http://127.0.0.1:1"},  # this host, another port: another origin
    {"Sec-Fetch-Site": "cross-site"},
    {"Sec-Fetch-Site": "same-site"},
    {"Referer": "http://evil.example/attack.html"},
]


def _app() -> web.Application:
    """The daemon's application as WebServer builds it, with collaborators that must never be reached: every
    request in these tests is refused before a handler runs."""
    ctx = WebContext(cast(Any, None), cast(Any, None), dict, 30.0)
    console = Console(HttpSection(), service=cast(Any, None), status=dict, devices=list)
    return build_app(ctx, 65536, None, console)


def state_changing_routes() -> list[tuple[str, str]]:
    """(method, path) of every route that is not GET, HEAD or OPTIONS, path parameters filled in."""
    found = []
    for route in _app().router.routes():
        if route.method in crosssite.SAFE_METHODS or route.resource is None:
            continue
        path = re.sub(r"\{(\w+)[^}]*\}", lambda m: FILL.get(m.group(1), "x"), route.resource.canonical)
        found.append((route.method, path))
    return sorted(found)


def test_the_router_lists_the_routes_a_reviewer_found_open() -> None:
    routes = state_changing_routes()
    for expected in ("/api/v1/commands", "/ui/command", "/login", "/logout", "/api/v1/admin/test/serial_unplug"):
        assert ("POST", expected) in routes, routes
    assert {path for _, path in routes} >= crosssite.FORM_ROUTES  # the form routes exist as named


def body_for(path: str) -> tuple[bytes, str]:
    """What the route takes, as its own client sends it: a form for the form routes, JSON elsewhere."""
    if path in crosssite.FORM_ROUTES:
        return urlencode({"device": "pump1", "action": "set_speed", "p.percent": "100"}).encode(), FORM
    return json.dumps(SET_SPEED).encode(), "application/json"


# --- in process: the application build_app makes -----------------------------------------------------------------


@pytest.fixture
async def client() -> AsyncIterator[TestClient[web.Request, web.Application]]:
    c = TestClient(TestServer(_app(), host="127.0.0.1"))
    await c.start_server()
    yield c
    await c.close()


async def _error(resp: Any) -> tuple[int, str]:
    return resp.status, (await resp.json())["error"]["code"]


@pytest.mark.parametrize(("method", "path"), state_changing_routes())
async def test_every_state_changing_route_refuses_other_sites(client: Any, method: str, path: str) -> None:
    body, ctype = body_for(path)
    for headers in FOREIGN:
        resp = await client.request(method, path, data=body, headers={"Content-Type": ctype, **headers})
        assert await _error(resp) == (403, "csrf_failed"), headers


@pytest.mark.parametrize(("method", "path"), [r for r in state_changing_routes() if r[1] not in crosssite.FORM_ROUTES])
async def test_every_json_route_refuses_a_body_a_page_could_send_without_asking(
    client: Any, method: str, path: str
) -> None:
    body = json.dumps(SET_SPEED).encode()
    for ctype in [*SIMPLE_TYPES, "application/xml"]:
        resp = await client.request(method, path, data=body, headers={"Content-Type": ctype})
        status, code = await _error(resp)
        assert (status, code) == (415, "unsupported_media_type"), ctype
    # A form with no fields has no body, and is still what a page elsewhere sends.
    resp = await client.request(method, path, data=b"", headers={"Content-Type": FORM})
    assert await _error(resp) == (415, "unsupported_media_type")
    # A body with no declared type (what fetch() sends for a Blob): refused too.
    resp = await client.request(method, path, data=body, skip_auto_headers=["Content-Type"])
    assert await _error(resp) == (415, "unsupported_media_type")
    # From a sandboxed iframe: the origin is refused first.
    resp = await client.request(method, path, data=body, headers={"Content-Type": "text/plain", "Origin": "null"})
    assert await _error(resp) == (403, "csrf_failed")


async def _passed(request: web.Request) -> web.Response:
    return web.json_response({"reached": request.path})


@pytest.fixture
async def small() -> AsyncIterator[TestClient[web.Request, web.Application]]:
    """The middleware alone, in front of handlers that say they were reached."""
    app = web.Application(middlewares=[errors_middleware, crosssite.middleware])
    app.router.add_post("/api/v1/thing", _passed)
    app.router.add_post("/ui/command", _passed)
    c = TestClient(TestServer(app, host="127.0.0.1"))
    await c.start_server()
    yield c
    await c.close()


async def test_the_own_pages_and_programs_get_through(small: Any) -> None:
    own = f"http://{small.host}:{small.port}"
    for headers in (
        {},  # curl, a script, the CLI
        {"X-Gatewayd-Client": "cli"},
        {"Origin": own, "Sec-Fetch-Site": "same-origin", "Referer": f"{own}/"},  # the page's fetch()
        {"Sec-Fetch-Site": "none"},
        {"Referer": f"{own}/?state=failed"},
    ):
        for ctype in ("application/json", "application/json; charset=utf-8", "application/merge-patch+json"):
            resp = await small.post("/api/v1/thing", data=b"{}", headers={"Content-Type": ctype, **headers})
            assert resp.status == 200, (headers, ctype)
        resp = await small.post("/ui/command", data=b"device=pump1", headers={"Content-Type": FORM, **headers})
        assert resp.status == 200, headers
    resp = await small.post("/api/v1/thing", skip_auto_headers=["Content-Type"])  # `curl -X POST .../admin/reset`
    assert resp.status == 200, await resp.text()
    assert (await small.post("/api/v1/thing")).status == 200  # aiohttp's client: octet-stream, and no body
    assert (await small.get("/api/v1/thing", headers={"Origin": "null"})).status == 405  # reading is not refused


def test_origin_checks() -> None:
    assert crosssite.same_origin("http://127.0.0.1:8080", "127.0.0.1:8080")
    assert crosssite.same_origin("http://127.0.0.1:8080/page?x=1", "127.0.0.1:8080")  # a Referer
    assert not crosssite.same_origin("null", "127.0.0.1:8080")
    assert not crosssite.same_origin("http://127.0.0.1:8081", "127.0.0.1:8080")
    assert not crosssite.same_origin("file://", "")
    assert crosssite.is_json("application/json") and crosssite.is_json("application/problem+json")
    assert not crosssite.is_json("text/json") and not crosssite.is_json("application/jsonp")


# --- the daemon ----------------------------------------------------------------------------------------------------


def _nothing_happened(d: Daemon) -> None:
    assert d.sim_log() == []  # the pump never heard a thing
    status, _, _, data = raw("GET", f"{d.url}/api/v1/stats", {"Accept": "application/json", **bearer("ada")})
    assert status == 200 and sum(json.loads(data)["commands"].values()) == 0  # no command stored
    events = {line.get("event") for line in d.log_lines()}
    assert not events & {"operator_reset", "operator_test_started"}, events


def _refuses_other_sites(d: Daemon, credentials: dict[str, str]) -> None:
    for method, path in state_changing_routes():
        body, ctype = body_for(path)
        for headers in FOREIGN:
            status, _, _, data = raw(method, f"{d.url}{path}", {"Content-Type": ctype, **credentials, **headers}, body)
            assert status == 403, (path, headers, status, data[:200])
            assert json.loads(data)["error"]["code"] == "csrf_failed", (path, headers)
        if path not in crosssite.FORM_ROUTES:
            for ctype in SIMPLE_TYPES:
                status, _, _, data = raw(method, f"{d.url}{path}", {"Content-Type": ctype, **credentials}, body)
                assert status == 415 and json.loads(data)["error"]["code"] == "unsupported_media_type", (path, ctype)
    _nothing_happened(d)


def test_an_open_gateway_refuses_other_sites_on_every_route(make_daemon: Any) -> None:
    d: Daemon = make_daemon()
    d.start()
    _refuses_other_sites(d, {})
    # The page's own request, and the CLI, which sends no Origin at all.
    own = {"Origin": d.url, "Sec-Fetch-Site": "same-origin", "Content-Type": "application/json"}
    status, _, _, data = raw("POST", f"{d.url}/api/v1/commands", own, json.dumps(SET_SPEED | {"id": "page"}).encode())
    assert status == 202, data
    assert d.wait_final("page")["state"] == "succeeded"
    form = urlencode({"device": "pump1", "action": "set_speed", "p.percent": "30"}).encode()
    status, headers, _, _ = raw("POST", f"{d.url}/ui/command", {**own, "Content-Type": FORM}, form)
    assert status == 303 and headers["Location"].startswith("/?sent=")
    done = subprocess.run(
        [sys.executable, "-m", "gatewayd", "send", "pump1", "set_speed", "percent=40", "--id", "cli", "--url", d.url],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["source"] == "cli" and d.executions("cli") == 1
    done = subprocess.run(
        [sys.executable, "-m", "gatewayd", "reset", "--url", d.url],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr  # a POST without a body needs no Content-Type


def test_a_gateway_with_access_control_refuses_other_sites_even_with_credentials(make_daemon: Any) -> None:
    d: Daemon = make_daemon(auth_env(anonymous_read=False))
    d.start()
    _refuses_other_sites(d, bearer("ada"))
    # A logged-in browser session with its CSRF token: still refused from a sandboxed iframe.
    _, _, session = login(d.url, "ada")
    cookie = session.split(";")[0]
    _, _, _, who = raw("GET", f"{d.url}/api/v1/session", {"Cookie": cookie, "Accept": "application/json"})
    csrf = json.loads(who)["csrf_token"]
    form = urlencode({"device": "pump1", "action": "set_speed", "p.percent": "100", "csrf_token": csrf}).encode()
    status, _, _, data = raw(
        "POST", f"{d.url}/ui/command", {"Content-Type": FORM, "Cookie": cookie, "Origin": "null"}, form
    )
    assert status == 403 and json.loads(data)["error"]["code"] == "csrf_failed"
    _nothing_happened(d)
    # The same with its own origin, and a program with its token, get through.
    status, headers, _, _ = raw(
        "POST", f"{d.url}/ui/command", {"Content-Type": FORM, "Cookie": cookie, "Origin": d.url}, form
    )
    assert status == 303 and headers["Location"].startswith("/?sent=")
    status, _, _, data = raw(
        "POST",
        f"{d.url}/api/v1/commands",
        {"Content-Type": "application/json", **bearer("otto")},
        json.dumps(SET_SPEED).encode(),
    )
    assert status == 202 and json.loads(data)["user"] == "otto"
