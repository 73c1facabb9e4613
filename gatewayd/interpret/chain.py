"""The failover chain: the prompt cache, then the providers in priority order, then the local rules.

One request has one deadline (``deadline_s``) that covers every retry and every fallback; ``local_reserve_s`` of
it is kept for the local rules, so the providers get ``deadline_s - local_reserve_s`` between them, and each HTTP
attempt's timeout is cut to what is left. Providers of equal priority share the load, by weight (a weighted
shuffle per request) or by recent latency (fastest first, an unmeasured one first of all).

Fail over first, retry later. Each provider is asked once, in order; a failure of any kind moves the request to
the next provider at once. Only when every provider has failed (or been passed over) is one asked again: the one
whose pause ends first, under its own :class:`RetryPolicy` (transient errors only: 408, 409, 429, 5xx, 529,
timeouts, connection errors; full jitter; ``Retry-After`` honoured, a hint longer than ``max_hint_s`` or past the
deadline gives up). A server's ``Retry-After`` is also that provider's cool-down: other requests pass it over until
then (at most ``max_hint_s``). A pause ends at once when the provider's breaker opens or the cloud goes offline.

Hedging. A provider that has not answered within its hedge delay (``hedge_after_s``, else a quantile of its recent
latency, bounded, and ``hedge_min_s`` while its last call was too slow; at most half of the attempt's timeout)
gets the next provider asked alongside it; the first answer wins and the other call is cancelled. A cancelled call
that had run past its hedge delay, and a call cut off by the request's deadline, count as slow failures on the
provider's breaker. The spend ledger bills a cancelled call as estimated (the provider may bill it).

Each provider is a :class:`Slot` with the resilience kit's tools of its own: the retry policy, a
:class:`CircuitBreaker`, token buckets for requests and tokens per minute (the rpm bucket's rate steered down by
429s through an :class:`AdaptiveRate`). Permanent errors (400, 401, 403, 404) and unusable answers count against
the provider's breaker and are not retried. A breaker that is open, a rate limit, a cool-down, or a daily budget
the call would overrun passes the provider over without a call (a limited or cooling provider may still be waited
for when nobody else answered, if that fits the deadline). Cloud providers also share a connectivity breaker: when
as many of them as ``connectivity_providers`` fail to connect in a row, all of them are skipped at once until a
probe (a health check, or a request once the breaker half-opens) gets an answer.

If every provider fails, the local rules answer: a match is a degraded command, no match :class:`NotUnderstood`.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import ipaddress
import json
import math
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import structlog

from gatewayd.config.models import InterpretSection, ProviderConfig
from gatewayd.errors import GatewayError, StoreUnavailable, ValidationFailed
from gatewayd.interpret.cache import Entry, PromptCache
from gatewayd.interpret.errors import NotUnderstood, UnusableAnswer
from gatewayd.interpret.ledger import SpendLedger, SpendRow, cost_of
from gatewayd.interpret.local import LocalMatch, LocalQuestion, LocalRefusal, LocalRules, Understanding
from gatewayd.interpret.metrics import (
    LATENCY,
    PROVIDER_CALLS,
    PROVIDER_HEALTHY,
    PROVIDER_LATENCY,
    PROVIDER_SKIPS,
    REQUESTS,
)
from gatewayd.interpret.providers import Answer, Completion, Prompt, Provider, Usage, answer_of
from gatewayd.interpret.registry import Command, Registry, check_answer, normalise, understood
from gatewayd.resilience import (
    CRITICAL,
    AdaptiveRate,
    CircuitBreaker,
    CircuitOpenError,
    CircuitState,
    Clock,
    DeadlineExceeded,
    HttpStatusError,
    Permit,
    RateLimited,
    RetryPolicy,
    StateChange,
    TokenBucket,
    Verdict,
    classify,
)
from gatewayd.resilience.retry import RetrySchedule
from gatewayd.store import Store

log = structlog.get_logger("gatewayd.interpret")

MIN_ATTEMPT_S = 0.05  # an attempt with less of the deadline left than this is not started
LATENCY_ALPHA = 0.3  # weight of the newest sample in a provider's latency average
HEDGE_SAMPLES = 64  # a provider's hedge delay comes from its latest answers, this many at most
HEDGE_MIN_SAMPLES = 5  # with fewer answers than this, its delay is hedge_max_s
_UNREACHABLE_ERRNOS = frozenset({errno.ECONNREFUSED, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN})


def is_local_url(url: str) -> bool:
    """Loopback, private and link-local addresses, ``localhost`` and ``*.local`` stay on this network."""
    host = (urlsplit(url).hostname or "").lower()
    if host == "localhost" or host.endswith((".local", ".localhost")):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_private or address.is_link_local


def is_unreachable(err: BaseException) -> bool:
    """The network, not the provider: no connection could be made (refused, unreachable, DNS, connect timeout)."""
    if isinstance(err, aiohttp.ClientSSLError):
        return False  # the host answered; its certificate is the problem
    if isinstance(err, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
        return True
    return isinstance(err, OSError) and err.errno in _UNREACHABLE_ERRNOS


def _without_userinfo(url: str) -> str:
    """A URL as it may be shown: credentials in it (``https://user:secret@host``) are not."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return parts._replace(netloc=f"***@{netloc}").geturl()


def _always_a_failure(_exc: BaseException) -> bool:
    # For a provider's breaker every error counts, permanent ones too: a provider that answers 401 or talks
    # nonsense is as useless to the chain as one that is down. Our own refusals are ignored (the kit's default).
    return True


def _estimate_tokens(chars: int) -> int:
    return math.ceil(chars / 3) + 16  # about 4 characters a token in English; 3 errs towards the budget's side


@dataclass
class Health:
    ok: bool | None = None
    checked_at: float | None = None  # wall clock
    latency_ms: float | None = None
    error: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def to_api(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ok": self.ok, "latency_ms": self.latency_ms, "error": self.error, **self.info}
        out["checked_at"] = (
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.checked_at)) if self.checked_at else None
        )
        return out


class Slot:
    """One provider and its own breaker, retry policy, limits, latency and health."""

    def __init__(
        self,
        name: str,
        cfg: ProviderConfig,
        provider: Provider,
        settings: InterpretSection,
        *,
        clock: Clock,
        wall: Callable[[], float],
        inactive: str | None = None,
    ):
        self.name = name
        self.cfg = cfg
        self.provider = provider
        self.inactive = inactive  # why it is never asked (disabled, no key), or None
        self.cloud = cfg.cloud if cfg.cloud is not None else not is_local_url(cfg.base_url)
        self.breaker = CircuitBreaker(
            f"provider:{name}", **settings.breaker.model_dump(), is_failure=_always_a_failure, clock=clock
        )

        def verdict(err: BaseException) -> Verdict:
            # Refusals of our own (breaker, limiter, deadline) and unusable answers are not retried here: the
            # chain moves on to the next provider at once.
            if isinstance(err, CircuitOpenError | RateLimited | DeadlineExceeded | UnusableAnswer):
                return Verdict(False, None, err.code)
            return classify(err, now=wall)

        self.policy = RetryPolicy(
            **settings.retry.model_dump(),
            max_hint_s=settings.max_hint_s,
            name=f"provider:{name}",
            clock=clock,
            wall=wall,
            classifier=verdict,
        )
        per_s = cfg.rpm / 60
        self.rpm = TokenBucket(cfg.rpm, per_s, name=f"provider:{name}:rpm", clock=clock)
        self.rate = AdaptiveRate(self.rpm, min_rate=per_s / 10, max_rate=per_s, clock=clock)
        self.tpm = TokenBucket(cfg.tpm, cfg.tpm / 60, name=f"provider:{name}:tpm", clock=clock)
        self.reserved_tokens = 0  # estimates of calls in flight, not yet settled against the tpm bucket
        self.cool_until = 0.0  # monotonic: passed over until then (the server's Retry-After)
        self._clock = clock
        self.latency_s: float | None = None
        self.health = Health()
        self._samples: deque[float] = deque(maxlen=HEDGE_SAMPLES)
        self._quantile = settings.hedge_quantile
        self._hedge_bounds = (settings.hedge_min_s, settings.hedge_max_s)
        self._hedge_s = settings.hedge_max_s
        # Its last call was too slow (cut off by a deadline or a timeout, or outrun by a hedge): until it answers in
        # time again, the next provider is asked alongside it after hedge_min_s, not after its usual delay.
        self.lagging = False
        # Set, and replaced by a fresh one, when this provider will not answer for a while (its breaker opened, the
        # cloud went offline): whoever pauses to ask it again stops pausing.
        self.gone = asyncio.Event()
        self.breaker.add_listener(self._breaker_changed)
        self._latency_metric = PROVIDER_LATENCY.labels(name)

    def _breaker_changed(self, change: StateChange) -> None:
        if change.new is CircuitState.OPEN:
            self.interrupt()

    def interrupt(self) -> None:
        """End every pause that waits to ask this provider again."""
        gone, self.gone = self.gone, asyncio.Event()
        gone.set()

    @property
    def hedge_s(self) -> float:
        """How long it may go without answering before the next provider is asked too."""
        if self.cfg.hedge_after_s is not None:
            return self.cfg.hedge_after_s
        return self._hedge_bounds[0] if self.lagging else self._hedge_s

    def observe(self, latency_s: float) -> None:
        self.latency_s = (
            latency_s if self.latency_s is None else (LATENCY_ALPHA * latency_s + (1 - LATENCY_ALPHA) * self.latency_s)
        )
        self._latency_metric.observe(latency_s)
        samples = self._samples
        samples.append(latency_s)
        if len(samples) >= HEDGE_MIN_SAMPLES:
            ranked = sorted(samples)
            quantile = ranked[min(len(ranked), math.ceil(self._quantile * len(ranked))) - 1]
            low, high = self._hedge_bounds
            self._hedge_s = min(high, max(low, quantile))

    def describe(self) -> dict[str, Any]:
        rpm, tpm = self.rpm.peek(), self.tpm.peek()
        breaker = self.breaker.state
        retry_at = self.breaker.retry_at
        now = self._clock.monotonic()
        return {
            "name": self.name,
            "type": self.cfg.type,
            "model": self.cfg.model,
            "base_url": _without_userinfo(self.cfg.base_url),
            "api_key_env": self.cfg.api_key_env,
            "active": self.inactive is None,
            "inactive_reason": self.inactive,
            "cloud": self.cloud,
            "priority": self.cfg.priority,
            "weight": self.cfg.weight,
            "breaker": {
                "state": breaker.value,
                "retry_after_s": round(max(0.0, retry_at - now), 3) if retry_at is not None else None,
            },
            "health": self.health.to_api(),
            "latency_ms": round(self.latency_s * 1000, 1) if self.latency_s is not None else None,
            "hedge_after_ms": round(self.hedge_s * 1000, 1),
            "cooling_down_s": round(self.cool_until - now, 3) if self.cool_until > now else None,
            "limits": {
                "rpm": {
                    "limit": self.cfg.rpm,
                    "available": round(rpm.remaining, 2),
                    "rate_per_min": round(self.rpm.rate * 60, 2),
                },
                "tpm": {"limit": self.cfg.tpm, "available": round(tpm.remaining, 1), "in_flight": self.reserved_tokens},
            },
            "prices": {"in_per_mtok": self.cfg.price_in_per_mtok, "out_per_mtok": self.cfg.price_out_per_mtok},
        }


class Connectivity:
    """Whether the cloud is reachable at all, as one breaker over every cloud provider.

    A cloud provider whose attempt ends in a connection error (refused, unreachable, DNS, connect timeout) is one
    witness, counted once per streak however many attempts or requests it fails; an answer of any kind from any
    cloud provider (an HTTP error is an answer) ends the streak. When ``needed`` providers in a row are witnesses
    the breaker opens and every cloud provider is skipped: so when every cloud provider fails to connect, the
    request goes to the local rules right after the last refusal, without pausing to retry any of them. Half-open,
    the next cloud attempt or health check is the probe: an answer closes the breaker, a connection error opens it
    again.
    """

    def __init__(self, clock: Clock, *, needed: int, open_s: float):
        self.needed = needed
        self.breaker = CircuitBreaker(
            "interpret:connectivity",
            window="count",
            window_size=needed,
            minimum_calls=needed,
            failure_rate=1.0,
            open_s=open_s,
            is_failure=_always_a_failure,
            clock=clock,
        )
        self._streak: set[str] = set()

    @property
    def offline(self) -> bool:
        return self.breaker.state is CircuitState.OPEN

    def permit(self) -> Permit:
        return self.breaker.permit()

    def settle(self, provider: str, permit: Permit | None, err: BaseException | None, *, witness: bool = True) -> None:
        """One attempt's outcome. A connection error makes ``provider`` a witness (``witness=False``: a health
        check's, which only counts when it is the probe)."""
        if permit is None:
            return
        if err is None or isinstance(err, HttpStatusError | UnusableAnswer):
            self._streak.clear()
            permit.success()
        elif is_unreachable(err):
            if permit.probe:
                permit.failure()
                return
            permit.ignore()
            if witness:
                self._witness(provider)
        else:
            permit.ignore()

    def _witness(self, provider: str) -> None:
        if provider in self._streak:
            return
        self._streak.add(provider)
        try:
            permit = self.breaker.permit()
        except CircuitOpenError:
            return  # already open, or a probe is out: that probe decides
        permit.failure()


def not_understood(
    text: str,
    found: Understanding | None,
    local: LocalRules | None,
    *,
    tried: list[dict[str, Any]] | None = None,
    declined: str | None = None,
) -> NotUnderstood:
    """The refusal of a text no interpreter acts on: the local rules' reason (negated, two commands, which
    channel, which device ...) and the few closest sentences that would work for the device it names."""
    details: dict[str, Any] = {"text": text, "can_do": local.capabilities if local is not None else []}
    if tried is not None:
        details["providers"] = tried
    if declined is not None:
        details["provider_reason"] = declined
    if isinstance(found, LocalQuestion):
        found = LocalRefusal("not_understood", "that is a question, and questions are answered, not run")
    if isinstance(found, LocalRefusal) and local is not None:
        suggestions = local.suggestions(found, text)
        details["reason"] = found.reason
        for key in ("device", "channel"):
            if getattr(found, key) is not None:
                details[key] = getattr(found, key)
        if found.candidates:
            details["candidates"] = list(found.candidates)
        details["suggestions"] = suggestions
        tries = "; ".join(f'"{s}"' for s in suggestions)
        return NotUnderstood(
            f"not understood: {found.message}" + (f"; try: {tries}" if tries and found.reason != "negated" else ""),
            details=details,
        )
    examples = "; ".join(f'"{c["example"]}"' for c in details["can_do"][:6])
    return NotUnderstood(
        "not understood: no provider could interpret this and the local rules do not match it"
        + (f"; the local rules understand, for example: {examples}" if examples else ""),
        details=details,
    )


@dataclass
class Outcome:
    """How one request was interpreted: the command, and everything the command record keeps about it."""

    command: Command
    provider: str
    model: str
    attempts: int
    cached: bool
    degraded: bool
    latency_s: float
    cost: float
    tokens_in: int
    tokens_out: int
    tried: list[dict[str, Any]]
    cost_saved: float = 0.0
    understood: str = ""  # the command in words: "relays1 on3 (channel 3, greenhouse valve) for 30 min"
    channel: int | None = None

    def to_api(self, text: str) -> dict[str, Any]:
        out: dict[str, Any] = {
            "text": text,
            "provider": self.provider,
            "model": self.model,
            "attempts": self.attempts,
            "cached": self.cached,
            "degraded": self.degraded,
            "latency_ms": round(self.latency_s * 1000, 3),
            "cost": round(self.cost, 8),
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "tried": self.tried,
        }
        if self.cached:
            out["cost_saved"] = round(self.cost_saved, 8)
        if self.command.duration_s is not None:
            out["duration_s"] = self.command.duration_s
        if self.understood:
            out["understood"] = self.understood
        if self.channel is not None:
            out["channel"] = self.channel
        return out


@dataclass
class _Request:
    text: str
    norm: str
    registry: Registry
    prompt: Prompt  # max_tokens is each provider's own, set per call
    tokens_in: int  # estimated
    started: float
    cloud_deadline: float
    tried: list[dict[str, Any]] = field(default_factory=list)
    spend: list[SpendRow] = field(default_factory=list)
    cache_entry: Entry | None = None
    attempts: int = 0
    declined: str | None = None

    @property
    def cost(self) -> float:
        return sum(r.cost for r in self.spend)


@dataclass
class _Answered:
    command: Command
    model: str


_Result = tuple[Answer, Completion, Command | None] | Exception  # what one attempt ends with


@dataclass(eq=False)
class _Try:
    """One provider within one request."""

    slot: Slot
    entry: dict[str, Any] | None = None  # its row in ``tried`` once it is called
    schedule: RetrySchedule | None = None
    ready_at: float = 0.0  # monotonic: when it may be asked again
    error: Exception | None = None  # its last failure
    skipped: bool = False  # a "skipped" row is in ``tried`` for it


@dataclass(eq=False)
class _Attempt:
    """One HTTP call to a provider, admitted by its breakers and limits."""

    tr: _Try
    permit: Permit
    conn: Permit | None  # the connectivity breaker's, for a cloud provider
    timeout_s: float
    started: float
    hedge_at: float  # monotonic: when the next provider is asked alongside it (inf: never)
    sent: bool = False  # the request went out: the provider may bill it
    lost: bool = False  # cancelled because another provider answered first


class Chain:
    def __init__(
        self,
        settings: InterpretSection,
        slots: list[Slot],
        *,
        session: aiohttp.ClientSession,
        ledger: SpendLedger,
        cache: PromptCache | None,
        store: Store | None,
        clock: Clock,
        rng: random.Random | None = None,
    ):
        self.settings = settings
        self.slots = slots
        self._session = session
        self.ledger = ledger
        self.cache = cache
        self._store = store
        self._clock = clock
        self._rng = rng or random.Random()
        cloud = [s for s in slots if s.cloud and s.inactive is None]
        self.connectivity = Connectivity(
            clock, needed=max(1, min(settings.connectivity_providers, len(cloud))), open_s=settings.connectivity_open_s
        )
        self.connectivity.breaker.add_listener(self._connectivity_changed)
        self._writes: set[asyncio.Future[None]] = set()  # queued to the store, not yet committed

    def _connectivity_changed(self, change: StateChange) -> None:
        if change.new is CircuitState.OPEN:
            for slot in self.slots:
                if slot.cloud:
                    slot.interrupt()  # nobody waits to retry a cloud provider that cannot be reached

    @property
    def active(self) -> list[Slot]:
        return [s for s in self.slots if s.inactive is None]

    def order(self) -> list[Slot]:
        """Active providers in the order this request tries them."""
        out: list[Slot] = []
        for priority in sorted({s.cfg.priority for s in self.active}):
            tier = [s for s in self.active if s.cfg.priority == priority]
            if self.settings.balance == "latency":
                tier.sort(key=lambda s: (s.latency_s is not None, s.latency_s or 0.0))
            else:  # weighted shuffle (Efraimidis-Spirakis): P(first) is proportional to the weight
                tier.sort(key=lambda s: self._rng.random() ** (1.0 / s.cfg.weight), reverse=True)
            out.extend(tier)
        return out

    # --- one request ---------------------------------------------------------------------------------------------

    async def interpret(self, text: str, registry: Registry, local: LocalRules | None) -> Outcome:
        started = self._clock.monotonic()
        settings = self.settings
        req = _Request(
            text,
            normalise(text),
            registry,
            Prompt(registry.prompt, text, registry.tools, 0),
            _estimate_tokens(registry.prompt_chars + len(text)),
            started,
            started + settings.deadline_s - settings.local_reserve_s,
        )
        try:
            outcome = await self._from_cache(req)
            if outcome is None:
                outcome = await self._from_providers(req)
            if outcome is None:
                outcome = self._from_local(req, local)
        except NotUnderstood:
            self._finish("not_understood", started)
            raise
        finally:
            self._save(req)
        self._finish("cache" if outcome.cached else "local" if outcome.degraded else "provider", started)
        outcome.understood, outcome.channel = understood(outcome.command, registry)
        return outcome

    def _finish(self, outcome: str, started: float) -> None:
        REQUESTS.labels(outcome).inc()
        LATENCY.labels(outcome).observe(self._clock.monotonic() - started)

    async def _from_cache(self, req: _Request) -> Outcome | None:
        cache = self.cache
        if cache is None or not cache.enabled:
            return None
        if self._writes:
            await self.settled()  # an answer of a request just before this one is a hit, not a second payment
        pairs = [(s.name, s.cfg.model) for s in sorted(self.slots, key=lambda s: s.cfg.priority) if s.cfg.enabled]
        try:
            hit = await cache.lookup(req.norm, req.registry.digest, pairs)
        except StoreUnavailable as err:
            log.warning("interpret_cache_unavailable", error=err.message)
            return None
        if hit is not None:
            try:
                command = check_answer(hit.command, req.registry)
            except UnusableAnswer as err:  # cannot happen while the digest matches, unless the row was tampered with
                log.warning("interpret_cache_entry_invalid", provider=hit.provider, error=err.message)
                await cache.drop(hit.key)
                hit = None
        cache.count(hit)
        if hit is None:
            return None
        return Outcome(
            command,
            hit.provider,
            hit.model,
            0,
            cached=True,
            degraded=False,
            latency_s=self._clock.monotonic() - req.started,
            cost=0.0,
            tokens_in=0,
            tokens_out=0,
            tried=[],
            cost_saved=hit.cost,
        )

    def _skip_reason(self, slot: Slot, req: _Request) -> str | None:
        if req.cloud_deadline - self._clock.monotonic() < MIN_ATTEMPT_S:
            return "deadline"
        if slot.cloud and self.connectivity.offline:
            return "offline"
        if slot.breaker.state is CircuitState.OPEN:
            return "circuit_open"
        estimate = cost_of(slot.cfg, req.tokens_in, slot.cfg.max_tokens)
        if not self.ledger.allows(estimate):
            return "budget"
        return None

    def _skip(self, slot: Slot, req: _Request, reason: str, wait_s: float | None = None) -> None:
        PROVIDER_SKIPS.labels(slot.name, reason).inc()
        entry: dict[str, Any] = {"provider": slot.name, "outcome": "skipped", "reason": reason, "attempts": 0}
        if wait_s is not None:
            entry["retry_after_s"] = round(wait_s, 3)
        req.tried.append(entry)

    async def _from_providers(self, req: _Request) -> Outcome | None:
        """Fail over first, retry later, hedge a slow one: see the module's docstring."""
        tries = [_Try(slot) for slot in self.order()]
        fresh = deque(tries)
        waiting: list[_Try] = []
        flying: dict[asyncio.Task[_Result], _Attempt] = {}
        won: tuple[_Attempt, _Answered] | None = None
        try:
            async with asyncio.TaskGroup() as tg:
                try:
                    won = await self._race(req, fresh, waiting, flying, tg)
                finally:
                    for task, at in flying.items():
                        at.lost = won is not None or req.declined is not None
                        task.cancel()
        finally:
            for task, at in flying.items():
                self._abandoned(req, task, at)
            for tr in tries:
                if tr.error is not None and tr.entry is not None and tr.entry.get("outcome") == "failed":
                    self._log_failure(tr)
        if won is None:
            return None
        at, answered = won
        return self._answered(req, at.tr.slot, answered)

    async def _race(
        self,
        req: _Request,
        fresh: deque[_Try],
        waiting: list[_Try],
        flying: dict[asyncio.Task[_Result], _Attempt],
        tg: asyncio.TaskGroup,
    ) -> tuple[_Attempt, _Answered] | None:
        clock = self._clock
        while True:
            now = clock.monotonic()
            # A new call when none is out, or when every call out is overdue (past its hedge delay).
            if not flying or all(now >= at.hedge_at for at in flying.values()):
                at = self._launch(req, fresh, waiting, now)
                if at is not None:
                    task = tg.create_task(self._run(req, at), name=f"gatewayd[interpret].{at.tr.slot.name}")
                    flying[task] = at
                    continue
            if not flying:
                # Everyone has failed or been passed over: the one that may be asked again first, after its pause.
                tr = self._next_ready(req, waiting)
                if tr is None:
                    return None
                if tr.ready_at > now:
                    await self._schedule(tr, req).pause(tr.ready_at - now, tr.slot.gone)
                continue
            # The hedge timer runs on the loop's time, like the HTTP timeouts of the calls it races.
            wake_at = self._hedge_moment(req, fresh, waiting, flying)
            timeout = None if wake_at is None else max(0.0, wake_at - now)
            done, _ = await asyncio.wait(flying, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                at = flying.pop(task)
                result = task.result()
                if isinstance(result, Exception):
                    self._attempt_failed(req, at, result, waiting)
                    continue
                answered = self._attempt_answered(req, at, result)
                if answered is not None:
                    return at, answered
                return None  # declined: the model says the text is no command, and the others would too

    def _launch(self, req: _Request, fresh: deque[_Try], waiting: list[_Try], now: float) -> _Attempt | None:
        """The next call to make now: a provider not yet asked, else one whose pause is over; None if none."""
        while fresh:
            at = self._admit(req, fresh.popleft(), waiting, now)
            if at is not None:
                return at
        for tr in sorted((t for t in waiting if t.ready_at <= now), key=lambda t: t.ready_at):
            waiting.remove(tr)
            at = self._admit(req, tr, waiting, now)
            if at is not None:
                return at
        return None

    def _next_ready(self, req: _Request, waiting: list[_Try]) -> _Try | None:
        """Of the providers that may be asked again, the one ready first, if that fits the deadline; the others
        that no longer can be asked (breaker opened, offline, too late) are dropped."""
        for tr in list(waiting):
            if self._skip_reason(tr.slot, req) is not None or tr.ready_at + MIN_ATTEMPT_S >= req.cloud_deadline:
                waiting.remove(tr)
        return min(waiting, key=lambda t: t.ready_at, default=None)

    def _hedge_moment(
        self, req: _Request, fresh: deque[_Try], waiting: list[_Try], flying: dict[asyncio.Task[_Result], _Attempt]
    ) -> float | None:
        """When to stop waiting for the calls out and ask another provider too; None: only their end counts."""
        moment = max(at.hedge_at for at in flying.values())
        if math.isinf(moment):
            return None
        if fresh:
            return moment
        ready = [t.ready_at for t in waiting if t.ready_at + MIN_ATTEMPT_S < req.cloud_deadline]
        return max(moment, min(ready)) if ready else None

    def _schedule(self, tr: _Try, req: _Request) -> RetrySchedule:
        if tr.schedule is None:
            tr.schedule = tr.slot.policy.schedule(deadline=req.cloud_deadline - MIN_ATTEMPT_S)
        return tr.schedule

    def _admit(self, req: _Request, tr: _Try, waiting: list[_Try], now: float) -> _Attempt | None:
        """A call to ``tr``'s provider, admitted by its breakers and limits; or None, and why in ``tried`` (a
        provider limited or cooling down goes to ``waiting``, to be asked when it may if nobody answers)."""
        slot = tr.slot
        reason = self._skip_reason(slot, req)
        if reason is not None:
            self._skip_once(tr, req, reason)
            return None
        if slot.cool_until > now:
            self._skip_once(tr, req, "cooling_down", slot.cool_until - now)
            tr.ready_at = slot.cool_until
            waiting.append(tr)
            return None
        conn: Permit | None = None
        if slot.cloud:
            try:
                conn = self.connectivity.permit()
            except CircuitOpenError:
                self._skip_once(tr, req, "offline")
                return None
        try:
            permit = slot.breaker.permit()
        except CircuitOpenError:
            if conn is not None:
                conn.ignore()
            self._skip_once(tr, req, "circuit_open")
            return None
        try:
            self._take_rate(slot, req)
        except RateLimited as err:
            permit.ignore()
            if conn is not None:
                conn.ignore()
            self._skip_once(tr, req, "rate_limited", err.retry_after_s)
            tr.ready_at = now + max(err.retry_after_s, 0.001)
            waiting.append(tr)
            return None
        entry = tr.entry
        if entry is None:
            entry = tr.entry = {"provider": slot.name, "model": slot.cfg.model, "attempts": 0}
            req.tried.append(entry)
        entry["attempts"] += 1
        req.attempts += 1
        remaining = req.cloud_deadline - now
        timeout_s = min(slot.cfg.timeout_s, remaining)
        # Never later than half of the attempt's time: a hedge at its timeout would be a plain failover.
        hedge_at = now + min(slot.hedge_s, timeout_s / 2) if self.settings.hedge else math.inf
        return _Attempt(tr, permit, conn, timeout_s, now, hedge_at)

    def _skip_once(self, tr: _Try, req: _Request, reason: str, wait_s: float | None = None) -> None:
        """A provider passed over: one "skipped" row, unless it has a row already (it was asked before)."""
        if tr.entry is None and not tr.skipped:
            tr.skipped = True
            self._skip(tr.slot, req, reason, wait_s)

    async def _run(self, req: _Request, at: _Attempt) -> _Result:
        try:
            return await self._call(at.tr.slot, req, at)
        except Exception as err:  # an outcome, handled by the race; cancellation still propagates
            return err

    def _attempt_answered(
        self, req: _Request, at: _Attempt, result: tuple[Answer, Completion, Command | None]
    ) -> _Answered | None:
        answer, completion, command = result
        tr = at.tr
        entry = tr.entry
        assert entry is not None
        self._schedule(tr, req).succeeded()
        for key in ("error", "http_status", "message"):  # an earlier attempt's failure is not the outcome
            entry.pop(key, None)
        entry["latency_ms"] = round((self._clock.monotonic() - at.started) * 1000, 3)
        if answer.kind == "declined":
            entry["outcome"] = "declined"
            entry["reason"] = answer.reason
            req.declined = answer.reason or "the model found no command in the text"
            return None
        assert command is not None
        entry["outcome"] = "answered"
        return _Answered(command, completion.model)

    def _attempt_failed(self, req: _Request, at: _Attempt, err: Exception, waiting: list[_Try]) -> None:
        """Note the failure; if the provider may be asked again, when (its retry policy's pause, or the server's
        Retry-After, which is also its cool-down for every request)."""
        tr, slot = at.tr, at.tr.slot
        now = self._clock.monotonic()
        step = self._schedule(tr, req).failed(err)
        hint = step.verdict.hint_s
        if isinstance(err, HttpStatusError) and hint is not None and math.isfinite(hint):
            slot.cool_until = max(slot.cool_until, now + min(hint, self.settings.max_hint_s))
        self._note_failure(at, err, now)
        if step.give_up is None:
            tr.ready_at = now + step.delay_s
            waiting.append(tr)

    @staticmethod
    def _note_failure(at: _Attempt, err: Exception, now: float) -> None:
        tr = at.tr
        tr.error = err
        entry = tr.entry
        assert entry is not None
        entry["outcome"] = "failed"
        entry["error"] = err.code if isinstance(err, GatewayError) else type(err).__name__
        if isinstance(err, HttpStatusError):
            entry["http_status"] = err.http_status
        else:
            entry.pop("http_status", None)
        entry["message"] = str(err)[:200]
        entry["latency_ms"] = round((now - at.started) * 1000, 3)

    def _abandoned(self, req: _Request, task: asyncio.Task[_Result], at: _Attempt) -> None:
        """A call still out when the request ended: cancelled because another provider answered (or the request
        itself was cancelled). Its permits are settled if it never ran; a call that went out is billed, estimated
        at the prompt and the winner's answer, as the provider may bill it."""
        if not at.permit.settled:
            at.permit.ignore()
        if at.conn is not None and not at.conn.settled:
            at.conn.ignore()
        entry = at.tr.entry
        assert entry is not None
        result = None if task.cancelled() else task.result()
        if isinstance(result, Exception):  # it failed in the same instant another answered
            self._note_failure(at, result, self._clock.monotonic())
            return
        entry["outcome"] = "cancelled"
        entry["reason"] = "another provider answered first" if at.lost else "the request was cancelled"
        entry["latency_ms"] = round((self._clock.monotonic() - at.started) * 1000, 3)
        if result is None and at.sent and at.lost:
            slot = at.tr.slot
            tokens_out = req.spend[-1].tokens_out if req.spend else slot.cfg.max_tokens
            usage = Usage(req.tokens_in, tokens_out, reported=False)
            slot.tpm.try_acquire(max(1, usage.tokens_in + usage.tokens_out), priority=CRITICAL)
            req.spend.append(self.ledger.record(slot.name, slot.cfg, slot.cfg.model, usage))
            PROVIDER_CALLS.labels(slot.name, "cancelled").inc()

    def _answered(self, req: _Request, slot: Slot, result: _Answered) -> Outcome:
        command = result.command
        cost = req.cost
        if self.cache is not None:
            # What this answer cost is what a hit on it will save: the successful call, not the failures before.
            paid = next((r.cost for r in reversed(req.spend) if r.provider == slot.name), 0.0)
            req.cache_entry = self.cache.entry(
                req.norm, req.registry.digest, slot.name, slot.cfg.model, command.to_api(), paid
            )
        return Outcome(
            command,
            slot.name,
            result.model,
            req.attempts,
            cached=False,
            degraded=False,
            latency_s=self._clock.monotonic() - req.started,
            cost=cost,
            tokens_in=sum(r.tokens_in for r in req.spend),
            tokens_out=sum(r.tokens_out for r in req.spend),
            tried=req.tried,
        )

    def _take_rate(self, slot: Slot, req: _Request) -> None:
        tokens = slot.tpm.peek(req.tokens_in + slot.cfg.max_tokens + slot.reserved_tokens)
        if not tokens.allowed:
            raise tokens.refusal(slot.tpm.name)
        decision = slot.rpm.try_acquire()
        if not decision.allowed:
            raise decision.refusal(slot.rpm.name)

    async def _call(self, slot: Slot, req: _Request, at: _Attempt) -> tuple[Answer, Completion, Command | None]:
        """One HTTP attempt, its outcome told to the breakers, the limits, the ledger and the metrics."""
        permit, conn, timeout_s = at.permit, at.conn, at.timeout_s
        timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=min(timeout_s, slot.cfg.connect_timeout_s))
        started = self._clock.monotonic()
        estimate = req.tokens_in + slot.cfg.max_tokens
        slot.reserved_tokens += estimate
        at.sent = True
        try:
            completion = await slot.provider.complete(
                self._session, replace(req.prompt, max_tokens=slot.cfg.max_tokens), timeout
            )
        except Exception as err:
            if isinstance(err, TimeoutError) and timeout_s < slot.cfg.timeout_s:
                permit.slow()  # the request's deadline cut it off: too slow for this request, and so counted
            else:
                permit.failure()
            if isinstance(err, TimeoutError):
                slot.lagging = True
            self.connectivity.settle(slot.name, conn, err)
            throttled = isinstance(err, HttpStatusError) and err.http_status == 429
            slot.rate.record(False, throttled=throttled)
            outcome = (
                "unusable"
                if isinstance(err, UnusableAnswer)
                else ("transient" if classify(err).transient else "permanent")
            )
            PROVIDER_CALLS.labels(slot.name, outcome).inc()
            raise
        except BaseException:
            # Cancelled. Because another provider answered first, after this one's hedge delay: it was slow.
            if at.lost and self._clock.monotonic() >= at.hedge_at:
                permit.slow()
                slot.lagging = True
            else:
                permit.ignore()
            if conn is not None:
                conn.ignore()
            raise
        finally:
            slot.reserved_tokens -= estimate
        elapsed = self._clock.monotonic() - started
        self.connectivity.settle(slot.name, conn, None)
        usage = completion.usage or Usage(
            req.tokens_in,
            _estimate_tokens(len(json.dumps(completion.call.arguments if completion.call else completion.content))),
            reported=False,
        )
        slot.tpm.try_acquire(max(1, usage.tokens_in + usage.tokens_out), priority=CRITICAL)  # settle; never below 0
        req.spend.append(self.ledger.record(slot.name, slot.cfg, completion.model, usage))
        try:
            answer = answer_of(completion)
            command = check_answer(answer.arguments, req.registry) if answer.kind == "run" else None
        except UnusableAnswer:
            permit.failure()
            slot.rate.record(True)  # the API worked; the model did not
            PROVIDER_CALLS.labels(slot.name, "unusable").inc()
            raise
        permit.success()
        slot.rate.record(True)
        slot.observe(elapsed)
        slot.lagging = False
        PROVIDER_CALLS.labels(slot.name, "declined" if command is None else "answered").inc()
        return answer, completion, command

    def _log_failure(self, tr: _Try) -> None:
        entry = tr.entry
        assert entry is not None
        log.warning(
            "provider_failed",
            provider=tr.slot.name,
            attempts=entry["attempts"],
            error=entry["error"],
            http_status=entry.get("http_status"),
            message=entry["message"],
        )

    def _from_local(self, req: _Request, local: LocalRules | None) -> Outcome:
        found = local.understand(req.text) if local is not None else None
        if not isinstance(found, LocalMatch):
            raise not_understood(req.text, found, local, tried=req.tried, declined=req.declined)
        match = found
        try:
            command = check_answer(match.answer(), req.registry)
        except UnusableAnswer as err:
            # The rules understood the text, and what it asks is not allowed: the validation's own answer.
            cause = err.__cause__
            if isinstance(cause, GatewayError):
                raise cause from None
            raise ValidationFailed(err.message, details=err.details) from None
        return Outcome(
            command,
            "local",
            "rules",
            req.attempts,
            cached=False,
            degraded=True,
            latency_s=self._clock.monotonic() - req.started,
            cost=req.cost,
            tokens_in=sum(r.tokens_in for r in req.spend),
            tokens_out=sum(r.tokens_out for r in req.spend),
            tried=req.tried,
        )

    def _save(self, req: _Request) -> None:
        """The request's spend rows and cache entry, queued to the store as one job and not waited for. Queued on
        the loop's next turn, after the answer is handed back: waking the store's writer thread costs its caller
        the GIL for a moment (about 0.4 ms measured), which the answer need not wait for. The store commits jobs in
        the order they were queued; :meth:`settled` waits for them, and so does a cache lookup."""
        if self._store is None or (not req.spend and req.cache_entry is None):
            return
        rows, entry, cache = list(req.spend), req.cache_entry, self.cache

        def job(conn: Any) -> None:
            if rows:
                SpendLedger.insert(conn, rows)
            if entry is not None and cache is not None:
                cache.put(conn, entry)

        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._writes.add(done)
        loop.call_soon(self._submit, job, len(rows), done)

    def _submit(self, job: Callable[[Any], None], rows: int, done: asyncio.Future[None]) -> None:
        assert self._store is not None
        try:
            saving = self._store.submit(job)
        except StoreUnavailable as err:
            log.warning("interpret_spend_not_saved", error=err.message, rows=rows)
            self._writes.discard(done)
            done.set_result(None)
            return
        saving.add_done_callback(functools.partial(self._saved, rows, done))

    def _saved(self, rows: int, done: asyncio.Future[None], saving: asyncio.Future[None]) -> None:
        self._writes.discard(done)
        if not done.done():
            done.set_result(None)
        err = None if saving.cancelled() else saving.exception()
        if isinstance(err, StoreUnavailable):
            log.warning("interpret_spend_not_saved", error=err.message, rows=rows)
        elif err is not None:
            log.error("interpret_spend_not_saved", error=f"{type(err).__name__}: {err}", rows=rows)

    async def settled(self) -> None:
        """Until the store has committed (or refused) the rows and cache entries of every request so far."""
        if self._writes:
            await asyncio.wait(set(self._writes))

    # --- health --------------------------------------------------------------------------------------------------

    async def check(self, slot: Slot, wall: Callable[[], float] = time.time) -> Health:
        """A token-free health check. Half-open, it is the breaker's probe (the provider's, and for a cloud
        provider the connectivity breaker's); otherwise it only updates what ``/api/v1/providers`` shows."""
        probe: Permit | None = None
        if slot.breaker.state is CircuitState.HALF_OPEN:
            try:
                probe = slot.breaker.permit()
            except CircuitOpenError:
                probe = None
        conn: Permit | None = None
        if slot.cloud:
            try:
                conn = self.connectivity.permit()
            except CircuitOpenError:
                conn = None
        timeout_s = min(slot.cfg.timeout_s, 10.0)
        timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=min(timeout_s, slot.cfg.connect_timeout_s))
        started = self._clock.monotonic()
        health = slot.health
        try:
            info = await slot.provider.check(self._session, timeout)
        except Exception as err:
            if probe is not None:
                probe.failure()
            self.connectivity.settle(slot.name, conn, err, witness=False)
            was = health.ok
            health.ok, health.error = (
                False,
                f"{err.code if isinstance(err, GatewayError) else type(err).__name__}: {err}"[:200],
            )
            if was is not False:
                log.warning("provider_unhealthy", provider=slot.name, error=health.error)
        except BaseException:
            if probe is not None:
                probe.ignore()
            if conn is not None:
                conn.ignore()
            raise
        else:
            if probe is not None:
                probe.success()
            self.connectivity.settle(slot.name, conn, None)
            if health.ok is False:
                log.info("provider_healthy", provider=slot.name)
            health.ok, health.error, health.info = True, None, info
        health.checked_at = wall()
        health.latency_ms = round((self._clock.monotonic() - started) * 1000, 1)
        PROVIDER_HEALTHY.labels(slot.name).set(1 if health.ok else 0)
        return health
