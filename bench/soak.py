"""A bounded soak: the real daemon under moderate mixed load for a fixed time, watched for growth.

Starts a real Mosquitto (tests/mqtt_broker.py's Broker) on a free loopback port and the real daemon
(``python -m gatewayd run --config config.toml``) pointed at it, with a fresh data directory, then sends from this
process, each on its own schedule: HTTP commands to four devices (pump1 set_speed, relay1 on/off, relays1 on/off
of each channel in turn, meter1 read), MQTT commands on ``gatewayd/<id>/cmd`` (pump1 read, sensor1 set_alarm),
natural-language requests answered by the local rules, and GETs of the status page and the JSON API, a few
requests per second in all, while the sensor node reports telemetry at ``--telemetry-hz``. It subscribes to
everything the gateway publishes. Before that, a prefill (``--prefill``, 24,000 commands by default) sent as fast as
the daemon takes them brings its bounded caches to their bounds (see ``Soak.prefill``), so that what follows
measures the daemon in its steady state rather than a fresh one filling up.

Every ``--interval`` seconds it prints a row: the daemon's RSS (VmRSS), open file descriptors (/proc/PID/fd),
threads, asyncio tasks (the ``gatewayd_asyncio_tasks`` gauge on /metrics), the SQLite file and WAL sizes, commands
sent, succeeded and otherwise final (by their results on the broker), commands in the daemon's store (its history, held
at ``--keep-max`` by the daemon's pruner), the outbox, and the MQTT messages received. At the end it checks that every
command it sent is final and succeeded and that its result reached the broker, stops the daemon with SIGTERM
(exit 0 expected), and gives the verdict on growth after the warm-up (``--warmup`` of the run, 20 % by default):
the RSS trend (least-squares slope in MiB/hour, and the median of the last third minus that of the first third),
and the spread (max - min) of file descriptors and tasks, each against a printed threshold.

    .venv/bin/python bench/soak.py [--minutes 30] [--interval 30] [--json PATH]

Exit status: 0 flat and every check held; 1 growth over a threshold or a failed check; 2 bad usage; 130
interrupted (the daemon and the broker are stopped either way). Linux only (/proc); needs mosquitto.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import random
import re
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import report  # bench/report.py: the script's own directory is on sys.path
from daemon import BenchError, Daemon, proc_fds, proc_status_mib, proc_threads, scan_log

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.mqtt_broker: the broker the tests use
from tests.mqtt_broker import GW, Broker  # noqa: E402

READY_TIMEOUT_S = 30.0
REQUEST_TIMEOUT_S = 15.0
FINAL_TIMEOUT_S = 90.0  # after the load stops: every command final, every result at the broker
HTTP_CONNECTIONS = 4  # the soak's own connections to the daemon: they show in its fds and tasks
PREFILL_IN_FLIGHT = 16
PREFILL_DRAIN_TIMEOUT_S = 900.0  # the prefill's commands final and their results sent (at drain_messages_per_s)

# Flat, after the prefill and the warm-up. The RSS limits have a part per hour (a leak) and an allowance for the
# noise of a Python heap (arenas, garbage collection), which a short run cannot tell from a leak: the shorter the
# window, the larger the slope that allowance permits. What they cannot see: growth under about 2 MiB/h.
RSS_SLOPE_MIB_PER_H = 2.0
RSS_NOISE_MIB = 1.0
RSS_THIRDS_MIB = 2.0
FDS_SPREAD = HTTP_CONNECTIONS + 2  # the soak's pooled connections come and go; +2 for an MQTT/probe socket
TASKS_SPREAD = 2 * HTTP_CONNECTIONS + 4  # aiohttp: a task per connection and one per request in progress

FINAL_STATES = frozenset({"succeeded", "failed", "expired", "rejected", "cancelled"})
NL_TEXTS = (
    "set the pump speed to {n} percent",
    "read sensor 1",
    "read meter 1",
    "water gently",
    "read irrigation pump",
)
GET_PATHS = (
    "/",
    "/api/v1/devices",
    "/api/v1/stats",
    "/api/v1/commands?limit=20",
    "/api/v1/queue",
    "/api/v1/devices/sensor1/telemetry",
    "/api/v1/outbox",
    "/api/v1/providers",
    "/healthz",
)


@dataclass
class Sent:
    id: str
    channel: str  # http | mqtt | text
    device: str
    action: str


@dataclass
class Sample:
    t_s: float
    rss_mib: float
    fds: int
    threads: int
    tasks: int
    db_mib: float
    wal_mib: float
    sent: int
    succeeded: int
    other_final: int
    stored: int
    outbox_rows: int
    mqtt_results: int
    mqtt_telemetry: int
    gets: int
    errors: int


@dataclass
class Load:
    """What the soak sent and received, shared by its tasks."""

    sent: list[Sent] = field(default_factory=list)
    prefilled: list[str] = field(default_factory=list)  # ids of the warm-up burst (checked in bulk, not one by one)
    refused: list[str] = field(default_factory=list)  # "channel id: status body"
    gets: int = 0
    get_failures: Counter[str] = field(default_factory=Counter)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # command id -> last result on MQTT
    received: Counter[str] = field(default_factory=Counter)  # kind of topic -> messages
    rejected_events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def errors(self) -> int:
        return len(self.refused) + sum(self.get_failures.values())


def parse_metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    if match is None:
        raise BenchError(f"/metrics has no {name}")
    return float(match.group(1))


def file_mib(path: Path) -> float:
    return path.stat().st_size / 2**20 if path.exists() else 0.0


def slope_per_hour(ts: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over ts (seconds), per hour."""
    mt, my = statistics.fmean(ts), statistics.fmean(ys)
    den = sum((t - mt) ** 2 for t in ts)
    if den == 0:
        return math.nan
    return 3600 * sum((t - mt) * (y - my) for t, y in zip(ts, ys, strict=True)) / den


class Soak:
    def __init__(self, args: argparse.Namespace, daemon: Daemon, broker: Broker):
        self.args = args
        self.daemon = daemon
        self.broker = broker
        self.load = Load()
        self.rng = random.Random(args.seed)
        self.nonce = f"{self.rng.getrandbits(32):08x}"
        self.serial = itertools.count(1)
        self.samples: list[Sample] = []
        self.session: aiohttp.ClientSession | None = None
        self.mqtt: aiomqtt.Client | None = None
        self.started = 0.0
        self.base_results = 0  # results received when the measured load began
        self.prefill_report: dict[str, Any] = {}

    def next_id(self, kind: str) -> str:
        return f"soak-{self.nonce}-{kind}-{next(self.serial):06d}"

    # --- load --------------------------------------------------------------------------------------------------

    async def every(self, period_s: float, action: Callable[[int], Awaitable[None]], offset_s: float = 0.0) -> None:
        """``action(n)`` at start + offset + n * period (no drift), until cancelled."""
        for n in itertools.count():
            delay = self.started + offset_s + n * period_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await action(n)

    async def post(self, channel: str, body: dict[str, Any]) -> None:
        assert self.session is not None
        try:
            async with self.session.post(f"{self.daemon.url}/api/v1/commands", json=body) as resp:
                answer = await resp.json(content_type=None)
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, ValueError) as err:
            self.load.refused.append(f"{channel} {body['id']}: {type(err).__name__}: {err}")
            return
        if status == 202 and isinstance(answer, dict) and answer.get("id") == body["id"]:
            device, action = answer.get("device", "?"), answer.get("action", "?")
            self.load.sent.append(Sent(body["id"], channel, str(device), str(action)))
        else:
            self.load.refused.append(f"{channel} {body['id']}: {status} {json.dumps(answer)[:300]}")

    async def command(self, device: str, action: str, params: dict[str, Any] | None = None) -> None:
        await self.post("http", {"id": self.next_id("h"), "device": device, "action": action, "params": params or {}})

    async def text(self, n: int) -> None:
        words = NL_TEXTS[n % len(NL_TEXTS)].format(n=self.rng.randint(10, 90))
        await self.post("text", {"id": self.next_id("t"), "text": words, "user": "soak"})

    async def mqtt_command(self, device: str, action: str, params: dict[str, Any]) -> None:
        assert self.mqtt is not None
        cid = self.next_id("m")
        payload = json.dumps({"id": cid, "device": device, "action": action, "params": params})
        try:
            await self.mqtt.publish(f"{GW}/cmd", payload, qos=1, timeout=REQUEST_TIMEOUT_S)
        except aiomqtt.MqttError as err:
            self.load.refused.append(f"mqtt {cid}: {type(err).__name__}: {err}")
            return
        self.load.sent.append(Sent(cid, "mqtt", device, action))

    async def get(self, n: int) -> None:
        assert self.session is not None
        path = GET_PATHS[n % len(GET_PATHS)]
        try:
            async with self.session.get(f"{self.daemon.url}{path}") as resp:
                await resp.read()
                ok = resp.status == 200
        except (aiohttp.ClientError, TimeoutError) as err:
            self.load.get_failures[f"{path}: {type(err).__name__}"] += 1
            return
        self.load.gets += 1
        if not ok:
            self.load.get_failures[f"{path}: {resp.status}"] += 1

    def generators(self) -> list[Coroutine[Any, Any, None]]:
        """The mixed load, about 2.5 requests/s: offsets spread the schedules so they do not all fire at once.

        relays1's profile allows an actuation a second and 20 a minute: one every 5 s stays inside both, as it must
        for every command to succeed."""
        return [
            self.every(2.0, lambda n: self.command("pump1", "set_speed", {"percent": self.rng.randint(0, 100)})),
            self.every(3.0, lambda n: self.command("relay1", "on" if n % 2 == 0 else "off"), 0.3),
            self.every(5.0, lambda n: self.command("relays1", f"{'on' if n % 2 == 0 else 'off'}{n // 2 % 8 + 1}"), 0.7),
            self.every(15.0, lambda n: self.command("meter1", "read"), 1.1),
            self.every(4.0, lambda n: self.mqtt_command("pump1", "read", {}), 1.5),
            self.every(20.0, lambda n: self.mqtt_command("sensor1", "set_alarm", {"above_c": 20.0 + 5 * (n % 3)}), 1.9),
            self.every(10.0, self.text, 2.3),
            self.every(1.0, self.get, 0.5),
        ]

    async def listen(self) -> None:
        try:
            await self._listen()
        except aiomqtt.MqttError as err:  # the soak's own link to the broker: a failed check, not a crash
            self.load.refused.append(f"mqtt subscriber: {type(err).__name__}: {err}")

    async def _listen(self) -> None:
        assert self.mqtt is not None
        async for message in self.mqtt.messages:
            topic = message.topic.value
            kind = topic.removeprefix(f"{GW}/").split("/", 1)[0]
            self.load.received[kind] += 1
            payload = message.payload if isinstance(message.payload, bytes | str) else b""
            if kind == "result":
                with contextlib.suppress(ValueError):
                    self.load.results[topic.rsplit("/", 1)[1]] = json.loads(payload)
            elif kind == "events":
                with contextlib.suppress(ValueError):
                    event = json.loads(payload)
                    if isinstance(event, dict) and event.get("event") == "command_rejected":
                        self.load.rejected_events.append(event)

    # --- samples -------------------------------------------------------------------------------------------------

    async def json_get(self, path: str) -> Any:
        assert self.session is not None
        async with self.session.get(f"{self.daemon.url}{path}") as resp:
            if resp.status != 200:
                raise BenchError(f"GET {path} answered {resp.status}")
            return await resp.json()

    async def sample(self) -> Sample:
        assert self.session is not None
        if not self.daemon.alive():
            raise BenchError(f"the daemon exited (code {self.daemon.proc and self.daemon.proc.returncode})")
        pid = self.daemon.pid
        rss, fds, threads = proc_status_mib(pid, "VmRSS"), proc_fds(pid), proc_threads(pid)
        async with self.session.get(f"{self.daemon.url}/metrics") as resp:
            tasks = int(parse_metric(await resp.text(), "gatewayd_asyncio_tasks"))
        stats = await self.json_get("/api/v1/stats")
        counts: dict[str, int] = stats.get("commands", {})
        # What the broker said of the soak's commands: the store's counts include the prefill and shrink as the
        # daemon prunes its history.
        states = Counter(self.load.results[s.id].get("state") for s in self.load.sent if s.id in self.load.results)
        db = self.daemon.data_dir / "gatewayd.sqlite3"
        wal = db.with_name(db.name + "-wal")
        return Sample(
            t_s=time.monotonic() - self.started,
            rss_mib=rss,
            fds=fds,
            threads=threads,
            tasks=tasks,
            db_mib=file_mib(db),
            wal_mib=file_mib(wal),
            sent=len(self.load.sent),
            succeeded=states["succeeded"],
            other_final=sum(n for st, n in states.items() if st in FINAL_STATES and st != "succeeded"),
            stored=sum(counts.values()),
            outbox_rows=int((stats.get("outbox") or {}).get("rows", 0)),
            mqtt_results=self.load.received["result"] - self.base_results,
            mqtt_telemetry=self.load.received["telemetry"],
            gets=self.load.gets,
            errors=self.load.errors,
        )

    async def sampler(self, duration_s: float) -> None:
        print(ROW_HEAD, flush=True)
        for n in itertools.count():
            at = self.started + n * self.args.interval
            if at > self.started + duration_s + 0.5:
                return
            delay = at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            s = await self.sample()
            self.samples.append(s)
            print(row(s), flush=True)

    # --- the run -------------------------------------------------------------------------------------------------

    async def prefill(self, n: int) -> None:
        """The warm-up burst: ``n`` commands as fast as the daemon takes them (pump1 set_speed/read, relay1 on/off),
        then wait until every one is final and its result has left the outbox.

        A fresh daemon's memory grows with its first tens of thousands of commands until caches reach their bounds:
        SQLite's page cache (2 MiB per connection, two connections) fills as the file grows, pydantic-core keeps
        the last 16,384 distinct strings it stripped, and the simulators remember the last 10,000 command ids per
        device; the command history grows to ``[commands] keep_max`` (``--keep-max``), where the daemon's pruner
        holds it. A soak that starts cold measures that filling, not a leak; this burst brings them to their
        bounds first (``--prefill 0`` to measure from cold)."""
        assert self.session is not None
        session, url = self.session, self.daemon.url
        rss_before = proc_status_mib(self.daemon.pid, "VmRSS")
        began = time.monotonic()
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(n):
            queue.put_nowait(i)

        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                cid = f"soak-{self.nonce}-p-{i:07d}"
                device, action, params = (
                    ("pump1", "set_speed", {"percent": i % 101}) if i % 4 == 0 else
                    ("pump1", "read", {}) if i % 4 == 1 else
                    ("relay1", "on" if i % 8 == 2 else "off", {})
                )  # fmt: skip
                body = {"id": cid, "device": device, "action": action, "params": params}
                status = 0
                try:
                    for _ in range(200):  # 503 queue_full is back-pressure: the same id again after a pause
                        async with session.post(f"{url}/api/v1/commands", json=body) as resp:
                            await resp.read()
                            status = resp.status
                        if status != 503:
                            break
                        await asyncio.sleep(0.05)
                except (aiohttp.ClientError, TimeoutError) as err:
                    self.load.refused.append(f"prefill {cid}: {type(err).__name__}: {err}")
                    continue
                if status == 202:
                    self.load.prefilled.append(cid)
                else:
                    self.load.refused.append(f"prefill {cid}: {status}")

        async with asyncio.TaskGroup() as tg:
            for w in range(PREFILL_IN_FLIGHT):
                tg.create_task(worker(), name=f"soak.prefill{w}")
        submitted_s = time.monotonic() - began
        deadline = time.monotonic() + PREFILL_DRAIN_TIMEOUT_S
        while True:
            # Done when every result is on the broker (results are sent only for final commands) and the outbox
            # is empty; not from the store's counts, which the daemon's pruner lowers as the history passes
            # --keep-max.
            stats = await self.json_get("/api/v1/stats")
            results = [self.load.results.get(cid) for cid in self.load.prefilled]
            final = sum(1 for r in results if r is not None)
            rows = int((stats.get("outbox") or {}).get("rows", 0))
            if final >= len(self.load.prefilled) and rows == 0:
                break
            if time.monotonic() >= deadline:
                raise BenchError(
                    f"prefill: {final} of {len(self.load.prefilled)} results on the broker, {rows} outbox rows, "
                    f"{PREFILL_DRAIN_TIMEOUT_S:g} s after the burst"
                )
            await asyncio.sleep(1.0)
        counts = Counter(str(r.get("state")) for r in results if r is not None)
        self.base_results = self.load.received["result"]
        self.prefill_report = {
            "commands": len(self.load.prefilled),
            "submitted_s": round(submitted_s, 1),
            "drained_s": round(time.monotonic() - began, 1),
            "states": dict(counts),
            "rss_before_mib": round(rss_before, 1),
            "rss_after_mib": round(proc_status_mib(self.daemon.pid, "VmRSS"), 1),
            "db_mib": round(file_mib(self.daemon.data_dir / "gatewayd.sqlite3"), 2),
        }
        r = self.prefill_report
        print(
            f"prefill: {r['commands']} commands submitted in {r['submitted_s']:g} s, all final and their results "
            f"sent after {r['drained_s']:g} s ({', '.join(f'{k} {v}' for k, v in sorted(r['states'].items()))}); "
            f"RSS {r['rss_before_mib']:g} -> {r['rss_after_mib']:g} MiB, database {r['db_mib']:g} MiB",
            flush=True,
        )

    async def wait_ready(self) -> float:
        assert self.session is not None
        deadline = self.daemon.spawned_mono + READY_TIMEOUT_S
        while True:
            if not self.daemon.alive():
                raise BenchError("the daemon exited before it was ready")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with self.session.get(f"{self.daemon.url}/readyz") as resp:
                    if resp.status == 200:
                        return time.monotonic() - self.daemon.spawned_mono
            if time.monotonic() >= deadline:
                raise BenchError(f"the daemon was not ready within {READY_TIMEOUT_S:g} s")
            await asyncio.sleep(0.05)

    async def finals(self) -> dict[str, dict[str, Any]]:
        """Every sent command's record, polling those not final yet, and every result on MQTT, within the limit."""
        session = self.session
        assert session is not None
        deadline = time.monotonic() + FINAL_TIMEOUT_S
        records: dict[str, dict[str, Any]] = {}
        pending = [s.id for s in self.load.sent]
        sem = asyncio.Semaphore(HTTP_CONNECTIONS)

        async def fetch(cid: str) -> None:
            async with sem, session.get(f"{self.daemon.url}/api/v1/commands/{cid}") as resp:
                if resp.status == 200:
                    records[cid] = await resp.json()

        while True:
            async with asyncio.TaskGroup() as tg:
                for cid in pending:
                    tg.create_task(fetch(cid))
            pending = [cid for cid in pending if records.get(cid, {}).get("state") not in FINAL_STATES]
            missing = [s.id for s in self.load.sent if s.id not in self.load.results]
            if (not pending and not missing) or time.monotonic() >= deadline:
                return records
            await asyncio.sleep(1.0)

    async def run(self) -> dict[str, Any]:
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        connector = aiohttp.TCPConnector(limit=HTTP_CONNECTIONS)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            self.session = session
            ready_s = await self.wait_ready()
            async with aiomqtt.Client("127.0.0.1", self.broker.port, identifier=f"soak-{self.nonce}") as client:
                self.mqtt = client
                for topic in ("result/+", "telemetry/+", "events", "status"):  # not cmd: our own commands
                    await client.subscribe(f"{GW}/{topic}", qos=1)
                duration_s = self.args.minutes * 60
                # The children catch their own errors (they are failed checks); the sampler's BenchError (the
                # daemon died, an answer made no sense) ends the soak and the TaskGroup cancels the load.
                async with asyncio.TaskGroup() as tg:
                    listener = tg.create_task(self.listen(), name="soak.listen")
                    if self.args.prefill:
                        await self.prefill(self.args.prefill)
                    self.started = time.monotonic()
                    load = [tg.create_task(g, name=f"soak.load{i}") for i, g in enumerate(self.generators())]
                    await self.sampler(duration_s)
                    for task in load:
                        task.cancel()
                    print(f"load stopped; waiting up to {FINAL_TIMEOUT_S:g} s for every command and result",
                          flush=True)  # fmt: skip
                    records = await self.finals()
                    listener.cancel()
            exit_code, stop_s = await self.daemon.stop()
        return {
            "ready_s": ready_s,
            "records": records,
            "exit_code": exit_code,
            "stop_s": stop_s,
            "prefill": self.prefill_report,
        }


ROW_HEAD = (
    f"{'t (s)':>7} {'RSS MiB':>8} {'fds':>4} {'thr':>4} {'tasks':>5} {'db MiB':>7} {'wal MiB':>7} "
    f"{'sent':>6} {'ok':>6} {'not ok':>6} {'stored':>6} {'outbox':>6} {'results':>7} {'telem':>7} {'GETs':>6} "
    f"{'errors':>6}"
)


def row(s: Sample) -> str:
    return (
        f"{s.t_s:7.0f} {s.rss_mib:8.1f} {s.fds:4d} {s.threads:4d} {s.tasks:5d} {s.db_mib:7.2f} {s.wal_mib:7.2f} "
        f"{s.sent:6d} {s.succeeded:6d} {s.other_final:6d} {s.stored:6d} {s.outbox_rows:6d} {s.mqtt_results:7d} "
        f"{s.mqtt_telemetry:7d} {s.gets:6d} {s.errors:6d}"
    )


# --- verdict -------------------------------------------------------------------------------------------------------


@dataclass
class Verdict:
    warmup_s: float
    window_s: float
    samples: int
    rss_slope_mib_per_h: float
    rss_slope_limit: float
    rss_first_third_mib: float
    rss_last_third_mib: float
    rss_thirds_delta_mib: float
    rss_thirds_limit: float
    fds_spread: int
    fds_limit: int
    tasks_spread: int
    tasks_limit: int
    flat: bool
    over: list[str]


def verdict(samples: list[Sample], duration_s: float, warmup: float) -> Verdict:
    warmup_s = duration_s * warmup
    kept = [s for s in samples if s.t_s >= warmup_s - 0.5]
    if len(kept) < 3:
        raise BenchError(f"only {len(kept)} sample(s) after the warm-up: lower --interval or raise --minutes")
    window_s = kept[-1].t_s - kept[0].t_s
    slope = slope_per_hour([s.t_s for s in kept], [s.rss_mib for s in kept])
    slope_limit = RSS_SLOPE_MIB_PER_H + RSS_NOISE_MIB / (window_s / 3600)
    third = max(1, len(kept) // 3)
    first = statistics.median(s.rss_mib for s in kept[:third])
    last = statistics.median(s.rss_mib for s in kept[-third:])
    thirds_limit = RSS_THIRDS_MIB
    fds = max(s.fds for s in kept) - min(s.fds for s in kept)
    tasks = max(s.tasks for s in kept) - min(s.tasks for s in kept)
    over = []
    if not slope <= slope_limit:
        over.append(f"RSS slope {slope:+.2f} MiB/h > {slope_limit:.2f}")
    if not last - first <= thirds_limit:
        over.append(f"RSS last third - first third {last - first:+.2f} MiB > {thirds_limit:.2f}")
    if fds > FDS_SPREAD:
        over.append(f"fds spread {fds} > {FDS_SPREAD}")
    if tasks > TASKS_SPREAD:
        over.append(f"tasks spread {tasks} > {TASKS_SPREAD}")
    return Verdict(
        warmup_s=warmup_s,
        window_s=window_s,
        samples=len(kept),
        rss_slope_mib_per_h=slope,
        rss_slope_limit=slope_limit,
        rss_first_third_mib=first,
        rss_last_third_mib=last,
        rss_thirds_delta_mib=last - first,
        rss_thirds_limit=thirds_limit,
        fds_spread=fds,
        fds_limit=FDS_SPREAD,
        tasks_spread=tasks,
        tasks_limit=TASKS_SPREAD,
        flat=not over,
        over=over,
    )


def checks(load: Load, outcome: dict[str, Any], log_path: Path) -> list[str]:
    problems: list[str] = []
    records: dict[str, dict[str, Any]] = outcome["records"]
    states = Counter(records.get(s.id, {}).get("state", "unknown") for s in load.sent)
    bad = [s for s in load.sent if records.get(s.id, {}).get("state") != "succeeded"]
    if bad:
        problems.append(f"{len(bad)} of {len(load.sent)} command(s) not succeeded: {dict(states)}")
        for s in bad[:5]:
            rec = records.get(s.id, {})
            problems.append(f"  {s.channel} {s.id} {s.device} {s.action}: {rec.get('state')} {rec.get('error')}")
    prefill = outcome.get("prefill") or {}
    if prefill and prefill["states"] != {"succeeded": len(load.prefilled)}:
        problems.append(f"prefill: {len(load.prefilled)} commands, final states {prefill['states']}")
    missing = [cid for cid in [*load.prefilled, *(s.id for s in load.sent)] if cid not in load.results]
    if missing:
        problems.append(f"{len(missing)} command result(s) never reached the broker, e.g. {missing[:3]}")
    wrong = [cid for cid, res in load.results.items() if cid.startswith("soak-") and res.get("state") != "succeeded"]
    if wrong:
        problems.append(f"{len(wrong)} result(s) on MQTT not succeeded, e.g. {wrong[:3]}")
    if load.refused:
        problems.append(f"{len(load.refused)} command(s) refused or failed to send, e.g. {load.refused[:3]}")
    if load.get_failures:
        problems.append(f"GETs failed: {dict(load.get_failures.most_common(5))}")
    if load.rejected_events:
        problems.append(f"{len(load.rejected_events)} command_rejected event(s), e.g. {load.rejected_events[:2]}")
    if outcome["exit_code"] != 0:
        problems.append(f"the daemon exited with code {outcome['exit_code']} after SIGTERM (expected 0)")
    scan = scan_log(log_path)
    if scan.errors:
        problems.append(f"{scan.errors} error line(s) in the daemon log: {dict(scan.events.most_common(5))}")
    return problems


def render_verdict(v: Verdict, load: Load, outcome: dict[str, Any], problems: list[str]) -> list[str]:
    channels = Counter(s.channel for s in load.sent)
    lines = [
        "",
        f"sent {len(load.sent)} commands ({', '.join(f'{k} {n}' for k, n in sorted(channels.items()))}), "
        f"{load.gets} GETs; received on MQTT: " + ", ".join(f"{k} {n}" for k, n in sorted(load.received.items())),
        f"ready {outcome['ready_s']:.2f} s after start; SIGTERM to exit {outcome['stop_s']:.2f} s, "
        f"exit code {outcome['exit_code']}",
        "",
        f"after the warm-up (first {v.warmup_s:.0f} s): {v.samples} samples over {v.window_s:.0f} s",
        f"  RSS slope (least squares)      {v.rss_slope_mib_per_h:+8.2f} MiB/h   flat if <= {v.rss_slope_limit:.2f} "
        f"({RSS_SLOPE_MIB_PER_H:g} MiB/h + {RSS_NOISE_MIB:g} MiB over the {v.window_s / 60:.1f} min window)",
        f"  RSS median, first/last third   {v.rss_first_third_mib:8.1f} / {v.rss_last_third_mib:.1f} MiB "
        f"(last - first {v.rss_thirds_delta_mib:+.2f} MiB)   flat if <= {v.rss_thirds_limit:g} MiB",
        f"  open fds, max - min            {v.fds_spread:8d}         flat if <= {v.fds_limit} "
        f"(the soak keeps up to {HTTP_CONNECTIONS} HTTP connections)",
        f"  asyncio tasks, max - min       {v.tasks_spread:8d}         flat if <= {v.tasks_limit}",
        "GROWTH: FLAT" if v.flat else "GROWTH: NOT FLAT: " + "; ".join(v.over),
    ]
    lines.append("CHECKS: FAIL\n  " + "\n  ".join(problems) if problems else "CHECKS: PASS (every command succeeded, "
                 "every result reached the broker, clean exit)")  # fmt: skip
    lines.append("RESULT: PASS" if v.flat and not problems else "RESULT: FAIL")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--minutes", type=float, default=30.0, help="how long the load runs (default 30, 1 to 1440)")
    parser.add_argument("--interval", type=float, default=30.0, help="seconds between samples (default 30, 1 to 600)")
    parser.add_argument("--warmup", type=float, default=0.2, help="share of the run left out of the verdict (0.2)")
    parser.add_argument("--telemetry-hz", type=float, default=3.0, help="sensor1 reports per second (default 3)")
    parser.add_argument(
        "--prefill",
        type=int,
        default=24_000,
        help="commands sent as fast as taken before the measured load, to bring caches to their bounds "
        "(default 24000; 0: measure from cold)",
    )
    parser.add_argument(
        "--keep-max",
        type=int,
        default=10_000,
        help="the daemon's [commands] keep_max: commands kept in its history (default 10000, below the prefill)",
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the load's random choices (default 1)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the samples and verdict as JSON")
    args = parser.parse_args(argv)
    if not 1 <= args.minutes <= 1440:
        parser.error("--minutes must be from 1 to 1440")
    if not 1 <= args.interval <= 600:
        parser.error("--interval must be from 1 to 600")
    if not 0 <= args.warmup <= 0.8:
        parser.error("--warmup must be from 0 to 0.8")
    if not 0 <= args.prefill <= 200_000:
        parser.error("--prefill must be from 0 to 200000")
    if not 100 <= args.keep_max <= 100_000_000:
        parser.error("--keep-max must be from 100 to 100000000")
    if not 0.1 <= args.telemetry_hz <= 50:
        parser.error("--telemetry-hz must be from 0.1 to 50")
    if args.minutes * 60 * (1 - args.warmup) / args.interval < 4:
        parser.error("fewer than 4 samples after the warm-up: lower --interval or raise --minutes")
    return args


async def soak(args: argparse.Namespace, workdir: Path, broker: Broker) -> tuple[Soak, dict[str, Any]]:
    # Ctrl-C and SIGTERM clean up: the daemon and the broker are stopped on the way out.
    report.stop_on_signals()
    env = {
        "GATEWAYD_MQTT__PORT": str(broker.port),
        "GATEWAYD_DEVICES__SENSOR1__SIMULATOR__TELEMETRY_HZ": repr(args.telemetry_hz),
        # The prefill sends hundreds of commands a second from one client; the measured load (about 2.5
        # requests/s) is far below [http.limits] either way.
        "GATEWAYD_HTTP__LIMITS__ENABLED": "false",
        # Below the prefill, so the command history is at its bound through the measured window, as months of
        # traffic leave it: the pruner deletes about as many commands as the load adds.
        "GATEWAYD_COMMANDS__KEEP_MAX": str(args.keep_max),
    }
    async with Daemon(workdir, env) as daemon:
        s = Soak(args, daemon, broker)
        try:
            outcome = await s.run()
        except BenchError as err:
            raise BenchError(f"{err}\n  daemon log ({daemon.log_path}), last lines:\n{daemon.log_tail()}") from None
    return s, outcome


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    machine = report.machine_info()
    load = (
        f"{args.minutes:g} min of mixed load, about 2.5 requests/s: HTTP commands (pump1 every 2 s, relay1 every 3 s, "
        f"relays1 every 5 s, meter1 every 15 s), MQTT commands (pump1 every 4 s, sensor1 every 20 s), a "
        f"natural-language request every 10 s, a GET every 1 s; sensor1 telemetry at {args.telemetry_hz:g}/s; "
        f"a sample every {args.interval:g} s; real Mosquitto; HTTP limits off; keep_max {args.keep_max}; "
        f"seed {args.seed}; "
        + (
            f"after a prefill of {args.prefill} commands (pump1, relay1) as fast as taken"
            if args.prefill
            else "no prefill"
        )
    )
    print("\n".join(report.header("gatewayd soak", machine, load)), flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="gatewayd-soak-"))
    # Started from the main thread, so that it dies with this process even when this process is killed outright;
    # the daemon does too (daemon.Daemon). Ctrl-C and SIGTERM stop both in order below.
    broker = Broker(workdir / "broker", die_with_parent=True)
    keep = True
    try:
        try:
            broker.start()
        except RuntimeError as err:  # mosquitto missing or not listening: nothing to soak against
            print(f"soak: FAILED: cannot start the broker: {err}", file=sys.stderr)
            keep = False
            return 1
        s, outcome = asyncio.run(soak(args, workdir, broker))
    except BenchError as err:
        print(f"soak: FAILED: {err}\n  work directory kept: {workdir}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        keep = False
        print("soak: interrupted; the daemon and the broker were stopped", file=sys.stderr)
        return 130
    finally:
        broker.stop()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    log_path = workdir / "daemon.log"
    v = verdict(s.samples, args.minutes * 60, args.warmup)
    problems = checks(s.load, outcome, log_path)
    print("\n".join(render_verdict(v, s.load, outcome, problems)))
    passed = v.flat and not problems
    if args.json is not None:
        payload = {
            "machine": machine,
            "command_line": shlex.join(sys.orig_argv),
            "settings": {k: value for k, value in vars(args).items() if k != "json"},
            "samples": [asdict(x) for x in s.samples],
            "verdict": asdict(v),
            "sent": dict(Counter(x.channel for x in s.load.sent)),
            "prefill": outcome["prefill"],
            "received": dict(s.load.received),
            "exit_code": outcome["exit_code"],
            "problems": problems,
            "passed": passed,
        }
        args.json.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    if passed:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"work directory kept: {workdir}", file=sys.stderr)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
