"""Natural-language commands, front to back: ``{"text": "switch the irrigation pump on for 10 minutes"}`` in, a
command record out, through the same validation and the same durable accept as any structured command.

:class:`InterpretService` owns the HTTP session to the providers, the failover :class:`~.chain.Chain`, the local
rules (built in a thread, so hassil is imported only when natural language is on, and never on the event loop),
the health checks (one task per provider), the prompt cache, the spend ledger, the per-user limit and the pending
ends of on-periods. The device registry is rebuilt whenever a device's profile object changes (SIGHUP), and with
it the local rules; the cache keys carry the registry's digest, so answers about the old profiles are never
reused.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Annotated, Any, Literal

import aiohttp
import structlog
from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError

from gatewayd.clock import REAL_CLOCK, Clock
from gatewayd.commands.model import CommandId, CommandRecord, Priority, StrictBool
from gatewayd.commands.service import CommandService, Then
from gatewayd.commands.validate import field_errors, parse_request
from gatewayd.config.models import InterpretSection
from gatewayd.config.profiles import Profile
from gatewayd.errors import BadRequest, Conflict, GatewayError, ShuttingDown, UnknownCommand, ValidationFailed
from gatewayd.interpret.answers import DeviceFacts, answer
from gatewayd.interpret.cache import PromptCache
from gatewayd.interpret.chain import Chain, Outcome, Slot, not_understood
from gatewayd.interpret.errors import ConfirmationRequired, QuestionAnswered
from gatewayd.interpret.ledger import SpendLedger
from gatewayd.interpret.local import LocalQuestion, LocalRefusal, LocalRules
from gatewayd.interpret.providers import HttpProvider, build_provider
from gatewayd.interpret.registry import Registry
from gatewayd.interpret.rules import EMPTY, RulesFile, load_rules
from gatewayd.resilience import BucketSpec, CircuitState, KeyedLimiter, ResilienceState, StateChange
from gatewayd.store import Store
from gatewayd.tasks import TaskOwner, wait_set

log = structlog.get_logger("gatewayd.interpret")

Profiles = Callable[[], Mapping[str, Profile]]
# Refusals the local rules make before any provider is asked: no model may turn these into a command.
SCREENED = frozenset({"negated", "several_commands", "ambiguous_device", "missing_channel", "no_such_channel"})


class TextRequest(BaseModel):
    """``POST /api/v1/commands`` with ``text``: the words, and what a structured command may also carry. The words
    and the user's name are trimmed (one is prose, the other a rate-limit key); id and confirm follow the command
    envelope's rules: taken exactly as sent, or refused. ``user`` is only a claim: see
    :meth:`InterpretService.submit` for when it counts."""

    model_config = ConfigDict(extra="forbid")

    text: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
    user: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=128)] | None = None
    confirm: StrictBool = False
    id: CommandId | None = None
    ttl_s: Any = None  # checked with the command envelope's own rules, before any provider is paid
    priority: Any = None


def parse_text_request(payload: Any, max_chars: int) -> TextRequest:
    if not isinstance(payload, dict):
        raise BadRequest("the body must be a JSON object", details={"got": type(payload).__name__})
    try:
        req = TextRequest.model_validate(payload)
    except ValidationError as exc:
        raise ValidationFailed("the request is not valid", details={"errors": field_errors(exc)}) from None
    if len(req.text) > max_chars:
        raise ValidationFailed(
            f"the text is longer than {max_chars} characters",
            details={"errors": [{"field": "text", "message": f"at most {max_chars} characters"}]},
        )
    envelope = {k: v for k, v in (("id", req.id), ("ttl_s", req.ttl_s), ("priority", req.priority)) if v is not None}
    parse_request({"device": "-", "action": "-", **envelope})  # the same field errors as a structured command
    return req


def build_slots(
    settings: InterpretSection, environ: Mapping[str, str], *, clock: Clock, wall: Callable[[], float]
) -> list[Slot]:
    """One slot per configured provider; a disabled one, or one whose key variable is unset or empty, is
    inactive: listed, never asked."""
    slots = []
    for name, cfg in settings.providers.items():
        key = environ.get(cfg.api_key_env, "") if cfg.api_key_env else None
        inactive = None
        if not cfg.enabled:
            inactive = "disabled"
        elif cfg.api_key_env and not key:
            inactive = f"no API key: environment variable {cfg.api_key_env} is not set"
        provider = build_provider(name, cfg, key or None)
        slots.append(Slot(name, cfg, provider, settings, clock=clock, wall=wall, inactive=inactive))
    return slots


class InterpretService:
    def __init__(
        self,
        settings: InterpretSection,
        *,
        store: Store,
        service: CommandService,
        profiles: Profiles,
        descriptions: Mapping[str, str],
        channels: Mapping[str, Mapping[int, str]] | None = None,
        facts: DeviceFacts | None = None,
        environ: Mapping[str, str] | None = None,
        clock: Clock = REAL_CLOCK,
        rng: random.Random | None = None,
    ):
        self.settings = settings
        self._store = store
        self._service = service
        self._profiles = profiles
        self._descriptions = dict(descriptions)
        self._channels = {name: dict(labels) for name, labels in (channels or {}).items()}
        self._facts = facts  # what questions are answered from; None: "no reading yet" for every device
        self._clock = clock
        self._wall = wall = clock.wall
        self._rng = rng
        environ = os.environ if environ is None else environ
        self.rules_path: Path | None = settings.rules_file
        self._rules: RulesFile = EMPTY
        self._registry: Registry | None = None
        self._registry_key: tuple[Any, ...] = ()
        self._local: LocalRules | None = None
        self._local_lock = asyncio.Lock()
        self.slots = build_slots(settings, environ, clock=clock, wall=wall)
        self.ledger = SpendLedger(store, budget=settings.daily_budget, wall=wall)
        self.cache = PromptCache(store, ttl_s=settings.cache_ttl_s, max_entries=settings.cache_max_entries, wall=wall)
        self.users = KeyedLimiter(
            BucketSpec(settings.user_burst, settings.user_rate_per_minute / 60),
            name="interpret:user",
            max_keys=10_000,
            clock=clock,
        )
        self._tasks = TaskOwner("interpret")
        self._session: aiohttp.ClientSession | None = None
        self.chain: Chain | None = None
        self._wake = {slot.name: asyncio.Event() for slot in self.slots}

    def register(self, state: ResilienceState) -> None:
        """Breakers, limits and adaptive rates survive a restart like the devices' (before ``load``)."""
        for slot in self.slots:
            if slot.inactive is None:
                state.register(f"breaker:provider:{slot.name}", slot.breaker)
                state.register(f"limiter:provider:{slot.name}:rpm", slot.rpm)
                state.register(f"limiter:provider:{slot.name}:tpm", slot.tpm)
                state.register(f"adaptive:provider:{slot.name}", slot.rate)
        state.register("limiter:interpret:user", self.users)

    # --- lifecycle -----------------------------------------------------------------------------------------------

    async def __aenter__(self) -> InterpretService:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=32, ttl_dns_cache=300), headers={"Connection": "keep-alive"}
        )
        try:
            self.chain = Chain(
                self.settings,
                self.slots,
                session=self._session,
                ledger=self.ledger,
                cache=self.cache,
                store=self._store,
                clock=self._clock,
                rng=self._rng,
            )
            for slot in self.chain.active:
                slot.breaker.add_listener(self._waker(slot.name))
            self.chain.connectivity.breaker.add_listener(self._connectivity_changed)
            self._rules = self._read_rules()
            registry = self.registry()
            await self.ledger.load()
            await self.cache.load()
            await self._tasks.open()
            self._tasks.spawn("local_rules", self._prepare(registry))
            for slot in self.chain.active:
                self._tasks.spawn(f"health.{slot.name}", self._monitor(slot))
        except BaseException:
            await self._tasks.close()
            await self._session.close()
            raise
        log.info(
            "interpret_ready",
            providers=[s.name for s in self.chain.active],
            inactive={s.name: s.inactive for s in self.slots if s.inactive},
            rules_file=str(self.rules_path) if self.rules_path else None,
        )
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._tasks.close()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _read_rules(self) -> RulesFile:
        if self.rules_path is not None and not self.rules_path.exists():
            log.warning("interpret_rules_missing", file=str(self.rules_path), using="the device profiles alone")
            return EMPTY
        rules, problems = load_rules(self.rules_path, self._profiles())
        for key, problem in problems:  # the loader refused these at start; a file edited since is caught here
            log.error("interpret_rules_invalid", file=str(self.rules_path), key=key, problem=problem)
        return rules

    async def reload(self) -> None:
        """SIGHUP: read the rules file again; the profiles' changes are picked up by ``registry()``."""
        self._rules = self._read_rules()
        self._registry_key = ()
        registry = self.registry()
        await self._prepare(registry)

    def registry(self) -> Registry:
        profiles = self._profiles()
        key = (id(self._rules), *((name, id(p)) for name, p in profiles.items()))
        if self._registry is None or key != self._registry_key:
            self._registry = Registry.build(profiles, self._descriptions, self._rules, self._channels)
            self._registry_key = key
        return self._registry

    async def _prepare(self, registry: Registry) -> None:
        await self._local_rules(registry)
        with contextlib.suppress(Exception):  # cleanup only: the digest in every key already keeps old rows out
            purged = await self.cache.purge(registry.digest)
            if purged:
                log.info("interpret_cache_purged", rows=purged)

    async def _local_rules(self, registry: Registry) -> LocalRules:
        local = self._local
        if local is not None and local.registry.digest == registry.digest:
            return local
        async with self._local_lock:
            local = self._local
            if local is None or local.registry.digest != registry.digest:
                local = await asyncio.to_thread(_build_local, registry)
                self._local = local
            return local

    # --- health --------------------------------------------------------------------------------------------------

    def _waker(self, name: str) -> Callable[[StateChange], None]:
        def wake(change: StateChange) -> None:
            if change.new is CircuitState.OPEN and change.old is CircuitState.CLOSED:
                self._wake[name].set()  # look at it now, then again when its probe is due

        return wake

    def _connectivity_changed(self, change: StateChange) -> None:
        if change.new is CircuitState.OPEN:
            log.warning("interpret_offline", retry_after_s=round((change.retry_at or change.at) - change.at, 3))
        elif change.new is CircuitState.CLOSED:
            log.info("interpret_online")

    async def _monitor(self, slot: Slot) -> None:
        assert self.chain is not None
        connectivity = self.chain.connectivity.breaker
        wake = self._wake[slot.name]
        while True:
            await self.chain.check(slot, self._wall)
            delay = self.settings.health_interval_s
            now = self._clock.monotonic()
            for breaker in (slot.breaker, connectivity) if slot.cloud else (slot.breaker,):
                retry_at = breaker.retry_at
                if breaker.state is CircuitState.OPEN and retry_at is not None:
                    delay = min(delay, max(0.0, retry_at - now) + 0.001)
            await wait_set(wake, delay)
            wake.clear()

    # --- operator fault scenarios -------------------------------------------------------------------------------

    def fault_scenarios(self) -> dict[str, Callable[[float], Awaitable[dict[str, Any]]]]:
        """The operator's scenarios this service brings: ``gatewayd test provider_timeout`` and its kin."""
        return {
            "provider_timeout": functools.partial(self.fault_scenario, "timeout"),
            "provider_429": functools.partial(self.fault_scenario, "429"),
            "provider_down": functools.partial(self.fault_scenario, "down"),
        }

    async def fault_scenario(self, fault: Literal["timeout", "429", "down"], duration_s: float) -> dict[str, Any]:
        """Every active provider fails this way for ``duration_s``, while requests keep coming (one every 0.5 s:
        sentences the local rules know; the cache holds only provider answers, and none are given meanwhile);
        then the fault is lifted and each provider's token-free health check must pass again. The report says
        who answered meanwhile and how fast."""
        assert self.chain is not None, "the service is not open"
        slots = [slot for slot in self.chain.active if isinstance(slot.provider, HttpProvider)]
        if not slots:
            raise Conflict(
                "no active provider to fail (none configured, or their API keys are not set)",
                code="scenario_unavailable",
            )
        # What the local rules can do, as sentences: a request the providers cannot answer must still be met.
        local = await self._local_rules(self.registry())
        texts = [c["example"] for c in local.capabilities] if local is not None else []
        if not texts:
            raise Conflict("the local rules know no sentence to ask with", code="scenario_unavailable")
        answered: list[dict[str, Any]] = []
        for slot in slots:
            slot.provider.fault = fault  # type: ignore[attr-defined]
        try:
            end = time.monotonic() + duration_s
            n = 0
            while time.monotonic() < end:
                text = texts[n % len(texts)]
                n += 1
                started = time.monotonic()
                try:
                    outcome = await self.interpret(text)
                    answered.append({"provider": outcome.provider, "degraded": outcome.degraded, "ms": _ms(started)})
                except GatewayError as err:
                    answered.append({"error": err.code, "ms": _ms(started)})
                await asyncio.sleep(0.5)
        finally:
            for slot in slots:
                slot.provider.fault = None  # type: ignore[attr-defined]
        health = {}
        for slot in slots:
            checked = await self.chain.check(slot, self._wall)
            health[slot.name] = {"ok": checked.ok, "error": checked.error, "breaker": slot.breaker.state.value}
        worst = max((a["ms"] for a in answered), default=0.0)
        return {
            "actions": [
                f"every provider ({', '.join(s.name for s in slots)}) failed with {fault} for {duration_s:g} s"
            ],
            "observed": {
                "requests": len(answered),
                "answered_locally": sum(1 for a in answered if a.get("degraded")),
                "answered_by_provider": sum(1 for a in answered if a.get("provider") not in (None, "local")),
                "errors": sum(1 for a in answered if "error" in a),
                "slowest_ms": worst,
                "deadline_ms": self.settings.deadline_s * 1000,
                "providers_after": health,
            },
            "recovered": all(h["ok"] for h in health.values()) and worst <= self.settings.deadline_s * 1000 + 250,
        }

    # --- requests ------------------------------------------------------------------------------------------------

    async def interpret(self, text: str) -> Outcome:
        assert self.chain is not None, "the service is not open"
        registry = self.registry()
        local = await self._local_rules(registry)
        return await self.chain.interpret(text, registry, local)

    async def submit(
        self, payload: Any, *, source: str, client: str, principal: str | None
    ) -> tuple[CommandRecord, bool, dict[str, str]]:
        """Interpret and submit, where only a command record can be the answer (MQTT): a question is refused
        with :class:`QuestionAnswered`, whose message is the answer."""
        result = await self.handle(payload, source=source, client=client, principal=principal)
        if isinstance(result, Answer):
            raise QuestionAnswered(result.body["answer"], details=result.body)
        return result.record, result.created, result.headers

    async def handle(self, payload: Any, *, source: str, client: str, principal: str | None) -> Submitted | Answer:
        """Interpret and submit, or answer a question about state without running anything. A known id is
        answered from the store first, before the shutdown, the rate limit or a provider can refuse it.

        Who asks: ``principal`` is the name the transport has verified (the HTTP bearer token's or session's), or
        None where nothing is verified (HTTP with access control off, MQTT). With a principal, it is the command's
        user and its rate-limit key, and a body ``user`` naming anyone else is refused (422): a client cannot
        record its commands under another name, spend another user's allowance, or escape its own. Without one, a
        body ``user`` is the client's unverified label, stored as said; its allowance is keyed by the client too
        (the address, or the MQTT uplink), so a label never shares a bucket with a verified user."""
        started = self._clock.monotonic()
        req = parse_text_request(payload, self.settings.max_text_chars)
        if req.id is not None:
            replay = await self._replay(req)
            if replay is not None:
                return Submitted(replay, False, {})
        if principal is not None and req.user is not None and req.user != principal:
            raise ValidationFailed(
                f"user is who you are authenticated as ({principal}): leave it out",
                details={"errors": [{"field": "user", "message": f"must be {principal!r} or absent"}]},
            )
        user = principal if principal is not None else req.user
        if not self._service.accepting:
            raise ShuttingDown("the gateway is not accepting commands (starting or shutting down)")
        if principal is not None:
            key = f"user:{principal}"
        else:
            key = f"client:{client}" + (f":claimed:{req.user}" if req.user else "")
        decision = self.users.try_acquire(key)
        if not decision.allowed:
            raise decision.refusal(self.users.name)
        headers = decision.headers()
        # Questions, negations, two commands in one, an ambiguous name or a missing channel: the local rules
        # decide these before any provider is asked, so no model can turn them into an actuation.
        registry = self.registry()
        local = await self._local_rules(registry)
        screened = local.understand(req.text)
        if isinstance(screened, LocalQuestion):
            return Answer(self._answer(screened, req.text, registry, started), headers)
        if isinstance(screened, LocalRefusal) and screened.reason in SCREENED:
            raise not_understood(req.text, screened, local)
        # A full disk refuses before a provider is paid for an answer that could not be kept.
        envelope = {"device": "-", "action": "-"} | ({"priority": req.priority} if req.priority is not None else {})
        self._service.refuse_if_full(parse_request(envelope).priority)
        outcome = await self.interpret(req.text)
        command = outcome.command
        registry = self.registry()
        entry = registry.devices[command.device]
        interpretation = outcome.to_api(req.text)
        if entry.profile.actions[command.action].confirm and not req.confirm:
            raise ConfirmationRequired(
                f"{command.device} {command.action} needs confirmation"
                + (" (interpreted by the local rules)" if outcome.degraded else "")
                + ': send the request again with "confirm": true',
                details={"command": command.to_api(), "interpretation": interpretation},
            )
        body: dict[str, Any] = {**command.payload(), "confirm": req.confirm}
        for key in ("id", "ttl_s", "priority"):
            value = getattr(req, key)
            if value is not None:
                body[key] = value
        then = []
        off = entry.off_for(command.action)
        if command.duration_s is not None and off is not None:
            # "on for ten minutes": the off (a channel's own, on a multi-channel board) is a scheduled action,
            # written with the on command (before it is acknowledged), armed when the on reaches the wire, ended by
            # a newer on or off of the same channel (gatewayd.store.schedule.dispatched).
            then.append(Then("on_period", off, command.duration_s, Priority.HIGH, "interpret"))
        rec, created = await self._service.submit(
            body, source=source, user=user, interpretation=interpretation, then=then
        )
        log.info(
            "command_interpreted",
            command_id=rec.id,
            provider=outcome.provider,
            cached=outcome.cached,
            degraded=outcome.degraded,
            attempts=outcome.attempts,
            latency_ms=interpretation["latency_ms"],
            device=command.device,
            action=command.action,
        )
        return Submitted(rec, created, headers)

    def _answer(self, question: LocalQuestion, text: str, registry: Registry, started: float) -> dict[str, Any]:
        body = answer(question, self._facts, registry.profiles(), registry.channels, wall=self._wall)
        body["interpretation"] = {
            "text": text,
            "provider": "local",
            "model": "rules",
            "kind": "question",
            "language": question.language,
            "latency_ms": round((self._clock.monotonic() - started) * 1000, 3),
        }
        log.info("question_answered", devices=[a.device for a in question.about])
        return body

    async def _replay(self, req: TextRequest) -> CommandRecord | None:
        """The same id sent again: the first command's record, without paying a provider a second time."""
        assert req.id is not None
        try:
            existing = await self._service.get(req.id)
        except UnknownCommand:
            return None
        if (existing.interpretation or {}).get("text") != req.text:
            raise Conflict(
                f"command id {req.id!r} was already used for a different command",
                details={"id": req.id, "existing": existing.to_api(transitions=False)},
            )
        self._service.replayed += 1
        await self._service.ensure_open(existing)
        return existing

    async def describe(self) -> dict[str, Any]:
        chain = self.chain
        assert chain is not None
        connectivity = chain.connectivity.breaker
        retry_at = connectivity.retry_at
        now = self._clock.monotonic()
        local = self._local
        cache = self.cache.stats()
        with contextlib.suppress(Exception):
            cache["entries"] = await self.cache.size()
        providers = []
        for slot in self.slots:
            info = slot.describe()
            info["spend_today"] = round(self.ledger.today(slot.name), 6)
            providers.append(info)
        return {
            "enabled": True,
            "deadline_s": self.settings.deadline_s,
            "local_reserve_s": self.settings.local_reserve_s,
            "balance": self.settings.balance,
            "connectivity": {
                "state": connectivity.state.value,
                "retry_after_s": round(max(0.0, retry_at - now), 3) if retry_at is not None else None,
                "needed": chain.connectivity.needed,
            },
            "cache": cache,
            "spend": self.ledger.stats(),
            "local": {
                "ready": local is not None,
                "rules_file": str(self.rules_path) if self.rules_path else None,
                "rules_file_found": self.rules_path is not None and self.rules_path.exists(),
                "can_do": local.capabilities if local is not None else [],
            },
            "providers": providers,
        }


@dataclass(frozen=True)
class Submitted:
    record: CommandRecord
    created: bool
    headers: dict[str, str]


@dataclass(frozen=True)
class Answer:
    """A question's answer: ``{"answer": text, "devices": [...], "interpretation": {...}}``; nothing was run."""

    body: dict[str, Any]
    headers: dict[str, str]


def _build_local(registry: Registry) -> LocalRules:
    local = LocalRules.build(registry)
    local.understand("warm up")  # hassil parses its templates on first use: pay that here, off the request path
    return local


def _ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 2)
