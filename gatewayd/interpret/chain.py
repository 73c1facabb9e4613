"""The failover chain: the prompt cache, then the providers in priority order, then the local rules.

One request has one deadline (``deadline_s``) that covers every retry and every fallback; ``local_reserve_s`` of
it is kept for the local rules, so the providers get ``deadline_s - local_reserve_s`` between them, and each HTTP
attempt's timeout is cut to what is left. Providers of equal priority share the load, by weight (a weighted
shuffle per request) or by recent latency (fastest first, an unmeasured one first of all).

Each provider is a :class:`Slot` with the resilience kit's tools of its own: a :class:`RetryPolicy` for transient
errors (408, 409, 429, 5xx, 529, timeouts, connection errors; full jitter; ``Retry-After`` honoured, a hint longer
than ``max_hint_s`` or past the deadline fails over at once), a :class:`CircuitBreaker`, token buckets for requests
and tokens per minute (the rpm bucket's rate steered down by 429s through an :class:`AdaptiveRate`). Permanent
errors (400, 401, 403, 404) and unusable answers fail over at once and count against the provider's breaker. A
breaker that is open, a rate limit, or a daily budget the call would overrun passes the provider over without a
call. Cloud providers also share a connectivity breaker: when as many of them as ``connectivity_providers`` fail
with connection errors in a row, all of them are skipped at once until a probe (a health check, or a request once
the breaker half-opens) gets an answer.

If every provider fails, the local rules answer: a match is a degraded command, no match :class:`NotUnderstood`.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import math
import random
import time
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
    RetryExhausted,
    RetryPolicy,
    TokenBucket,
    Verdict,
    classify,
)
from gatewayd.store import Store

log = structlog.get_logger("gatewayd.interpret")

MIN_ATTEMPT_S = 0.05  # an attempt with less of the deadline left than this is not started
LATENCY_ALPHA = 0.3  # weight of the newest sample in a provider's latency average
_UNREACHABLE_ERRNOS = frozenset({errno.ECONNREFUSED, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN})


def is_local_url(url: str) -> bool:
    """Loopback, private and link-local addresses, ``localhost`` and ``*.local`` stay on this network."""
    host = (urlsplit(url).hostname or "").lower()
    if host == "localhost" or host.endswith(".local") or host.endswith(".localhost"):
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
        self._clock = clock
        self.latency_s: float | None = None
        self.health = Health()

    def observe(self, latency_s: float) -> None:
        self.latency_s = (
            latency_s if self.latency_s is None else (LATENCY_ALPHA * latency_s + (1 - LATENCY_ALPHA) * self.latency_s)
        )
        PROVIDER_LATENCY.labels(self.name).observe(latency_s)

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

    A cloud provider whose retries all ended in connection errors (refused, unreachable, DNS, connect timeout) is
    one witness, counted once per streak however many requests it fails; an answer of any kind from any cloud
    provider (an HTTP error is an answer) ends the streak. When ``needed`` providers in a row are witnesses the
    breaker opens and every cloud provider is skipped. Half-open, the next cloud attempt or health check is the
    probe: an answer closes the breaker, a connection error opens it again.
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

    def settle(self, permit: Permit | None, err: BaseException | None) -> None:
        """One attempt's outcome. Only a probe's connection error counts here; others wait for the provider's
        retries to end (:meth:`gave_up`), so one refused connection is not yet a network that is down."""
        if permit is None:
            return
        if err is None or isinstance(err, HttpStatusError | UnusableAnswer):
            self._streak.clear()
            permit.success()
        elif permit.probe and is_unreachable(err):
            permit.failure()
        else:
            permit.ignore()

    def gave_up(self, provider: str, err: BaseException) -> None:
        """A cloud provider failed a request; a witness if its last attempt could not connect."""
        if not is_unreachable(err) or provider in self._streak:
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
            await self._persist(req)
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
        limited: list[tuple[float, int, Slot]] = []
        for slot in self.order():
            reason = self._skip_reason(slot, req)
            if reason is not None:
                self._skip(slot, req, reason)
                continue
            result = await self._ask(slot, req, wait=False)
            if isinstance(result, _Answered):
                return self._answered(req, slot, result)
            if isinstance(result, float):
                limited.append((result, len(limited), slot))
            if req.declined is not None:
                return None  # the model says the text is no command: the others would say so too, and cost more
        # Every provider failed or was limited: wait for the one whose limit frees first, if that fits the deadline.
        for wait_s, _, slot in sorted(limited):
            if self._clock.monotonic() + wait_s + MIN_ATTEMPT_S >= req.cloud_deadline:
                break
            if self._skip_reason(slot, req) is None:
                result = await self._ask(slot, req, wait=True)
                if isinstance(result, _Answered):
                    return self._answered(req, slot, result)
            break
        return None

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

    async def _ask(self, slot: Slot, req: _Request, *, wait: bool) -> _Answered | float | None:
        """One provider under its retry policy: the answer, the wait its rate limit asks (limited before any
        call), or None (failed, or declined: ``req.declined`` is set)."""
        entry: dict[str, Any] = {"provider": slot.name, "model": slot.cfg.model, "attempts": 0}
        req.tried.append(entry)
        started = self._clock.monotonic()

        async def attempt() -> tuple[Answer, Completion, Command | None]:
            now = self._clock.monotonic()
            remaining = req.cloud_deadline - now
            if remaining < MIN_ATTEMPT_S:
                raise DeadlineExceeded(f"{slot.name}: the request's deadline leaves no time for another attempt")
            conn = self.connectivity.permit() if slot.cloud else None
            try:
                permit = slot.breaker.permit()
            except CircuitOpenError:
                if conn is not None:
                    conn.ignore()
                raise
            try:
                await self._take_rate(slot, req, wait=wait and entry["attempts"] == 0)
            except BaseException:
                permit.ignore()
                if conn is not None:
                    conn.ignore()
                raise
            entry["attempts"] += 1
            req.attempts += 1
            return await self._call(slot, req, permit, conn, remaining)

        try:
            answer, completion, command = await slot.policy.call(attempt, deadline=req.cloud_deadline - MIN_ATTEMPT_S)
        except RateLimited as err:
            if entry["attempts"] == 0:
                req.tried.pop()
                self._skip(slot, req, "rate_limited", err.retry_after_s)
                return err.retry_after_s
            self._failed(slot, entry, err, started)
            return None
        except CircuitOpenError as err:
            if entry["attempts"] == 0:
                req.tried.pop()
                self._skip(
                    slot, req, "offline" if err.details.get("breaker") == "interpret:connectivity" else "circuit_open"
                )
            else:
                self._failed(slot, entry, err, started)
            return None
        except DeadlineExceeded as err:
            if entry["attempts"] == 0:
                req.tried.pop()
                self._skip(slot, req, "deadline")
            else:
                self._failed(slot, entry, err, started)
            return None
        except Exception as err:  # HttpStatusError, UnusableAnswer, RetryExhausted, anything a provider raised
            self._failed(slot, entry, err, started)
            return None
        entry["latency_ms"] = round((self._clock.monotonic() - started) * 1000, 3)
        if answer.kind == "declined":
            entry["outcome"] = "declined"
            entry["reason"] = answer.reason
            req.declined = answer.reason or "the model found no command in the text"
            return None
        assert command is not None
        entry["outcome"] = "answered"
        return _Answered(command, completion.model)

    async def _take_rate(self, slot: Slot, req: _Request, *, wait: bool) -> None:
        tokens = slot.tpm.peek(req.tokens_in + slot.cfg.max_tokens + slot.reserved_tokens)
        if not tokens.allowed:
            raise tokens.refusal(slot.tpm.name)
        if wait:
            await slot.rpm.acquire(deadline=req.cloud_deadline - MIN_ATTEMPT_S)
            return
        decision = slot.rpm.try_acquire()
        if not decision.allowed:
            raise decision.refusal(slot.rpm.name)

    async def _call(
        self, slot: Slot, req: _Request, permit: Permit, conn: Permit | None, remaining: float
    ) -> tuple[Answer, Completion, Command | None]:
        """One HTTP attempt, its outcome told to the breakers, the limits, the ledger and the metrics."""
        timeout_s = min(slot.cfg.timeout_s, remaining)
        timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=min(timeout_s, slot.cfg.connect_timeout_s))
        started = self._clock.monotonic()
        estimate = req.tokens_in + slot.cfg.max_tokens
        slot.reserved_tokens += estimate
        try:
            completion = await slot.provider.complete(
                self._session, replace(req.prompt, max_tokens=slot.cfg.max_tokens), timeout
            )
        except Exception as err:
            cut_short = isinstance(err, TimeoutError) and timeout_s < slot.cfg.timeout_s
            if cut_short:  # a timeout the request's deadline imposed says nothing about the provider
                permit.ignore()
            else:
                permit.failure()
            self.connectivity.settle(conn, err)
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
            permit.ignore()
            if conn is not None:
                conn.ignore()
            raise
        finally:
            slot.reserved_tokens -= estimate
        elapsed = self._clock.monotonic() - started
        self.connectivity.settle(conn, None)
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
        PROVIDER_CALLS.labels(slot.name, "declined" if command is None else "answered").inc()
        return answer, completion, command

    def _failed(self, slot: Slot, entry: dict[str, Any], err: Exception, started: float) -> None:
        last = err.last_error if isinstance(err, RetryExhausted) else err
        if slot.cloud:
            self.connectivity.gave_up(slot.name, last)
        entry["outcome"] = "failed"
        entry["error"] = last.code if isinstance(last, GatewayError) else type(last).__name__
        if isinstance(last, HttpStatusError):
            entry["http_status"] = last.http_status
        entry["message"] = str(last)[:200]
        entry["latency_ms"] = round((self._clock.monotonic() - started) * 1000, 3)
        log.warning(
            "provider_failed",
            provider=slot.name,
            attempts=entry["attempts"],
            error=entry["error"],
            http_status=entry.get("http_status"),
            reason=err.reason if isinstance(err, RetryExhausted) else None,
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

    async def _persist(self, req: _Request) -> None:
        """The request's spend rows and cache entry, in one store job."""
        if self._store is None or (not req.spend and req.cache_entry is None):
            return
        rows, entry, cache = list(req.spend), req.cache_entry, self.cache

        def job(conn: Any) -> None:
            if rows:
                SpendLedger.insert(conn, rows)
            if entry is not None and cache is not None:
                cache.put(conn, entry)

        try:
            await self._store.write(job)
        except StoreUnavailable as err:
            log.warning("interpret_spend_not_saved", error=err.message, rows=len(rows))

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
            self.connectivity.settle(conn, err)
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
            self.connectivity.settle(conn, None)
            if health.ok is False:
                log.info("provider_healthy", provider=slot.name)
            health.ok, health.error, health.info = True, None, info
        health.checked_at = wall()
        health.latency_ms = round((self._clock.monotonic() - started) * 1000, 1)
        PROVIDER_HEALTHY.labels(slot.name).set(1 if health.ok else 0)
        return health
