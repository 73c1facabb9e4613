"""What the outbox's SQLite settings cost the SD card: bytes written per datapoint kept through an outage.

The pattern is the one write-behind leaves (issue 19): while the broker is away, readings are written once a
second in one transaction (``--per-batch`` readings of 10 datapoints each: 10 Modbus units polled every 100 ms);
when it is back, the rows are deleted as the broker acknowledges them, in batches of 512. Each combination of
``page_size``, ``wal_autocheckpoint`` and the ``synchronous`` level of the deletes (inserts are always FULL, the
durability contract) runs on a fresh database in ``--dir`` through gatewayd's own migrations and outbox SQL, and
the bytes this process wrote to disk (write_bytes, /proc/self/io: the WAL, the checkpoints into the database) are
divided by the datapoints kept. Run it where the daemon's data lives (``--dir``) to measure that disk.

    .venv/bin/python bench/store_pragmas.py [--dir ./var] [--batches 60] [--per-batch 100]

Exit status 0. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import json
import logging
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import structlog
from daemon import proc_write_bytes  # bench/daemon.py: the script's own directory is on sys.path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gatewayd.store import outbox  # noqa: E402
from gatewayd.store.db import _migrate  # noqa: E402

DATAPOINTS_PER_READING = 10


def reading(unit: int, n: int) -> str:
    values = {f"r{i}": (n * 7 + i) % 65536 for i in range(DATAPOINTS_PER_READING)}
    return json.dumps({"device": f"unit{unit}", "values": values}, separators=(",", ":"))


def one(directory: Path, page_size: int, autocheckpoint: int, delete_sync: str, batches: int, per: int) -> float:
    path = directory / f"p{page_size}-a{autocheckpoint}-{delete_sync}.sqlite3"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(f"PRAGMA page_size = {page_size}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA wal_autocheckpoint = {autocheckpoint}")
    _migrate(conn, path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    before = proc_write_bytes()
    mono, n = time.monotonic(), 0
    for _ in range(batches):
        rows = []
        for _ in range(per):
            rows.append(
                outbox.NewRow("telemetry", 2, f"unit{n % 10}", f"telemetry/unit{n % 10}", reading(n % 10, n),
                              time.time(), mono, "bench", True)
            )  # fmt: skip
            n += 1
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("BEGIN IMMEDIATE")
        outbox.insert(conn, rows)
        conn.execute("COMMIT")
    conn.execute(f"PRAGMA synchronous = {delete_sync}")
    while True:
        keys = [r.key for r in outbox.fetch(conn, 512)]
        if not keys:
            break
        conn.execute("BEGIN IMMEDIATE")
        outbox.delete(conn, keys)
        conn.execute("COMMIT")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("BEGIN IMMEDIATE")  # the next durable commit after the deletes (it syncs them along)
    conn.execute("UPDATE outbox_counters SET value = value WHERE name = 'rows'")
    conn.execute("COMMIT")
    conn.close()  # the last connection: checkpointed into the database
    return (proc_write_bytes() - before) / (n * DATAPOINTS_PER_READING)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, help="where the databases are made (default: a temporary directory)")
    parser.add_argument("--batches", type=int, default=60, help="transactions of readings (seconds of outage)")
    parser.add_argument("--per-batch", type=int, default=100, help="readings per transaction")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))  # no migration lines
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        print(f"bytes written per datapoint kept: {args.batches} transactions of {args.per_batch} readings "
              f"({DATAPOINTS_PER_READING} datapoints each), deleted 512 rows at a time")  # fmt: skip
        print(f"{'page_size':>9} {'autocheckpoint':>14} {'deletes':>8} {'bytes/dp':>9}")
        for page_size in (1024, 4096, 16384):
            for autocheckpoint in (1000, 10000):
                for delete_sync in ("FULL", "NORMAL"):
                    per_dp = one(Path(tmp), page_size, autocheckpoint, delete_sync, args.batches, args.per_batch)
                    print(f"{page_size:>9} {autocheckpoint:>14} {delete_sync:>8} {per_dp:>9.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
