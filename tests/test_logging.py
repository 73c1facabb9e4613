"""Logs: one JSON object per line, secrets never written."""

from __future__ import annotations

import base64
import io
import json
import logging
from collections.abc import Iterator
from urllib.parse import quote, quote_plus

import pytest
import structlog

from gatewayd.config.models import AuthSection, AuthToken
from gatewayd.observability import logging as gwlog
from gatewayd.web.auth import Authenticator, hash_token


def _capture(level: str = "info") -> io.StringIO:
    out = io.StringIO()
    gwlog.configure(level, stream=out)
    return out


def test_secrets_are_redacted_by_key_and_by_shape() -> None:
    out = _capture()
    log = structlog.get_logger("t")
    log.info(
        "provider_call",
        api_key="sk-live-1234567890abcdef",
        headers={"Authorization": "Bearer abcdefghijklmnop", "Accept": "json"},
        note="retrying with key sk-abcdefghijklmnop after 429",
        mqtt_password="hunter2",
        device="pump1",
    )
    line = json.loads(out.getvalue())
    text = out.getvalue()
    assert "1234567890abcdef" not in text and "abcdefghijklmnop" not in text and "hunter2" not in text
    assert line["api_key"] == gwlog.REDACTED
    assert line["headers"] == {"Authorization": gwlog.REDACTED, "Accept": "json"}
    assert line["mqtt_password"] == gwlog.REDACTED
    assert line["note"] == f"retrying with key {gwlog.REDACTED} after 429"
    assert line["device"] == "pump1"
    assert {"event", "level", "timestamp"} <= set(line)


def test_stdlib_records_are_json_too_and_levels_filter() -> None:
    out = _capture("warning")
    logging.getLogger("aiohttp.server").error("Error handling request from %s", "10.0.0.1")
    structlog.get_logger("t").info("hidden")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["event"] for line in lines] == ["Error handling request from 10.0.0.1"]
    assert lines[0]["level"] == "error"
    gwlog.configure("info")


def test_exceptions_are_structured_not_multiline() -> None:
    out = _capture()
    try:
        raise ValueError("boom")
    except ValueError:
        structlog.get_logger("t").exception("crashed", token="Bearer abcdefghijkl")
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    line = json.loads(lines[0])
    assert line["exception"][0]["exc_type"] == "ValueError"
    assert line["token"] == gwlog.REDACTED
    gwlog.configure("info")


# --- redaction by value ----------------------------------------------------------------------------------------------

# A key of no recognisable shape (not sk-...), with characters that change when encoded.
KEY = "gwk+Zq8/Pr0v1derKey=7Lm"


@pytest.fixture
def secrets() -> Iterator[None]:
    gwlog.SECRETS.clear()
    yield
    gwlog.SECRETS.clear()
    gwlog.configure("info")


def _forms(secret: str) -> list[str]:
    raw = secret.encode()
    return [
        secret,
        quote(secret, safe=""),
        quote_plus(secret),
        base64.b64encode(raw).decode().rstrip("="),
        base64.urlsafe_b64encode(raw).decode().rstrip("="),
        base64.b64encode(b"user:" + raw).decode()[8:-4],  # inside a Basic credential
    ]


def _leaks(text: str, secret: str) -> list[str]:
    return [form for form in _forms(secret) if form in text]


def _call_provider(key: str) -> None:
    url = f"https://api.example/v1/models?key={quote(key, safe='')}"
    raise ValueError(f"provider said: invalid key {key} (tried {url})")


def test_a_registered_secret_is_redacted_in_every_form_and_every_place(secrets: None) -> None:
    out = _capture()
    gwlog.register_secrets("config", [KEY, None, ""])
    log = structlog.get_logger("t")
    basic = base64.b64encode(f"user:{KEY}".encode()).decode()
    log.info(
        "provider_call",
        note=f"retrying with {KEY}",
        url=f"https://api.example/v1?key={quote(KEY, safe='')}&k2={quote_plus(KEY)}",
        header=f"Basic {basic}",
        body=json.dumps({"key": KEY, "nested": [KEY]}),
        nested={"list": [KEY, {"deeper": KEY}], KEY: 1},
        raw=KEY.encode(),
        error=ValueError(KEY),
    )
    try:
        _call_provider(KEY)
    except ValueError:
        log.exception("provider_crashed")
        logging.getLogger("aiohttp.client").exception("stdlib too: %s", KEY)
    text = out.getvalue()
    assert _leaks(text, KEY) == [], text
    lines = [json.loads(line) for line in text.splitlines()]
    assert len(lines) == 3 and gwlog.REDACTED in lines[0]["note"]
    assert lines[0]["url"] == f"https://api.example/v1?key={gwlog.REDACTED}&k2={gwlog.REDACTED}"
    for line in lines[1:]:
        [exc] = line["exception"]
        assert exc["exc_type"] == "ValueError" and gwlog.REDACTED in exc["exc_value"]
        assert exc["frames"] and all("locals" not in frame for frame in exc["frames"])


def test_tracebacks_carry_no_local_variables(secrets: None) -> None:
    out = _capture()
    harmless = "a-value-nobody-registered"

    def crash() -> None:
        key = harmless  # a local with an innocent name, holding what could be anything
        raise RuntimeError("boom " + str(len(key)))

    try:
        crash()
    except RuntimeError:
        structlog.get_logger("t").exception("crashed")
    assert harmless not in out.getvalue()
    [exc] = json.loads(out.getvalue())["exception"]
    assert [f["name"] for f in exc["frames"]][-1] == "crash" and all("locals" not in f for f in exc["frames"])


def test_flags_under_a_secrets_name_stay_readable(secrets: None) -> None:
    out = _capture()
    structlog.get_logger("t").info("http_listening", host="127.0.0.1", port=8080, auth=False, token=None)
    line = json.loads(out.getvalue())
    assert line["auth"] is False and line["token"] is None
    out = _capture()
    structlog.get_logger("t").info("x", auth="Bearer something-secret-1234", password="hunter2")
    line = json.loads(out.getvalue())
    assert line["auth"] == gwlog.REDACTED and line["password"] == gwlog.REDACTED


def test_a_short_secret_is_refused_and_says_so_and_sources_replace_their_own(secrets: None) -> None:
    out = _capture()
    gwlog.register_secrets("mqtt", ["abc"])
    structlog.get_logger("t").info("x", note="abc is a common word")
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["event"] == "secret_too_short_to_redact" and "abc" not in json.dumps(first)
    assert second["note"] == "abc is a common word"
    gwlog.register_secrets("a", ["first-secret-value"])
    gwlog.register_secrets("b", ["second-secret-value"])
    gwlog.register_secrets("a", ["third-secret-value"])  # a replaces its own, b keeps its
    assert gwlog.scrub("first-secret-value second-secret-value third-secret-value") == (
        f"first-secret-value {gwlog.REDACTED} {gwlog.REDACTED}"
    )


async def test_a_verified_bearer_token_is_never_logged(secrets: None) -> None:
    token = "opaque-token-without-a-shape"
    entry = AuthToken(name="ops", role="operator", hash=hash_token(token, log2_n=10))
    authn = Authenticator(AuthSection(enabled=True, tokens=[entry]))
    out = _capture()
    structlog.get_logger("t").info("before", note=f"client sent {token}")
    assert token in out.getvalue()  # nothing known about it yet (and no shape to go by)
    assert await authn.check_token(token) is not None
    out = _capture()
    structlog.get_logger("t").info("after", note=f"client sent {token}")
    assert token not in out.getvalue()
