"""The front door for commands, shared by HTTP, the CLI (through HTTP) and later MQTT.

Accept means committed: ``submit`` returns only after the command and its first transitions are in SQLite.
While the storage is full (:mod:`gatewayd.store.space`), new commands are refused with ``storage_full``, except
critical ones, which may use the reserve; a command sent again with the id of one already stored is still
answered with its record, since that needs no room.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from gatewayd.clock import Clock
from gatewayd.commands import validate as v
from gatewayd.commands.dispatcher import Dispatcher
from gatewayd.commands.model import CommandRecord, CommandRequest, Priority, State, Transition, new_command_id
from gatewayd.config.models import CommandsSection
from gatewayd.config.profiles import Profile
from gatewayd.devices.manager import DeviceManager
from gatewayd.errors import Conflict, GatewayError, QueueFull, ShuttingDown, StoreUnavailable, UnknownCommand
from gatewayd.observability.metrics import COMMANDS_PRUNED
from gatewayd.store import Store, schedule
from gatewayd.store import commands as sql
from gatewayd.store.space import DiskSpace

log = structlog.get_logger("gatewayd.commands")


@dataclass(frozen=True)
class Then:
    """Something a command asks the gateway to do by itself later: ``action`` on the same device, ``delay_s`` after
    the command reaches the wire (a row of ``scheduled_actions``)."""

    kind: str  # max_on | on_period
    action: str
    delay_s: float
    priority: Priority
    source: str  # of the command sent then: safety | interpret


PRUNE_BATCH = 500  # commands per store job: other writes get their turn between two


class CommandService:
    def __init__(
        self,
        store: Store,
        devices: DeviceManager,
        cfg: CommandsSection,
        clock: Clock,
        space: DiskSpace | None = None,
        *,
        dispatcher: Dispatcher | None = None,
    ):
        self._store = store
        self.space = space
        self._devices = devices
        self._cfg = cfg
        self._clock = clock
        self._waiters: dict[str, list[asyncio.Future[None]]] = defaultdict(list)
        self.dispatcher = dispatcher  # None: validation and lookups only (nothing can be queued)
        self.accepting = False
        self.accepted = 0
        self.replayed = 0
        self.final_listeners: list[Callable[[CommandRecord], None]] = []  # told when a command finishes

    @property
    def boot_id(self) -> str:
        return self._clock.boot_id

    def open_intake(self) -> None:
        """Start-up is done: new commands are taken from now on."""
        self.accepting = self.dispatcher is not None

    def close_intake(self) -> None:
        self.accepting = False

    @property
    def storage_full(self) -> bool:
        return self.space is not None and self.space.full

    def refuse_if_full(self, priority: Priority) -> None:
        """Raise ``storage_full`` for new work while the storage is full; a critical command may use the reserve.
        Raise ``store_lost`` for any work once the store's file is lost: nothing at all could be kept then."""
        lost = self._store.lost
        if lost is not None:
            raise lost.error()
        if self.space is not None and priority is not Priority.CRITICAL and self.space.full:
            raise self.space.refusal()

    async def submit(
        self,
        payload: Any,
        *,
        source: str,
        user: str | None = None,
        interpretation: dict[str, Any] | None = None,
        then: Sequence[Then] = (),
        command_id: str | None = None,
    ) -> tuple[CommandRecord, bool]:
        """Validate and durably accept a command. Returns (record, created); created is False for a replay.
        ``interpretation`` is stored with a command that came from natural language (gatewayd.interpret).

        A known id is answered from the store before anything else can refuse it: a client that sends a command
        again because it never heard the answer (an MQTT redelivery after a lost PUBACK, an HTTP retry) gets the
        command it sent, not ``queue_full``, ``shutting_down`` or a validation error from a profile reloaded since.
        New commands take one store write (insert, or the existing record when the id is taken); the extra read
        happens only on the way to a refusal.

        What the command asks the gateway to do later (``then``: the end of an on-period; and the profile's max
        on-time switch-off, added here for every on action) is written in the same transaction, before the command
        is acknowledged. ``command_id`` is a gateway-made id, outside the alphabet clients may use (the Scheduler's
        commands)."""
        received = self._transition(State.RECEIVED)
        request = v.parse_request(payload)  # the envelope: what a replay must match too
        if command_id is not None:
            request = request.model_copy(update={"id": command_id})
        try:
            checked = self._admit(request)
        except GatewayError:
            found = await self._known(request)
            if found is None:
                raise
            return await self._replayed(found, request, None)
        assert self.dispatcher is not None
        now, mono = self._clock.wall(), self._clock.monotonic()
        rec = CommandRecord(
            id=request.id or new_command_id(),
            device=request.device,
            action=request.action,
            params=checked.params,
            priority=request.priority,
            source=source,
            user=user,
            state=State.QUEUED,
            created_at=received.at,
            ttl_s=checked.ttl_s,
            deadline_at=received.at + checked.ttl_s,
            deadline_mono=received.mono + checked.ttl_s,
            boot_id=self._clock.boot_id,
            updated_at=now,
            interpretation=interpretation,
        )
        transitions = [
            received,
            Transition(State.ACCEPTED, now, mono, self._clock.boot_id),
            Transition(State.QUEUED, now, mono, self._clock.boot_id),
        ]
        later = [*then, *self._safety_then(checked.profile, rec.action)]
        rows = [
            schedule.Scheduled(
                id=schedule.new_id(),
                kind=t.kind,
                device=rec.device,
                action=t.action,
                priority=int(t.priority),
                source=t.source,
                after=rec.id,
                delay_s=t.delay_s,
                state=schedule.WAITING,
                created_at=now,
                updated_at=now,
                user=user,
            )
            for t in later
        ]
        # Shielded: once the commit is under way, the command reaches the dispatcher even if the caller is
        # cancelled meanwhile (an MQTT session torn down, a client gone). Cancelled between the COMMIT and the
        # push, a command would stay queued in the store and in no queue until the next restart.
        stored, created = await asyncio.shield(self._commit(rec, transitions, rows))
        if not created:
            return await self._replayed(stored, request, rec.params)
        log.info(
            "command_accepted",
            command_id=rec.id,
            device=rec.device,
            action=rec.action,
            priority=rec.priority.label,
            source=source,
        )
        return stored, True

    def _admit(self, request: CommandRequest) -> v.Validated:
        """Every reason to refuse a new command: shutting down, invalid for its profile, its device's queue full,
        the storage full."""
        if not self.accepting or self.dispatcher is None:
            raise ShuttingDown("the gateway is not accepting commands (starting or shutting down)")
        checked = v.validate(
            request, self._devices.profiles(), default_ttl_s=self._cfg.default_ttl_s, max_ttl_s=self._cfg.max_ttl_s
        )
        waiting = self.dispatcher.queued(request.device)
        limit = self._cfg.max_queued_per_device
        if request.priority is Priority.CRITICAL:
            limit += self._cfg.critical_reserve_per_device
        if waiting >= limit:
            raise QueueFull(
                f"{waiting} commands are already waiting for {request.device!r} (at most {limit}"
                + (" for critical ones)" if request.priority is Priority.CRITICAL else ")"),
                details={"device": request.device, "queued": waiting, "limit": limit},
            )
        self.refuse_if_full(request.priority)
        return checked

    async def _known(self, request: CommandRequest) -> CommandRecord | None:
        command_id = request.id
        if command_id is None:
            return None
        return await self._store.read(lambda c: sql.get(c, command_id))

    @staticmethod
    def _safety_then(profile: Profile, action: str) -> list[Then]:
        """The profile's max on-time: an on action is followed by its off action, critical, ``max_on_s`` after it
        reaches the wire."""
        safety = profile.safety
        if action in safety.on_actions and safety.max_on_s is not None and safety.off_action is not None:
            return [Then("max_on", safety.off_action, safety.max_on_s, Priority.CRITICAL, "safety")]
        return []

    async def _commit(
        self, rec: CommandRecord, transitions: list[Transition], later: list[schedule.Scheduled]
    ) -> tuple[CommandRecord, bool]:
        def accept(conn: Any) -> tuple[CommandRecord, bool]:
            inserted = sql.insert(conn, rec, transitions)
            if inserted is not None:
                schedule.insert(conn, later)
                return inserted, True
            existing = sql.get(conn, rec.id)
            assert existing is not None
            return existing, False

        stored, created = await self._store.write(accept)
        if created:
            assert self.dispatcher is not None
            self.accepted += 1
            self.dispatcher.push(stored)
        return stored, created

    async def _replayed(
        self, stored: CommandRecord, request: CommandRequest, params: dict[str, Any] | None
    ) -> tuple[CommandRecord, bool]:
        """The answer to a command sent again: its record, if it is the same command; ``conflict`` if the id was
        used for another. An open one is made sure to be queued or executing (it may have been stranded)."""
        if params is None:  # refused as new: compare the parameters as the profile would have normalised them
            params = self._normalised_params(request)
        if not stored.same_request(request.device, request.action, params):
            raise Conflict(
                f"command id {stored.id!r} was already used for a different command",
                details={"id": stored.id, "existing": stored.to_api(transitions=False)},
            )
        self.replayed += 1
        log.info("command_replayed", command_id=stored.id, device=stored.device, state=stored.state.value)
        await self.ensure_open(stored)
        return stored, False

    async def ensure_open(self, rec: CommandRecord) -> None:
        """A command sent again: if it is still open, it is queued or executing (a stranded one is queued now)."""
        if not rec.state.final and self.dispatcher is not None:
            await self.dispatcher.ensure(rec)

    def _normalised_params(self, request: CommandRequest) -> dict[str, Any]:
        profile = self._devices.profiles().get(request.device)
        action = profile.actions.get(request.action) if profile is not None else None
        if action is None:
            return dict(request.params)
        out: dict[str, Any] = {}
        for name, value in request.params.items():
            spec = action.params.get(name)
            normalised, problem = v.check_param(spec, value) if spec is not None else (value, None)
            out[name] = value if problem is not None else normalised
        for name, spec in action.params.items():
            if name not in out and not spec.required:
                out[name] = spec.default
        return out

    def _transition(self, state: State) -> Transition:
        return Transition(state, self._clock.wall(), self._clock.monotonic(), self._clock.boot_id)

    async def get(self, command_id: str) -> CommandRecord:
        rec = await self._store.read(lambda c: sql.get(c, command_id))
        if rec is None:
            raise UnknownCommand(f"no command with id {command_id!r}", details={"id": command_id})
        return rec

    async def cancel(self, command_id: str, *, by: str) -> CommandRecord:
        """Cancel a command still waiting in its queue (never sent). A command already sent, being retried or
        finished cannot be taken back: Conflict, with its state; stop a running actuator with its opposite action."""
        rec = await self.get(command_id)
        if rec.state is State.CANCELLED:
            return rec  # cancelled already: asking again changes nothing
        if rec.state.final:
            raise Conflict(
                f"command {command_id!r} is already {rec.state.value}",
                details={"id": command_id, "state": rec.state.value},
            )
        cancelled = None if self.dispatcher is None else await self.dispatcher.cancel(command_id, by)
        if cancelled is None:
            rec = await self.get(command_id)
            if rec.state is State.CANCELLED:
                return rec  # two cancels at once: the other one did it
            raise Conflict(
                f"command {command_id!r} is {rec.state.value}: it may already have reached the device and cannot be "
                "taken back; send the opposite action (for example stop) instead",
                details={"id": command_id, "state": rec.state.value},
            )
        return await self.get(command_id)

    async def listing(self, *, state: str | None, device: str | None, limit: int) -> list[CommandRecord]:
        return await self._store.read(lambda c: sql.listing(c, state=state, device=device, limit=limit))

    async def counts(self) -> dict[str, int]:
        return await self._store.read(sql.counts)

    async def wait(self, command_id: str, timeout_s: float) -> CommandRecord:
        """The record once it reaches a final state, or as it is when ``timeout_s`` runs out."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters[command_id].append(fut)
        try:
            rec = await self.get(command_id)
            if rec.state.final or timeout_s <= 0:
                return rec
            try:
                async with asyncio.timeout(timeout_s):
                    await fut
            except TimeoutError:
                pass

            return await self.get(command_id)  # the stored record, with every transition
        finally:
            waiters = self._waiters.get(command_id)
            if waiters is not None:
                if fut in waiters:
                    waiters.remove(fut)
                if not waiters:
                    del self._waiters[command_id]

    def wake_waiters(self) -> None:
        """Shutting down: every ``?wait`` returns now, with the command as it stands."""
        for futures in self._waiters.values():
            for fut in futures:
                if not fut.done():
                    fut.set_result(None)

    def on_final(self, rec: CommandRecord) -> None:
        for fut in self._waiters.pop(rec.id, []):
            if not fut.done():
                fut.set_result(None)
        for listener in list(self.final_listeners):
            listener(rec)

    async def prune(self) -> int:
        """Delete the finished commands past their keeping ([commands] keep_final_s, keep_max), a batch per store
        job, until none is left. Returns how many were deleted."""
        older_than = self._clock.wall() - self._cfg.keep_final_s
        keep_max = self._cfg.keep_max
        total = 0
        while True:
            n = await self._store.write(
                lambda c: sql.prune(c, older_than=older_than, keep_max=keep_max, batch=PRUNE_BATCH)
            )
            total += n
            COMMANDS_PRUNED.inc(n)
            if n < PRUNE_BATCH:
                await self._store.write(lambda c: schedule.prune(c, older_than=older_than))
                return total

    async def run_pruner(self) -> None:
        """Every ``prune_interval_s``: :meth:`prune`. A write that fails (the disk full, the store stuck) is
        logged and tried again next time; deleting is never urgent."""
        failing = False
        while True:
            try:
                n = await self.prune()
            except StoreUnavailable as err:
                if not failing:
                    log.warning("commands_prune_failed", error=err.message, code=err.code)
                failing = True
            else:
                failing = False
                if n:
                    log.info(
                        "commands_pruned", commands=n, keep_final_s=self._cfg.keep_final_s, keep_max=self._cfg.keep_max
                    )
            await asyncio.sleep(self._cfg.prune_interval_s)
