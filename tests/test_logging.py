"""Logs: one JSON object per line, secrets never written."""

from __future__ import annotations

import io
import json
import logging

import structlog

from gatewayd.observability import logging as gwlog


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
