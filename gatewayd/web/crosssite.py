"""What a web page on another site must never make this gateway do, whatever the route and whether access control
is on or off: change anything.

A browser sends some requests to any server without asking it first (no CORS preflight): a form post, or a
``fetch`` with no custom header, whose body is ``text/plain``, ``application/x-www-form-urlencoded``,
``multipart/form-data`` or of no declared type, from any page, including a sandboxed iframe, whose ``Origin`` is
``null``. The page cannot read the answer, but the request has already run: with access control off (the default
on loopback) a page a technician opens could start the pump. So :func:`middleware`, installed once by
:func:`gatewayd.web.server.build_app` for every route, refuses each request whose method changes state (anything
but GET, HEAD and OPTIONS):

- **403** ``csrf_failed`` when the browser says it comes from elsewhere: an ``Origin`` that is not this server
  (``null`` included), a ``Sec-Fetch-Site`` other than ``same-origin`` or ``none`` (``cross-site``, ``same-site``:
  another port on this host is another origin), or, with no ``Origin``, a ``Referer`` from another origin;
- **415** ``unsupported_media_type`` when a JSON route gets a body not declared ``application/json`` (or
  ``application/<something>+json``), a body with no ``Content-Type`` at all, or a form or ``text/plain`` type
  even with no body: what a page elsewhere could send without a preflight never reaches a JSON handler. Only
  :data:`FORM_ROUTES` (the page's script-less form, login, logout) take form bodies, and for them the origin
  checks above are the defence (with the session's CSRF token too once logged in).

A request with no ``Origin``, no ``Sec-Fetch-Site`` and no ``Referer`` is let through: every current browser sends
``Origin`` with every request that is not GET or HEAD, so such a request comes from a program (curl, ``gatewayd
send``, a script), which no web page can drive. With access control on, such a program still needs its token.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from aiohttp import hdrs, web

from gatewayd.errors import CsrfFailed, UnsupportedMediaType

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# The only routes that read a form body. Every other state-changing route is JSON: a route added later is
# protected by default, and must be named here to take a form.
FORM_ROUTES = frozenset({"/ui/command", "/login", "/logout"})
# The body types a page may send anywhere without asking first (the CORS "simple" ones), as aiohttp parses them.
SIMPLE_TYPES = frozenset({"text/plain", "application/x-www-form-urlencoded", "multipart/form-data"})
# What a browser's own navigation or a same-origin script says (``none``: typed in the address bar, a bookmark).
_OWN_FETCH_SITES = frozenset({"same-origin", "none"})


def same_origin(origin: str, host: str) -> bool:
    """Whether an ``Origin`` (or ``Referer``) names this server (``host`` is the request's Host header)."""
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and bool(parts.netloc) and parts.netloc.lower() == host.lower()


def is_json(content_type: str) -> bool:
    """``application/json`` or a structured ``application/<name>+json``, as aiohttp parsed it (lower case, no
    parameters)."""
    major, _, minor = content_type.partition("/")
    return major == "application" and (minor == "json" or minor.endswith("+json"))


def foreign(request: web.Request) -> CsrfFailed | None:
    """The refusal for a request a browser made on behalf of another site, else None."""
    origin = request.headers.get(hdrs.ORIGIN)
    fetch_site = request.headers.get("Sec-Fetch-Site")
    details: dict[str, str] = {}
    if origin is not None and not same_origin(origin, request.host):
        details["origin"] = origin
    if fetch_site is not None and fetch_site.lower() not in _OWN_FETCH_SITES:
        details["sec_fetch_site"] = fetch_site
    referer = request.headers.get(hdrs.REFERER)
    if origin is None and referer is not None and not same_origin(referer, request.host):
        details["referer"] = urlsplit(referer)._replace(path="", query="", fragment="").geturl()
    if not details:
        return None
    return CsrfFailed(
        "cross-site request refused: this server takes changes only from its own pages and from programs",
        details=details,
    )


def unreadable_body(request: web.Request) -> UnsupportedMediaType | None:
    """The refusal for a JSON route's request that carries a body not declared JSON, or that is declared as what a
    form or a page's script may send without a preflight (even empty: a form with no fields), else None."""
    declared = hdrs.CONTENT_TYPE in request.headers
    if declared and is_json(request.content_type):
        return None
    if not request.body_exists and not (declared and request.content_type in SIMPLE_TYPES):
        return None  # nothing to read: `curl -X POST .../admin/reset`
    got = request.headers.get(hdrs.CONTENT_TYPE) if declared else None
    return UnsupportedMediaType(
        f"this route takes a JSON body: send it with Content-Type: application/json (got {got or 'no Content-Type'})",
        details={"content_type": got, "accepted": ["application/json", "application/*+json"]},
    )


@web.middleware
async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.method in SAFE_METHODS:
        return await handler(request)
    refusal = foreign(request)
    if refusal is not None:
        raise refusal
    match = request.match_info
    # An unknown path or method keeps its 404 or 405: there is no body to read there.
    if match.http_exception is None and match.route.resource is not None:
        if match.route.resource.canonical not in FORM_ROUTES:
            wrong = unreadable_body(request)
            if wrong is not None:
                raise wrong
    return await handler(request)
