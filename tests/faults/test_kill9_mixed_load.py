"""kill -9 of the daemon at 20 random instants during mixed load (HTTP and MQTT commands, telemetry, natural-language
requests), each time started again on the same data directory while the load goes on. Afterwards every
acknowledged command reached its final state, none ran twice (the simulators' execution logs), and every result
reached the broker.

The instants come from a seeded generator: the seed is printed, and ``GATEWAYD_FAULT_SEED=N`` runs the same draw
again (the daemon's own timing still varies from run to run)."""

from __future__ import annotations

import os
import random
import signal
import time
from typing import Any

import pytest

from tests.conftest import Daemon
from tests.faults.mixed_load import MixedLoad, ProviderThread, daemon_overrides, report, seed_from, verify
from tests.mqtt_broker import GW, Broker, Subscriber, daemon_env, wait_until

KILLS = 20
LOAD_S = 60.0  # the kill instants are drawn over this much of the load


def _telemetry(sub: Subscriber) -> int:
    return sum(1 for topic, _, _ in sub.snapshot() if topic == f"{GW}/telemetry/sensor1")


def _connected(daemon: Daemon) -> bool:
    return bool(daemon.get("/api/v1/stats")[1]["uplink"]["connected"])


@pytest.mark.timeout(240)
def test_kill_9_at_20_random_instants_during_mixed_load_loses_nothing_and_runs_nothing_twice(
    broker: Broker, make_daemon: Any
) -> None:
    seed = seed_from(os.environ)
    print(f"seed {seed}")
    rng = random.Random(seed)
    instants = sorted(rng.uniform(1.0, LOAD_S) for _ in range(KILLS))
    broker.start()
    with ProviderThread() as provider, Subscriber(broker, f"{GW}/#", client_id=f"kill9-sub-{seed}") as sub:
        d: Daemon = make_daemon(daemon_env(broker, **daemon_overrides(provider.base_url)))
        d.start(timeout=30)
        wait_until(lambda: _connected(d), what="the uplink connected")  # its persistent session now exists
        load = MixedLoad(d, broker, seed)
        began = time.monotonic()
        load.start()
        down_s: list[float] = []
        for at in instants:
            pause = began + at - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            d.kill9()
            killed = time.monotonic()
            d.start(timeout=30)
            down_s.append(time.monotonic() - killed)
        readings_then = _telemetry(sub)
        time.sleep(3.0)  # some load on the last start too
        readings_after_last_start = _telemetry(sub) - readings_then
        load.stop()
        loaded_s = time.monotonic() - began
        wait_until(lambda: _connected(d), timeout=30, what="the uplink connected at the end")
        summary = verify(d, sub, load, seed=seed, timeout=90)
        assert d.proc is not None and d.proc.poll() is None, "the daemon died by itself"
    # The texts were really interpreted by the provider (then served from the prompt cache, which lives in SQLite).
    assert summary.answered_by["openai"] > 0, summary.answered_by
    assert provider.completions() > 0
    # The kills found commands on their way to the pump, which the restart sent again with the same id.
    assert summary.requeued["requeued after restart"] > 0, summary.requeued
    # Telemetry flows again after the last restart (3 s at 20 readings/s; a kill costs what was not yet written).
    assert readings_after_last_start >= 20, readings_after_last_start
    print(
        report(
            "kill -9 during mixed load",
            seed,
            summary,
            kills=f"{KILLS} at {[round(t, 1) for t in instants]} s",
            restarts=f"{d.starts - 1}, down {min(down_s):.2f}-{max(down_s):.2f} s (median "
            f"{sorted(down_s)[len(down_s) // 2]:.2f} s) from kill to ready",
            load=f"{loaded_s:.1f} s",
            telemetry_in_the_3_s_after_the_last_start=readings_after_last_start,
        )
    )


@pytest.mark.timeout(240)
def test_sigstop_past_the_keepalive_and_sigterms_during_mixed_load_lose_nothing_and_run_nothing_twice(
    broker: Broker, make_daemon: Any
) -> None:
    """The same mixed load, and the two faults black-box testing found under it: the daemon frozen (SIGSTOP) for
    longer than 1.5 keepalives, so the broker drops its session while commands keep arriving, then SIGCONT; and
    SIGTERMs (each followed by a start on the same data directory) with MQTT commands arriving. Every stop is
    clean (exit 0, within grace_s and a second); afterwards every acknowledged command is final, ran once, and
    its result is on the broker."""
    seed = seed_from(os.environ)
    print(f"seed {seed}")
    rng = random.Random(seed)
    grace_s = 2.0
    broker.start()
    with ProviderThread() as provider, Subscriber(broker, f"{GW}/#", client_id=f"stopcont-sub-{seed}") as sub:
        env = daemon_overrides(
            provider.base_url, GATEWAYD_SHUTDOWN__GRACE_S=str(grace_s), GATEWAYD_COMMANDS__RECONCILE_INTERVAL_S="1"
        )
        d: Daemon = make_daemon(daemon_env(broker, **env))
        d.start(timeout=30)
        wait_until(lambda: _connected(d), what="the uplink connected")
        load = MixedLoad(d, broker, seed, mqtt_per_s=20.0)
        load.start()
        stops: list[float] = []
        frozen: list[float] = []
        for round_ in range(3):
            time.sleep(rng.uniform(1.0, 3.0))
            d.send_signal(signal.SIGSTOP)
            pause = rng.uniform(8.0, 10.0)  # past 1.5 x the 5 s keepalive: the broker drops the session
            time.sleep(pause)
            d.send_signal(signal.SIGCONT)
            frozen.append(pause)
            wait_until(lambda: _connected(d), timeout=30, what=f"reconnected after SIGCONT {round_}")
            time.sleep(rng.uniform(1.0, 3.0))
            began = time.monotonic()
            d.send_signal(signal.SIGTERM)
            code = d.wait_exit(timeout=grace_s + 20)
            stops.append(time.monotonic() - began)
            assert code == 0, d.log_tail()
            d.start(timeout=30)
        time.sleep(3.0)
        load.stop()
        wait_until(lambda: _connected(d), timeout=30, what="the uplink connected at the end")
        summary = verify(d, sub, load, seed=seed, timeout=90)
        assert d.get("/api/v1/queue")[1]["queued"] == 0
        metrics = d.get("/metrics")[1]
        gaps = [line for line in str(metrics).splitlines() if line.startswith("gatewayd_dispatcher_gaps_total")]
        assert d.proc is not None and d.proc.poll() is None, "the daemon died by itself"
    assert max(stops) <= grace_s + 1.0, f"SIGTERM to exit: {stops}"
    assert all(line.endswith(" 0.0") for line in gaps), gaps  # the store and the dispatcher never disagreed
    reconnect_loop = [
        e for e in d.log_lines() if e.get("event") in ("mqtt_command_not_committed", "mqtt_command_failed")
    ]
    assert reconnect_loop == [], reconnect_loop[:3]
    print(
        report(
            "SIGSTOP past the keepalive and SIGTERM during mixed load",
            seed,
            summary,
            frozen=f"{[round(f, 1) for f in frozen]} s",
            sigterm_to_exit=f"{[round(s, 2) for s in stops]} s (grace_s {grace_s})",
            gaps=gaps,
        )
    )
