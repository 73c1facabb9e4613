"""The front door for commands, shared by HTTP, the CLI (through HTTP) and later MQTT.

Accept means committed: ``submit`` returns only after the command and its first transitions are in SQLite.
While the storage is full (:mod:`gatewayd.store.space`), new commands are refused with ``storage_full``, except
critical ones, which may use the reserve; a command sent again with the id of one already stored is still
answered with its record, since that needs no room.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import structlog

from gatewayd.commands import validate as v
from gatewayd.commands.dispatcher import Dispatcher
from gatewayd.commands.model import Clock, CommandRecord, Priority, State, Transition, new_command_id
from gatewayd.config.models import CommandsSection
from gatewayd.devices.manager import DeviceManager
from gatewayd.errors import Conflict, QueueFull, ShuttingDown, StorageFull, StoreUnavailable, UnknownCommand
from gatewayd.observability.metrics import COMMANDS_PRUNED
from gatewayd.store import Store
from gatewayd.store import commands as sql
from gatewayd.store.space import DiskSpace

log = structlog.get_logger("gatewayd.commands")

PRUNE_BATCH = 500  # commands per store job: other writes get their turn between two


class CommandService:
    def __init__(
        self,
        store: Store,
        devices: DeviceManager,
        cfg: CommandsSection,
        clock: Clock,
        space: DiskSpace | None = None,
    ):
        self._store = store
        self.space = space
        self._devices = devices
        self._cfg = cfg
        self._clock = clock
        self._waiters: dict[str, list[asyncio.Future[None]]] = defaultdict(list)
        self.dispatcher: Dispatcher | None = None
        self.accepting = False
        self.accepted = 0
        self.replayed = 0
        self.final_listeners: list[Callable[[CommandRecord], None]] = []  # told when a command finishes

    @property
    def boot_id(self) -> str:
        return self._clock.boot_id

    def attach(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        self.accepting = True

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
        self, payload: Any, *, source: str, user: str | None = None, interpretation: dict[str, Any] | None = None
    ) -> tuple[CommandRecord, bool]:
        """Validate and durably accept a command. Returns (record, created); created is False for a replay.
        ``interpretation`` is stored with a command that came from natural language (gatewayd.interpret)."""
        received = self._transition(State.RECEIVED)
        if not self.accepting or self.dispatcher is None:
            raise ShuttingDown("the gateway is not accepting commands (starting or shutting down)")
        request = v.parse_request(payload)
        checked = v.validate(
            request, self._devices.profiles(), default_ttl_s=self._cfg.default_ttl_s, max_ttl_s=self._cfg.max_ttl_s
        )
        if (
            request.priority is not Priority.CRITICAL
            and self.dispatcher.queued(request.device) >= self._cfg.max_queued_per_device
        ):
            raise QueueFull(
                f"{self._cfg.max_queued_per_device} commands are already waiting for {request.device!r}",
                details={"device": request.device},
            )
        now, mono = self._clock.wall(), self._clock.mono()
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

        def accept(conn: Any) -> tuple[CommandRecord, bool]:
            inserted = sql.insert(conn, rec, transitions)
            if inserted is not None:
                return inserted, True
            existing = sql.get(conn, rec.id)
            assert existing is not None
            return existing, False

        try:
            self.refuse_if_full(rec.priority)
        except StorageFull:
            # No room for a new command; one we already have is answered from the store, which takes none.
            found = await self._store.read(lambda c: sql.get(c, rec.id)) if request.id else None
            if found is None:
                raise
            stored, created = found, False
        else:
            stored, created = await self._store.write(accept)
        if not created:
            if not stored.same_request(rec.device, rec.action, rec.params):
                raise Conflict(
                    f"command id {rec.id!r} was already used for a different command",
                    details={"id": rec.id, "existing": stored.to_api(transitions=False)},
                )
            self.replayed += 1
            log.info("command_replayed", command_id=rec.id, device=rec.device, state=stored.state.value)
            return stored, False
        self.accepted += 1
        self.dispatcher.push(stored)
        log.info(
            "command_accepted",
            command_id=rec.id,
            device=rec.device,
            action=rec.action,
            priority=rec.priority.label,
            source=source,
        )
        return stored, True

    def _transition(self, state: State) -> Transition:
        return Transition(state, self._clock.wall(), self._clock.mono(), self._clock.boot_id)

    async def get(self, command_id: str) -> CommandRecord:
        rec = await self._store.read(lambda c: sql.get(c, command_id))
        if rec is None:
            raise UnknownCommand(f"no command with id {command_id!r}", details={"id": command_id})
        return rec

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
                await asyncio.wait_for(fut, timeout_s)
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
