"""The last hour of the gateway in memory, for the status page's charts: one sample every ``interval_s``.

A sample counts the commands that finished during its interval (throughput, and how many of them ended in
failure), the median and 95th percentile of their latency from acceptance to final state, and the queue and
outbox depths at its end. Nothing is written to disk: after a restart the charts start empty.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gatewayd.commands.model import CommandRecord, State
from gatewayd.timefmt import iso

# Final states that count as errors in the error rate (a cancelled command is somebody's choice, not a fault).
ERROR_STATES = frozenset({State.FAILED, State.EXPIRED, State.REJECTED})


@dataclass(frozen=True, slots=True)
class Sample:
    at: float  # wall clock at the end of the interval, for display
    interval_s: float
    finished: int
    failed: int
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    queued: int
    in_flight: int
    outbox_rows: int | None

    def to_api(self) -> dict[str, Any]:
        return {
            "at": iso(self.at),
            "ts": round(self.at, 3),
            "interval_s": self.interval_s,
            "finished": self.finished,
            "failed": self.failed,
            "throughput_per_min": round(self.finished * 60.0 / self.interval_s, 3) if self.interval_s > 0 else 0.0,
            "latency_p50_ms": self.latency_p50_ms,
            "latency_p95_ms": self.latency_p95_ms,
            "queued": self.queued,
            "in_flight": self.in_flight,
            "outbox_rows": self.outbox_rows,
        }


def latency_s(rec: CommandRecord, *, mono_now: float, wall_now: float, boot_id: str) -> float:
    """Seconds from acceptance to now (the command just finished). Within one boot from the monotonic clock (the
    record's deadline less its time to live is when it arrived), so a wall-clock step cannot distort it; a
    command from an earlier boot only has the wall clock."""
    if rec.boot_id == boot_id and math.isfinite(rec.deadline_mono):
        return max(0.0, mono_now - (rec.deadline_mono - rec.ttl_s))
    return max(0.0, wall_now - rec.created_at)


def _percentile(sorted_values: list[float], q: float) -> float:
    if len(sorted_values) == 1:
        return sorted_values[0]
    return statistics.quantiles(sorted_values, n=100, method="inclusive")[int(q * 100) - 1]


class History:
    def __init__(
        self,
        interval_s: float,
        *,
        window_s: float = 3600.0,
        boot_id: str = "",
        mono: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ):
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self.interval_s = interval_s
        self.window_s = window_s
        self._boot_id = boot_id
        self._mono = mono
        self._wall = wall
        self.samples: deque[Sample] = deque(maxlen=max(1, math.ceil(window_s / interval_s)))
        self._latencies: list[float] = []
        self._failed = 0
        self._started = mono()

    def record_final(self, rec: CommandRecord) -> None:
        """A command reached its final state (the command service's final listener)."""
        self._latencies.append(latency_s(rec, mono_now=self._mono(), wall_now=self._wall(), boot_id=self._boot_id))
        if rec.state in ERROR_STATES:
            self._failed += 1

    def sample(self, status: dict[str, Any]) -> Sample:
        """Close the current interval with the supervisor's status (queue, outbox) and start the next."""
        latencies, self._latencies = sorted(self._latencies), []
        failed, self._failed = self._failed, 0
        now = self._mono()
        elapsed, self._started = now - self._started, now
        queue = status.get("queue") or {}
        outbox = status.get("outbox") or {}
        rows = outbox.get("rows")
        sample = Sample(
            at=self._wall(),
            interval_s=round(elapsed if elapsed > 0 else self.interval_s, 3),
            finished=len(latencies),
            failed=failed,
            latency_p50_ms=round(_percentile(latencies, 0.5) * 1000, 1) if latencies else None,
            latency_p95_ms=round(_percentile(latencies, 0.95) * 1000, 1) if latencies else None,
            queued=int(queue.get("queued", 0)),
            in_flight=int(queue.get("in_flight", 0)),
            outbox_rows=int(rows) if isinstance(rows, int) else None,
        )
        self.samples.append(sample)
        return sample

    def error_rate(self, window_s: float = 300.0) -> dict[str, Any]:
        """Failed among finished commands over the last ``window_s`` (whole samples, plus the open interval)."""
        finished, failed = len(self._latencies), self._failed
        covered = self._mono() - self._started
        for s in reversed(self.samples):
            if covered >= window_s:
                break
            finished += s.finished
            failed += s.failed
            covered += s.interval_s
        return {
            "window_s": window_s,
            "finished": finished,
            "failed": failed,
            "rate": round(failed / finished, 4) if finished else None,
        }

    def to_api(self) -> dict[str, Any]:
        return {
            "interval_s": self.interval_s,
            "window_s": self.window_s,
            "samples": [s.to_api() for s in self.samples],
            "error_rate": self.error_rate(),
        }
