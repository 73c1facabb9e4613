"""Benchmark of the MQTT uplink against a local Mosquitto broker.

For each run, with a fresh data directory and broker (both on loopback, started here):

- drain: the daemon is started against an outbox already holding ``--backlog`` records (results and telemetry,
  written into its SQLite file while it was stopped, as an outage leaves them), with the upstream rate limit
  off; the figure is records per second from the daemon's READY until a subscriber has received all of them.
- latency: ``--commands`` commands are published on ``cmd`` at ``--rate`` per second (open loop) and the time
  from each publish to its ``result/{id}`` at the subscriber is measured: p50 and p99.
- command disk: the daemon's bytes written to disk during the latency part (from the first publish until every
  result is out and the outbox empty again), per command and per message it published then: what the durable
  classes (the command's record and its state changes, its result and events) cost the SD card.
- disk: the daemon's bytes written to disk (``/proc/<pid>/io`` write_bytes: the WAL, the database, fsyncs'
  metadata) while it takes telemetry at ``--telemetry-hz`` and forwards it for ``--seconds``, divided by the
  records forwarded: the SD-card cost of one message.

    .venv/bin/python bench/uplink.py [--runs 3] [--backlog 20000] [--commands 500] [--rate 50]

Exit status 0 when every run completed and every record arrived; 1 otherwise. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import report  # bench/report.py: the script's own directory is on sys.path
from daemon import proc_write_bytes

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.mqtt_broker import Broker, Subscriber  # noqa: E402  (the tests' broker and subscriber)

GW = "gatewayd/gw-dev"
PYTHON = str(ROOT / ".venv" / "bin" / "python")


@dataclass
class RunResult:
    run: int
    drain_per_s: float
    p50_ms: float
    p99_ms: float
    cmd_bytes_per_command: float
    cmd_bytes_per_msg: float
    disk_bytes_per_msg: float
    disk_msgs: int


class Daemon:
    def __init__(self, data: Path, broker: Broker, **env: str):
        from tests.conftest import free_port

        self.port = free_port()
        self.env = {
            **os.environ,
            "GATEWAYD_HTTP__PORT": str(self.port),
            "GATEWAYD_GATEWAY__DATA_DIR": str(data),
            "GATEWAYD_MQTT__PORT": str(broker.port),
            "GATEWAYD_MQTT__RECONNECT_BASE_S": "0.05",
            "GATEWAYD_MQTT__RECONNECT_CAP_S": "0.2",
            "GATEWAYD_LOG__LEVEL": "warning",
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = data.parent / f"{data.name}.log"

    def start(self) -> float:
        started = time.monotonic()
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "gatewayd", "run", "--config", str(ROOT / "config.toml")],
            env=self.env,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
        )
        while time.monotonic() - started < 15:
            try:
                if self.get("/readyz")["status"] == "ready":
                    return time.monotonic()
            except OSError:
                pass
            time.sleep(0.02)
        tail = self.log.read_text(errors="replace").splitlines()[-10:]
        raise RuntimeError("daemon not ready:\n" + "\n".join(tail))

    def get(self, path: str) -> Any:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as resp:
            return json.loads(resp.read())

    def post(self, body: dict[str, Any]) -> Any:
        import urllib.request

        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/api/v1/commands?wait=5",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def write_bytes(self) -> int:
        assert self.proc is not None
        return proc_write_bytes(self.proc.pid)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=20)


def fill_outbox(db: Path, n: int) -> None:
    """An outage's backlog: one command result for every ten telemetry readings, as a busy site would have. Written
    with the outbox's own insert (the table's layout and counters are its business)."""
    from gatewayd.store import outbox

    conn = sqlite3.connect(db)
    now, mono = time.time(), time.monotonic()
    rows = []
    for i in range(n):
        if i % 11 == 0:
            payload = json.dumps({"id": f"backlog-{i}", "device": "pump1", "state": "succeeded", "result": {"x": i}})
            rows.append(("result", 0, "pump1", f"result/backlog-{i}", payload))
        else:
            payload = json.dumps({"device": "sensor1", "values": {"temperature_c": 20.5, "humidity_pct": 45.1, "n": i}})
            rows.append(("telemetry", 2, "sensor1", "telemetry/sensor1", payload))
    with conn:
        outbox.insert(conn, [outbox.NewRow(k, p, d, t, pl, now, mono, "bench", False) for k, p, d, t, pl in rows])
    conn.close()


def one_run(run: int, args: argparse.Namespace, work: Path) -> RunResult:
    broker = Broker(work / f"broker{run}")
    broker.start()
    data = work / f"data{run}"
    try:
        # 1. Drain: create the database, stop, fill the outbox, start again with the broker up.
        first = Daemon(data, broker, GATEWAYD_MQTT__ENABLED="false")
        first.start()
        first.stop()
        fill_outbox(data / "gatewayd.sqlite3", args.backlog)
        with Subscriber(broker, f"{GW}/#", client_id=f"bench{run}") as sub:
            d = Daemon(data, broker, GATEWAYD_MQTT__DRAIN_MESSAGES_PER_S="0")
            ready = d.start()
            sub.wait_for(
                lambda m: (
                    sum(1 for t, p, _ in m if b"backlog-" in p or t.endswith("/telemetry/sensor1")) >= args.backlog
                ),
                timeout=600,
            )
            drain_s = time.monotonic() - ready
            # 2. Latency: commands published on cmd, results timed at the subscriber.
            sent: dict[str, float] = {}
            received: dict[str, float] = {}
            seen = threading.Event()

            def on_message(client: Any, userdata: Any, msg: Any) -> None:
                if msg.topic.startswith(f"{GW}/result/lat-"):
                    received.setdefault(msg.topic.rsplit("/", 1)[1], time.monotonic())
                    if len(received) >= args.commands:
                        seen.set()

            sub.client.on_message = on_message
            import paho.mqtt.client as mqtt

            pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-pub{run}")
            pub.connect("127.0.0.1", broker.port)
            pub.loop_start()
            cmd_bytes, cmd_pub = d.write_bytes(), d.get("/api/v1/stats")["uplink"]["published"]
            for i in range(args.commands):
                command_id = f"lat-{run}-{i}"
                body = {"id": command_id, "device": "pump1", "action": "set_speed", "params": {"percent": i % 101}}
                sent[command_id] = time.monotonic()
                pub.publish(f"{GW}/cmd", json.dumps(body), qos=1)
                time.sleep(1 / args.rate)
            seen.wait(60)
            pub.loop_stop()
            pub.disconnect()
            if len(received) < args.commands:
                raise RuntimeError(f"only {len(received)} of {args.commands} results arrived")
            latencies = sorted((received[i] - sent[i]) * 1000 for i in sent)
            deadline = time.monotonic() + 30
            while d.get("/api/v1/stats")["outbox"]["rows"] and time.monotonic() < deadline:
                time.sleep(0.1)  # the rows of acknowledged results deleted: part of what a command costs
            cmd_bytes = d.write_bytes() - cmd_bytes
            cmd_pub = d.get("/api/v1/stats")["uplink"]["published"] - cmd_pub
            # 3. Disk: telemetry in, forwarded, deleted; bytes the daemon wrote per record.
            d.post({"device": "sensor1", "action": "set_interval", "params": {"seconds": 1 / args.telemetry_hz}})
            time.sleep(1.0)
            before_bytes, before_pub = d.write_bytes(), d.get("/api/v1/stats")["uplink"]["published"]
            time.sleep(args.seconds)
            after_bytes, after_pub = d.write_bytes(), d.get("/api/v1/stats")["uplink"]["published"]
            d.stop()
        msgs = after_pub - before_pub
        return RunResult(
            run=run,
            drain_per_s=args.backlog / drain_s,
            p50_ms=statistics.median(latencies),
            p99_ms=latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
            cmd_bytes_per_command=cmd_bytes / args.commands,
            cmd_bytes_per_msg=cmd_bytes / max(1, cmd_pub),
            disk_bytes_per_msg=(after_bytes - before_bytes) / max(1, msgs),
            disk_msgs=msgs,
        )
    finally:
        broker.kill9()


ROWS: list[report.Row] = [
    ("backlog drain (records/s, rate limit off)", "drain_per_s", "{:.0f}"),
    ("MQTT command -> result p50 (ms)", "p50_ms", "{:.1f}"),
    ("MQTT command -> result p99 (ms)", "p99_ms", "{:.1f}"),
    ("commands: disk bytes per command", "cmd_bytes_per_command", "{:.0f}"),
    ("commands: disk bytes per result/event message", "cmd_bytes_per_msg", "{:.0f}"),
    ("telemetry: disk bytes written per message", "disk_bytes_per_msg", "{:.0f}"),
    ("messages in the disk window", "disk_msgs", "{:.0f}"),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--backlog", type=int, default=20_000)
    parser.add_argument("--commands", type=int, default=500)
    parser.add_argument("--rate", type=float, default=50.0, help="commands per second for the latency part")
    parser.add_argument("--telemetry-hz", type=float, default=40.0)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the disk window")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures as JSON to PATH")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.backlog < 1 or args.commands < 1 or args.rate <= 0 or args.telemetry_hz <= 0:
        parser.error("counts and rates must be positive")
    load = (
        f"backlog {args.backlog} records; {args.commands} MQTT commands at {args.rate:g}/s; "
        f"telemetry {args.telemetry_hz:g}/s for {args.seconds:g} s; {args.runs} runs"
    )
    lines = report.header("gatewayd MQTT uplink benchmark (local Mosquitto, loopback)", report.machine_info(), load)
    print("\n".join(lines), flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="gatewayd-bench-uplink-") as tmp:
        for run in range(1, args.runs + 1):
            try:
                results.append(one_run(run, args, Path(tmp)))
            except Exception as err:
                print(f"run {run} failed: {err}", file=sys.stderr)
                return 1
            print(f"run {run} done", flush=True)
    print("\n".join(report.runs_table(ROWS, results)))
    runs = [dataclasses.asdict(r) for r in results]
    report.write_json(args.json, report.machine_info(), vars(args), runs, report.medians(ROWS, results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
