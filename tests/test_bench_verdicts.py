"""The judgements the footprint and soak benchmarks print: a leak is called a leak, noise is not, and the limits
they compare with are the ones in the unit we ship. Pure functions over made-up samples; no daemon."""

from __future__ import annotations

import random
import re
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import footprint  # noqa: E402
import soak  # noqa: E402

MINUTES = 30
INTERVAL_S = 30


def samples(rss: list[float], fds: list[int] | None = None, tasks: list[int] | None = None) -> list[soak.Sample]:
    n = len(rss)
    return [
        soak.Sample(
            t_s=i * INTERVAL_S,
            rss_mib=rss[i],
            fds=(fds or [40] * n)[i],
            threads=6,
            tasks=(tasks or [33] * n)[i],
            db_mib=0.1 * i,
            wal_mib=3.9,
            sent=90 * i,
            succeeded=90 * i,
            other_final=0,
            stored=1000,
            outbox_rows=0,
            mqtt_results=90 * i,
            mqtt_telemetry=200 * i,
            gets=60 * i,
            errors=0,
        )
        for i in range(n)
    ]


def series(slope_mib_per_h: float, noise_mib: float, seed: int = 7) -> list[float]:
    rng = random.Random(seed)
    n = MINUTES * 60 // INTERVAL_S + 1
    return [70.0 + slope_mib_per_h * i * INTERVAL_S / 3600 + rng.uniform(-noise_mib, noise_mib) for i in range(n)]


def test_a_flat_but_noisy_heap_is_flat() -> None:
    v = soak.verdict(samples(series(0.0, 0.4)), MINUTES * 60, 0.2)
    assert v.flat, v.over
    assert v.samples == 49 and v.window_s == 24 * 60  # samples from 6 min (20 %) to 30 min


def test_a_steady_leak_is_not_flat_by_slope_and_by_thirds() -> None:
    v = soak.verdict(samples(series(10.0, 0.2)), MINUTES * 60, 0.2)
    assert not v.flat
    assert v.rss_slope_mib_per_h == pytest.approx(10.0, abs=1.0)
    assert any(o.startswith("RSS slope") for o in v.over)
    assert any(o.startswith("RSS last third") for o in v.over)


def test_growth_during_the_warm_up_only_is_flat() -> None:
    rss = [60.0 + 2 * i if i < 10 else 80.0 for i in range(61)]  # 20 MiB in the first 5 min, then nothing
    assert soak.verdict(samples(rss), MINUTES * 60, 0.2).flat


def test_leaking_file_descriptors_or_tasks_are_not_flat() -> None:
    rss = series(0.0, 0.1)
    n = len(rss)
    fd_leak = soak.verdict(samples(rss, fds=[40 + i // 3 for i in range(n)]), MINUTES * 60, 0.2)
    assert not fd_leak.flat and fd_leak.over == [f"fds spread {fd_leak.fds_spread} > {soak.FDS_SPREAD}"]
    task_leak = soak.verdict(samples(rss, tasks=[33 + i // 2 for i in range(n)]), MINUTES * 60, 0.2)
    assert not task_leak.flat and task_leak.over == [f"tasks spread {task_leak.tasks_spread} > {soak.TASKS_SPREAD}"]


def test_too_few_samples_after_the_warm_up_is_an_error_not_a_verdict() -> None:
    with pytest.raises(footprint.BenchError, match="sample"):
        soak.verdict(samples([70.0, 70.0, 70.0]), 90, 0.5)


def test_the_soak_refuses_settings_that_leave_too_few_samples() -> None:
    with pytest.raises(SystemExit) as err:
        soak.parse_args(["--minutes", "1", "--interval", "30"])
    assert err.value.code == 2


def test_footprint_compares_with_the_unit_we_ship() -> None:
    unit = (BENCH.parent / "systemd" / "gatewayd.service").read_text(encoding="utf-8")
    setting = {m[0]: m[1] for m in re.findall(r"^(WatchdogSec|MemoryMax|TasksMax)=(\d+)", unit, re.MULTILINE)}
    assert int(setting["WatchdogSec"]) == footprint.WATCHDOG_S  # plain seconds and M in the unit today
    assert int(setting["MemoryMax"]) == footprint.MEMORY_MAX_MIB
    assert int(setting["TasksMax"]) == footprint.TASKS_MAX
    assert footprint.systemd_seconds("2min") == 120 and footprint.systemd_seconds("500ms") == 0.5
    assert footprint.systemd_bytes("1G") == 1024
    with pytest.raises(footprint.BenchError):
        footprint.systemd_seconds("soon")
