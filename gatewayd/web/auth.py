"""Who may read and who may act: tokens with roles, sessions from the login form, CSRF, failed-login limits.

Configuration (``[http.auth]``) holds each token's name, role and scrypt hash, never the token itself
(``gatewayd hash-token`` makes both). A request is identified, in order, by

- ``Authorization: Bearer <token>``: for scripts and the API; exempt from CSRF checks, since a browser never
  adds this header to a request on its own;
- the ``gatewayd_session`` cookie set by the login form (HttpOnly, SameSite=Strict, Path=/): sessions live in
  memory with an expiry and end with ``POST /logout`` or a restart. Every state-changing request made with the
  cookie must carry the session's CSRF token, in the ``X-CSRF-Token`` header or a ``csrf_token`` form field;
- nothing: an anonymous viewer when ``anonymous_read`` allows it, and only for reading.

Roles are ordered viewer < operator < admin: reading needs viewer, every change operator, ``/api/v1/admin/*``
admin. With ``[http.auth] enabled = false`` (the default, allowed only on a loopback bind) every request may do
everything; requests that change state on behalf of another site are refused in both modes, before this module
sees them (:mod:`gatewayd.web.crosssite`).

Failed logins and failed bearer tokens take a token from two buckets of the resilience kit's
:class:`~gatewayd.resilience.KeyedLimiter`, one per client address and one per user name; while either is
empty, attempts are refused with 429 before the secret is even checked.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import secrets
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import structlog
from aiohttp import web

from gatewayd.config.models import AuthSection, AuthToken
from gatewayd.errors import (
    BadRequest,
    CsrfFailed,
    Forbidden,
    GatewayError,
    InvalidCredentials,
    Unauthenticated,
)
from gatewayd.observability import logging as gwlog
from gatewayd.observability.metrics import RATE_LIMIT_DECISIONS, counter
from gatewayd.resilience import REAL_CLOCK, BucketSpec, Clock, Decision, KeyedLimiter, RateLimited
from gatewayd.web.crosssite import SAFE_METHODS
from gatewayd.web.identity import ANONYMOUS, CSRF_FIELD, OPEN, ROLES, Principal, Role

__all__ = ["ANONYMOUS", "CSRF_FIELD", "OPEN", "ROLES", "Principal", "Role"]  # re-exported: the API of gatewayd.web.auth

log = structlog.get_logger("gatewayd.web.auth")

# Handlers find who is asking as request["principal"] (and the cookie session as request["session"]): plain
# string keys, the contract with the rest of gatewayd.web (aiohttp ignores its own advice to use RequestKey).


SESSION_COOKIE = "gatewayd_session"
LOGIN_COOKIE = "gatewayd_login"  # the login form's own CSRF token (double submit): there is no session yet
CSRF_HEADER = "X-CSRF-Token"

# scrypt's cost for new hashes: 16 MiB and some tens of milliseconds on a laptop, well under a second on a Pi.
SCRYPT_LOG2_N, SCRYPT_R, SCRYPT_P = 14, 8, 1
_KEY_BYTES = 32


# --- tokens and their hashes -------------------------------------------------------------------------------------


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def new_token() -> str:
    """A fresh secret: 256 random bits, URL-safe."""
    return secrets.token_urlsafe(32)


def hash_token(
    token: str, *, log2_n: int = SCRYPT_LOG2_N, r: int = SCRYPT_R, p: int = SCRYPT_P, salt: bytes | None = None
) -> str:
    """``scrypt$<log2 n>$<r>$<p>$<salt>$<key>$<tag>``, the form ``[http.auth] tokens`` keeps."""
    salt = secrets.token_bytes(16) if salt is None else salt
    key = _scrypt(token, salt, log2_n, r, p)
    return f"scrypt${log2_n}${r}${p}${_b64(salt)}${_b64(key)}${token_tag(token)}"


def token_tag(token: str) -> str:
    """16 bits of an HMAC of the token: enough to find which configured entry a presented token could be (so an
    unknown token costs no scrypt at all, and a known one exactly one), too few to test guesses against: a
    dictionary of a million candidates leaves some fifteen per tag, each to be checked with scrypt."""
    return _b64(hmac.digest(_TAG_KEY, token.encode("utf-8"), "sha256")[:_TAG_BYTES])


_TAG_KEY, _TAG_BYTES = b"gatewayd bearer token tag v1", 2


def _stored_tag(stored: str) -> str | None:
    """The tag of a stored hash, None for a hash made before tags (checked by scrypt, as then)."""
    fields = stored.split("$")
    return fields[6] if len(fields) == 7 else None


def _scrypt(token: str, salt: bytes, log2_n: int, r: int, p: int) -> bytes:
    n = 2**log2_n
    return hashlib.scrypt(
        token.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=128 * r * n * 2 + 1024**2, dklen=_KEY_BYTES
    )


def verify_token(token: str, stored: str) -> bool:
    """True if ``token`` is the secret ``stored`` was made from. Constant-time in the comparison; a malformed
    hash verifies nothing."""
    try:
        scheme, log2_n, r, p, salt, key, *tag = stored.split("$")
        if scheme != "scrypt" or len(tag) > 1:
            return False
        expected = _unb64(key)
        actual = _scrypt(token, _unb64(salt), int(log2_n), int(r), int(p))
    except (ValueError, MemoryError):
        return False
    return hmac.compare_digest(actual, expected)


# --- who is asking -----------------------------------------------------------------------------------------------


def principal_of(request: web.Request) -> Principal:
    found = request.get("principal")
    return found if isinstance(found, Principal) else OPEN


def user_of(request: web.Request) -> str | None:
    """The name to record as a command's ``user``: the token's name, or None for an unauthenticated request."""
    principal = principal_of(request)
    return principal.name if principal.authenticated else None


@dataclass(slots=True)
class Session:
    id: str
    principal: Principal
    csrf: str
    expires: float  # on the authenticator's monotonic clock


class Sessions:
    """Server-side sessions in memory, oldest first; bounded, and gone on restart (log in again)."""

    def __init__(self, ttl_s: float, max_sessions: int, clock: Clock):
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self._clock = clock
        self._by_id: OrderedDict[str, Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_id)

    def create(self, principal: Principal) -> Session:
        now = self._clock.monotonic()
        self._expire(now)
        while len(self._by_id) >= self.max_sessions:
            self._by_id.popitem(last=False)
        session = Session(secrets.token_urlsafe(32), principal, secrets.token_urlsafe(32), now + self.ttl_s)
        self._by_id[session.id] = session
        return session

    def get(self, session_id: str) -> Session | None:
        session = self._by_id.get(session_id)
        if session is None:
            return None
        if self._clock.monotonic() >= session.expires:
            del self._by_id[session_id]
            return None
        return session

    def drop(self, session_id: str) -> None:
        self._by_id.pop(session_id, None)

    def _expire(self, now: float) -> None:
        for sid in [sid for sid, s in self._by_id.items() if now >= s.expires]:
            del self._by_id[sid]


def csrf_matches(expected: str, presented: str | None) -> bool:
    return bool(presented) and hmac.compare_digest(expected.encode(), (presented or "").encode())


def required_role(method: str, path: str) -> Role:
    if path.startswith("/api/v1/admin/"):
        return "admin"
    if method in SAFE_METHODS:
        return "viewer"
    return "operator"


# Paths anyone may use: probes for systemd and load balancers, the login form, and the page's own assets.
# /logout checks its own CSRF token: logging out must work without a valid session.
_PUBLIC = frozenset({"/healthz", "/readyz", "/login", "/logout", "/favicon.ico"})


def is_public(path: str) -> bool:
    return path in _PUBLIC or path.startswith("/static/")


class Authenticator:
    def __init__(self, cfg: AuthSection, *, clock: Clock = REAL_CLOCK):
        self.cfg = cfg
        self.enabled = cfg.enabled
        self.sessions = Sessions(cfg.session_ttl_s, cfg.max_sessions, clock)
        self._by_name: dict[str, AuthToken] = {t.name: t for t in cfg.tokens}
        # Bearer tokens are looked up by their tag: an unknown token costs no scrypt, a known one one (hashes made
        # before tags existed are each tried, as they were).
        self._by_tag: dict[str | None, list[AuthToken]] = {}
        for t in cfg.tokens:
            self._by_tag.setdefault(_stored_tag(t.hash), []).append(t)
        # Tokens already verified, by their SHA-256: a bearer request costs one scrypt per token, not per request.
        # At most one entry per configured token (only successes are kept).
        self._verified: dict[bytes, AuthToken] = {}
        spec = BucketSpec(cfg.login_burst, cfg.login_refill_per_min / 60.0)
        self.failures = KeyedLimiter(spec, name="http:failed_login", max_keys=10_000, clock=clock)

    # --- rate limit of failures ----------------------------------------------------------------------------------

    def _keys(self, address: str, name: str | None) -> list[str]:
        keys = [f"addr:{address}"]
        if name:
            keys.append(f"user:{name}")
        return keys

    def refused(self, address: str, name: str | None = None) -> RateLimited | None:
        """The refusal to answer while this address or name has no failed attempts left, else None."""
        worst: Decision | None = None
        for key in self._keys(address, name):
            decision = self.failures.peek(key)
            if not decision.allowed and (worst is None or decision.wait_s > worst.wait_s):
                worst = decision
        if worst is None:
            return None
        counter(RATE_LIMIT_DECISIONS, self.failures.name, "limited").inc()  # peeking counts nothing by itself
        return worst.refusal(self.failures.name)

    def failed(self, address: str, name: str | None = None) -> None:
        for key in self._keys(address, name):
            self.failures.try_acquire(key)
        log.warning("auth_failed", client=address, user=name)

    # --- verification ------------------------------------------------------------------------------------------

    async def check_token(self, token: str) -> Principal | None:
        digest = hashlib.sha256(token.encode("utf-8")).digest()
        entry = self._verified.get(digest)
        if entry is None:
            entry = await asyncio.to_thread(self._find, token)
            if entry is None:
                return None
            self._verified[digest] = entry
            gwlog.add_secret("http.auth", token)  # a real token now known in clear: the log must never show it
        return Principal(entry.name, entry.role, "bearer")

    def _find(self, token: str) -> AuthToken | None:
        for entry in self._by_tag.get(token_tag(token), []) + self._by_tag.get(None, []):
            if verify_token(token, entry.hash):
                return entry
        return None

    async def login(self, name: str, token: str) -> Principal | None:
        entry = self._by_name.get(name)
        if entry is None:
            await asyncio.to_thread(hash_token, token)  # as long as a real check: names cannot be probed by timing
            return None
        if not await asyncio.to_thread(verify_token, token, entry.hash):
            return None
        gwlog.add_secret("http.auth", token)
        return Principal(entry.name, entry.role, "session")

    # --- identification ----------------------------------------------------------------------------------------

    async def identify(self, request: web.Request) -> tuple[Principal | None, Session | None]:
        """The request's principal from a bearer token or the session cookie (None: no valid credential)."""
        header = request.headers.get("Authorization")
        if header is not None:
            scheme, _, token = header.partition(" ")
            address = client_address(request)
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated("the Authorization header must be 'Bearer <token>'")
            refusal = self.refused(address)
            if refusal is not None:
                raise refusal
            principal = await self.check_token(token.strip())
            if principal is None:
                self.failed(address)
                raise InvalidCredentials("the bearer token is not valid")
            return principal, None
        session_id = request.cookies.get(SESSION_COOKIE)
        if session_id:
            session = self.sessions.get(session_id)
            if session is not None:
                return session.principal, session
        return None, None


def client_address(request: web.Request) -> str:
    return request.remote or "unknown"


AUTH = web.AppKey("auth", Authenticator)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _refusal(err: GatewayError, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": err.to_dict()}, status=err.status, headers=headers)


def wants_html(request: web.Request) -> bool:
    return request.method == "GET" and "text/html" in request.headers.get("Accept", "")


async def presented_csrf(request: web.Request) -> str | None:
    header = request.headers.get(CSRF_HEADER)
    if header:
        return header
    if request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        form = await read_form(request)  # aiohttp keeps it: the handler reads the same form
        value = form.get(CSRF_FIELD)
        return value if isinstance(value, str) else None
    return None


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    auth = request.app[AUTH]
    unsafe = request.method not in SAFE_METHODS  # a request from another site never gets here (crosssite.py)
    if not auth.enabled:
        request["principal"] = OPEN
        return await handler(request)
    try:
        principal, session = await auth.identify(request)
    except RateLimited as err:
        return _refusal(err, err.headers())
    except Unauthenticated as err:
        return _refusal(err)
    if is_public(request.path):
        request["principal"] = principal or ANONYMOUS
        request["session"] = session
        return await handler(request)
    if principal is None:
        if not unsafe and auth.cfg.anonymous_read:
            principal = ANONYMOUS
        elif wants_html(request):
            raise web.HTTPSeeOther(f"/login?next={quote(str(request.rel_url), safe='/')}")
        else:
            return _refusal(Unauthenticated("log in, or send 'Authorization: Bearer <token>'"))
    need = required_role(request.method, request.path)
    if not principal.can(need):
        return _refusal(
            Forbidden(
                f"{principal.name} ({principal.role}) may not do this; it needs {need}",
                details={"role": principal.role, "required": need},
            )
        )
    if unsafe and session is not None and not csrf_matches(session.csrf, await presented_csrf(request)):
        return _refusal(CsrfFailed(f"missing or wrong CSRF token: send the {CSRF_HEADER} header"))
    request["principal"] = principal
    request["session"] = session
    return await handler(request)


# --- the login form ----------------------------------------------------------------------------------------------


def safe_next(target: str | None) -> str:
    """Where to go after logging in: a path on this server only (no open redirect)."""
    if not target or not target.startswith("/") or target.startswith(("//", "/\\")):
        return "/"
    return target


def see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location, "Cache-Control": "no-store"})


def _set_cookie(
    resp: web.StreamResponse, auth: Authenticator, name: str, value: str, path: str, max_age: float
) -> None:
    resp.set_cookie(
        name, value, httponly=True, samesite="Strict", path=path, max_age=int(max_age), secure=auth.cfg.cookie_secure
    )


def _login_page(
    request: web.Request, *, error: GatewayError | None = None, headers: dict[str, str] | None = None
) -> web.Response:
    from gatewayd.web import page  # the page module renders; this one only decides

    auth = request.app[AUTH]
    token = secrets.token_urlsafe(24)
    target = safe_next(request.query.get("next"))
    html = page.render_login(
        csrf=token, next_path=target, error=None if error is None else error.message, enabled=auth.enabled
    )
    resp = web.Response(
        text=html,
        content_type="text/html",
        status=200 if error is None else error.status,
        headers={"Cache-Control": "no-store", **(headers or {})},
    )
    _set_cookie(resp, auth, LOGIN_COOKIE, token, "/login", 3600)
    return resp


async def login_form(request: web.Request) -> web.StreamResponse:
    if principal_of(request).authenticated:
        raise web.HTTPSeeOther(safe_next(request.query.get("next")))
    return _login_page(request)


def _login_refusal(request: web.Request, err: GatewayError, headers: dict[str, str] | None = None) -> web.Response:
    if "text/html" in request.headers.get("Accept", ""):
        return _login_page(request, error=err, headers=headers)
    return _refusal(err, headers)


async def login(request: web.Request) -> web.StreamResponse:
    """``POST /login`` (form: name, token, csrf_token, next): a session cookie, then back to the page."""
    auth = request.app[AUTH]
    if not auth.enabled:
        raise web.HTTPSeeOther("/")
    form = await read_form(request)
    name, token, csrf, target = (str(form.get(k) or "") for k in ("name", "token", CSRF_FIELD, "next"))
    if not csrf_matches(request.cookies.get(LOGIN_COOKIE, ""), csrf):
        return _login_refusal(request, CsrfFailed("the login form expired or came from elsewhere: try again"))
    address = client_address(request)
    refusal = auth.refused(address, name)
    if refusal is not None:
        return _login_refusal(request, refusal, refusal.headers())
    principal = await auth.login(name, token) if name and token else None
    if principal is None:
        auth.failed(address, name or None)
        return _login_refusal(request, InvalidCredentials("unknown name or wrong token"))
    session = auth.sessions.create(principal)
    log.info("login", user=principal.name, role=principal.role, client=address)
    resp = see_other(safe_next(target))
    _set_cookie(resp, auth, SESSION_COOKIE, session.id, "/", auth.cfg.session_ttl_s)
    resp.del_cookie(LOGIN_COOKIE, path="/login")
    return resp


async def logout(request: web.Request) -> web.StreamResponse:
    """``POST /logout`` (form field or header with the session's CSRF token)."""
    session = request.get("session")
    if isinstance(session, Session) and csrf_matches(session.csrf, await presented_csrf(request)):
        request.app[AUTH].sessions.drop(session.id)
        log.info("logout", user=session.principal.name)
    resp = see_other("/login" if request.app[AUTH].enabled else "/")
    resp.del_cookie(SESSION_COOKIE, path="/")
    return resp


async def whoami(request: web.Request) -> web.Response:
    """``GET /api/v1/session``: who the server thinks you are, and the CSRF token for your session's forms."""
    session = request.get("session")
    return web.json_response(
        {
            "auth_enabled": request.app[AUTH].enabled,
            "principal": principal_of(request).to_api(),
            "csrf_token": session.csrf if isinstance(session, Session) else None,
        },
        headers={"Cache-Control": "no-store"},
    )


async def read_form(request: web.Request) -> Any:
    """The request's form fields. A body aiohttp cannot parse (multipart without a boundary, broken encoding)
    is the client's mistake, 400, not a server error; a body over the size limit stays 413."""
    try:
        return await request.post()
    except web.HTTPException:
        raise
    except Exception as err:
        raise BadRequest(f"the form cannot be read: {err}") from None


def install(app: web.Application, auth: Authenticator) -> None:
    """The middleware (after the error formatter, so refusals keep the standard body) and the login routes."""
    app[AUTH] = auth
    app.middlewares.append(auth_middleware)
    app.router.add_get("/login", login_form)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
    app.router.add_get("/api/v1/session", whoami)
