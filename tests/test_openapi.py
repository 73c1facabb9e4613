"""The API contract: the OpenAPI document matches the router, a fuzzer finds no server error and no undocumented
status code, /metrics passes promtool, and the per-client, per-endpoint limits answer 429 with their headers."""

from __future__ import annotations

import shutil
import subprocess
import sys
from typing import Any

import pytest

from gatewayd.config.models import HttpLimits, HttpSection
from gatewayd.web.console import Console
from gatewayd.web.limits import RateLimits
from gatewayd.web.openapi import document
from gatewayd.web.server import WebContext, build_app
from tests.conftest import Daemon

# POST /api/v1/admin/test/{scenario} runs real fault scenarios of up to two minutes each: it has its own tests
# (tests/test_operator.py) and is left out of the fuzzing.
FUZZ_EXCLUDE = r"^/api/v1/admin/test/"


def test_the_document_names_every_route_of_the_server_and_no_other() -> None:
    ctx = WebContext(None, None, dict, 1.0)  # type: ignore[arg-type]
    console = Console(HttpSection(), service=None, status=dict, devices=list)  # type: ignore[arg-type]
    app = build_app(ctx, 65536, RateLimits(HttpLimits()), console)
    served = {
        (route.method.lower(), route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }
    served.discard(("get", "/"))  # the HTML status page
    assert ("get", "/login") in served and ("get", "/api/v1/events/stream") in served  # the console's routes too
    documented = {(method, path) for path, ops in document()["paths"].items() for method in ops}
    assert documented == served


def test_every_route_documents_the_refusals_any_request_may_get() -> None:
    """A body declared over the limit is refused 413 on any route, and a connection over [http] max_connections
    gets a 503 whatever it asked for: both are documented everywhere, with the same error schema."""
    for path, ops in document()["paths"].items():
        for method, op in ops.items():
            for status in ("413", "503"):
                assert status in op["responses"], (method, path, status)
                schema = op["responses"][status]["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/Error"}, (method, path, status)


def fuzz_api(daemon: Daemon, *, phases: str, max_examples: int) -> None:
    """schemathesis against the running daemon's own OpenAPI document: no 5xx, no status code the document does
    not list, and the daemon still running after it."""
    schemathesis = shutil.which("schemathesis", path=str(__import__("pathlib").Path(sys.executable).parent))
    assert schemathesis is not None, "schemathesis is part of the test extra"
    proc = subprocess.run(
        [
            schemathesis,
            "run",
            f"{daemon.url}/api/v1/openapi.json",
            "--checks",
            "not_a_server_error,status_code_conformance",
            "--exclude-path-regex",
            FUZZ_EXCLUDE,
            "--max-examples",
            str(max_examples),
            "--seed",
            "1",
            "--request-timeout",
            "30",
            "--phases",
            phases,
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert daemon.proc is not None and daemon.proc.poll() is None  # still running after all of it


def test_fuzzing_the_api_finds_no_server_error_and_no_undocumented_status(daemon: Daemon) -> None:
    # A light pass (some 260 requests); the fault suite runs the thorough one, with schemathesis' boundary values
    # (tests/faults/test_api_fuzz.py): that one is 650 requests and takes a minute and a half here.
    fuzz_api(daemon, phases="fuzzing", max_examples=10)


def test_promtool_accepts_the_metrics(daemon: Daemon) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: ./scripts/test installs Debian's prometheus package, which ships it")
    # Traffic first, so the HTTP histograms and per-route counters have samples.
    daemon.post({"device": "pump1", "action": "read"}, wait=5)
    daemon.get("/api/v1/nope")
    status, text = daemon.get("/metrics")
    assert status == 200
    for name in (
        "gatewayd_http_requests_total",
        "gatewayd_http_request_duration_seconds_bucket",
        "gatewayd_breaker_state",
        "gatewayd_outbox_rows",
        "gatewayd_device_available",
        "gatewayd_queue_depth",
        "gatewayd_asyncio_tasks",
    ):
        assert name in text, name
    proc = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_per_client_per_endpoint_limits_answer_429_with_headers(make_daemon: Any) -> None:
    d: Daemon = make_daemon(
        {
            "GATEWAYD_HTTP__LIMITS__ENABLED": "true",
            "GATEWAYD_HTTP__LIMITS__WRITE_BURST": "5",
            "GATEWAYD_HTTP__LIMITS__WRITE_PER_S": "0.5",
        }
    )
    d.start()
    answers = [d.post({"device": "pump1", "action": "read"}) for _ in range(8)]
    statuses = [a[0] for a in answers]
    assert statuses[:5] == [202] * 5 and statuses[5:] == [429] * 3
    _, body, headers = answers[-1]
    assert body["error"]["code"] == "rate_limited"
    assert int(headers["Retry-After"]) >= 1
    assert headers["X-RateLimit-Limit"] == "5" and headers["X-RateLimit-Remaining"] == "0"
    assert "X-RateLimit-Reset" in headers
    assert "X-RateLimit-Remaining" in answers[0][2]
    # Another endpoint (reads) has its own allowance: the technician's page still loads.
    assert d.get("/api/v1/devices")[0] == 200
    assert d.get("/healthz")[0] == 200
