"""The soak and the footprint benchmark in their short forms, as a user runs them: they pass on a healthy daemon,
fit the limits of the unit we ship, and leave nothing running behind them, even when interrupted with Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable


def run_bench(script: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, str(ROOT / "bench" / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,
    )


def children(pid: int) -> set[int]:
    """Every child of every thread of ``pid`` (the broker is started from a worker thread)."""
    found: set[int] = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children", encoding="ascii") as f:
            found.update(int(c) for c in f.read().split())
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.timeout(300)
def test_a_one_minute_soak_is_flat_and_every_command_it_sends_succeeds(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    proc = run_bench("soak.py", "--minutes", "1", "--interval", "5", "--json", str(out), timeout=280)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "GROWTH: FLAT" in proc.stdout and "RESULT: PASS" in proc.stdout
    report = json.loads(out.read_text())
    assert report["passed"] and report["verdict"]["flat"] and report["problems"] == []
    sent = report["sent"]
    assert sent["http"] >= 40 and sent["mqtt"] >= 10 and sent["text"] >= 4, sent
    assert report["received"]["result"] >= sum(sent.values())  # every result reached the broker
    assert report["received"]["telemetry"] >= 120  # sensor1 at 3/s for a minute, and the pollers
    rows = report["samples"]
    assert len(rows) == 13 and rows[-1]["errors"] == 0
    assert rows[-1]["tasks"] > 10 and rows[-1]["fds"] > 10  # the figures are read, not defaulted


@pytest.mark.timeout(120)
def test_footprint_fits_the_unit_and_the_daemon_stops_cleanly(tmp_path: Path) -> None:
    out = tmp_path / "footprint.json"
    proc = run_bench("footprint.py", "--runs", "1", "--idle-seconds", "10", "--warmup-seconds", "2",
                     "--json", str(out), timeout=100)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    run = json.loads(out.read_text())["runs"][0]
    assert 0 < run["start_to_ready_s"] < 30
    assert 0 < run["supervisor_startup_s"] < run["start_to_ready_s"]
    assert 30 < run["steady_rss_mib"] <= run["peak_rss_mib"] < 256  # MemoryMax=256M
    assert run["threads"] < 64  # TasksMax=64
    assert run["watchdog_pings"] >= 1 and run["readyz_status"] == 200
    assert run["stopping_sent"] and run["exit_code"] == 0
    assert 0 < run["idle_cpu_pct"] < 50


@pytest.mark.timeout(120)
def test_ctrl_c_stops_the_soak_and_leaves_neither_daemon_nor_broker_running() -> None:
    proc = subprocess.Popen(
        [PY, str(ROOT / "bench" / "soak.py"), "--minutes", "5", "--interval", "5"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal gives it
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # the first sample with load on it: broker and daemon are up
            if line.split()[:1] == ["5"]:
                break
        else:
            pytest.fail(f"the soak ended before its first samples: {proc.wait()} {proc.stderr.read()[-2000:]}")
        spawned = children(proc.pid)
        assert len(spawned) == 2, spawned  # the daemon and mosquitto
        environ = [Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") for pid in spawned]
        data_dirs = [
            v.split(b"=", 1)[1] for env in environ for v in env if v.startswith(b"GATEWAYD_GATEWAY__DATA_DIR=")
        ]
        assert len(data_dirs) == 1
        workdir = Path(data_dirs[0].decode()).parent  # the soak's temp dir: data, daemon log, broker
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground group
        assert proc.wait(timeout=30) == 130
        deadline = time.monotonic() + 5
        while any(alive(pid) for pid in spawned) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in spawned if alive(pid)], "a child outlived the interrupted soak"
        assert "interrupted" in proc.stderr.read()
        assert not workdir.exists(), f"{workdir} left behind"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
