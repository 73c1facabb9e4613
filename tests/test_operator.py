"""Operator commands on a live daemon: stats, health, config (secrets redacted), reset, and each fault scenario
through ``gatewayd test``, which must end with the gateway healthy again and a report of what happened."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gatewayd.app.operator import redact
from tests.conftest import Daemon
from tests.mqtt_broker import Broker


def _cli(daemon: Daemon, *args: str, timeout: float = 60) -> tuple[int, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "gatewayd", *args, "--url", daemon.url],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "GATEWAYD_TOKEN": "unused-without-access-control"},
    )
    try:
        return proc.returncode, json.loads(proc.stdout)
    except ValueError:
        return proc.returncode, proc.stdout + proc.stderr


def test_secrets_are_redacted_but_the_names_of_their_variables_are_kept() -> None:
    config = {
        "mqtt": {"username": "gw", "password": "hunter2", "password_env": "MQTT_PASSWORD"},
        "auth": {"tokens": [{"name": "tech", "token_hash": "pbkdf2:abc"}]},
        "providers": {"openai": {"api_key": "sk-123", "api_key_env": "OPENAI_API_KEY"}},
    }
    out = redact(config)
    assert out["mqtt"] == {"username": "gw", "password": "***", "password_env": "MQTT_PASSWORD"}
    assert out["auth"]["tokens"][0] == {"name": "tech", "token_hash": "***"}
    assert out["providers"]["openai"] == {"api_key": "***", "api_key_env": "OPENAI_API_KEY"}


def test_stats_health_config_and_reset_from_the_cli(daemon: Daemon) -> None:
    code, stats = _cli(daemon, "stats", "--json")
    assert code == 0 and stats["gateway_id"] == "gw-dev" and "outbox" in stats and "uplink" in stats
    code, health = _cli(daemon, "health", "--json")
    assert code == 0 and health["healthz"]["status"] == "ok"
    code, config = _cli(daemon, "config")
    assert code == 0
    assert config["config"]["serial"]["bus0"]["baudrate"] == 115200
    assert config["overrides"]["http.port"] == "GATEWAYD_HTTP__PORT"
    code, reset = _cli(daemon, "reset", "--json")
    assert code == 0 and reset["breakers_closed"] == 5  # one per device
    code, unknown = _cli(daemon, "test", "meteor_strike")
    assert code == 2 and "unknown_scenario" in str(unknown)


@pytest.mark.parametrize("scenario", ["serial_unplug", "serial_garbage", "slow_disk"])
def test_each_local_fault_scenario_ends_healthy_with_a_report(daemon: Daemon, scenario: str) -> None:
    code, report = _cli(daemon, "test", scenario, "--duration", "1", "--json")
    assert code == 0, report
    assert report["scenario"] == scenario and report["recovered"] is True and report["healthy_after"] is True
    assert report["actions"] and report["observed"]
    if scenario == "serial_unplug":
        observed = report["observed"]
        assert observed["detected_unplug_after_s"] < 1.0
        assert observed["available_again_after_replug_s"] < 2.0
    if scenario == "serial_garbage":
        assert report["observed"]["lines_discarded"] > 0 and report["observed"]["probe"]["ok"] is True
    if scenario == "slow_disk":
        assert report["observed"]["commit_ms_max_during"] >= 250 > report["observed"]["commit_ms_after"]
    # And the gateway still does its job afterwards.
    status, body, _ = daemon.post({"device": "pump1", "action": "read"}, wait=5)
    assert status == 200 and body["state"] == "succeeded"


def test_broker_down_drops_the_link_keeps_the_backlog_and_drains_it_after(tmp_path: Path, make_daemon: Any) -> None:
    broker = Broker(tmp_path / "broker")
    broker.start()
    try:
        d: Daemon = make_daemon(
            {
                "GATEWAYD_MQTT__PORT": str(broker.port),
                "GATEWAYD_MQTT__RECONNECT_BASE_S": "0.05",
                "GATEWAYD_MQTT__RECONNECT_CAP_S": "0.3",
                # Readings are written once unacknowledged this long: well inside the 1.5 s outage.
                "GATEWAYD_OUTBOX__WRITE_BEHIND_S": "0.3",
            }
        )
        d.start()
        assert d.post({"device": "sensor1", "action": "set_interval", "params": {"seconds": 0.05}}, wait=5)[0] == 200
        code, report = _cli(d, "test", "broker_down", "--duration", "1.5", "--json")
        assert code == 0, report
        observed = report["observed"]
        assert observed["connected_before"] is True
        assert observed["outbox_rows_at_end_of_outage"] > observed["outbox_rows_before"]  # kept while down
        assert observed["reconnected_after_s"] < 5 and observed["backlog_drained_after_s"] is not None
        assert report["healthy_after"] is True
    finally:
        broker.kill9()


def test_provider_scenarios_say_what_they_need_when_no_provider_is_active(daemon: Daemon) -> None:
    # The bundled config lists providers, but without API keys in the environment none of them is asked.
    code, report = _cli(daemon, "test", "provider_down", "--duration", "1", "--json")
    assert code == 2
    assert "scenario_unavailable" in str(report)
