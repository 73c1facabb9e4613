"""Access control, piece by piece: token hashes, roles, sessions, CSRF, the failed-login limit, and the middleware's
decisions on a small aiohttp application (the daemon-level tests are in test_access.py)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from pydantic import ValidationError

from gatewayd.config.models import AuthSection, AuthToken, HttpSection
from gatewayd.resilience import FakeClock
from gatewayd.web import auth, crosssite
from gatewayd.web.auth import Authenticator, Principal, hash_token, verify_token
from gatewayd.web.server import errors_middleware

# The cheapest cost the configuration accepts: these tests check logic, not scrypt's strength.
FAST = 10


def entry(name: str, role: str, token: str) -> dict[str, str]:
    return {"name": name, "role": role, "hash": hash_token(token, log2_n=FAST)}


# --- hashes ------------------------------------------------------------------------------------------------------


def test_a_hash_verifies_its_token_only_and_is_salted() -> None:
    first, second = hash_token("s3cret", log2_n=FAST), hash_token("s3cret", log2_n=FAST)
    assert first != second  # a fresh salt each time
    assert verify_token("s3cret", first) and verify_token("s3cret", second)
    assert not verify_token("s3cret ", first) and not verify_token("", first)
    assert re.fullmatch(r"scrypt\$10\$8\$1\$[A-Za-z0-9_-]{22}\$[A-Za-z0-9_-]{43}\$[A-Za-z0-9_-]{3}", first)
    AuthToken(name="x", role="viewer", hash=first)  # the configuration accepts what hash_token makes


@pytest.mark.parametrize(
    "stored",
    ["", "scrypt$10$8$1$abc", "pbkdf2$10$8$1$c2FsdA$a2V5", "scrypt$x$8$1$c2FsdHNhbHRzYWx0$a2V5", "scrypt$10$8$1$!!$!!"],
)
def test_a_malformed_hash_verifies_nothing(stored: str) -> None:
    assert verify_token("anything", stored) is False


def test_the_configuration_refuses_bad_hashes_costs_and_names() -> None:
    good = hash_token("t", log2_n=FAST)
    with pytest.raises(ValidationError, match="hash"):
        AuthToken(name="x", role="viewer", hash="sha256:abcdef")
    with pytest.raises(ValidationError, match="cost out of range"):
        AuthToken(name="x", role="viewer", hash=good.replace("scrypt$10$", "scrypt$22$"))
    with pytest.raises(ValidationError, match="role"):
        AuthToken(name="x", role="root", hash=good)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="once"):
        AuthSection(tokens=[AuthToken(name="x", role="viewer", hash=good)] * 2)
    with pytest.raises(ValidationError, match="reserved"):
        AuthSection(tokens=[AuthToken(name="anonymous", role="viewer", hash=good)])


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "::", "gateway.local"])
def test_an_open_gateway_must_stay_on_loopback(host: str) -> None:
    with pytest.raises(ValidationError, match="reachable from the network"):
        HttpSection(host=host)
    HttpSection(host=host, auth=AuthSection(enabled=True))


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.53", "::1", "localhost"])
def test_loopback_needs_no_access_control(host: str) -> None:
    assert HttpSection(host=host).auth.enabled is False


# --- roles, origins, redirects ----------------------------------------------------------------------------------


def test_roles_are_ordered_and_routes_need_the_right_one() -> None:
    viewer, operator, admin = (Principal("p", r) for r in ("viewer", "operator", "admin"))
    assert viewer.can("viewer") and not viewer.can("operator") and not viewer.can("admin")
    assert operator.can("operator") and not operator.can("admin")
    assert admin.can("viewer") and admin.can("operator") and admin.can("admin")
    assert auth.required_role("GET", "/api/v1/commands") == "viewer"
    assert auth.required_role("POST", "/api/v1/commands") == "operator"
    assert auth.required_role("POST", "/ui/command") == "operator"
    assert auth.required_role("POST", "/api/v1/admin/test/broker_down") == "admin"
    assert auth.required_role("GET", "/api/v1/admin/anything") == "admin"


def test_origin_and_next_checks() -> None:
    assert crosssite.same_origin("http://127.0.0.1:8080", "127.0.0.1:8080")
    assert not crosssite.same_origin("http://127.0.0.1:8081", "127.0.0.1:8080")
    assert not crosssite.same_origin("http://evil.example", "127.0.0.1:8080")
    assert not crosssite.same_origin("file://", "127.0.0.1:8080")
    assert auth.safe_next("/?state=failed") == "/?state=failed"
    for bad in (None, "", "http://evil.example/", "//evil.example/", "/\\evil.example", "javascript:alert(1)"):
        assert auth.safe_next(bad) == "/"
    assert (
        auth.csrf_matches("abc", "abc") and not auth.csrf_matches("abc", "abd") and not auth.csrf_matches("abc", None)
    )


# --- sessions -----------------------------------------------------------------------------------------------------


def test_sessions_expire_are_bounded_and_end_on_logout() -> None:
    clock = FakeClock()
    sessions = auth.Sessions(ttl_s=60, max_sessions=2, clock=clock)
    who = Principal("op", "operator", "session")
    first = sessions.create(who)
    assert sessions.get(first.id) is first and len(first.csrf) >= 32 and first.csrf != first.id
    clock.advance(59.9)
    assert sessions.get(first.id) is first
    clock.advance(0.1)
    assert sessions.get(first.id) is None  # expired, and forgotten
    a, b = sessions.create(who), sessions.create(who)
    c = sessions.create(who)  # over the bound: the oldest goes
    assert sessions.get(a.id) is None and sessions.get(b.id) is b and sessions.get(c.id) is c
    sessions.drop(b.id)
    assert sessions.get(b.id) is None and len(sessions) == 1


async def test_an_unknown_token_costs_no_scrypt_however_many_tokens_are_configured(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bearer token is found by its tag, not by trying every configured hash: a flood of wrong tokens costs
    nothing but an HMAC each, and a right one one scrypt. A hash made before tags existed is still accepted."""
    tokens = [f"tok-{i:03d}" for i in range(60)]
    legacy = hash_token("tok-legacy", log2_n=FAST).rsplit("$", 1)[0]  # the six-field form of earlier releases
    cfg = AuthSection(
        enabled=True,
        tokens=[entry(f"user{i}", "viewer", t) for i, t in enumerate(tokens)]
        + [AuthToken(name="old", role="operator", hash=legacy)],
    )
    authn = Authenticator(cfg)
    calls: list[str] = []
    real = auth.verify_token

    def counting(token: str, stored: str) -> bool:
        calls.append(stored)
        return real(token, stored)

    monkeypatch.setattr(auth, "verify_token", counting)
    wrong = [f"guess-{i}" for i in range(200)]
    for guess in wrong:
        assert await authn.check_token(guess) is None
    tag_collisions = sum(auth.token_tag(g) == auth.token_tag(t) for g in wrong for t in tokens)
    assert len(calls) == len(wrong) + tag_collisions  # the legacy entry for each, a tagged one only on a collision
    calls.clear()
    assert await authn.check_token("tok-042") == Principal("user42", "viewer", "bearer")
    assert len(calls) == 1
    assert await authn.check_token("tok-legacy") == Principal("old", "operator", "bearer")


# --- the authenticator ------------------------------------------------------------------------------------------


async def test_a_bearer_token_is_verified_once_then_remembered(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = AuthSection(enabled=True, tokens=[entry("ops", "operator", "tok-ops"), entry("eve", "viewer", "tok-eve")])
    authn = Authenticator(cfg)
    calls: list[str] = []
    real = auth.verify_token

    def counting(token: str, stored: str) -> bool:
        calls.append(token)
        return real(token, stored)

    monkeypatch.setattr(auth, "verify_token", counting)
    assert await authn.check_token("tok-eve") == Principal("eve", "viewer", "bearer")
    verified = len(calls)
    assert await authn.check_token("tok-eve") == Principal("eve", "viewer", "bearer")
    assert len(calls) == verified == 1  # one scrypt for the holder's entry, none for the other; none the 2nd time
    assert await authn.check_token("tok-nobody") is None
    assert await authn.check_token("tok-nobody") is None  # failures are not remembered
    assert await authn.login("ops", "tok-ops") == Principal("ops", "operator", "session")
    assert await authn.login("ops", "tok-eve") is None  # another holder's token is not this name's
    assert await authn.login("nobody", "tok-ops") is None


def test_failed_attempts_are_limited_per_address_and_per_name() -> None:
    clock = FakeClock()
    cfg = AuthSection(enabled=True, login_burst=3, login_refill_per_min=6)  # one attempt back every 10 s
    authn = Authenticator(cfg, clock=clock)
    for _ in range(3):
        assert authn.refused("10.0.0.1", "ops") is None
        authn.failed("10.0.0.1", "ops")
    refusal = authn.refused("10.0.0.1", "ops")
    assert refusal is not None and refusal.status == 429 and refusal.retry_after_s == pytest.approx(10)
    headers = refusal.headers()
    assert headers["Retry-After"] == "10" and headers["X-RateLimit-Limit"] == "3"
    assert headers["X-RateLimit-Remaining"] == "0"
    assert authn.refused("10.0.0.1", "someone") is not None  # the address is spent, whatever the name
    assert authn.refused("10.0.0.2", "ops") is not None  # the name is spent, whatever the address
    assert authn.refused("10.0.0.2", "someone") is None
    clock.advance(10)
    assert authn.refused("10.0.0.1", "ops") is None  # one attempt has come back


# --- the middleware on a small application ----------------------------------------------------------------------


async def _ok(request: web.Request) -> web.Response:
    return web.json_response({"principal": auth.principal_of(request).to_api(), "user": auth.user_of(request)})


@pytest.fixture
async def client_for() -> AsyncIterator[Any]:
    clients: list[TestClient[web.Request, web.Application]] = []

    async def make(cfg: AuthSection) -> TestClient[web.Request, web.Application]:
        # The order build_app gives them: the error format, the cross-site check, then access control.
        app = web.Application(middlewares=[errors_middleware, crosssite.middleware])
        auth.install(app, Authenticator(cfg))
        for path in ("/api/v1/thing", "/api/v1/admin/test/x", "/healthz"):
            app.router.add_get(path, _ok)
            app.router.add_post(path, _ok)
        client = TestClient(TestServer(app, host="127.0.0.1"))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


async def _error(resp: Any) -> tuple[int, str]:
    body = await resp.json()
    return resp.status, body["error"]["code"]


async def test_without_access_control_everything_is_allowed_but_cross_origin_changes(client_for: Any) -> None:
    client = await client_for(AuthSection())
    resp = await client.post("/api/v1/thing")
    assert resp.status == 200 and (await resp.json())["principal"] == {
        "name": "anonymous",
        "role": "admin",
        "via": "open",
    }
    assert (await resp.json())["user"] is None
    for origin in ("http://evil.example", "null"):
        resp = await client.post("/api/v1/thing", headers={"Origin": origin})
        assert await _error(resp) == (403, "csrf_failed")
    resp = await client.post("/api/v1/thing", headers={"Origin": f"http://{client.host}:{client.port}"})
    assert resp.status == 200


async def test_roles_bearer_tokens_and_anonymous_reading(client_for: Any) -> None:
    tokens = [entry("eve", "viewer", "t-eve"), entry("ops", "operator", "t-ops"), entry("root", "admin", "t-root")]
    closed = await client_for(AuthSection(enabled=True, tokens=tokens))
    assert await _error(await closed.get("/api/v1/thing")) == (401, "unauthenticated")
    assert (await closed.get("/healthz")).status == 200  # probes stay open
    bearer = {"Authorization": "Bearer t-eve"}
    resp = await closed.get("/api/v1/thing", headers=bearer)
    assert resp.status == 200 and (await resp.json())["user"] == "eve"
    assert await _error(await closed.post("/api/v1/thing", headers=bearer)) == (403, "forbidden")
    ops = {"Authorization": "Bearer t-ops"}
    assert (await closed.post("/api/v1/thing", headers=ops)).status == 200  # no CSRF token: no cookie involved
    assert await _error(await closed.post("/api/v1/admin/test/x", headers=ops)) == (403, "forbidden")
    assert (await closed.post("/api/v1/admin/test/x", headers={"Authorization": "Bearer t-root"})).status == 200
    assert await _error(await closed.get("/api/v1/thing", headers={"Authorization": "Bearer nope"})) == (
        401,
        "invalid_credentials",
    )
    assert await _error(await closed.get("/api/v1/thing", headers={"Authorization": "Basic b3BzOnQtb3Bz"})) == (
        401,
        "unauthenticated",
    )
    resp = await closed.get("/", headers={"Accept": "text/html"}, allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == "/login?next=/"  # a browser is sent to log in

    open_read = await client_for(AuthSection(enabled=True, anonymous_read=True, tokens=tokens))
    resp = await open_read.get("/api/v1/thing")
    assert resp.status == 200 and (await resp.json())["principal"]["via"] == "anonymous"
    assert await _error(await open_read.post("/api/v1/thing")) == (401, "unauthenticated")


async def test_a_cookie_session_must_carry_its_csrf_token(client_for: Any) -> None:
    client = await client_for(AuthSection(enabled=True, tokens=[entry("ops", "operator", "t-ops")]))
    form = await client.get("/login")
    html = await form.text()
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert form.status == 200 and csrf is not None
    # The login form's own token is checked too (double submit: form field against its cookie).
    bad = await client.post("/login", data={"name": "ops", "token": "t-ops", "csrf_token": "forged"})
    assert await _error(bad) == (403, "csrf_failed")
    resp = await client.post(
        "/login", data={"name": "ops", "token": "t-ops", "csrf_token": csrf.group(1)}, allow_redirects=False
    )
    assert resp.status == 303 and resp.headers["Location"] == "/"
    cookie = resp.headers["Set-Cookie"]
    assert "gatewayd_session=" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    who = await (await client.get("/api/v1/session")).json()
    assert who["principal"] == {"name": "ops", "role": "operator", "via": "session"}
    token = who["csrf_token"]
    assert await _error(await client.post("/api/v1/thing")) == (403, "csrf_failed")
    assert await _error(await client.post("/api/v1/thing", headers={"X-CSRF-Token": "wrong"})) == (403, "csrf_failed")
    resp = await client.post("/api/v1/thing", headers={"X-CSRF-Token": token})
    assert resp.status == 200 and (await resp.json())["user"] == "ops"
    # A form field does as well, on the routes that take forms; a JSON route takes no form at all.
    assert await _error(await client.post("/api/v1/thing", data={"csrf_token": token})) == (
        415,
        "unsupported_media_type",
    )
    # Logging out needs the token too, then the session is gone.
    resp = await client.post("/logout", data={"csrf_token": token}, allow_redirects=False)
    assert resp.status == 303
    assert await _error(await client.post("/api/v1/thing", headers={"X-CSRF-Token": token})) == (401, "unauthenticated")
