"""How gatewayd writes a time for people and other programs: one format for the API, the uplink and the page."""

from __future__ import annotations

import math
import time


def iso(ts: float) -> str:
    """A UTC timestamp with milliseconds (``2026-12-07T17:37:36.123Z``); '' for a time that is not a number."""
    if not math.isfinite(ts):
        return ""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"
