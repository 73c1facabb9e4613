"""Access control on the real daemon: bearer tokens and roles, the login form's session cookie and CSRF, the
failed-login limit, and the rule that an open gateway stays on loopback."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from typing import Any
from urllib.parse import parse_qs, urlsplit

from gatewayd.web.auth import verify_token
from tests.conftest import CONFIG, ROOT, Daemon, http
from tests.webauth import TOKENS, auth_env, bearer, login, raw

CMD = {"device": "relay1", "action": "on"}
JSON = {"Content-Type": "application/json", "Accept": "application/json"}


def _post(d: Daemon, headers: dict[str, str], body: Any = CMD, path: str = "/api/v1/commands") -> tuple[int, Any]:
    status, _, _, data = raw("POST", f"{d.url}{path}", {**JSON, **headers}, json.dumps(body).encode())
    return status, json.loads(data) if data else None


def _get(d: Daemon, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    status, _, _, data = raw("GET", f"{d.url}{path}", {"Accept": "application/json", **(headers or {})})
    return status, json.loads(data) if data else None


def test_bearer_tokens_roles_and_closed_reading(make_daemon: Any) -> None:
    d: Daemon = make_daemon(auth_env(anonymous_read=False))
    d.start()
    status, err = _get(d, "/api/v1/devices")
    assert status == 401 and err["error"]["code"] == "unauthenticated"
    assert _get(d, "/healthz")[0] == 200 and _get(d, "/readyz")[0] == 200  # probes need no token
    assert _get(d, "/metrics")[0] == 401
    status, page_headers, _, _ = raw("GET", f"{d.url}/?state=failed", {"Accept": "text/html"})
    where = urlsplit(page_headers["Location"])
    assert status == 303 and where.path == "/login" and parse_qs(where.query)["next"] == ["/?state=failed"]

    status, body = _get(d, "/api/v1/devices", bearer("vera"))
    assert status == 200 and {x["name"] for x in body["devices"]} == {"pump1", "sensor1", "relay1", "meter1", "relays1"}
    status, err = _post(d, bearer("vera"))
    assert status == 403 and err["error"]["code"] == "forbidden" and err["error"]["details"]["required"] == "operator"

    status, rec = _post(d, bearer("otto"))
    assert status == 202 and rec["user"] == "otto"  # bearer requests need no CSRF token: nothing is ambient
    status, err = _get(d, "/api/v1/devices", {"Authorization": "Bearer not-a-token"})
    assert status == 401 and err["error"]["code"] == "invalid_credentials"
    assert set(err["error"]) == {"code", "message", "details"}

    # Admin routes need admin: an operator is refused before the route is looked up; an admin reaches the
    # route (and hears that there is no such scenario).
    assert _post(d, bearer("otto"), {}, "/api/v1/admin/test/no_such_scenario")[0] == 403
    status, err = _post(d, bearer("ada"), {}, "/api/v1/admin/test/no_such_scenario")
    assert status == 404 and err["error"]["code"] == "unknown_scenario"

    status, who = _get(d, "/api/v1/session", bearer("ada"))
    assert who == {
        "auth_enabled": True,
        "principal": {"name": "ada", "role": "admin", "via": "bearer"},
        "csrf_token": None,
    }


def test_logged_out_changes_are_refused_and_a_cookie_needs_its_csrf_token(make_daemon: Any) -> None:
    d: Daemon = make_daemon(auth_env(anonymous_read=True))
    d.start()
    assert _get(d, "/api/v1/devices")[0] == 200  # anonymous viewers may read
    status, page, _ = http("GET", f"{d.url}/")
    assert status == 200 and "pump1" in page and 'id="login-link"' in page
    status, err = _post(d, {})
    assert status == 401 and err["error"]["code"] == "unauthenticated"
    status, _, _, _ = raw(
        "POST", f"{d.url}/ui/command", {"Content-Type": "application/x-www-form-urlencoded"}, b"device=relay1&action=on"
    )
    assert status == 401  # the script-less form too
    assert _get(d, "/api/v1/commands")[1]["commands"] == []  # nothing was accepted

    status, headers, session = login(d.url, "otto")
    assert status == 303 and headers["Location"] == "/"
    assert "HttpOnly" in session and "SameSite=Strict" in session and "Path=/" in session
    cookie = session.split(";")[0]
    status, who = _get(d, "/api/v1/session", {"Cookie": cookie})
    assert who["principal"] == {"name": "otto", "role": "operator", "via": "session"}
    csrf = who["csrf_token"]

    status, err = _post(d, {"Cookie": cookie})
    assert status == 403 and err["error"]["code"] == "csrf_failed"
    status, err = _post(d, {"Cookie": cookie, "X-CSRF-Token": "guess"})
    assert status == 403 and err["error"]["code"] == "csrf_failed"
    status, err = _post(d, {"Cookie": cookie, "X-CSRF-Token": csrf, "Origin": "http://evil.example"})
    assert status == 403 and err["error"]["code"] == "csrf_failed"
    status, _, _, _ = raw(
        "POST",
        f"{d.url}/ui/command",
        {"Content-Type": "application/x-www-form-urlencoded", "Cookie": cookie},
        b"device=relay1&action=on",
    )
    assert status == 403
    assert _get(d, "/api/v1/commands")[1]["commands"] == []

    status, rec = _post(d, {"Cookie": cookie, "X-CSRF-Token": csrf})
    assert status == 202 and rec["user"] == "otto"
    form = f"device=pump1&action=set_speed&p.percent=35&csrf_token={csrf}".encode()
    status, headers, _, _ = raw(
        "POST", f"{d.url}/ui/command", {"Content-Type": "application/x-www-form-urlencoded", "Cookie": cookie}, form
    )
    assert status == 303 and headers["Location"].startswith("/?sent=")
    sent = re.search(r"sent=([^#]+)", headers["Location"])
    assert sent is not None
    done = d.wait_final(sent.group(1))
    assert done["source"] == "page" and done["params"]["percent"] == 35 and done["user"] == "otto"

    # The viewer's session can read but not act, CSRF token or not.
    _, _, viewer = login(d.url, "vera")
    vcookie = viewer.split(";")[0]
    vcsrf = _get(d, "/api/v1/session", {"Cookie": vcookie})[1]["csrf_token"]
    assert _post(d, {"Cookie": vcookie, "X-CSRF-Token": vcsrf})[0] == 403

    # After logging out the cookie is worth nothing.
    status, _, cookies, _ = raw(
        "POST",
        f"{d.url}/logout",
        {"Content-Type": "application/x-www-form-urlencoded", "Cookie": cookie},
        f"csrf_token={csrf}".encode(),
    )
    assert status == 303 and any(c.startswith("gatewayd_session=") for c in cookies)
    status, err = _post(d, {"Cookie": cookie, "X-CSRF-Token": csrf})
    assert status == 401 and err["error"]["code"] == "unauthenticated"


def test_failed_logins_are_rate_limited(make_daemon: Any) -> None:
    d: Daemon = make_daemon(
        auth_env(
            anonymous_read=True,
            GATEWAYD_HTTP__AUTH__LOGIN_BURST="3",
            GATEWAYD_HTTP__AUTH__LOGIN_REFILL_PER_MIN="0.5",  # one more attempt every two minutes
        )
    )
    d.start()
    for _ in range(3):
        status, headers, session = login(d.url, "otto", "wrong")
        assert status == 401 and session == ""
    status, headers, session = login(d.url, "otto")  # even the right token: the attempts are spent
    assert status == 429 and session == ""
    assert 1 <= int(headers["Retry-After"]) <= 120
    assert headers["X-RateLimit-Limit"] == "3" and headers["X-RateLimit-Remaining"] == "0"
    # The same client guessing bearer tokens is refused as well, before any token is checked.
    status, _, _, body = raw("GET", f"{d.url}/api/v1/devices", bearer("otto"))
    assert status == 429 and json.loads(body)["error"]["code"] == "rate_limited"
    # The browser's login page says so too.
    status, _, _ = login(d.url, "vera", accept="text/html")
    assert status == 429
    limiter = _get(d, "/api/v1/overview")[1]["limiters"]["http:failed_login"]
    # Three failures, each taken from two buckets (the address and the name); three refusals.
    assert limiter["allowed"] == 6 and limiter["limited"] == 3 and limiter["keys"] == 2
    log = [line for line in d.log_lines() if line.get("event") == "auth_failed"]
    assert len(log) == 3 and all(TOKENS["otto"][1] not in json.dumps(line) for line in d.log_lines())


def _check_config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gatewayd", "check-config", str(CONFIG)],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )


def test_an_open_gateway_refuses_a_network_bind() -> None:
    done = _check_config({"GATEWAYD_HTTP__HOST": "0.0.0.0"})
    assert done.returncode == 2 and "http: Value error, host '0.0.0.0' is reachable from the network" in done.stdout
    done = _check_config({"GATEWAYD_HTTP__HOST": "0.0.0.0", **auth_env(anonymous_read=False)})
    assert done.returncode == 0, done.stdout


def test_hash_token_makes_a_config_entry_and_a_token() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gatewayd", "hash-token", "--name", "field-tech", "--role", "viewer"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    entry = tomllib.loads(f"e = {done.stdout.strip()}")["e"]
    token = done.stderr.strip().rsplit(" ", 1)[-1]
    assert entry["name"] == "field-tech" and entry["role"] == "viewer"
    assert verify_token(token, entry["hash"]) and token not in done.stdout
    piped = subprocess.run(
        [sys.executable, "-m", "gatewayd", "hash-token", "--stdin"],
        input="my own token\n",
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert piped.returncode == 0 and verify_token("my own token", piped.stdout.strip()) and piped.stderr == ""
