"""Operator commands: the effective configuration (secrets redacted), a reset of breakers and limiters, and fault
scenarios a technician can run on a live gateway to see how it copes (``gatewayd test SCENARIO``).

Each scenario injects one fault for a bounded time, undoes it, waits (bounded) for the gateway to recover, and
returns a report: what was done, what was observed, whether and how fast the gateway was healthy again. Faults
that would touch real hardware (unplugging a real port) are only offered for simulated buses.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import structlog

from gatewayd.config.loader import LoadedConfig
from gatewayd.devices.manager import DeviceManager
from gatewayd.devices.serial_bus import SerialDevice
from gatewayd.errors import BadRequest, Conflict, GatewayError, NotFound
from gatewayd.resilience import ResilienceState
from gatewayd.resilience.breaker import CircuitBreaker
from gatewayd.resilience.keyed import KeyedLimiter
from gatewayd.store import Store, ping

if TYPE_CHECKING:
    from gatewayd.telemetry.recorder import Recorder
    from gatewayd.uplink.mqtt import Uplink

Scenario = Callable[[float], Awaitable[dict[str, Any]]]

log = structlog.get_logger("gatewayd.operator")

SCENARIOS = (
    "serial_unplug",
    "serial_garbage",
    "broker_down",
    "slow_disk",
    "provider_timeout",
    "provider_429",
    "provider_down",
)
_SECRET_WORDS = ("password", "secret", "token", "hash", "api_key", "private")
_RECOVERY_TIMEOUT_S = 15.0
MAX_DURATION_S = 120.0


def redact(value: Any, key: str = "") -> Any:
    """The configuration as JSON, with anything that looks like a secret replaced. Names of environment
    variables (``*_env``) are kept: they say where a secret comes from, not what it is."""
    if isinstance(value, dict):
        return {k: redact(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    lowered = key.lower()
    if value is not None and not lowered.endswith("_env") and any(w in lowered for w in _SECRET_WORDS):
        return "***"
    return value


class Operator:
    """What ``gatewayd config``, ``reset`` and ``test`` do, given the parts they act on. Scenarios are a registry:
    the gateway's own (offered when their part runs) and those another component brings (the interpreter's
    provider faults), each a runner of ``duration_s`` that returns what it did and saw."""

    def __init__(
        self,
        *,
        loaded: Callable[[], LoadedConfig],
        healthy: Callable[[], bool],
        store: Store,
        resilience: ResilienceState,
        devices: DeviceManager,
        recorder: Recorder | None = None,
        uplink: Uplink | None = None,
        scenarios: Mapping[str, Scenario] | None = None,
    ):
        self._loaded, self._healthy = loaded, healthy
        self._store, self._resilience, self._devices = store, resilience, devices
        self._recorder, self._uplink = recorder, uplink
        self._running: str | None = None
        self.scenarios: dict[str, Scenario] = {
            "serial_unplug": self._serial_unplug,
            "serial_garbage": self._serial_garbage,
            "slow_disk": self._slow_disk,
        }
        if uplink is not None and uplink.cfg.enabled:
            self.scenarios["broker_down"] = self._broker_down
        self.scenarios.update(scenarios or {})

    def config(self) -> dict[str, Any]:
        loaded = self._loaded()
        return {
            "path": str(loaded.path),
            "overrides": loaded.overrides,
            "config": redact(loaded.config.model_dump(mode="json")),
            "profiles": sorted(loaded.profiles),
        }

    def reset(self) -> dict[str, Any]:
        """Close every breaker, refill every limiter, zero the counters a technician watches."""
        breakers = limiters = 0
        for tool in self._resilience.tools().values():
            if isinstance(tool, CircuitBreaker):
                tool.reset("operator reset")
                breakers += 1
            elif isinstance(tool, KeyedLimiter):
                limiters += tool.clear()
        for bus in self._devices.buses.values():
            limiters += bus.reset_counters()
        log.warning("operator_reset", breakers=breakers, limiters=limiters)
        return {"breakers_closed": breakers, "limiter_keys_cleared": limiters}

    async def run(self, scenario: str, duration_s: float) -> dict[str, Any]:
        if scenario not in SCENARIOS and scenario not in self.scenarios:
            raise NotFound(
                f"no scenario {scenario!r}",
                details={"scenarios": sorted({*SCENARIOS, *self.scenarios})},
                code="unknown_scenario",
            )
        if not 0 < duration_s <= MAX_DURATION_S:
            raise BadRequest(f"duration_s must be more than 0 and at most {MAX_DURATION_S:g}")
        if self._running is not None:
            raise Conflict(f"scenario {self._running!r} is still running", code="scenario_running")
        self._running = scenario
        started = time.monotonic()
        log.warning("operator_test_started", scenario=scenario, duration_s=duration_s)
        try:
            runner = self.scenarios.get(scenario)
            if runner is None:
                raise Conflict(
                    f"scenario {scenario!r} needs a component this gateway does not run",
                    code="scenario_unavailable",
                )
            observed = await runner(duration_s)
        finally:
            self._running = None
        report = {
            "scenario": scenario,
            "duration_s": duration_s,
            "took_s": round(time.monotonic() - started, 3),
            **observed,
            "healthy_after": self._healthy(),
        }
        log.warning("operator_test_finished", **{k: v for k, v in report.items() if not isinstance(v, dict | list)})
        return report

    # --- scenarios -------------------------------------------------------------------------------------------

    def _simulated_bus(self) -> tuple[str, Any, Any]:
        devices = self._devices
        if not devices.simulators:
            raise Conflict("no simulated serial bus: this scenario runs in mock mode only", code="needs_mock_mode")
        name = next(iter(devices.simulators))
        return name, devices.simulators[name], devices.buses[name]

    async def _serial_unplug(self, duration_s: float) -> dict[str, Any]:
        name, sim, bus = self._simulated_bus()
        sim.unplug()
        unplugged = time.monotonic()
        went_down = await _until(lambda: not bus.availability.available, duration_s + 5)
        await asyncio.sleep(max(0.0, duration_s - (time.monotonic() - unplugged)))
        sim.plug()
        plugged = time.monotonic()
        back = await _until(lambda: bus.availability.available, _RECOVERY_TIMEOUT_S)
        return {
            "actions": [f"unplugged the simulated port of {name}", f"plugged it back in after {duration_s:g} s"],
            "observed": {
                "bus": name,
                "detected_unplug_after_s": None if went_down is None else round(went_down - unplugged, 3),
                "available_again_after_replug_s": None if back is None else round(back - plugged, 3),
                "last_error": bus.availability.last_error,
            },
            "recovered": back is not None,
        }

    async def _serial_garbage(self, duration_s: float) -> dict[str, Any]:
        name, sim, bus = self._simulated_bus()
        decoder_before = (bus.decoder.frames, bus.decoder.dropped)
        transactions, timeouts = bus.transactions, bus.timeouts
        rng = random.Random()
        end = time.monotonic() + duration_s
        sent = 0
        while time.monotonic() < end:
            noise = rng.randbytes(rng.randint(16, 512))
            sim.inject(noise)
            sent += len(noise)
            await asyncio.sleep(0.05)
        # Does the bus still carry a transaction cleanly?
        probe = await self._probe_serial(bus)
        return {
            "actions": [f"put {sent} random bytes on {name} over {duration_s:g} s"],
            "observed": {
                "bus": name,
                "frames_decoded": bus.decoder.frames - decoder_before[0],
                "lines_discarded": bus.decoder.dropped - decoder_before[1],
                "peak_buffered_bytes": bus.decoder.peak_buffered,
                "transactions": bus.transactions - transactions,
                "timeouts": bus.timeouts - timeouts,
                "probe": probe,
            },
            "recovered": probe.get("ok", False),
        }

    async def _probe_serial(self, bus: Any) -> dict[str, Any]:
        """One read on the first device of the bus whose profile has a read that needs no parameters."""
        for device in self._devices.devices.values():
            if not isinstance(device, SerialDevice) or device.bus is not bus:
                continue
            for action, spec in device.profile.actions.items():
                if not spec.actuates and not any(p.required for p in spec.params.values()):
                    # Noise still in flight may swallow one reply (a run of garbage with no line feed is
                    # discarded up to the next one, the reply's): a real command would be retried, so is this.
                    errors = []
                    for _ in range(3):
                        started = time.monotonic()
                        try:
                            await device.execute(f"operator-probe-{time.time_ns()}", action, {})
                        except GatewayError as err:
                            errors.append(err.message)
                            continue
                        return {"ok": True, "device": device.name, "action": action, "ms": _ms(started),
                                "failed_attempts": errors}  # fmt: skip
                    return {"ok": False, "device": device.name, "errors": errors}
        return {"ok": bus.availability.available, "device": None}

    async def _broker_down(self, duration_s: float) -> dict[str, Any]:
        uplink, recorder = self._uplink, self._recorder
        assert uplink is not None  # offered only with an uplink that is enabled
        was_connected = uplink.connected
        depth_before = recorder.stats.rows if recorder and recorder.stats else 0
        await uplink.outage(duration_s)
        depth_during = recorder.stats.rows if recorder and recorder.stats else 0
        ended = time.monotonic()
        back = await _until(lambda: uplink.connected, _RECOVERY_TIMEOUT_S) if was_connected else None
        drained = None
        if back is not None and recorder is not None:
            drained = await _until(
                lambda: recorder.stats is not None and recorder.stats.rows <= depth_before, _RECOVERY_TIMEOUT_S
            )
        return {
            "actions": [f"dropped the broker connection and kept it down for {duration_s:g} s"],
            "observed": {
                "connected_before": was_connected,
                "outbox_rows_before": depth_before,
                "outbox_rows_at_end_of_outage": depth_during,
                "reconnected_after_s": None if back is None else round(back - ended, 3),
                "backlog_drained_after_s": None if drained is None else round(drained - ended, 3),
            },
            "recovered": (back is not None) if was_connected else True,
        }

    async def _slow_disk(self, duration_s: float) -> dict[str, Any]:
        store = self._store
        delay = 0.25
        store.write_delay_s = delay
        latencies = []
        try:
            end = time.monotonic() + duration_s
            while time.monotonic() < end:
                started = time.monotonic()
                await store.write(ping)
                latencies.append(_ms(started))
        finally:
            store.write_delay_s = 0.0
        # A batch that began before the delay was lifted (a telemetry flush) may still be sleeping: let it go.
        await store.write(lambda c: None)
        started = time.monotonic()
        await store.write(ping)
        after = _ms(started)
        return {
            "actions": [f"every commit delayed by {delay * 1000:.0f} ms for {duration_s:g} s (a slow SD card)"],
            "observed": {
                "commits_during": len(latencies),
                "commit_ms_max_during": max(latencies) if latencies else None,
                "commit_ms_after": after,
                "stalled_s_now": round(store.stalled_for, 3),
            },
            "recovered": after < delay * 1000,
        }


async def _until(predicate: Callable[[], bool], timeout_s: float) -> float | None:
    """The monotonic time at which ``predicate`` first held, polling every 20 ms; None if it never did."""
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return time.monotonic()
        if time.monotonic() >= deadline:
            return None
        await asyncio.sleep(0.02)


def _ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 2)
