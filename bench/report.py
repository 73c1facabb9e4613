"""What every benchmark does the same way: how it runs and fails, the machine it ran on, the command, and a table
of runs with their median. Imported by the scripts in this directory (their own directory is on ``sys.path``)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import platform
import shlex
import signal
import statistics
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

Row = tuple[str, str, str]  # label, attribute of a run result, format
T = TypeVar("T")


class BenchError(Exception):
    """A run could not measure what its figure assumes (a daemon not ready, commands not final in time, a path that
    answered otherwise): the number would measure something else, so there is none."""


def run(name: str, main: Coroutine[Any, Any, T], *, stopped: str = "the daemon was killed") -> T:
    """``asyncio.run(main)``, ended as every benchmark ends: a :class:`BenchError` with ``NAME: FAILED: why`` and
    exit status 1; Ctrl-C or SIGTERM (cancelling the main task) with ``NAME: interrupted; STOPPED`` and 130."""
    try:
        return asyncio.run(main)
    except BenchError as err:
        print(f"{name}: FAILED: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except (KeyboardInterrupt, asyncio.CancelledError):
        print(f"{name}: interrupted; {stopped}", file=sys.stderr)
        raise SystemExit(130) from None


def stop_on_signals(again_s: float = 2.0) -> None:
    """From now on Ctrl-C and SIGTERM cancel the running task (a benchmark's main task, which stops its daemon,
    broker and drivers on the way out), and cancel it again every ``again_s`` until it has ended. Once is not
    always enough: a library that lets a cancellation go (``asyncio.wait_for`` on Python 3.11, cpython gh-86296,
    used inside aiomqtt) would leave the benchmark running on for minutes. Ended by cancellation, ``run`` exits 130."""
    task = asyncio.current_task()
    assert task is not None, "stop_on_signals() is called from the benchmark's main task"
    loop = asyncio.get_running_loop()

    def stop() -> None:
        if not task.done():
            task.cancel()
            loop.call_later(again_s, stop)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)


def conclude(args: Any, machine: dict[str, Any], rows: Sequence[Row], results: Sequence[Any]) -> int:
    """The end of a benchmark whose runs are dataclasses with ``problems``: the JSON (``--json``: the runs, their
    medians over ``rows``, passed or not) and the exit status, 0 when no run found a problem."""
    passed = not any(r.problems for r in results)
    runs = [dataclasses.asdict(r) for r in results]
    write_json(args.json, machine, vars(args), runs, medians(rows, results), passed)
    return 0 if passed else 1


def cpu_model() -> str:
    """The CPU as /proc/cpuinfo names it; a Raspberry Pi's ARM kernel has ``Model`` instead of ``model name``."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return platform.processor() or "unknown"
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields and value.strip():
            fields[key.strip()] = value.strip()
    for key in ("model name", "Model", "Hardware", "cpu model", "Processor"):
        if key in fields:
            return fields[key]
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": f"{platform.python_version()} ({platform.python_implementation()})",
    }


def header(title: str, machine: dict[str, Any], load: str) -> list[str]:
    return [
        title,
        f"machine : {machine['platform']}",
        f"cpu     : {machine['cpu']} ({machine['cpu_count']} logical CPUs)",
        f"python  : {machine['python']}",
        f"command : {shlex.join(sys.orig_argv)}",
        f"load    : {load}",
        "",
    ]


def medians(rows: Sequence[Row], results: Sequence[Any]) -> dict[str, float]:
    return {name: statistics.median(float(getattr(r, name)) for r in results) for _, name, _ in rows}


def runs_table(rows: Sequence[Row], results: Sequence[Any]) -> list[str]:
    """One column per run (``result.run``) and a median column, one line per row."""
    label_w = max(len(label) for label, _, _ in rows)
    heads = [f"run {r.run}" for r in results] + ["median"]
    col_w = max(10, *(len(h) for h in heads))
    lines = [f"{'':<{label_w}}" + "".join(f"{h:>{col_w}}" for h in heads), "-" * (label_w + col_w * len(heads))]
    mid = medians(rows, results)
    for label, name, fmt in rows:
        cells = [fmt.format(float(getattr(r, name))) for r in results] + [fmt.format(mid[name])]
        lines.append(f"{label:<{label_w}}" + "".join(f"{c:>{col_w}}" for c in cells))
    return lines


def log_events_and_result(results: Sequence[Any]) -> list[str]:
    """For the benchmarks of a real daemon: each run's daemon-log lines at warning and above (``result.log_events``),
    then RESULT: PASS, or FAIL with every run's ``result.problems``."""
    lines = []
    for r in results:
        if r.log_events:
            events = ", ".join(f"{event} x{n}" for event, n in r.log_events.items())
            lines.append(f"run {r.run} daemon log, warning and above: {events}")
    problems = [f"run {r.run}: {p}" for r in results for p in r.problems]
    lines.append("RESULT: FAIL\n  " + "\n  ".join(problems) if problems else "RESULT: PASS (every check held)")
    return lines


def write_json(
    path: Path | None,
    machine: dict[str, Any],
    settings: dict[str, Any],
    runs: Sequence[dict[str, Any]],
    median: dict[str, float],
    passed: bool = True,
) -> None:
    """The figures as bench/all.py reads them (one shape for every benchmark); nothing when ``path`` is None."""
    if path is None:
        return
    payload = {
        "machine": machine,
        "command_line": shlex.join(sys.orig_argv),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in settings.items() if k != "json"},
        "runs": list(runs),
        "median": median,
        "passed": passed,
    }
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
