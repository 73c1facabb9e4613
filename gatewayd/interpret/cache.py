"""The prompt cache: a provider's answer to a text, kept in SQLite so it survives a restart.

The key is the hash of the prompt version, the registry digest (devices, profiles, names), the provider and its
model, and the normalised text: the same words to the same model about the same devices. A profile or device
change makes a new digest, so older rows can never match again, and :meth:`PromptCache.purge` deletes them. Rows
live ``ttl_s`` of wall-clock time (monotonic time does not survive a reboot); a row created "in the future" (the
clock was stepped back) is not trusted. Only provider answers are cached, never the local rules' (they cost
nothing and must not stand in for a provider that has come back). Whatever the cache returns is validated again
before it runs.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from gatewayd.interpret.metrics import CACHE_LOOKUPS, CACHE_SAVED
from gatewayd.interpret.registry import PROMPT_VERSION
from gatewayd.store import Store
from gatewayd.store import interpret as sql


def cache_key(text: str, registry: str, provider: str, model: str) -> str:
    material = f"{PROMPT_VERSION}\x1f{registry}\x1f{provider}\x1f{model}\x1f{text}"
    return hashlib.sha256(material.encode()).hexdigest()


@dataclass(frozen=True)
class Hit:
    key: str
    provider: str
    model: str
    command: dict[str, Any]
    cost: float
    created_at: float


@dataclass(frozen=True)
class Entry:
    key: str
    registry: str
    provider: str
    model: str
    text: str
    command: dict[str, Any]
    cost: float
    created_at: float
    expires_at: float


class PromptCache:
    def __init__(self, store: Store, *, ttl_s: float, max_entries: int, wall: Callable[[], float]):
        self._store = store
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._wall = wall
        self.hits = 0
        self.misses = 0
        self.saved = 0.0
        # Every key that may be in the table (a superset: a row deleted, evicted or expired stays in it until the
        # next start), or None until load(). A text none of whose keys is here is a miss without asking SQLite:
        # every request the local rules answer while no provider has answered it (offline, no keys, a refusal)
        # is one, and a read is a hop to the reader thread, the largest part of a local answer's latency.
        self._known: set[str] | None = None

    async def load(self) -> None:
        """Read the keys present (at start): from now on a lookup of an absent key costs nothing."""
        self._known = set(await self._store.read(sql.cache_keys))

    @property
    def enabled(self) -> bool:
        return self.ttl_s > 0

    async def lookup(self, text: str, registry: str, candidates: Sequence[tuple[str, str]]) -> Hit | None:
        """The freshest live row for any of the (provider, model) pairs, the first pair's preferred."""
        if not self.enabled or not candidates:
            return None
        keys = {cache_key(text, registry, p, m): rank for rank, (p, m) in enumerate(candidates)}
        known = self._known
        if known is not None and known.isdisjoint(keys):
            return None
        now = self._wall()

        rows = await self._store.read(lambda c: sql.cache_rows(c, list(keys), now))
        for row in sorted(rows, key=lambda r: keys[r["key"]]):
            try:
                command = json.loads(row["command"])
            except ValueError:
                continue  # an unreadable row is a miss; the next answer overwrites it
            return Hit(row["key"], row["provider"], row["model"], command, float(row["cost"]), float(row["created_at"]))
        return None

    def count(self, hit: Hit | None) -> None:
        if hit is None:
            self.misses += 1
            CACHE_LOOKUPS.labels("miss").inc()
        else:
            self.hits += 1
            self.saved += hit.cost
            CACHE_LOOKUPS.labels("hit").inc()
            CACHE_SAVED.inc(hit.cost)

    def entry(
        self, text: str, registry: str, provider: str, model: str, command: dict[str, Any], cost: float
    ) -> Entry | None:
        if not self.enabled:
            return None
        now = self._wall()
        return Entry(
            cache_key(text, registry, provider, model),
            registry,
            provider,
            model,
            text,
            command,
            cost,
            now,
            now + self.ttl_s,
        )

    def put(self, conn: sqlite3.Connection, entry: Entry) -> None:
        """Inside a store job: insert or replace, then keep at most ``max_entries`` (the oldest go first)."""
        values = (
            entry.key,
            entry.registry,
            entry.provider,
            entry.model,
            entry.text,
            json.dumps(entry.command, sort_keys=True),
            entry.cost,
            entry.created_at,
            entry.expires_at,
        )
        sql.cache_put(conn, values, self.max_entries)
        if self._known is not None:
            self._known.add(entry.key)  # before the commit: a lookup meanwhile reads the table, and finds it or not

    async def drop(self, key: str) -> None:
        await self._store.write(lambda c: sql.cache_drop(c, key))

    async def purge(self, registry: str) -> int:
        """Delete rows of any other registry digest and expired rows; returns how many went."""
        now = self._wall()

        return await self._store.write(lambda c: sql.cache_purge(c, registry, now))

    async def size(self) -> int:
        return await self._store.read(sql.cache_count)

    def stats(self) -> dict[str, Any]:
        lookups = self.hits + self.misses
        return {
            "enabled": self.enabled,
            "ttl_s": self.ttl_s,
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": round(self.hits / lookups, 4) if lookups else None,
            "cost_saved": round(self.saved, 6),
        }
