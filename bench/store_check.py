"""Benchmark of what the store's lost-file check and commit confirmation cost each commit.

The writer compares the identity (st_dev, st_ino) of the database, its -wal and its -shm with the one recorded at
open, before and after every COMMIT (gatewayd/store/lost.py: three ``os.stat`` calls each time, so six per
commit), and after a durable COMMIT looks at the read-only flag (``unwritable``: statvfs, access, opening the WAL)
and gives the WAL a full ``fsync`` when the commit made it longer (Store._confirm). This times the two checks on a
real open store (``--checks`` calls, the garbage collector off) and, for scale, the latency of a one-row durable
write through the store (``synchronous=full``), on the same filesystem: while the WAL grows (each commit pays the
extra fsync) and once it is reused from the start after a checkpoint (none). Run it where the daemon's data lives
(``--dir``, default ``./var``) to measure that disk.

    .venv/bin/python bench/store_check.py [--dir ./var] [--checks 100000] [--writes 300] [--runs 5]

Exit status: 0 measured; 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import report  # bench/report.py: the script's own directory is on sys.path

from gatewayd.store import Store
from gatewayd.store import lost as lost_file

ROOT = Path(__file__).resolve().parent.parent
CHECKS_PER_COMMIT = 2  # identity checks: before COMMIT and after it
WAL_PAGES = 1_200  # a blob this many 4 KiB pages long makes the commit's auto-checkpoint reset the WAL


@dataclass
class Run:
    run: int
    check_us: float  # one identity check (three stats)
    writable_us: float  # one read-only look (statvfs, access, open and close of the WAL)
    per_commit_us: float  # what each durable commit pays for both
    growing_ms: float  # median latency of one durable one-row write while the WAL grows (an fsync more)
    write_ms: float  # the same once the WAL is reused from its start
    share_pct: float  # per_commit_us as a share of that write


async def one_run(n: int, directory: Path, checks: int, writes: int) -> Run:
    with tempfile.TemporaryDirectory(dir=directory, prefix="store-check-") as tmp:
        path = Path(tmp) / "gatewayd.sqlite3"
        async with Store(path, synchronous="full") as store:
            await store.write(lambda c: c.execute("CREATE TABLE scratch (n INTEGER PRIMARY KEY)"))
            identity = lost_file.identify(path)
            assert len(identity) == 3, identity  # the database, its WAL and its shm, as the writer checks them
            gc.disable()
            try:
                started = time.perf_counter_ns()
                for _ in range(checks):
                    lost_file.moved(path, identity)
                check_ns = (time.perf_counter_ns() - started) / checks
                started = time.perf_counter_ns()
                for _ in range(checks):
                    lost_file.unwritable(path)
                writable_ns = (time.perf_counter_ns() - started) / checks
            finally:
                gc.enable()

            async def timed(base: int) -> float:
                latencies = []
                for i in range(base, base + writes):
                    t = time.perf_counter_ns()
                    await store.write(lambda c, i=i: c.execute("INSERT INTO scratch (n) VALUES (?)", (i,)))
                    latencies.append(time.perf_counter_ns() - t)
                return statistics.median(latencies)

            growing_ns = await timed(0)
            await store.write(lambda c: c.execute("CREATE TABLE filler (b BLOB)"))
            await store.write(lambda c: c.execute("INSERT INTO filler VALUES (zeroblob(?))", (WAL_PAGES * 4096,)))
            await store.write(lambda c: c.execute("DELETE FROM filler"))
            write_ns = await timed(writes)
    per_commit_ns = check_ns * CHECKS_PER_COMMIT + writable_ns
    return Run(
        n,
        check_ns / 1000,
        writable_ns / 1000,
        per_commit_ns / 1000,
        growing_ns / 1e6,
        write_ns / 1e6,
        100 * per_commit_ns / write_ns,
    )


ROWS = [
    ("identity check, 3 stats (us)", "check_us", "{:.2f}"),
    ("read-only look (us)", "writable_us", "{:.2f}"),
    ("per durable commit, both (us)", "per_commit_us", "{:.2f}"),
    ("durable 1-row write, WAL growing (ms)", "growing_ms", "{:.3f}"),
    ("durable 1-row write, WAL reused (ms)", "write_ms", "{:.3f}"),
    ("check share of a write (%)", "share_pct", "{:.2f}"),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--dir", type=Path, default=ROOT / "var", help="where the database goes (default ./var)")
    parser.add_argument("--checks", type=int, default=100_000, help="identity checks timed per run (default 100000)")
    parser.add_argument("--writes", type=int, default=300, help="durable writes timed per run (default 300)")
    parser.add_argument("--runs", type=int, default=5, help="runs; the table shows their median (default 5)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures as JSON to PATH")
    args = parser.parse_args(argv)
    for name, hi in (("checks", 10_000_000), ("writes", 100_000), ("runs", 50)):
        if not 1 <= getattr(args, name) <= hi:
            parser.error(f"--{name} must be from 1 to {hi}")
    args.dir.mkdir(parents=True, exist_ok=True)
    results = [asyncio.run(one_run(n, args.dir, args.checks, args.writes)) for n in range(1, args.runs + 1)]
    machine = report.machine_info()
    load = f"{args.checks} checks and {args.writes} writes per run, {args.runs} run(s), database in {args.dir}"
    lines = report.header("gatewayd store lost-file check benchmark", machine, load)
    lines += report.runs_table(ROWS, results)
    print("\n".join(lines))
    runs = [{name: getattr(r, name) for _, name, _ in ROWS} for r in results]
    report.write_json(args.json, machine, vars(args), runs, report.medians(ROWS, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
