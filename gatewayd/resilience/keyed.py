"""Token buckets per key (user, device, provider, endpoint), with per-key overrides and tiers, and a bound on
how many keys are remembered.

Memory is bounded by ``max_keys``. When a new key arrives at the bound, the limiter looks at the ``scan`` least
recently used keys for an idle one (its bucket is full, so forgetting it loses nothing, or it has not been
touched for ``idle_s``) and drops the first found; failing that, it drops the least recently used key. The scan is
bounded so that a flood of new keys costs O(1) per request, not O(max_keys). Dropping a non-full key forgets its
debt: a client that churns through more keys than the bound can get more than its share, which is the price of a
memory bound; size ``max_keys`` above the number of keys expected in a refill period.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from gatewayd.observability.metrics import RATE_LIMIT_EVICTIONS, RATE_LIMIT_KEYS, counter, gauge
from gatewayd.resilience.bucket import CRITICAL, NORMAL, BucketSpec, Decision, TokenBucket, check_n, finite_number
from gatewayd.resilience.clock import REAL_CLOCK, Clock


class KeyedLimiter:
    kind = "keyed_limiter"

    def __init__(
        self,
        default: BucketSpec,
        *,
        name: str = "default",
        overrides: Mapping[str, BucketSpec] | None = None,
        tiers: Mapping[str, BucketSpec] | None = None,
        max_keys: int = 10_000,
        idle_s: float | None = None,
        scan: int = 32,
        snapshot_keys: int = 1_000,
        clock: Clock = REAL_CLOCK,
        bypass_priority: int = CRITICAL,
    ):
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self.name = name
        self.default = default
        self.overrides = dict(overrides or {})
        self.tiers = dict(tiers or {})
        self.max_keys = max_keys
        self.idle_s = idle_s
        self.scan = max(1, scan)
        self.snapshot_keys = snapshot_keys
        self.bypass_priority = bypass_priority
        self._clock = clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()  # least recently used first
        self._keys = gauge(RATE_LIMIT_KEYS, name)
        self._evicted_idle = counter(RATE_LIMIT_EVICTIONS, name, "idle")
        self._evicted_lru = counter(RATE_LIMIT_EVICTIONS, name, "lru")

    def __len__(self) -> int:
        return len(self._buckets)

    def __contains__(self, key: str) -> bool:
        return key in self._buckets

    def spec_for(self, key: str, tier: str | None = None) -> BucketSpec:
        """A per-key override wins over the tier, which wins over the default. An unknown tier is the default."""
        spec = self.overrides.get(key)
        if spec is None and tier is not None:
            spec = self.tiers.get(tier)
        return self.default if spec is None else spec

    def bucket(self, key: str, tier: str | None = None) -> TokenBucket:
        """The key's bucket, created full if new; marks the key as most recently used."""
        spec = self.spec_for(key, tier)
        found = self._buckets.get(key)
        if found is not None:
            self._buckets.move_to_end(key)
            if found.spec != spec:  # the key changed tier since its bucket was made
                found.reconfigure(spec.capacity, spec.rate)
            return found
        if len(self._buckets) >= self.max_keys:
            self._make_room()
        made = TokenBucket(
            spec.capacity, spec.rate, name=self.name, clock=self._clock, bypass_priority=self.bypass_priority
        )
        self._buckets[key] = made
        self._keys.set(len(self._buckets))
        return made

    def try_acquire(self, key: str, n: float = 1.0, *, tier: str | None = None, priority: int = NORMAL) -> Decision:
        return self.bucket(key, tier).try_acquire(n, priority=priority)

    async def acquire(
        self,
        key: str,
        n: float = 1.0,
        *,
        tier: str | None = None,
        deadline: float | None = None,
        priority: int = NORMAL,
    ) -> Decision:
        return await self.bucket(key, tier).acquire(n, deadline=deadline, priority=priority)

    def peek(self, key: str, n: float = 1.0, *, tier: str | None = None) -> Decision:
        """The key's current headers, without creating a bucket for a key never seen (that would let a scan of
        status requests push real keys out)."""
        found = self._buckets.get(key)
        if found is not None:
            return found.peek(n)
        check_n(n)
        spec = self.spec_for(key, tier)
        allowed = n <= spec.capacity
        return Decision(allowed, 0.0 if allowed else float("inf"), spec.capacity, spec.capacity, 0.0)

    def _idle(self, bucket: TokenBucket, now: float) -> bool:
        return bucket.is_full(now) or (self.idle_s is not None and now - bucket.touched_at >= self.idle_s)

    def _make_room(self) -> None:
        now = self._clock.monotonic()
        for key, bucket in itertools.islice(self._buckets.items(), self.scan):
            if self._idle(bucket, now):
                del self._buckets[key]  # leaving the loop at once: the iterator is not used again
                self._evicted_idle.inc()
                return
        self._buckets.popitem(last=False)
        self._evicted_lru.inc()

    def clear(self) -> int:
        """Forget every key (an operator's reset): each starts again with a full bucket. Returns how many."""
        n = len(self._buckets)
        self._buckets.clear()
        return n

    def sweep(self) -> int:
        """Drop every idle key; O(keys). For an owner to call now and then, not on the request path."""
        now = self._clock.monotonic()
        idle = [key for key, bucket in self._buckets.items() if self._idle(bucket, now)]
        for key in idle:
            del self._buckets[key]
        self._evicted_idle.inc(len(idle))
        self._keys.set(len(self._buckets))
        return len(idle)

    # --- persistence -------------------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Levels of the most recently used keys that are not full (a full bucket is what a new key gets anyway),
        at most ``snapshot_keys`` of them, so a flood of keys cannot make every save a large write."""
        now = self._clock.monotonic()
        keys: dict[str, Any] = {}
        for key, bucket in reversed(self._buckets.items()):
            if len(keys) >= self.snapshot_keys:
                break
            if not bucket.is_full(now):
                keys[key] = bucket.snapshot()
        return {"keys": keys}

    def restore(self, state: Mapping[str, Any], *, downtime_s: float | None = None) -> None:
        keys = state["keys"]
        if not isinstance(keys, Mapping):
            raise ValueError("keys is not an object")
        entries = []
        for key, saved in keys.items():
            if not isinstance(key, str) or not isinstance(saved, Mapping):
                raise ValueError(f"bad entry for key {key!r}")
            entries.append((key, finite_number(saved.get("tokens"), "tokens")))
        # Oldest first, so the restored recency order matches the saved one (the snapshot lists newest first).
        for key, tokens in reversed(entries):
            self.bucket(key).restore({"tokens": tokens}, downtime_s=downtime_s)
