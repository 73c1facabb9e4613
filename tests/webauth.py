"""Tokens and settings for tests that run the daemon with access control on (test_access.py, test_page.py)."""

from __future__ import annotations

import http.client
import re
from urllib.parse import urlencode, urlsplit

from gatewayd.web.auth import hash_token

# name -> (role, token). Hashed at the lowest cost the configuration accepts, so each check is quick.
TOKENS = {
    "vera": ("viewer", "viewer-token-0123456789"),
    "otto": ("operator", "operator-token-0123456789"),
    "ada": ("admin", "admin-token-0123456789"),
}
_ENTRIES = ", ".join(
    f'{{ name = "{name}", role = "{role}", hash = "{hash_token(token, log2_n=10)}" }}'
    for name, (role, token) in TOKENS.items()
)


def auth_env(*, anonymous_read: bool, **extra: str) -> dict[str, str]:
    env = {
        "GATEWAYD_HTTP__AUTH__ENABLED": "true",
        "GATEWAYD_HTTP__AUTH__ANONYMOUS_READ": "true" if anonymous_read else "false",
        "GATEWAYD_HTTP__AUTH__TOKENS": f"[{_ENTRIES}]",
    }
    env.update(extra)
    return env


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[name][1]}"}


def raw(
    method: str, url: str, headers: dict[str, str] | None = None, body: bytes | None = None
) -> tuple[int, dict[str, str], list[str], bytes]:
    """One request, redirects not followed: status, headers, every Set-Cookie, body."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=10)
    try:
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        conn.request(method, path or "/", body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, dict(resp.getheaders()), resp.headers.get_all("Set-Cookie") or [], data
    finally:
        conn.close()


def login(
    base: str, name: str, token: str | None = None, *, accept: str = "application/json"
) -> tuple[int, dict[str, str], str]:
    """The login form as a browser submits it: fetch the form (its CSRF cookie and field), post it back.
    Returns the status, the headers, and the session cookie ("" if none was set)."""
    status, _, cookies, body = raw("GET", f"{base}/login")
    assert status == 200, body
    field = re.search(rb'name="csrf_token" value="([^"]+)"', body)
    assert field is not None
    login_cookie = next(c.split(";")[0] for c in cookies if c.startswith("gatewayd_login="))
    form = urlencode({"name": name, "token": TOKENS[name][1] if token is None else token, "csrf_token": field.group(1)})
    status, headers, cookies, _ = raw(
        "POST",
        f"{base}/login",
        {"Content-Type": "application/x-www-form-urlencoded", "Cookie": login_cookie, "Accept": accept},
        form.encode(),
    )
    session = next((c for c in cookies if c.startswith("gatewayd_session=") and "=;" not in c), "")
    return status, headers, session
