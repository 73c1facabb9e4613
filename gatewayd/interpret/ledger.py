"""The spend ledger: tokens in and out of every provider call that reported them, times the configured prices.

Each billed call is one row in ``interpret_spend``, written in the same store job as the request's cache entry.
The day's total is also kept in memory, counted the moment a call returns (before its row is committed), so
concurrent requests see each other's spend against the daily budget. The day is the UTC date of the wall clock;
on start the total is read back from the rows of that day.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from gatewayd.config.models import ProviderConfig
from gatewayd.errors import StoreUnavailable
from gatewayd.interpret.metrics import SPEND, SPEND_TODAY, TOKENS
from gatewayd.interpret.providers import Usage
from gatewayd.store import Store
from gatewayd.store import interpret as sql

log = structlog.get_logger("gatewayd.interpret")

KEEP_DAYS = 400  # rows older than this are deleted on start


def cost_of(cfg: ProviderConfig, tokens_in: float, tokens_out: float) -> float:
    return (tokens_in * cfg.price_in_per_mtok + tokens_out * cfg.price_out_per_mtok) / 1e6


def utc_day(wall: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(wall))


@dataclass(frozen=True)
class SpendRow:
    at: float
    day: str
    provider: str
    model: str
    tokens_in: int
    tokens_out: int
    cost: float
    estimated: bool


class SpendLedger:
    def __init__(self, store: Store, *, budget: float | None, wall: Callable[[], float]):
        self._store = store
        self.budget = budget
        self._wall = wall
        self._day = utc_day(wall())
        self._today: dict[str, float] = {}  # provider -> spend today

    async def load(self) -> None:
        day = utc_day(self._wall())
        horizon = utc_day(self._wall() - KEEP_DAYS * 86_400)

        def job(conn: sqlite3.Connection) -> list[tuple[str, float]]:
            sql.prune_spend(conn, horizon)
            return sql.spend_by_provider(conn, day)

        try:
            totals = await self._store.write(job)
        except StoreUnavailable as err:  # a full disk must not stop the start: old rows go at the next one
            log.warning("interpret_spend_not_pruned", error=err.message)
            totals = await self._store.read(lambda c: sql.spend_by_provider(c, day))
        self._day, self._today = day, dict(totals)
        SPEND_TODAY.set(self.today())

    def _roll(self) -> None:
        day = utc_day(self._wall())
        if day != self._day:
            self._day, self._today = day, {}

    def today(self, provider: str | None = None) -> float:
        self._roll()
        if provider is not None:
            return self._today.get(provider, 0.0)
        return sum(self._today.values())

    def allows(self, cost: float) -> bool:
        """Whether a call estimated at ``cost`` fits what is left of today's budget (a free call always does)."""
        if self.budget is None or cost <= 0:
            return True
        return self.today() + cost <= self.budget

    @property
    def exhausted(self) -> bool:
        return self.budget is not None and self.today() >= self.budget

    def record(self, name: str, cfg: ProviderConfig, model: str, usage: Usage) -> SpendRow:
        """Count a billed call now; the returned row goes to the store with the request's other writes."""
        self._roll()
        cost = cost_of(cfg, usage.tokens_in, usage.tokens_out)
        self._today[name] = self._today.get(name, 0.0) + cost
        TOKENS.labels(name, "in").inc(usage.tokens_in)
        TOKENS.labels(name, "out").inc(usage.tokens_out)
        SPEND.labels(name).inc(cost)
        SPEND_TODAY.set(self.today())
        now = self._wall()
        return SpendRow(now, utc_day(now), name, model, usage.tokens_in, usage.tokens_out, cost, not usage.reported)

    @staticmethod
    def insert(conn: sqlite3.Connection, rows: list[SpendRow]) -> None:
        values = [(r.at, r.day, r.provider, r.model, r.tokens_in, r.tokens_out, r.cost, int(r.estimated)) for r in rows]
        sql.insert_spend(conn, values)

    async def totals(self, day: str | None = None) -> dict[str, dict[str, Any]]:
        """Per provider for one day (default today): calls, tokens and cost, as committed to the store."""
        when = day or utc_day(self._wall())
        return await self._store.read(lambda c: sql.spend_totals(c, when))

    def stats(self) -> dict[str, Any]:
        today = self.today()
        return {
            "day": self._day,
            "today": round(today, 6),
            "by_provider": {k: round(v, 6) for k, v in sorted(self._today.items())},
            "daily_budget": self.budget,
            "exhausted": self.exhausted,
        }
