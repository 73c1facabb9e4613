"""Command history is bounded: finished commands past ``[commands] keep_final_s`` or beyond the newest ``keep_max``
are deleted with their transitions, so months of traffic do not fill the SD card; open commands and those with a
pending follow-up are never touched."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from gatewayd.commands.model import CommandRecord, Priority, State, Transition
from gatewayd.store import Store
from gatewayd.store import commands as sql

from .conftest import Daemon, http, wait_until

DAY = 86_400.0


def record(cid: str, state: State, updated_at: float) -> CommandRecord:
    return CommandRecord(
        id=cid,
        device="pump1",
        action="read",
        params={},
        priority=Priority.NORMAL,
        source="test",
        user=None,
        state=state,
        created_at=updated_at - 1,
        ttl_s=300.0,
        deadline_at=updated_at + 299,
        deadline_mono=0.0,
        boot_id="b",
        updated_at=updated_at,
    )


def ids(conn: sqlite3.Connection) -> set[str]:
    return {r[0] for r in conn.execute("SELECT id FROM commands")}


async def test_old_finished_commands_go_open_ones_and_pending_followups_stay(tmp_path: Path) -> None:
    now = time.time()
    rows = [
        ("old-done", State.SUCCEEDED, now - 9 * DAY),
        ("old-failed", State.FAILED, now - 8 * DAY),
        ("old-open", State.QUEUED, now - 9 * DAY),  # a week-long ttl, still waiting for its device
        ("old-with-followup", State.SUCCEEDED, now - 9 * DAY),  # "on for 10 days": its off is still due
        ("new-done", State.SUCCEEDED, now - 60),
    ]
    async with Store(tmp_path / "g.db") as store:

        def fill(conn: sqlite3.Connection) -> None:
            for cid, state, at in rows:
                sql.insert(conn, record(cid, state, at), [Transition(State.RECEIVED, at, 0.0, "b")])
                conn.execute(
                    "INSERT INTO transitions (command_seq, state, at, mono, boot_id) "
                    "SELECT seq, ?, ?, 0, 'b' FROM commands WHERE id = ?",
                    (state.value, at, cid),
                )
            conn.execute(
                "INSERT INTO scheduled_actions (id, kind, device, action, priority, source, after, delay_s, state, "
                "due_at, created_at, updated_at) VALUES ('s1', 'on_period', 'relay1', 'off', 1, 'interpret', "
                "'old-with-followup', 864000, 'armed', ?, ?, ?)",
                (now + DAY, now - 9 * DAY, now - 9 * DAY),
            )

        await store.write(fill)
        deleted = await store.write(lambda c: sql.prune(c, older_than=now - 7 * DAY, keep_max=1000, batch=500))
        assert deleted == 2
        assert await store.read(ids) == {"old-open", "old-with-followup", "new-done"}
        orphans = await store.read(
            lambda c: c.execute(
                "SELECT count(*) FROM transitions WHERE command_seq NOT IN (SELECT seq FROM commands)"
            ).fetchone()[0]
        )
        assert orphans == 0  # the transitions went with their commands
        again = await store.write(lambda c: sql.prune(c, older_than=now - 7 * DAY, keep_max=1000, batch=500))
        assert again == 0


async def test_the_count_cap_keeps_the_newest_and_works_in_batches(tmp_path: Path) -> None:
    now = time.time()
    async with Store(tmp_path / "g.db") as store:

        def fill(conn: sqlite3.Connection) -> None:
            for i in range(1200):
                state = State.QUEUED if i in (5, 700) else State.SUCCEEDED
                sql.insert(conn, record(f"c{i:04d}", state, now - 60), [Transition(State.RECEIVED, now, 0.0, "b")])

        await store.write(fill)
        passes = []
        while True:  # what CommandService.prune does: a batch per store job until a short one
            n = await store.write(lambda c: sql.prune(c, older_than=now - DAY, keep_max=300, batch=250))
            passes.append(n)
            if n < 250:
                break
        left = await store.read(ids)
        # The newest 300 rows stay; of the 900 before them, all but the two still open are deleted.
        assert left == {f"c{i:04d}" for i in range(900, 1200)} | {"c0005", "c0700"}
        assert sum(passes) == 898 and passes[:3] == [250, 250, 250]


def scalar(path: Path, query: str) -> int:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return int(conn.execute(query).fetchone()[0])
    finally:
        conn.close()


def metric(d: Daemon, name: str) -> float:
    _, text, _ = http("GET", f"{d.url}/metrics")
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def send_round(d: Daemon, tag: str, n: int) -> list[str]:
    sent = []
    for i in range(n):
        cid = f"{tag}-{i:04d}"
        status, body, _ = d.post({"id": cid, "device": "relay1", "action": "on" if i % 2 else "off"})
        assert status == 202, body
        sent.append(cid)
    d.wait_final(sent[-1], timeout=30)
    return sent


def test_a_busy_daemon_keeps_its_database_from_growing(make_daemon: Any, broker: Any) -> None:
    broker.start()  # the results leave the outbox as they do in the field: only the command history could grow
    keep = 200
    d: Daemon = make_daemon(
        {
            "GATEWAYD_MQTT__PORT": str(broker.port),
            "GATEWAYD_COMMANDS__KEEP_MAX": str(keep),
            "GATEWAYD_COMMANDS__PRUNE_INTERVAL_S": "0.2",
        }
    )
    d.start()
    db = d.data_dir / "gatewayd.sqlite3"
    used: list[int] = []  # pages holding data
    pages: list[int] = []  # the file's size in pages, free ones included
    for r in range(5):
        sent = send_round(d, f"r{r}", 400)
        wait_until(lambda: len(d.get(f"/api/v1/commands?limit={keep * 3}")[1]["commands"]) <= keep + 10, 10, "prune")
        wait_until(lambda: d.get("/api/v1/outbox")[1]["rows"] == 0, 20, "the results on the broker")
        status, listing = d.get(f"/api/v1/commands?limit={keep * 3}")
        assert status == 200
        assert keep <= len(listing["commands"]) <= keep + 10, len(listing["commands"])
        assert d.command(sent[-1])["state"] == "succeeded"  # the newest stay readable
        assert d.get(f"/api/v1/commands/{sent[0]}")[0] == 404  # the oldest are gone
        used.append(scalar(db, "SELECT page_count - freelist_count FROM pragma_page_count, pragma_freelist_count"))
        pages.append(scalar(db, "SELECT page_count FROM pragma_page_count"))
    pruned = metric(d, "gatewayd_commands_pruned_total")
    assert 2000 - keep - 10 <= pruned <= 2000 - keep
    # 2,000 commands sent, 200 kept: the pages in use stay where the first rounds left them, the rest reused. The
    # file reaches its working size by the third round (the first starts from an empty history, the second's peak
    # depends on how far the pruner got during the burst) and does not grow after it.
    assert used[4] <= used[1] * 1.1 and pages[4] <= pages[2] * 1.1, (used, pages)
    assert scalar(db, "SELECT count(*) FROM transitions WHERE command_seq NOT IN (SELECT seq FROM commands)") == 0
    assert d.stop() == 0
