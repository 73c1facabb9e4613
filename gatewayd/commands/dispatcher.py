"""Runs accepted commands on their devices: one at a time per device, highest priority first, oldest first
within a priority, never after the deadline.

Each device has a retry policy and a circuit breaker from the resilience kit. A transient failure (no answer,
busy) is retried with backoff while the command's deadline allows; a refusal (NAK) is not. When a device keeps
failing its breaker opens: commands for it then wait in the queue, unsent, until the breaker lets a probe through
or their deadline passes, except critical ones, which are always tried. Commands for an unavailable device (its
bus unplugged) wait the same way until it is back, critical ones included, since nothing can reach it. A command
whose retries meet an open breaker or a vanished device goes back to the queue rather than failing.

Every state change is committed before the next step: ``dispatched`` before the device is asked, the final
state before waiters hear of it. A command cut off by a crash or a forced stop stays ``dispatched`` in the store
and is sent again after restart with the same id; devices use the id to answer a repeat without acting twice.
A change the store cannot take (the disk full) is tried again every ``STORE_RETRY_S`` until it can, logged once
per command and once more when it is recorded.

``expired`` means never executed. A command whose request may already have reached its device (it was cut off by
a crash, or its reply was lost when the device went away, and it went back to the queue) and whose deadline then
passes is not sent again, since the device might act on it late; the gateway cannot tell whether it acted, so it
ends ``failed`` with code ``outcome_unknown`` rather than claim it never ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import sqlite3
from collections import Counter
from collections.abc import Callable
from types import TracebackType
from typing import Any

import structlog

from gatewayd.clock import Clock
from gatewayd.commands.model import CommandRecord, Priority, State, Transition
from gatewayd.commands.safety import SafetyGate
from gatewayd.config.models import BreakerSettings, RetrySettings
from gatewayd.devices.base import Device
from gatewayd.devices.line import CALL, Call, DeadlinePassed, Preempted
from gatewayd.errors import DeviceRejected, DeviceUnavailable, GatewayError, SafetyLimited, StoreUnavailable
from gatewayd.observability.metrics import DISPATCHER_GAPS
from gatewayd.resilience import (
    CircuitBreaker,
    CircuitOpenError,
    CircuitState,
    DeadlineExceeded,
    RetryExhausted,
    RetryPolicy,
    Verdict,
    classify,
)
from gatewayd.resilience import Clock as ResilienceClock
from gatewayd.resilience.breaker import local_refusal_is_ignored
from gatewayd.store import Store, outbox, schedule
from gatewayd.store import commands as sql
from gatewayd.tasks import TaskOwner, wait_set
from gatewayd.uplink.outbox import Outbox

log = structlog.get_logger("gatewayd.dispatcher")

FinalCallback = Callable[[CommandRecord], None]
STORE_RETRY_S = 1.0
OUTCOME_UNKNOWN = "outcome_unknown"
HOLD_RECHECK_S = 1.0  # a held worker looks again this often even if no wake-up came


class Dispatcher:
    def __init__(
        self,
        store: Store,
        devices: dict[str, Device],
        *,
        clock: Clock,
        on_final: FinalCallback,
        sweep_interval_s: float = 1.0,
        reconcile_interval_s: float = 10.0,
        retry: RetrySettings | None = None,
        breaker: BreakerSettings | None = None,
        outbox: Outbox | None = None,
        on_armed: Callable[[], None] = lambda: None,
        clock_synced: Callable[[], bool] = lambda: False,
    ):
        self._store = store
        # Where results go for the uplink, in the transaction of the final state. None without an uplink ([mqtt]
        # enabled = false): no result row for an outbox nobody drains.
        self._outbox = outbox
        self._devices = devices
        self._clock = clock
        self._on_final = on_final
        self.clock_synced = clock_synced  # the telemetry clock's, for result timestamps
        self._sweep_interval_s = sweep_interval_s
        self._reconcile_interval_s = reconcile_interval_s
        self._on_armed = on_armed  # a scheduled action was armed: the Scheduler looks at its due times again
        self._suspects: set[str] = set()  # open in the store, unknown here, at the last reconciliation
        self._queues: dict[str, asyncio.PriorityQueue[tuple[int, int, str]]] = {}
        self._queued = _Waiting()  # everything waiting in a queue, by command id
        self._busy: dict[str, CommandRecord] = {}  # device -> command being executed
        self._settling: set[str] = set()  # taken from a queue to be expired: neither queued nor executing
        self._cancels: dict[str, tuple[CommandRecord, asyncio.Event]] = {}  # being cancelled: set when recorded
        # Open commands whose request may have reached the device: asked in this process, or dispatched before a
        # restart. Their deadline passing is not "expired" (never executed): the outcome is unknown.
        self._maybe_sent: set[str] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._draining = False
        self._unrecorded: set[str] = set()  # commands whose last state change the store refused
        self._tasks = TaskOwner("dispatcher")
        self.executed = 0
        # The settings' field names are the tools' own parameter names.
        self._retry = RetryPolicy(
            **(retry or RetrySettings()).model_dump(), name="device", clock=clock, classifier=_device_verdict
        )
        breaker_settings = (breaker or BreakerSettings()).model_dump()
        # Made here, not on entry, so the supervisor can restore their saved states before any command runs.
        self.breakers = {
            name: CircuitBreaker(f"device:{name}", **breaker_settings, is_ignored=_breaker_ignores, clock=clock)
            for name in devices
        }
        self.safety = {name: SafetyGate(name, device.profile, clock) for name, device in devices.items()}
        # device -> the command in hand and its preemption flag (set when a critical one arrives for the device)
        self._preempts: dict[str, tuple[CommandRecord, asyncio.Event]] = {}
        # A push, a drain, or the device coming back wakes a worker that holds its queue.
        self._wake = {name: asyncio.Event() for name in devices}
        for name, device in devices.items():
            device.availability.listeners.append(_waker(self._wake[name]))

    async def __aenter__(self) -> Dispatcher:
        await self._tasks.open()
        try:
            recovered = await self._store.read(sql.open_commands)
            self._maybe_sent = await self._store.read(sql.open_ever_dispatched)
            for rec in recovered:
                await self._recover(rec)
            for name in self._devices:
                self._queues.setdefault(name, asyncio.PriorityQueue())
                self._tasks.spawn(f"{name}.dispatch", self._work(name))
            self._tasks.spawn("sweep", self._sweep())
            self._tasks.spawn("reconcile", self._reconcile())
        except BaseException:
            await self._tasks.close()
            raise
        if recovered:
            log.info("commands_recovered", count=len(recovered))
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._tasks.close()

    async def _recover(self, rec: CommandRecord) -> None:
        if rec.device not in self._devices:
            await self._finish(
                rec, State.FAILED, code="unknown_device", message=f"device {rec.device!r} is no longer configured"
            )
            return
        if rec.state is not State.QUEUED:
            detail = "requeued after restart" if rec.state is State.DISPATCHED else "queued after restart"
            try:
                await self._store.write(lambda c: sql.transition(c, rec.seq, self._transition(State.QUEUED, detail)))
            except StoreUnavailable as err:
                # Start anyway (a full disk must not stop the gateway): the next state change is recorded instead.
                self._store_failed(rec, "requeue_not_recorded", err)
            rec.state = State.QUEUED
        self.push(rec)

    # --- queue ---------------------------------------------------------------------------------------------------

    def push(self, rec: CommandRecord) -> None:
        """Put an accepted (committed, state queued) command in its device's queue. A critical one preempts the
        device's command in hand, if that one is less urgent and has not reached the wire."""
        if rec.priority is Priority.CRITICAL:
            current = self._preempts.get(rec.device)
            if current is not None and current[0].priority > rec.priority and not current[1].is_set():
                current[1].set()
                log.info("command_preempted", command_id=current[0].id, device=rec.device, by=rec.id)
        self._queued.put(rec)
        self._queues.setdefault(rec.device, asyncio.PriorityQueue()).put_nowait((int(rec.priority), rec.seq, rec.id))
        wake = self._wake.get(rec.device)
        if wake is not None:
            wake.set()

    async def cancel(self, command_id: str, by: str) -> CommandRecord | None:
        """Take a command out of its queue before it is sent, and finish it as cancelled. None when it is not
        waiting in a queue (being executed, retried, settled, or not open): it may already be on the wire."""
        underway = self._cancels.get(command_id)
        if underway is not None:  # another cancel took it: its answer is this one's
            await underway[1].wait()
            return underway[0]
        rec = self._queued.pop(command_id)
        if rec is None:
            return None
        self._cancels[command_id] = (rec, done := asyncio.Event())
        self._settling.add(rec.id)
        try:
            await self._finish(rec, State.CANCELLED, code="cancelled", message=f"cancelled before it was sent, by {by}")
        finally:
            self._settling.discard(rec.id)
            del self._cancels[command_id]
            done.set()
        log.info("command_cancelled", command_id=rec.id, device=rec.device, by=by)
        return rec

    def knows(self, command_id: str) -> bool:
        """Whether the command is in a queue, executing, or being settled: in step with an open record."""
        return (
            command_id in self._queued
            or command_id in self._settling
            or any(rec.id == command_id for rec in self._busy.values())
        )

    async def ensure(self, rec: CommandRecord, *, found_by: str = "replay") -> bool:
        """An open command as the store has it (a client sent it again, or the reconciliation found it): queue it
        unless it is queued or executing already. True when it was not, a gap in the durability contract: logged
        and counted, then closed as a restart would close it."""
        if rec.state.final or self.knows(rec.id) or self._draining:
            return False
        DISPATCHER_GAPS.labels(found_by).inc()
        log.error("dispatcher_gap", command_id=rec.id, device=rec.device, state=rec.state.value, found_by=found_by)
        if rec.state is State.DISPATCHED:
            self._maybe_sent.add(rec.id)
        await self._recover(rec)
        return True

    def queued(self, device: str | None = None) -> int:
        if device is None:
            return len(self._queued)
        return self._queued.count(device)

    def in_flight(self) -> int:
        return len(self._busy)

    def snapshot(self) -> dict[str, Any]:
        return {
            "queued": self.queued(),
            "in_flight": self.in_flight(),
            "per_device": {
                name: {
                    "queued": self.queued(name),
                    "executing": self._busy[name].id if name in self._busy else None,
                    "breaker": self.breaker_state(name),
                }
                for name in self._devices
            },
        }

    def breaker_state(self, device: str) -> dict[str, Any] | None:
        """``{"state": ..., "retry_after_s": ...}`` for the API and the status page."""
        breaker = self.breakers.get(device)
        if breaker is None:
            return None
        state = breaker.state
        retry_at = breaker.retry_at
        wait = max(0.0, retry_at - self._clock.monotonic()) if retry_at is not None else None
        return {"state": state.value, "retry_after_s": None if wait is None else round(wait, 3)}

    async def drain(self, grace_s: float) -> int:
        """Stop starting commands; wait up to ``grace_s`` for those executing. Returns how many did not finish."""
        self._draining = True
        for wake in self._wake.values():
            wake.set()
        if not await wait_set(self._idle, grace_s):
            log.warning("drain_timeout", executing=[r.id for r in self._busy.values()], grace_s=grace_s)
        return len(self._busy)

    # --- workers -----------------------------------------------------------------------------------------------

    def _transition(self, state: State, detail: str | None = None) -> Transition:
        return Transition(state, self._clock.wall(), self._clock.monotonic(), self._clock.boot_id, detail)

    async def _work(self, name: str) -> None:
        queue = self._queues[name]
        device = self._devices[name]
        breaker = self.breakers[name]
        wake = self._wake[name]
        while not self._draining:
            item = await queue.get()
            prio, _seq, command_id = item
            rec = self._queued.pop(command_id)
            if rec is None:
                continue  # expired or cancelled while waiting
            if self._draining:
                self._queued.put(rec)  # stays queued in the store: it runs after restart
                return
            if not device.availability.available:
                hold = HOLD_RECHECK_S  # woken at once when the device comes back
            elif prio != Priority.CRITICAL:
                hold = self._held_for(breaker)
            else:
                hold = 0.0
            if hold > 0:
                # The device is unavailable (bus unplugged) or its breaker is open: leave the command queued and
                # unsent until that changes, a more urgent command arrives, or we drain. The sweep still watches
                # its deadline.
                self._queued.put(rec)
                queue.put_nowait(item)
                wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(hold):
                        await wake.wait()
                continue
            self._busy[name] = rec
            self._idle.clear()
            try:
                await self._run(device, rec)
            finally:
                del self._busy[name]
                if not self._busy:
                    self._idle.set()

    async def _run(self, device: Device, rec: CommandRecord) -> None:
        bound = structlog.contextvars.bound_contextvars(command_id=rec.id, device=rec.device)
        with bound:
            why = rec.expired(self._clock)
            if why is not None:
                await self._expire(rec, why)
                return
            gate = self.safety[rec.device]
            if gate.profile is not device.profile:  # re-read on SIGHUP
                gate.configure(device.profile)
            try:
                gate.admit(rec.id, rec.action)
            except SafetyLimited as err:
                await self._finish(rec, State.REJECTED, code=err.code, message=err.message)
                return
            t = self._transition(State.DISPATCHED)
            ends_all = rec.action == device.profile.safety.off_action

            def dispatched(c: sqlite3.Connection) -> int:
                # The command may act from the moment it reaches the wire: what it asked for later (the max on-time
                # switch-off, the end of an on-period) is armed in the same transaction.
                sql.transition(c, rec.seq, t)
                return schedule.dispatched(
                    c, rec.id, rec.device, rec.action, ends_all=ends_all, wall=t.at, mono=t.mono, boot_id=t.boot_id
                )

            try:
                armed = await self._store.write(dispatched)
            except StoreUnavailable as err:
                self._store_failed(rec, "dispatch_not_recorded", err)
                await asyncio.sleep(STORE_RETRY_S)
                self.push(rec)  # not dispatched: try again later, the store may recover
                return
            rec.state = State.DISPATCHED
            self._store_ok(rec)
            log.info("command_dispatched", action=rec.action)
            if armed:
                self._on_armed()
            try:
                result = await self._execute(device, rec)
            except Preempted as err:
                await self._requeue(rec, f"preempted: {err}")
            except DeadlinePassed as err:
                await self._expire(rec, err.message)
            except DeviceRejected as err:
                await self._finish(rec, State.REJECTED, code=err.code, message=err.message)
            except CircuitOpenError as err:
                await self._requeue(rec, f"device circuit open: next probe in {err.retry_after_s:.3g} s")
            except _DeviceDown as err:
                await self._requeue(rec, f"device unavailable: {err}")
            except DeadlineExceeded as err:
                await self._expire(rec, err.message)
            except RetryExhausted as err:
                last = err.last_error
                code = last.code if isinstance(last, GatewayError) else "internal_error"
                message = f"{last} (gave up after {err.attempts} attempt(s): {err.reason})"
                await self._finish(rec, State.FAILED, code=code, message=message)
            except GatewayError as err:
                await self._finish(rec, State.FAILED, code=err.code, message=err.message)
            except Exception as err:  # a bug in one device's code must not stop every device
                log.exception("device_execute_crashed", action=rec.action)
                await self._finish(rec, State.FAILED, code="internal_error", message=f"{type(err).__name__}: {err}")
            else:
                self.executed += 1
                await self._finish(rec, State.SUCCEEDED, result=result)

    def _held_for(self, breaker: CircuitBreaker) -> float:
        """Seconds until the breaker lets a probe through; 0 when it admits calls now."""
        if breaker.state is not CircuitState.OPEN:
            return 0.0
        retry_at = breaker.retry_at
        return 0.0 if retry_at is None else max(0.0, retry_at - self._clock.monotonic())

    async def _execute(self, device: Device, rec: CommandRecord) -> dict[str, Any]:
        """Run the action with retries, each attempt through the device's breaker, within the deadline. The
        deadline and the priority travel down to the wire (:class:`~gatewayd.devices.line.Call`): a bus hands its
        line over most urgent first, and puts nothing on the wire after the deadline (DeadlinePassed: not sent).
        A critical command pushed meanwhile for this device preempts the attempt while it waits for its turn, or
        the pause between two attempts (Preempted: not sent, back to the queue)."""
        breaker = self.breakers[rec.device]
        critical = rec.priority is Priority.CRITICAL
        deadline = self._deadline(rec)
        preempt = asyncio.Event()
        self._preempts[rec.device] = (rec, preempt)

        async def attempt() -> dict[str, Any]:
            if preempt.is_set():
                raise Preempted(f"{rec.id} gave its turn to a critical command")
            if not device.availability.available:
                raise _DeviceDown(device.availability.last_error or "unavailable")
            try:
                permit = breaker.permit()
            except CircuitOpenError:
                if not critical:
                    raise
                # An emergency stop is sent even to a device that has been failing: it may be the one that works.
                return await self._call_device(device, rec, deadline, preempt)
            async with permit:
                return await self._call_device(device, rec, deadline, preempt)

        try:
            return await self._retry.call(
                attempt, name=f"device:{rec.device}", deadline=deadline, clock=_Preemptible(self._clock, preempt)
            )
        finally:
            self._preempts.pop(rec.device, None)

    async def _call_device(
        self, device: Device, rec: CommandRecord, deadline: float, preempt: asyncio.Event
    ) -> dict[str, Any]:
        call = Call(rec.id, int(rec.priority), deadline, preempt=preempt)
        token = CALL.set(call)
        try:
            return await device.execute(rec.id, rec.action, rec.params)
        except (DeadlinePassed, Preempted):
            raise  # not sent: the device layer said so before the wire
        except BaseException:
            call.sent = True  # a device that does not say when it sends: it may have
            raise
        finally:
            CALL.reset(token)
            if call.sent:
                self._maybe_sent.add(rec.id)

    def _deadline(self, rec: CommandRecord) -> float:
        """The command's deadline on this boot's monotonic clock (from the wall clock if it was accepted on
        another boot)."""
        if rec.boot_id == self._clock.boot_id:
            return rec.deadline_mono
        return self._clock.monotonic() + rec.deadline_at - self._clock.wall()

    async def _requeue(self, rec: CommandRecord, detail: str) -> None:
        """Back to the queue, unsent, for a device whose breaker is open; it runs when a probe may go."""
        t = self._transition(State.QUEUED, detail)
        while True:
            try:
                await self._store.write(lambda c: sql.transition(c, rec.seq, t))
                break
            except StoreUnavailable as err:
                self._store_failed(rec, "requeue_not_recorded", err)
                await asyncio.sleep(STORE_RETRY_S)
        rec.state, rec.updated_at = State.QUEUED, t.at
        self._store_ok(rec)
        rec.transitions.append(t)
        log.info("command_requeued", reason=detail)
        self._queued.put(rec)
        self._queues[rec.device].put_nowait((int(rec.priority), rec.seq, rec.id))

    async def _expire(self, rec: CommandRecord, why: str) -> None:
        """The deadline passed before the command could run (again)."""
        if rec.id not in self._maybe_sent:
            await self._finish(rec, State.EXPIRED, code="expired", message=why)
            return
        await self._finish(
            rec,
            State.FAILED,
            code=OUTCOME_UNKNOWN,
            message=f"{why}: its request may have reached the device before the gateway lost track of it (a restart "
            "or the device going away), so whether it acted is unknown; it is not sent again after its deadline",
        )

    async def _finish(
        self,
        rec: CommandRecord,
        state: State,
        *,
        result: dict[str, Any] | None = None,
        code: str | None = None,
        message: str | None = None,
    ) -> None:
        t = self._transition(state, message)
        # The result goes to the outbox in the same transaction as the final state: it reaches the uplink even if
        # the daemon dies the instant after.
        final = dataclasses.replace(
            rec, state=state, result=result, error_code=code, error_message=message, updated_at=t.at
        )
        row = outbox.result_row(final, mono=t.mono, boot_id=t.boot_id, synced=self.clock_synced())

        acted = {State.SUCCEEDED: True, State.FAILED: None}.get(state, False)

        def job(c: sqlite3.Connection) -> outbox.OutboxStats | None:
            moved = sql.transition(c, rec.seq, t, result=result, error_code=code, error_message=message)
            added = None
            if moved and self._outbox is not None:
                outbox.insert(c, [row])
                added = outbox.stats(c)
            if moved:
                schedule.settled(c, rec.id, acted=acted, wall=t.at, why=f"{rec.id} ended {state.value}")
                if state is State.SUCCEEDED:  # a manual off: the automatic one it would have been is not needed
                    schedule.done_by(c, rec.device, rec.action, rec.id, wall=t.at)
            return added

        while True:
            try:
                added = await self._store.write(job)
                break
            except StoreUnavailable as err:
                # The outcome must not be lost while we live; after a crash the device's memory of the id covers it.
                self._store_failed(rec, "final_state_not_recorded", err, state=state.value)
                await asyncio.sleep(STORE_RETRY_S)
        if added is not None and self._outbox is not None:
            self._outbox.added(added)  # the uplink is woken: the result goes out
        rec.state, rec.result, rec.error_code, rec.error_message = state, result, code, message
        self._store_ok(rec)
        rec.updated_at = t.at
        self._maybe_sent.discard(rec.id)
        rec.transitions.append(t)
        emit = log.info if state is State.SUCCEEDED else log.warning
        emit("command_finished", command_id=rec.id, device=rec.device, state=state.value, error_code=code)
        self._on_final(rec)

    def _store_failed(self, rec: CommandRecord, event: str, err: StoreUnavailable, **extra: str) -> None:
        if rec.id not in self._unrecorded:
            self._unrecorded.add(rec.id)
            log.error(event, command_id=rec.id, code=err.code, error=err.message, retry_every_s=STORE_RETRY_S, **extra)

    def _store_ok(self, rec: CommandRecord) -> None:
        if rec.id in self._unrecorded:
            self._unrecorded.discard(rec.id)
            log.info("command_state_recorded", command_id=rec.id, state=rec.state.value)

    async def _sweep(self) -> None:
        """Expire queued commands whose deadline passed while they waited (a busy or absent device)."""
        while True:
            await asyncio.sleep(self._sweep_interval_s)
            for rec in [r for r in self._queued.records() if r.expired(self._clock) is not None]:
                if self._queued.pop(rec.id) is not None:
                    self._settling.add(rec.id)
                    try:
                        await self._expire(rec, rec.expired(self._clock) or "deadline passed")
                    finally:
                        self._settling.discard(rec.id)

    async def _reconcile(self) -> None:
        """Every ``reconcile_interval_s``: the open commands in the store against the queues and the devices. A
        command committed a moment ago may not be pushed yet when the store is read, so only one found missing at
        two passes in a row is a gap. A read that fails is tried again next time."""
        while True:
            await asyncio.sleep(self._reconcile_interval_s)
            try:
                open_ids = await self._store.read(sql.open_ids)
            except StoreUnavailable:
                continue
            missing = {command_id for command_id in open_ids if not self.knows(command_id)}
            confirmed, self._suspects = missing & self._suspects, missing - self._suspects
            for command_id in sorted(confirmed):
                try:
                    rec = await self._store.read(functools.partial(sql.get, command_id=command_id))
                except StoreUnavailable:
                    break
                if rec is not None:
                    await self.ensure(rec, found_by="reconciliation")


class _Waiting:
    """The commands waiting in the device queues, by id, with a count per device: ``queued(device)`` is asked on
    every submit (``max_queued_per_device``), and counting through thousands of waiting commands each time made
    a burst of submits quadratic."""

    def __init__(self) -> None:
        self._by_id: dict[str, CommandRecord] = {}
        self._per_device: Counter[str] = Counter()

    def put(self, rec: CommandRecord) -> None:
        if rec.id not in self._by_id:
            self._per_device[rec.device] += 1
        self._by_id[rec.id] = rec

    def pop(self, command_id: str) -> CommandRecord | None:
        rec = self._by_id.pop(command_id, None)
        if rec is not None:
            self._per_device[rec.device] -= 1
            if not self._per_device[rec.device]:
                del self._per_device[rec.device]
        return rec

    def count(self, device: str) -> int:
        return self._per_device.get(device, 0)

    def __contains__(self, command_id: object) -> bool:
        return command_id in self._by_id

    def records(self) -> list[CommandRecord]:
        return list(self._by_id.values())

    def __len__(self) -> int:
        return len(self._by_id)


class _DeviceDown(Exception):
    """The device became unavailable between attempts: the command goes back to the queue to wait for it."""


def _device_verdict(err: BaseException) -> Verdict:
    """As :func:`classify`, except that an open breaker, a device gone away or a preemption ends the retries (the
    command goes back to the queue rather than failing), and so does a deadline that passed on the way to the
    wire."""
    if isinstance(err, CircuitOpenError | _DeviceDown | Preempted):
        return Verdict(False, None, "held")
    if isinstance(err, DeadlinePassed):
        return Verdict(False, None, "deadline")
    return classify(err)


class _Preemptible:
    """The retry policy's clock for one command: its pause between two attempts ends at once, with Preempted,
    when a critical command for the same device arrives."""

    def __init__(self, clock: ResilienceClock, preempt: asyncio.Event):
        self._clock = clock
        self._preempt = preempt

    def monotonic(self) -> float:
        return self._clock.monotonic()

    async def sleep(self, seconds: float) -> None:
        if self._preempt.is_set():
            raise Preempted("a critical command came while waiting to try again")
        waiter = asyncio.ensure_future(self._preempt.wait())
        pause = asyncio.ensure_future(self._clock.sleep(seconds))
        try:
            await asyncio.wait({waiter, pause}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            pause.cancel()
        if self._preempt.is_set():
            raise Preempted("a critical command came while waiting to try again")


def _breaker_ignores(err: BaseException) -> bool:
    """Besides our own refusals, an unavailable bus says nothing about the device: availability handles it, and an
    unplugged cable must not open every breaker on the bus. Nor does a command that never reached the wire (its
    deadline passed waiting for the bus, or a critical one took its turn)."""
    return local_refusal_is_ignored(err) or isinstance(err, DeviceUnavailable | DeadlinePassed | Preempted)


def _waker(event: asyncio.Event) -> Callable[[bool], None]:
    def wake(available: bool) -> None:
        if available:
            event.set()

    return wake
