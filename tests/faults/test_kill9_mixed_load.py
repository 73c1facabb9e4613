"""kill -9 of the daemon at 20 random instants during mixed load (HTTP and MQTT commands, telemetry, natural-language
requests), each time started again on the same data directory while the load goes on. Afterwards every
acknowledged command reached its final state, none ran twice (the simulators' execution logs), and every result
reached the broker.

The instants come from a seeded generator: the seed is printed, and ``GATEWAYD_FAULT_SEED=N`` runs the same draw
again (the daemon's own timing still varies from run to run)."""

from __future__ import annotations

import os
import random
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
