"""The CLI as a technician uses it at a terminal: output piped into ``head`` ends quietly, columns line up, a name
it does not know is answered with the names it does, help says everything, a wrong value says what is wanted, and
``status``, ``health`` and ``stats`` each answer their own question in words (``--json`` for scripts).

One daemon (the bundled mock config) serves the whole module; each test asks it, as a user would, through
``python -m gatewayd``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from gatewayd.cli import EXIT_PIPE_CLOSED, columns
from gatewayd.web.present import SCENARIOS
from tests.conftest import ROOT, Daemon


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("cli") / "data")
    d.start()
    yield d
    d.stop()


def cli(d: Daemon | None, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    url = ["--url", d.url] if d is not None else []
    return subprocess.run(
        [sys.executable, "-m", "gatewayd", *args, *url], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


# --- a reader that goes away --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["status"],
        ["status", "--json"],
        ["health"],
        ["stats"],
        ["stats", "--json"],
        ["config"],
        ["send", "relay1", "on"],
        ["test", "--help"],
        ["--help"],
    ],
    ids=lambda a: " ".join(a),
)
def test_output_into_a_closed_pipe_ends_quietly(gw: Daemon, args: list[str]) -> None:
    # The read end is closed before the command writes a byte: its first write meets a pipe with no reader, every
    # time (a real `| head -1` only does so when the reader wins the race).
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "gatewayd", *args, *([] if "--help" in args else ["--url", gw.url])],
            stdout=write_fd,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
    finally:
        os.close(write_fd)
    assert proc.stderr == "", proc.stderr
    # argparse itself swallows an error writing its help (and exits 0); every other write ends as SIGPIPE would.
    assert proc.returncode == (0 if "--help" in args else EXIT_PIPE_CLOSED)


def test_status_piped_into_head_prints_its_first_line_and_nothing_on_stderr(gw: Daemon) -> None:
    proc = subprocess.run(
        ["bash", "-c", f'"{sys.executable}" -m gatewayd status --url {gw.url} | head -1'],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout.startswith("gw-dev: Working normally") and proc.stdout.count("\n") == 1, proc.stdout


# --- status, health, stats ------------------------------------------------------------------------------------------


def test_columns_are_as_wide_as_their_longest_cell() -> None:
    rows = [
        ["NAME", "PROFILE", "STATE"],
        ["a-very-long-device-name-indeed", "waveshare_relay8", "answering"],
        ["p", "x", "y"],
    ]
    lines = columns(rows)
    assert [line.index(r[1]) for line, r in zip(lines, rows, strict=True)] == [34] * 3
    assert [line.index(r[2]) for line, r in zip(lines, rows, strict=True)] == [52] * 3


def test_status_is_a_verdict_then_aligned_device_rows(gw: Daemon) -> None:
    out = cli(gw, "status")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("gw-dev: Working normally (gatewayd ")
    head = next(i for i, line in enumerate(lines) if line.lstrip().startswith("NAME"))
    rows = lines[head : head + 6]
    assert [r.split()[0] for r in rows] == ["NAME", "pump1", "sensor1", "relay1", "meter1", "relays1"]
    # Every column starts where its heading does, whatever the length of the profile's name (waveshare_relay8).
    for heading in ("PROFILE", "STATE", "LAST PROBLEM", "ACTIONS"):
        at = rows[0].index(heading)
        assert all(r[at - 2 : at] == "  " and r[at] != " " for r in rows[1:]), (heading, rows)
    assert "on1-8/off1-8 (channels), all_off" in out.stdout  # a relay board's 18 actions, said once
    assert "{" not in out.stdout and "[Errno" not in out.stdout


def test_health_and_stats_answer_different_questions_in_words(gw: Daemon) -> None:
    health, stats = cli(gw, "health"), cli(gw, "stats")
    assert health.returncode == stats.returncode == 0, health.stderr + stats.stderr
    h, s = health.stdout, stats.stdout
    for text in (h, s):
        assert "{" not in text and '"' not in text and "[Errno" not in text, text
    # health: the verdict, each part with its level, and what a note means and what to do, out of the box.
    assert h.splitlines()[0] == "gw-dev: Working normally"
    assert "  note  Uplink (MQTT)   Offline: no broker yet" in h
    words = " ".join(h.split())  # the explanations are wrapped to the terminal
    assert "(connection refused)" in words and "check [mqtt] host and port" in words
    assert "  note  Clock           Waiting for time sync" in h and "check the network and timedatectl" in words
    assert "FAULT" not in h and "CHECK" not in h
    # stats: the counters, by name, with units.
    stat_rows = {line.split()[0] for line in s.splitlines()[1:] if line and not line.startswith(" ")}
    assert {"commands", "queue", "outbox", "uplink", "store", "storage"} <= stat_rows
    assert " GiB free" in s or " MiB free" in s
    assert len(set(h.splitlines()) & set(s.splitlines())) == 0  # not the same lines twice

    hj, sj = json.loads(cli(gw, "health", "--json").stdout), json.loads(cli(gw, "stats", "--json").stdout)
    assert hj["healthz"]["status"] == "ok" and hj["summary"]["verdict"]["level"] == "ok"
    assert sj["gateway_id"] == "gw-dev" and "commands" in sj and "summary" not in sj


def test_a_fault_drill_reports_in_words(gw: Daemon) -> None:
    out = cli(gw, "test", "serial_garbage", "--duration", "0.5")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("serial_garbage: recovered, healthy after (took ")
    assert "{" not in out.stdout and "[Errno" not in out.stdout


# --- errors that say what would be right ------------------------------------------------------------------------


def test_unknown_names_are_answered_with_the_known_ones(gw: Daemon) -> None:
    device = cli(gw, "send", "pump9", "start")
    assert device.returncode == 2
    assert "no device named 'pump9'" in device.stderr
    assert "devices here: meter1, pump1, relay1, relays1, sensor1" in device.stderr

    action = cli(gw, "send", "pump1", "explode")
    assert action.returncode == 2
    assert "actions here: read, set_speed, start, stop" in action.stderr

    scenario = cli(gw, "test", "meteor_strike")
    assert scenario.returncode == 2
    listed = next(line for line in scenario.stderr.splitlines() if "scenarios here:" in line)
    names = listed.split(": ", 1)[1].split(", ")
    assert names == list(dict.fromkeys(names)) and set(names) == set(SCENARIOS), listed  # each once


def test_a_word_where_a_number_goes_says_what_is_wanted(gw: Daemon) -> None:
    out = cli(gw, "send", "pump1", "set_speed", "percent=fast")
    assert out.returncode == 2
    assert 'params.percent: must be a whole number from 0 to 100 %, not "fast"' in out.stderr, out.stderr


def test_test_help_names_and_explains_every_scenario() -> None:
    out = cli(None, "test", "--help")
    assert out.returncode == 0 and "..." not in out.stdout
    for name, what in SCENARIOS.items():
        assert f"  {name}" in out.stdout and what in out.stdout.replace("\n", " "), name


def test_each_client_command_has_json_for_scripts() -> None:
    for command in ("status", "health", "stats", "reset", "test"):
        out = cli(None, command, "--help")
        assert "--json" in out.stdout, command
