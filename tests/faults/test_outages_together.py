"""Broker outages, provider outages and serial unplugs during the same mixed load, overlapping in time.

The load is the kill -9 test's (tests/faults/mixed_load.py); the faults, on one timeline (seconds into the load):

    provider   refuses 4-14          answers 500 24-34            hangs 42-50
    broker     stopped 8-14          stopped 28-33
    serial     bus0 unplugged 10-16  unplugged 30-35              unplugged 44-48

Afterwards: every acknowledged command reached its final state (succeeded; expired only for a command with a
1.5 s deadline that passed while its device was unplugged or the daemon busy), none ran twice, every result reached
the broker; natural-language requests made while the provider was failing were answered by the local rules (and by
the provider otherwise); and the gateway reports healthy: devices available, uplink connected, provider healthy.

The timeline is fixed; the load's draws come from a printed seed (``GATEWAYD_FAULT_SEED=N`` repeats them).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import Daemon, http
from tests.faults.mixed_load import Fault, MixedLoad, ProviderThread, daemon_overrides, report, seed_from, verify
from tests.mqtt_broker import GW, Broker, Subscriber, daemon_env, wait_until

LOAD_S = 56.0
PROVIDER_OUTAGES = [(4.0, 14.0, "refuse"), (24.0, 34.0, "500"), (42.0, 50.0, "hang")]
BROKER_OUTAGES = [(8.0, 14.0), (28.0, 33.0)]
UNPLUGS = [(10.0, 6.0), (30.0, 5.0), (44.0, 4.0)]  # (at, for how long)


def _stats(daemon: Daemon) -> dict[str, Any]:
    status, body = daemon.get("/api/v1/stats")
    assert status == 200, body
    return dict(body)


@pytest.mark.timeout(240)
def test_broker_provider_and_serial_outages_together_during_mixed_load(broker: Broker, make_daemon: Any) -> None:
    seed = seed_from(os.environ)
    print(f"seed {seed}")
    broker.start()
    with ProviderThread() as provider, Subscriber(broker, f"{GW}/#", client_id=f"outages-sub-{seed}") as sub:
        env = daemon_overrides(
            provider.base_url,
            # The prompt cache would answer repeated texts without asking anyone: off, so every text is a request.
            GATEWAYD_INTERPRET__CACHE_TTL_S="0",
            # The provider's breaker probes again soon after an outage, so it answers between the outages.
            GATEWAYD_INTERPRET__BREAKER__OPEN_S="2",
        )
        d: Daemon = make_daemon(daemon_env(broker, **env))
        d.start(timeout=30)
        wait_until(lambda: _stats(d)["uplink"]["connected"], what="the uplink connected")
        load = MixedLoad(d, broker, seed)
        unplug_reports: list[dict[str, Any]] = []
        unplug_errors: list[str] = []

        def unplug(duration_s: float) -> None:
            url = f"{d.url}/api/v1/admin/test/serial_unplug?duration_s={duration_s}"
            try:
                status, body, _ = http("POST", url, {}, timeout=duration_s + 40)
            except OSError as err:
                unplug_errors.append(f"serial_unplug: {err}")
                return
            if status != 200:
                unplug_errors.append(f"serial_unplug: HTTP {status} {body}")
            else:
                unplug_reports.append(body)

        provider_faults: dict[str, Callable[[], None]] = {
            "refuse": provider.refuse,
            "500": lambda: provider.fail(Fault.http(500)),
            "hang": lambda: provider.fail(Fault.hang(5)),
        }
        timeline: list[tuple[float, str, Callable[[], None]]] = []
        for start, end, kind in PROVIDER_OUTAGES:
            timeline += [(start, f"provider {kind}", provider_faults[kind]), (end, "provider healed", provider.heal)]
        for start, end in BROKER_OUTAGES:
            timeline += [(start, "broker stopped", broker.stop), (end, "broker started", broker.start)]
        unpluggers: list[threading.Thread] = []
        for at, duration in UNPLUGS:
            thread = threading.Thread(target=unplug, args=(duration,), name=f"unplug@{at}", daemon=True)
            unpluggers.append(thread)
            timeline.append((at, f"serial unplugged for {duration} s", thread.start))
        timeline.sort(key=lambda event: event[0])

        began = time.monotonic()
        load.start()
        done: list[str] = []
        for at, what, action in timeline:
            pause = began + at - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            action()
            done.append(f"{time.monotonic() - began:5.1f} s {what}")
        time.sleep(max(0.0, began + LOAD_S - time.monotonic()))
        load.stop()
        loaded_s = time.monotonic() - began
        for thread in unpluggers:
            thread.join(60)
            assert not thread.is_alive(), "a serial_unplug scenario did not return"
        assert not unplug_errors, unplug_errors
        assert len(unplug_reports) == len(UNPLUGS)
        for rep in unplug_reports:  # each unplug was noticed, and the device was back after the replug
            assert rep["recovered"] is True and rep["observed"]["detected_unplug_after_s"] is not None, rep

        summary = verify(d, sub, load, seed=seed, timeout=90)

        # Texts sent and answered while the provider was failing were answered by the local rules.
        windows = [(began + start, began + end) for start, end, _ in PROVIDER_OUTAGES]
        during = [
            s
            for s in load.sent
            if s.via == "http-text"
            and s.acked
            and s.finished is not None
            and any(start + 0.1 <= s.started and s.finished <= end for start, end in windows)
        ]
        assert len(during) >= 5, f"seed {seed}: only {len(during)} texts fell inside a provider outage"
        by = {s.id: summary.records[s.id]["interpretation"] for s in during}
        not_local = {i: (h["provider"], h["degraded"]) for i, h in by.items() if h["provider"] != "local"}
        assert not not_local, f"seed {seed}: answered by a failing provider: {not_local}"
        assert all(h["degraded"] for h in by.values())
        # ... and by the provider when it worked: the check above is not true of every text.
        assert summary.answered_by["openai"] > 0, summary.answered_by

        # The gateway reports healthy: every device back, the uplink connected, the provider healthy again.
        assert http("GET", f"{d.url}/healthz")[0] == 200
        assert http("GET", f"{d.url}/readyz")[0] == 200
        stats = _stats(d)
        assert stats["uplink"]["connected"] is True and stats["uplink"]["connects"] >= 1 + len(BROKER_OUTAGES)
        _, devices = d.get("/api/v1/devices")
        down = {dev["name"]: dev.get("last_error") for dev in devices["devices"] if not dev["available"]}
        assert not down, down

        def provider_healthy() -> bool:
            [openai] = [p for p in d.get("/api/v1/providers")[1]["providers"] if p["name"] == "openai"]
            return bool(openai["health"]["ok"]) and openai["breaker"]["state"] == "closed"

        wait_until(provider_healthy, timeout=30, what="the provider healthy again")
        assert d.proc is not None and d.proc.poll() is None, "the daemon died by itself"
    print(
        report(
            "broker, provider and serial outages together",
            seed,
            summary,
            timeline="; ".join(done),
            texts_during_provider_outages=f"{len(during)}, all answered by the local rules",
            unplugs=[
                (r["observed"]["detected_unplug_after_s"], r["observed"]["available_again_after_replug_s"])
                for r in unplug_reports
            ],
            uplink_connects=stats["uplink"]["connects"],
            broker_starts=broker.starts,
            load=f"{loaded_s:.1f} s",
        )
    )
