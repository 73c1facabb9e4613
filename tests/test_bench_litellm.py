"""bench/litellm_router.py's guard and checks, without running either side: the driver's audit hook refuses what
would leave the machine, and an answer only counts when it is the command the fakes were told to give."""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import failover_driver  # bench/ is not a package: its directory is on sys.path above
import litellm_router


@pytest.fixture
def fresh_record() -> Iterator[None]:
    failover_driver.CONNECTS.clear()
    failover_driver.REFUSED.clear()
    yield
    failover_driver.CONNECTS.clear()
    failover_driver.REFUSED.clear()


@pytest.mark.usefixtures("fresh_record")
def test_the_driver_refuses_connections_and_lookups_off_this_machine() -> None:
    audit = failover_driver._audit
    with socket.socket() as tcp, socket.socket(socket.AF_INET6) as tcp6, socket.socket(socket.AF_UNIX) as unix:
        audit("socket.connect", (tcp, ("127.0.0.1", 8099)))
        audit("socket.connect", (tcp6, ("::1", 8099, 0, 0)))
        audit("socket.connect", (unix, "/run/some.sock"))
        with pytest.raises(PermissionError):
            audit("socket.connect", (tcp, ("192.0.2.10", 443)))
        with pytest.raises(PermissionError):
            audit("socket.connect", (tcp6, ("2001:db8::1", 443, 0, 0)))
    audit("socket.getaddrinfo", ("localhost", 80, 0, 0, 0, 0))
    audit("socket.getaddrinfo", (None, 80, 0, 0, 0, 0))
    with pytest.raises(PermissionError):
        audit("socket.getaddrinfo", ("raw.githubusercontent.com", 443, 0, 0, 0, 0))
    assert failover_driver.REFUSED == [
        "connect 192.0.2.10:443",
        "connect 2001:db8::1:443",
        "lookup 'raw.githubusercontent.com'",
    ]
    assert failover_driver.CONNECTS == {"127.0.0.1:8099": 1, "::1:8099": 1, "192.0.2.10:443": 1, "2001:db8::1:443": 1}


def test_only_the_right_answer_from_the_right_provider_counts() -> None:
    answer = {"device": "pump1", "action": "set_speed", "params": {"percent": 40, "ramp_s": 0}}
    check = litellm_router.problem_with
    assert check("litellm", "refused", {"answer": answer, "by": "fallback"}) is None
    assert check("litellm", "refused", {"answer": answer, "by": "primary"}) is not None
    wrong = {**answer, "params": {"percent": 41}}
    assert check("gatewayd", "healthy", {"answer": wrong, "by": "primary"}) is not None
    assert check("gatewayd", "healthy", {"error": "x.Y", "message": "no"}) is not None
    # every provider down: gatewayd must answer from its local rules; LiteLLM's exception is the figure
    assert check("gatewayd", "all_down", {"answer": answer, "by": "local", "degraded": True}) is None
    assert check("gatewayd", "all_down", {"error": "gatewayd.interpret.errors.NotUnderstood", "message": "?"})
    assert check("litellm", "all_down", {"error": "litellm.exceptions.InternalServerError", "message": "?"}) is None


def test_without_litellm_gatewayds_table_is_still_measured(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def cannot(venv: Path) -> str:
        raise litellm_router.BenchError("pip: no matching distribution")

    monkeypatch.setattr(litellm_router, "ensure_litellm", cannot)
    out = tmp_path / "litellm.json"
    argv = ["--requests", "3", "--fault-requests", "3", "--latency", "0.02", "--json", str(out)]
    assert litellm_router.main(argv) == 0  # every scenario answered as it must, or it exits 1
    printed = capsys.readouterr().out
    assert "LiteLLM: SKIPPED, litellm[mcp]==" in printed and "no matching distribution" in printed
    assert "| hanging (timeout 2 s) |" in printed and "litellm-order:" not in printed
    data = json.loads(out.read_text())
    assert data["settings"]["litellm_skipped"] and list(data["settings"]["configurations"]) == ["gatewayd"]
    # fail over first: a refusing or failing primary is asked at most once a request, never retried
    for fault in ("refused", "http500", "http503", "http429", "hang"):
        assert 0 < data["median"][f"gatewayd.{fault}.primary_attempts"] <= 1
        assert data["median"][f"gatewayd.{fault}.fallback_attempts"] == 1
