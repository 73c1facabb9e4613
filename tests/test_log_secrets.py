"""The daemon's log never shows a secret it was given, in any form, even when a provider quotes it back in an error
(as some do, and as a misconfigured proxy may), and tells plainly whether access control is on."""

from __future__ import annotations

import base64
import json
import signal
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import quote, quote_plus

import pytest

from gatewayd.config.models import Config
from tests.conftest import Daemon, wait_until

# No recognisable shape (not sk-...), and characters that change when URL-encoded or base64'd.
KEY = "gwk+Zq8/Pr0v1derKey=7Lm42"
MQTT_PASSWORD = "mqtt-pass/word+42"


def forms(secret: str) -> list[str]:
    raw = secret.encode()
    return [
        secret,
        quote(secret, safe=""),
        quote_plus(secret),
        base64.b64encode(raw).decode().rstrip("="),
        base64.urlsafe_b64encode(raw).decode().rstrip("="),
    ]


class Echo(BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint that refuses every key, quoting it back (raw, in a link, in base64)."""

    def _refuse(self) -> None:
        key = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
        echo = base64.b64encode(key.encode()).decode()
        message = f"Incorrect API key provided: {key}. See https://keys.example/?k={quote(key, safe='')} ({echo})"
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error"}}).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _refuse

    def log_message(self, *_args: Any) -> None:
        pass


@pytest.fixture
def echo() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_a_provider_quoting_the_key_back_never_gets_it_into_the_log_or_the_api(make_daemon: Any, echo: str) -> None:
    d: Daemon = make_daemon(
        {
            "OPENAI_API_KEY": KEY,
            "ANTHROPIC_API_KEY": "",
            "GATEWAYD_INTERPRET__PROVIDERS__OPENAI__BASE_URL": echo,
            "GATEWAYD_MQTT__USERNAME": "gw",
            "GATEWAYD_MQTT__PASSWORD_ENV": "GW_TEST_MQTT_PASSWORD",
            "GW_TEST_MQTT_PASSWORD": MQTT_PASSWORD,
        }
    )
    d.start()
    status, rec, _ = d.post({"text": "turn on relay 1"}, wait=5)
    assert status == 200 and rec["interpretation"]["provider"] == "local", rec  # the provider refused: local rules
    [tried] = rec["interpretation"]["tried"]
    assert tried["provider"] == "openai" and "Incorrect API key provided: [REDACTED]" in tried["message"], tried

    d.send_signal(signal.SIGHUP)  # a reload keeps the secrets known
    wait_until(lambda: any(line.get("event") == "config_reloaded" for line in d.log_lines()), 10, "the reload")
    status, rec, _ = d.post({"text": "turn off relay 1"}, wait=5)
    assert status == 200, rec
    wait_until(
        lambda: sum(1 for line in d.log_lines() if line.get("event") == "provider_failed") >= 2, 10, "two failures"
    )

    log = d.log_path.read_text()
    assert "Incorrect API key provided: [REDACTED]" in log  # the provider's words are there, the key is not
    for secret in (KEY, MQTT_PASSWORD):
        assert [form for form in forms(secret) if form in log] == [], secret
    _, providers = d.get("/api/v1/providers")
    _, commands = d.get("/api/v1/commands")
    for answer in (providers, commands):
        assert [form for form in forms(KEY) if form in json.dumps(answer)] == []

    [listening] = [line for line in d.log_lines() if line.get("event") == "http_listening"]
    assert listening["auth"] is False  # a flag, readable: access control is off
    assert not [line for line in d.log_lines() if "exception" in line and "locals" in json.dumps(line)]


def test_the_configuration_names_its_secrets() -> None:
    cfg = Config.model_validate(
        {
            "mqtt": {"password_env": "PW"},
            "interpret": {
                "providers": {
                    "a": {"type": "openai", "base_url": "https://x.example/v1", "model": "m", "api_key_env": "A_KEY"},
                    "b": {"type": "ollama", "base_url": "http://u:p%40ss-word@10.0.0.2:11434", "model": "m"},
                    "c": {"type": "openai", "base_url": "https://y.example/v1", "model": "m", "api_key_env": "UNSET"},
                }
            },
        }
    )
    found = cfg.secrets({"PW": "mqtt-secret", "A_KEY": "key-a", "UNSET": ""})
    assert sorted(found.values()) == ["key-a", "mqtt-secret", "p%40ss-word", "p@ss-word"]
