"""The supervisor: builds the components from the configuration, runs them, and stops them in order.

Signal handlers only set flags. SIGTERM/SIGINT: stop intake, let executing commands finish within
``shutdown.grace_s``, close the HTTP listener, the devices and the store, exit 0; a second SIGTERM/SIGINT
forces (exit 130; everything accepted is already in SQLite). SIGHUP re-reads the configuration and applies the
log level and the device profiles. Breaker states are restored from the store before the first command runs,
saved every ``resilience.save_interval_s`` and once more on the way out. systemd hears
READY/STATUS/WATCHDOG/STOPPING through sd_notify; the watchdog
is fed from a task on the event loop, so a blocked loop (or a stuck store) stops feeding it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import structlog

from gatewayd import __version__
from gatewayd.app.operator import Operator
from gatewayd.app.systemd import Notifier
from gatewayd.clock import REAL_CLOCK, Clock
from gatewayd.commands.dispatcher import Dispatcher
from gatewayd.commands.scheduler import Scheduler
from gatewayd.commands.service import CommandService
from gatewayd.config.loader import LoadedConfig, load_config
from gatewayd.config.models import Config
from gatewayd.devices.manager import DeviceManager
from gatewayd.errors import ConfigError, GatewayError, StoreCorrupt, StoreUnavailable
from gatewayd.interpret.answers import LiveFacts
from gatewayd.interpret.service import InterpretService
from gatewayd.observability import logging as gwlog
from gatewayd.observability.collector import GatewayCollector
from gatewayd.observability.metrics import REGISTRY
from gatewayd.resilience import ResilienceState
from gatewayd.store import Store
from gatewayd.store.space import DiskSpace
from gatewayd.tasks import TaskOwner
from gatewayd.telemetry.recorder import Recorder
from gatewayd.telemetry.timestamps import Stamper, sync_probe
from gatewayd.uplink.mqtt import Uplink
from gatewayd.uplink.outbox import Outbox
from gatewayd.web.server import WebContext, WebServer

log = structlog.get_logger("gatewayd.supervisor")

EXIT_OK, EXIT_CRASH, EXIT_CONFIG, EXIT_FORCED = 0, 1, 2, 130
FORCED_EXIT_S = 0.5  # after a second signal, the most the orderly unwinding may take before the process ends
STOP_OVERRUN_S = 5.0  # after grace_s, the most closing may take (it takes well under a second) before it ends
CLOSE_S = 1.0  # what the listeners and the uplink each get to say goodbye on a stop


class Supervisor:
    def __init__(
        self,
        loaded: LoadedConfig,
        *,
        environ: Mapping[str, str] | None = None,
        clock: Clock | None = None,
        hard_exit: Callable[[int], None] | None = None,
    ):
        self.loaded = loaded
        # The CLI's way out when the event loop cannot wind down (a second signal, or a stop that overran its
        # bound): everything accepted is in SQLite already, so ending the process loses nothing.
        self._hard_exit = hard_exit
        self._environ = environ
        self.notifier = Notifier(environ)
        self.clock = clock or REAL_CLOCK
        self.phase = "starting"
        self._started = time.monotonic()
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        self._main: asyncio.Task[Any] | None = None
        self._forced = False
        self.store: Store | None = None
        self.space: DiskSpace | None = None
        self.devices: DeviceManager | None = None
        self.recorder: Recorder | None = None
        self.uplink: Uplink | None = None
        self.operator: Operator | None = None
        self.dispatcher: Dispatcher | None = None
        self.service: CommandService | None = None
        self.scheduler: Scheduler | None = None
        self.web: WebServer | None = None
        self.interpret: InterpretService | None = None
        self.resilience = ResilienceState()

    # --- signals: flags only ---------------------------------------------------------------------------------

    def request_stop(self, reason: str = "request") -> None:
        loop = asyncio.get_running_loop()
        if self._stop.is_set():
            if not self._forced and self._main is not None:
                self._forced = True
                log.warning("shutdown_forced", reason=reason)
                self._main.cancel()
                if self._hard_exit is not None:
                    # Cancelling unwinds in order when it can; a task that does not end (a TaskGroup waits for
                    # its children) must not keep the process alive: the second signal always ends it.
                    loop.call_later(FORCED_EXIT_S, self._hard_exit, EXIT_FORCED)
            return
        log.info("shutdown_requested", reason=reason)
        self._stop.set()
        if self._hard_exit is not None:
            bound = self.loaded.config.shutdown.grace_s + STOP_OVERRUN_S
            loop.call_later(bound, self._overran, bound)

    def _overran(self, bound: float) -> None:
        """The stop took longer than grace_s plus its allowance to close: a defect (logged), not a reason to wait
        for systemd's SIGKILL."""
        log.error("shutdown_overran", bound_s=bound, phase=self.phase)
        assert self._hard_exit is not None
        self._hard_exit(EXIT_CRASH)

    def request_reload(self) -> None:
        self._reload.set()

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, sig.name)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)

    def _remove_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)

    # --- run -------------------------------------------------------------------------------------------------

    def _register_secrets(self, *configs: Config) -> None:
        """The values the configuration points at that the log must never show (keys, passwords): before any
        component reads them, and again on SIGHUP (the running components keep the old ones until a restart)."""
        environ = os.environ if self._environ is None else self._environ
        found: set[str] = set()
        for cfg in configs:
            found.update(cfg.secrets(environ).values())
        gwlog.register_secrets("config", found)

    async def run(self, *, install_signals: bool = True) -> int:
        loop = asyncio.get_running_loop()
        self._main = asyncio.current_task()
        self._register_secrets(self.loaded.config)
        if install_signals:
            self._install_signals(loop)
        self.notifier.notify("STATUS=starting")
        try:
            await self._run()
            return EXIT_OK
        except asyncio.CancelledError:
            if self._forced:
                return EXIT_FORCED
            raise
        except (ConfigError, StoreCorrupt) as err:
            self._startup_failed(err)
            return EXIT_CONFIG
        except GatewayError as err:
            self._startup_failed(err)
            return EXIT_CRASH
        except BaseExceptionGroup as group:
            log.error(
                "component_crashed", errors=[f"{type(e).__name__}: {e}" for e in group.exceptions], exc_info=group
            )
            return EXIT_FORCED if self._forced else EXIT_CRASH
        finally:
            self.phase = "stopped"
            if install_signals:
                self._remove_signals(loop)
            self.notifier.close()

    def _startup_failed(self, err: GatewayError) -> None:
        log.error("startup_failed", code=err.code, error=err.message, phase=self.phase)
        self.notifier.notify(f"STATUS=failed: {err.message}")
        print(f"gatewayd: cannot start: {err.message}", file=sys.stderr)

    async def _run(self) -> None:
        cfg = self.loaded.config
        async with contextlib.AsyncExitStack() as stack:
            self.store = await stack.enter_async_context(
                Store(
                    cfg.db_path,
                    synchronous=cfg.store.synchronous,
                    max_batch=cfg.store.max_batch,
                    wal_preallocate_frames=cfg.store.wal_preallocate_frames,
                )
            )
            self.space = await stack.enter_async_context(
                DiskSpace(
                    self.store,
                    cfg.db_path.parent,
                    min_free_bytes=cfg.store.min_free_bytes,
                    check_s=cfg.store.space_check_s,
                )
            )
            # Construction order is the dependency order; a component later in it that an earlier one calls back
            # (the device manager's profiles for the recorder, the service for the dispatcher's finished commands,
            # the scheduler's wake-up) is reached through a closure over the name it is about to be bound to.
            # Every name is bound before the component that holds such a closure is entered (starts working).
            service: CommandService
            scheduler: Scheduler
            stamper = Stamper(sync_probe(cfg.telemetry.clock_sync), wall=self.clock.wall, mono=self.clock.monotonic)
            # What waits for the uplink: telemetry and events from the recorder, results from the dispatcher.
            box = Outbox(self.store, stamper.now)
            recorder = Recorder(
                self.store,
                cfg.outbox,
                cfg.telemetry,
                boot_id=self.clock.boot_id,
                stamper=stamper,
                space=self.space,
                forward=cfg.mqtt.enabled,
                profiles=lambda: devices.profiles(),
                box=box,
            )
            devices = DeviceManager(self.loaded, sink=recorder)
            self.recorder = await stack.enter_async_context(recorder)
            self.devices = await stack.enter_async_context(devices)
            dispatcher = Dispatcher(
                self.store,
                devices.devices,
                clock=self.clock,
                on_final=lambda rec: service.on_final(rec),
                retry=cfg.resilience.device_retry,
                breaker=cfg.resilience.device_breaker,
                outbox=box if cfg.mqtt.enabled else None,
                reconcile_interval_s=cfg.commands.reconcile_interval_s,
                on_armed=lambda: scheduler.wake(),
                clock_synced=lambda: stamper.synced,
            )
            self.service = service = CommandService(
                self.store, devices, cfg.commands, self.clock, self.space, dispatcher=dispatcher
            )
            self.scheduler = scheduler = Scheduler(self.store, service, self.clock)
            for name, breaker in dispatcher.breakers.items():
                self.resilience.register(f"breaker:device:{name}", breaker)
            if cfg.interpret.enabled:
                self.interpret = InterpretService(
                    cfg.interpret,
                    store=self.store,
                    service=service,
                    profiles=devices.profiles,
                    descriptions={name: dev.description for name, dev in cfg.devices.items()},
                    channels={name: dev.channels for name, dev in cfg.devices.items() if dev.channels},
                    facts=LiveFacts(devices.devices, recorder.recent),
                    environ=self._environ,
                    clock=self.clock,
                )
                self.interpret.register(self.resilience)
            await self.resilience.load(self.store)  # before any command runs: an open breaker stays open
            self.dispatcher = await stack.enter_async_context(dispatcher)
            if self.interpret is not None:
                await stack.enter_async_context(self.interpret)
            self.uplink = await stack.enter_async_context(
                Uplink(
                    cfg.mqtt,
                    cfg.gateway.id,
                    box,
                    service,
                    recorder,
                    devices.profiles,
                    interpret=self.interpret,
                )
            )
            self.operator = Operator(
                loaded=lambda: self.loaded,
                healthy=self.healthy,
                store=self.store,
                resilience=self.resilience,
                devices=devices,
                recorder=recorder,
                uplink=self.uplink,
                scenarios=self.interpret.fault_scenarios() if self.interpret is not None else None,
            )
            ctx = WebContext(
                service,
                devices,
                self.status,
                cfg.commands.max_wait_s,
                dispatcher.breaker_state,
                recorder=recorder,
                operator=self.operator,
                interpret=self.interpret,
                scheduler=scheduler,
            )
            collector = GatewayCollector(lambda: devices, lambda: self.dispatcher)
            REGISTRY.register(collector)
            stack.callback(REGISTRY.unregister, collector)
            self.web = await stack.enter_async_context(WebServer(cfg.http, ctx))
            tasks = TaskOwner("supervisor")
            await tasks.open()
            stack.push_async_callback(tasks.close)
            tasks.spawn("reload", self._reloader())
            saver = self.resilience.run_saver(self.store, interval_s=cfg.resilience.save_interval_s)
            tasks.spawn("resilience_saver", saver)
            tasks.spawn("commands_pruner", self.service.run_pruner())
            if self.notifier.enabled:
                tasks.spawn("systemd", self._systemd())

            service.open_intake()
            # Switch-offs and ends of on-periods, those from before a restart too (overdue ones at once): now that
            # commands are taken.
            await stack.enter_async_context(self.scheduler)
            self.uplink.open_intake()
            # Ready means a command published from now on is not lost: the uplink has subscribed (or the broker is
            # away, which is a normal state: commands then wait at the broker for our persistent session).
            await self.uplink.wait_settled(cfg.mqtt.ready_wait_s)
            self.phase = "running"
            self.notifier.notify("READY=1", f"STATUS={self._status_line()}")
            log.info(
                "gateway_ready",
                gateway_id=cfg.gateway.id,
                mode=cfg.gateway.mode,
                port=self.web.port,
                devices=len(self.devices.devices),
                version=__version__,
                startup_s=round(time.monotonic() - self._started, 3),
            )

            await self._stop.wait()

            self.phase = "stopping"
            self.uplink.close_intake()  # MQTT commands not taken yet stay with the broker, unacknowledged
            self.service.close_intake()
            executing = self.dispatcher.in_flight()
            self.notifier.notify("STOPPING=1", f"STATUS=stopping: {executing} command(s) executing")
            log.info(
                "gateway_stopping", executing=executing, queued=self.dispatcher.queued(), grace_s=cfg.shutdown.grace_s
            )
            unfinished = await self.dispatcher.drain(cfg.shutdown.grace_s)
            self.service.wake_waiters()
            try:
                await self.resilience.save(self.store)
            except StoreUnavailable as err:
                log.warning("resilience_state_not_saved", error=err.message)
            # The exit stack now closes, in reverse order: tasks, HTTP, dispatcher, devices, store.
        log.info("gateway_stopped", unfinished=unfinished, queued_for_restart=self.dispatcher.queued())

    # --- background duties -------------------------------------------------------------------------------------

    async def _reloader(self) -> None:
        while True:
            await self._reload.wait()
            self._reload.clear()
            await self.reload()

    async def reload(self) -> None:
        """SIGHUP: re-read the file; apply the log level and device profiles; keep the old ones on any error."""
        old = self.loaded
        try:
            new = await asyncio.to_thread(load_config, old.path, self._environ)
        except ConfigError as err:
            log.error("reload_rejected", problems=[str(p) for p in err.problems])
            return
        gwlog.configure(new.config.log.level)
        self._register_secrets(old.config, new.config)
        assert self.devices is not None
        changed = self.devices.reload_profiles(
            new.profiles, {name: dev.profile for name, dev in new.config.devices.items()}
        )
        if self.interpret is not None:
            await self.interpret.reload()  # the rules file again, and the registry of the new profiles
        later = [
            section
            for section in type(new.config).model_fields
            if section != "log" and getattr(new.config, section) != getattr(old.config, section)
        ]
        self.loaded = LoadedConfig(
            old.config.model_copy(update={"log": new.config.log}), new.profiles, old.path, old.overrides
        )
        log.info("config_reloaded", log_level=new.config.log.level, profiles_changed=changed, needs_restart=later)

    async def _systemd(self) -> None:
        watchdog_s = self.notifier.watchdog_s
        interval = min(5.0, watchdog_s / 2) if watchdog_s else 5.0
        last_status = ""
        while True:
            await asyncio.sleep(interval)
            if watchdog_s and self.healthy():
                self.notifier.notify("WATCHDOG=1")
            line = self._status_line()
            if line != last_status:
                self.notifier.notify(f"STATUS={line}")
                last_status = line

    # --- state -------------------------------------------------------------------------------------------------

    def healthy(self) -> bool:
        """Alive and worth keeping alive: what feeds the watchdog. The loop runs (we are here), the store is not
        stuck on the disk, and its file is not gone or replaced.

        A store lost that way stops the feeding, so systemd restarts the daemon (within WatchdogSec) and the next
        start opens a new database, or the file now at the path: nothing else brings the gateway back, and an
        unattended one would refuse every command until someone came. The store has already made the kill safe
        (its WAL checkpointed and truncated, so it is not replayed into a replacement: Store._secure). A store lost
        to a read-only or failing disk, or to permissions, keeps the feeding: a restart cannot open the database
        there, so it would only turn into a crash loop every RestartSec, without the /healthz and status page that
        tell the technician why. /healthz is 503 in every case (status()["healthy"])."""
        if self.store is None:
            return self.phase == "starting"
        lost = self.store.lost
        if lost is not None and lost.restart_helps:
            return False
        limit = max(10.0, self.notifier.watchdog_s or 0.0)
        return self.store.stalled_for < limit

    def _status_line(self) -> str:
        if self.devices is None or self.dispatcher is None:
            return self.phase
        up = sum(1 for d in self.devices.devices.values() if d.availability.available)
        storage = ", STORAGE FULL: new commands refused" if self.space is not None and self.space.full else ""
        lost = self.store.lost if self.store is not None else None
        if lost is not None:
            then = "restart pending" if lost.restart_helps else "fix the disk, then restart"
            storage = f", STORE LOST ({lost.summary}): new commands refused, {then}{storage}"
        return (
            f"{self.phase}: {up}/{len(self.devices.devices)} devices available, "
            f"{self.dispatcher.queued()} queued, {self.dispatcher.executed} executed{storage}"
        )

    def status(self) -> dict[str, Any]:
        cfg = self.loaded.config
        store = self.store
        lost = store.lost if store else None
        return {
            "gateway_id": cfg.gateway.id,
            "version": __version__,
            "mode": cfg.gateway.mode,
            "phase": self.phase,
            "healthy": self.healthy() and lost is None,
            "uptime_s": round(time.monotonic() - self._started, 1),
            "queue": self.dispatcher.snapshot() if self.dispatcher else {"queued": 0, "in_flight": 0},
            "store": {
                "path": str(cfg.db_path),
                "commits": store.commits if store else 0,
                "durable_commits": store.durable_commits if store else 0,
                "lazy_commits": store.lazy_commits if store else 0,
                "stalled_s": round(store.stalled_for, 3) if store else 0.0,
                "lost": lost.to_api() if lost else None,
            },
            "storage": self.space.status() if self.space else None,
            "outbox": self._outbox_status(),
            "clock": {"synchronised": self.recorder.stamper.synced if self.recorder else None},
            "uplink": self.uplink.status() if self.uplink else None,
        }

    def _outbox_status(self) -> dict[str, Any] | None:
        recorder = self.recorder
        if recorder is None or recorder.stats is None:
            return None
        out = recorder.stats.to_api(recorder.stamper.now())
        out["pending"] = recorder.pending
        out["dropped_pending"] = recorder.dropped_pending
        out["telemetry"] = recorder.status()  # write-behind: held in memory, live or stored, the backlog
        return out
