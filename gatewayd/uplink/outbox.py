"""The outbox's one owner on the event loop: what waits to be sent upstream (results, events, telemetry).

Four components put rows in or take them out: the recorder (telemetry and events), the dispatcher (a command's
result, in the transaction of its final state), the intake (a result sent again for a repeated command) and the
uplink (it reads the next rows and deletes what the broker acknowledged). Each goes through here, so after every
commit that changed the outbox its figures (depth, bytes, oldest) are the ones on the page, in /metrics and in the
recorder's budget, and the uplink is woken by every row added, whoever added it. The SQL is in
``gatewayd.store.outbox``; a writer whose rows must share a transaction with other work (the dispatcher's final
state, the recorder's budget) inserts them in its own job, ends the job with ``store.outbox.stats`` and hands those
figures to :meth:`Outbox.added` once the transaction is committed.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

from gatewayd.observability.metrics import OUTBOX_BYTES, OUTBOX_OLDEST_AGE, OUTBOX_ROWS
from gatewayd.store import Store
from gatewayd.store import outbox as sql


class Outbox:
    def __init__(self, store: Store, now: Callable[[], float]):
        """``now``: the current time on the clock that stamps the rows (the recorder's stamper), for the age of
        the oldest."""
        self.store = store
        self._now = now
        self.stats: sql.OutboxStats | None = None  # None until the first refresh()
        self.listeners: list[Callable[[], None]] = []  # told after rows were added (the uplink drains)
        self.stats_listeners: list[Callable[[sql.OutboxStats], None]] = []  # told after every change

    # --- writing ----------------------------------------------------------------------------------------------

    def added(self, stats: sql.OutboxStats) -> None:
        """Rows were committed to the outbox (``stats``: read in the same transaction): new figures, and the uplink
        is woken."""
        self._changed(stats)
        for listener in list(self.listeners):
            listener()

    async def add(self, rows: Sequence[sql.NewRow]) -> list[int]:
        """Add ``rows`` in a transaction of their own (durable). Raises what the store raises (StorageFull...)."""
        ids, stats = await self.store.write(lambda conn: (sql.insert(conn, rows), sql.stats(conn)))
        self.added(stats)
        return ids

    async def delete(self, keys: Collection[sql.Key]) -> sql.OutboxStats:
        """Delete rows the broker acknowledged. Not synced on its own (lost on power failure, they are sent again);
        the next durable commit syncs it."""
        stats = await self.store.write(lambda c: (sql.delete(c, keys), sql.stats(c))[1], durable=False)
        return self._changed(stats)

    # --- reading ----------------------------------------------------------------------------------------------

    async def fetch(self, limit: int, *, skip: Collection[sql.Key] = ()) -> list[sql.OutboxRow]:
        """The next ``limit`` rows in send order, leaving out ``skip``."""
        return await self.store.read(lambda conn: sql.fetch(conn, limit, skip=skip))

    async def refresh(self) -> sql.OutboxStats:
        """The figures, read now (from the counters: no scan): at start, an outage's backlog from before the
        restart; the API's look at the outbox."""
        return self._changed(await self.store.read(sql.stats))

    def _changed(self, stats: sql.OutboxStats) -> sql.OutboxStats:
        self.stats = stats
        OUTBOX_ROWS.set(stats.rows)
        OUTBOX_BYTES.set(stats.bytes)
        OUTBOX_OLDEST_AGE.set(0 if stats.oldest_ts is None else max(0.0, self._now() - stats.oldest_ts))
        for listener in list(self.stats_listeners):
            listener(stats)
        return stats
