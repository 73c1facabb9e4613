"""Natural-language commands in the running daemon (``python -m gatewayd run`` with the bundled config): with
every provider down the local rules answer and the command runs on the simulated pump; through a provider the
command is interpreted once and cached; confirmation, per-user limits, ``GET /api/v1/providers``, ``gatewayd
say``, and the end of an on-period surviving a kill -9."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gatewayd.config.loader import load_config
from tests.conftest import ROOT, Daemon, free_port, http

NO_KEYS = {"OPENAI_API_KEY": "", "ANTHROPIC_API_KEY": ""}  # whatever the machine running the tests has set
FAST_RETRY = {"GATEWAYD_INTERPRET__RETRY__BASE_S": "0.01", "GATEWAYD_INTERPRET__RETRY__CAP_S": "0.05"}
FINAL = ("succeeded", "failed", "expired", "rejected", "cancelled")


def _wait(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"not {what} within {timeout} s")


@pytest.fixture
def fake_openai() -> Iterator[tuple[str, str]]:
    """The provider simulator as its own process, as a developer would run it: (base URL, key)."""
    port, key = free_port(), "sk-test-daemon-0123456789"
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "gatewayd.interpret.simulator", "--kind", "openai", "--port", str(port)),
            *("--model", "gpt-4o-mini", "--api-key", key),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert "fake openai provider" in line, line
        yield f"http://127.0.0.1:{port}/v1", key
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_with_every_provider_down_a_text_command_runs_degraded_on_the_simulated_pump(make_daemon: Any) -> None:
    d: Daemon = make_daemon(
        {
            **NO_KEYS,
            **FAST_RETRY,
            "OPENAI_API_KEY": "sk-test-0123456789",
            "GATEWAYD_INTERPRET__PROVIDERS__OPENAI__BASE_URL": f"http://127.0.0.1:{free_port()}/v1",  # refuses
        }
    )
    d.start()
    status, rec, _ = d.post({"text": "Switch the irrigation pump on", "user": "tech-7"}, wait=10)
    assert status == 200 and rec["state"] == "succeeded", rec
    assert (rec["device"], rec["action"], rec["user"]) == ("pump1", "start", "tech-7")
    how = rec["interpretation"]
    assert (how["provider"], how["model"], how["degraded"], how["cached"]) == ("local", "rules", True, False)
    assert [(t["provider"], t["outcome"], t["attempts"], t["error"]) for t in how["tried"]] == [
        ("openai", "failed", 3, "ClientConnectorError")
    ]
    assert how["attempts"] == 3 and how["latency_ms"] < 5000 and how["text"] == "Switch the irrigation pump on"
    assert d.executions(rec["id"]) == 1  # it ran, once, on the simulated pump
    assert d.command(rec["id"])["interpretation"] == how  # stored with the command
    _, providers = d.get("/api/v1/providers")
    [openai] = [p for p in providers["providers"] if p["name"] == "openai"]
    assert openai["active"] is True and openai["health"]["ok"] is False  # checked at start, refused


def test_the_bundled_config_answers_from_the_local_rules_and_never_calls_out(make_daemon: Any) -> None:
    d: Daemon = make_daemon(NO_KEYS)
    d.start()
    _, body = d.get("/api/v1/providers")
    inactive = {p["name"]: p["inactive_reason"] for p in body["providers"]}
    assert "OPENAI_API_KEY" in inactive["openai"] and "ANTHROPIC_API_KEY" in inactive["anthropic"]
    assert inactive["ollama"] == "disabled"
    assert all(p["health"]["checked_at"] is None for p in body["providers"])  # nobody was even health-checked
    # The local rules are built in a thread after start (hassil is imported there); a request would wait for it.
    local = _wait(
        lambda: d.get("/api/v1/providers")[1]["local"] if d.get("/api/v1/providers")[1]["local"]["ready"] else None,
        5,
        "built",
    )
    # Every action of every device in the bundled config has a local phrasing.
    bundled = load_config(ROOT / "config.toml")
    assert {(c["device"], c["action"]) for c in local["can_do"]} == {
        (name, action)
        for name, dev in bundled.config.devices.items()
        for action in bundled.profiles[dev.profile].actions
    }

    out = subprocess.run(
        [sys.executable, "-m", "gatewayd", "say", "set the pump speed to 40 percent", "--url", d.url],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    rec = json.loads(out.stdout)
    assert rec["state"] == "succeeded" and rec["source"] == "cli" and rec["params"] == {"percent": 40, "ramp_s": 0.0}
    assert "by local (degraded: local rules)" in out.stderr

    out = subprocess.run(
        [sys.executable, "-m", "gatewayd", "say", "make me a coffee", "--url", d.url],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2 and "not_understood" in out.stderr
    # The closest sentence for each device, as the refusal's suggestions, not the whole list of capabilities.
    assert "try:" in out.stderr and '"set irrigation pump speed to 50 percent"' in out.stderr
    assert '"turn on channel 1 of relays1"' in out.stderr and "on2" not in out.stderr

    status, err, _ = d.post({"text": "make me a coffee"})
    assert status == 422 and err["error"]["code"] == "not_understood"
    assert {"device": "relay1", "action": "on", "example": "turn on valve", "takes_duration": True} in err["error"][
        "details"
    ]["can_do"]
    status, err, _ = d.post({"text": "set the pump speed to 400 percent"})
    assert status == 422 and err["error"]["code"] == "validation_failed"
    assert err["error"]["details"]["errors"][0]["field"] == "params.percent"
    status, err, _ = d.post({"text": "", "colour": "red"})
    assert status == 422 and {e["field"] for e in err["error"]["details"]["errors"]} == {"text", "colour"}
    status, err, _ = d.post({"text": "start the pump", "priority": "urgent"})
    assert status == 422 and err["error"]["details"]["errors"][0]["field"] == "priority"
    # A question is answered from state and telemetry: 200, an answer, and no command.
    status, answer, _ = d.post({"text": "is the pump running?"})
    assert status == 200 and answer["device"] == "pump1" and answer["interpretation"]["kind"] == "question", answer
    assert "pump1" in answer["answer"] and "id" not in answer
    out = subprocess.run(
        [sys.executable, "-m", "gatewayd", "say", "what's the humidity?", "--url", d.url],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0 and "gatewayd: sensor1" in out.stderr, out.stderr
    status, err, _ = d.post({"text": "turn on relays1"})  # a channel device without its channel: a question back
    assert status == 422 and err["error"]["details"]["reason"] == "missing_channel"
    assert err["error"]["details"]["suggestions"][0] == "turn on channel 1 of relays1"
    _, listing = d.get("/api/v1/commands")
    assert [c["id"] for c in listing["commands"]] == [rec["id"]]  # the refused requests never became commands


def test_through_a_provider_the_text_is_interpreted_once_then_served_from_the_cache(
    make_daemon: Any, fake_openai: tuple[str, str]
) -> None:
    url, key = fake_openai
    d: Daemon = make_daemon({**NO_KEYS, "OPENAI_API_KEY": key, "GATEWAYD_INTERPRET__PROVIDERS__OPENAI__BASE_URL": url})
    d.start()
    status, first, headers = d.post({"text": "start pump1"}, wait=10)
    assert status == 200 and first["state"] == "succeeded", first
    how = first["interpretation"]
    assert (how["provider"], how["model"], how["cached"], how["degraded"], how["attempts"]) == (
        "openai",
        "gpt-4o-mini",
        False,
        False,
        1,
    )
    assert how["cost"] > 0 and how["tokens_in"] > 0
    assert headers["X-RateLimit-Limit"] == "10" and headers["X-RateLimit-Remaining"] == "9"

    status, second, _ = d.post({"text": "Start pump1."}, wait=10)
    assert status == 200 and second["state"] == "succeeded"
    assert second["interpretation"]["cached"] is True and second["interpretation"]["cost"] == 0
    assert second["interpretation"]["cost_saved"] == pytest.approx(how["cost"])
    assert d.executions(first["id"]) == 1 and d.executions(second["id"]) == 1

    _, body = d.get("/api/v1/providers")
    [openai] = [p for p in body["providers"] if p["name"] == "openai"]
    assert openai["health"]["ok"] is True and openai["health"]["model_listed"] is True
    assert openai["breaker"]["state"] == "closed" and openai["spend_today"] == pytest.approx(how["cost"], abs=1e-6)
    assert openai["limits"]["rpm"]["limit"] == 60 and openai["limits"]["rpm"]["available"] < 60
    assert body["cache"]["hits"] == 1 and body["cache"]["misses"] == 1 and body["cache"]["hit_rate"] == 0.5
    assert body["spend"]["today"] == pytest.approx(how["cost"], abs=1e-6) and body["connectivity"]["state"] == "closed"
    _, metrics, _ = http("GET", f"{d.url}/metrics")
    assert 'gatewayd_interpret_cache_lookups_total{result="hit"} 1.0' in metrics
    assert 'gatewayd_interpret_provider_calls_total{outcome="answered",provider="openai"} 1.0' in metrics
    assert 'gatewayd_breaker_state{breaker="provider:openai"} 0.0' in metrics

    # The same id again is the first command, not a second interpretation or a second run.
    status, replay, headers = d.post({"text": "start pump1", "id": first["id"]})
    assert status == 200 and headers.get("Idempotent-Replay") == "true" and replay["id"] == first["id"]
    status, err, _ = d.post({"text": "stop pump1", "id": first["id"]})
    assert status == 409 and err["error"]["code"] == "conflict"
    assert d.executions(first["id"]) == 1


def test_a_confirm_action_from_a_degraded_interpretation_needs_confirmation(make_daemon: Any, tmp_path: Path) -> None:
    profiles = tmp_path / "profiles"
    shutil.copytree(ROOT / "hardware" / "profiles", profiles)
    pump = profiles / "sim_pump.toml"
    pump.write_text(pump.read_text().replace('description = "Start the pump"', 'description = "Start"\nconfirm = true'))
    d: Daemon = make_daemon({**NO_KEYS, "GATEWAYD_GATEWAY__PROFILES_DIR": str(profiles)})
    d.start()
    status, err, _ = d.post({"text": "start the irrigation pump"}, wait=5)
    assert status == 409 and err["error"]["code"] == "confirmation_required", err
    details = err["error"]["details"]
    assert details["command"] == {"device": "pump1", "action": "start", "params": {}}
    assert details["interpretation"]["degraded"] is True
    assert d.sim_log() == []  # nothing ran
    status, rec, _ = d.post({"text": "start the irrigation pump", "confirm": True}, wait=5)
    assert status == 200 and rec["state"] == "succeeded" and d.executions(rec["id"]) == 1


def test_the_per_user_limit_answers_429_with_its_headers(make_daemon: Any) -> None:
    d: Daemon = make_daemon(
        {**NO_KEYS, "GATEWAYD_INTERPRET__USER_BURST": "2", "GATEWAYD_INTERPRET__USER_RATE_PER_MINUTE": "1"}
    )
    d.start()
    for remaining in ("1", "0"):
        status, _, headers = d.post({"text": "read pump 1", "user": "alice"})
        assert status == 202 and headers["X-RateLimit-Remaining"] == remaining
    status, err, headers = d.post({"text": "read pump 1", "user": "alice"})
    assert status == 429 and err["error"]["code"] == "rate_limited"
    assert 1 <= int(headers["Retry-After"]) <= 60
    assert headers["X-RateLimit-Limit"] == "2" and headers["X-RateLimit-Remaining"] == "0"
    assert 1 <= int(headers["X-RateLimit-Reset"]) <= 120
    status, _, _ = d.post({"text": "read pump 1", "user": "bob"})  # another user has an allowance of his own
    assert status == 202
    status, _, _ = d.post({"device": "pump1", "action": "read"})  # structured commands are not counted
    assert status == 202


def test_the_end_of_an_on_period_survives_a_kill(make_daemon: Any) -> None:
    d: Daemon = make_daemon(NO_KEYS)
    d.start()
    status, rec, _ = d.post({"text": "switch the irrigation pump on for 2 seconds"}, wait=5)
    assert status == 200 and rec["state"] == "succeeded" and rec["interpretation"]["duration_s"] == 2.0
    _, body = d.get("/api/v1/schedule")
    [row] = body["scheduled"]
    assert (row["kind"], row["device"], row["action"], row["after"], row["delay_s"], row["state"]) == (
        "on_period",
        "pump1",
        "stop",
        rec["id"],
        2.0,
        "armed",
    )
    d.kill9()  # before the pump was switched off again
    started = time.monotonic()
    d.start()
    off_id = f"~{row['id']}"  # the gateway's own id for it: no client can have used it
    off = _wait(lambda: _final(d, off_id), 10, "switched off")
    assert off["state"] == "succeeded" and off["source"] == "interpret" and off["priority"] == "high"
    assert time.monotonic() - started < 6
    # Only our two ids: other processes on a shared machine can land frames on a reused pty number.
    ours = [(e["id"], e["action"]) for e in d.sim_log() if e["id"] in (rec["id"], off["id"])]
    assert ours == [(rec["id"], "start"), (off_id, "stop")]


def _final(d: Daemon, command_id: str) -> dict[str, Any] | None:
    status, body, _ = http("GET", f"{d.url}/api/v1/commands/{command_id}")
    return dict(body) if status == 200 and body["state"] in FINAL else None


def test_with_interpret_disabled_text_is_refused_and_structured_commands_still_run(make_daemon: Any) -> None:
    d: Daemon = make_daemon({**NO_KEYS, "GATEWAYD_INTERPRET__ENABLED": "false"})
    d.start()
    status, err, _ = d.post({"text": "start the pump"})
    assert status == 503 and err["error"]["code"] == "interpret_unavailable"
    assert d.get("/api/v1/providers") == (200, {"enabled": False, "providers": []})
    status, rec, _ = d.post({"device": "relay1", "action": "on"}, wait=5)
    assert status == 200 and rec["state"] == "succeeded" and "interpretation" not in rec


@pytest.mark.parametrize("scenario", ["provider_down", "provider_429", "provider_timeout"])
def test_provider_fault_scenarios_fall_back_to_the_local_rules_within_the_deadline_and_recover(
    make_daemon: Any, fake_openai: tuple[str, str], scenario: str
) -> None:
    url, key = fake_openai
    d: Daemon = make_daemon(
        {
            **NO_KEYS,
            "OPENAI_API_KEY": key,
            "GATEWAYD_INTERPRET__PROVIDERS__OPENAI__BASE_URL": url,
            "GATEWAYD_INTERPRET__DEADLINE_S": "2",
        }
    )
    d.start()
    status, report, _ = http("POST", f"{d.url}/api/v1/admin/test/{scenario}?duration_s=2", {}, timeout=60)
    assert status == 200, report
    observed = report["observed"]
    assert observed["requests"] >= 1  # a hanging provider holds each request until its deadline
    assert observed["answered_locally"] == observed["requests"]  # every request answered, degraded
    assert observed["answered_by_provider"] == 0 and observed["errors"] == 0
    assert observed["slowest_ms"] <= observed["deadline_ms"] + 250
    assert observed["providers_after"]["openai"]["ok"] is True
    assert report["recovered"] is True and report["healthy_after"] is True
