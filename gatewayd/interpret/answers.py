"""Answers to questions about state ("is the pump running?", "what's the humidity?") from what the gateway already
knows: each device's latest telemetry reading and its state. Nothing is sent to a device to answer.

The service is handed a :class:`DeviceFacts` when it is built; :class:`LiveFacts` is the daemon's, over the
device manager's devices and the telemetry recorder's recent readings. :func:`answer` is pure: facts and a
:class:`~.local.LocalQuestion` in, the answer's JSON out.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from gatewayd.config.profiles import Profile
from gatewayd.interpret.local import LocalQuestion, nice_number


@dataclass(frozen=True)
class Facts:
    values: Mapping[str, Any]  # the latest reading's values, with the device's state for what it does not report
    at: float | None  # wall-clock time of the reading (None: only state, of unknown age)
    available: bool = True
    last_error: str | None = None


class DeviceFacts(Protocol):
    def facts(self, device: str) -> Facts | None: ...


class _Reading(Protocol):
    @property
    def ts(self) -> float: ...

    @property
    def values(self) -> dict[str, Any]: ...


class _Availability(Protocol):
    @property
    def available(self) -> bool: ...

    @property
    def last_error(self) -> str | None: ...


class _Device(Protocol):
    @property
    def availability(self) -> _Availability: ...

    def describe(self) -> dict[str, Any]: ...


class LiveFacts:
    """The running daemon's facts: the recorder's latest reading of a device, over the state it describes."""

    def __init__(self, devices: Mapping[str, _Device], recent: Mapping[str, Sequence[_Reading]]):
        self._devices = devices
        self._recent = recent

    def facts(self, device: str) -> Facts | None:
        dev = self._devices.get(device)
        if dev is None:
            return None
        values: dict[str, Any] = {}
        state = dev.describe().get("state")
        if isinstance(state, dict):
            values.update({k: v for k, v in state.items() if isinstance(v, bool | int | float | str) or v is None})
        ring = self._recent.get(device)
        at = None
        if ring:
            values.update(ring[-1].values)
            at = ring[-1].ts
        availability = dev.availability
        return Facts(values, at, availability.available, availability.last_error)


def answer(
    question: LocalQuestion,
    facts: DeviceFacts | None,
    profiles: Mapping[str, Profile],
    labels: Mapping[str, Mapping[int, str]],
    *,
    wall: Callable[[], float] = time.time,
) -> dict[str, Any]:
    """``{"answer": text, "devices": [{"device", "values", "at", "age_s", "text"}, ...]}`` for the question."""
    now = wall()
    parts: list[dict[str, Any]] = []
    verdicts: list[bool] = []
    for asked in question.about:
        profile = profiles.get(asked.device)
        found = facts.facts(asked.device) if facts is not None else None
        values = dict(found.values) if found is not None else {}
        if asked.points:
            values = {k: v for k, v in values.items() if k in asked.points}
        elif asked.channel is not None:
            values = {}
        age = None if found is None or found.at is None else max(0.0, now - found.at)
        name = asked.device
        if asked.channel is not None:
            label = labels.get(asked.device, {}).get(asked.channel)
            name = f"{asked.device} channel {asked.channel}" + (f" ({label})" if label else "")
        on = _is_on(found.values if found is not None else {}, asked, profile)
        if question.expects is not None and on is not None:
            verdicts.append(on == (question.expects == "on"))
        if found is None or (not values and on is None):
            text = f'{name}: no reading yet (say "read {asked.device}" to take one)'
        else:
            shown = [_show(k, v, profile) for k, v in values.items() if not (asked.channel is None and k == "state")]
            head = name if on is None or asked.points else f"{name} is {_on_word(on, profile, asked)}"
            text = head + (": " + ", ".join(s for s in shown if s) if shown and any(shown) else "")
            if age is not None:
                text += f" ({_age(age)})"
        if found is not None and not found.available:
            text += f" [unavailable: {found.last_error or 'not answering'}]"
        part: dict[str, Any] = {"device": asked.device, "values": values, "text": text}
        if asked.channel is not None:
            part["channel"] = asked.channel
        if found is not None and found.at is not None:
            part["at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(found.at))
            part["age_s"] = round(age or 0.0, 1)
        parts.append(part)
    text = "; ".join(p["text"] for p in parts)
    if verdicts and len(verdicts) == len(parts):
        text = ("Yes: " if all(verdicts) else "No: " if not any(verdicts) else "") + text
    out: dict[str, Any] = {"answer": text, "devices": parts}
    if len(parts) == 1:
        out["device"] = parts[0]["device"]
        out["values"] = parts[0]["values"]
    return out


def _is_on(values: Mapping[str, Any], asked: Any, profile: Profile | None) -> bool | None:
    if asked.channel is not None and profile is not None:
        for point in profile.telemetry:
            if (
                point.endswith(str(asked.channel))
                and point.rstrip("0123456789")
                and isinstance(values.get(point), bool)
            ):
                if point[len(point.rstrip("0123456789")) :] == str(asked.channel):
                    return bool(values[point])
        return None
    for key in ("running", "on", "state"):
        value = values.get(key)
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("on", "off"):
            return value.lower() == "on"
    return None


def _on_word(on: bool, profile: Profile | None, asked: Any) -> str:
    if asked.channel is None and profile is not None and "running" in profile.telemetry:
        return "running" if on else "stopped"
    return "on" if on else "off"


def _show(name: str, value: Any, profile: Profile | None) -> str:
    point = profile.telemetry.get(name) if profile is not None else None
    words = name.replace("_", " ")
    if point is not None and point.unit and words.endswith(" " + point.unit.lower().replace("%rh", "pct")):
        words = words.rsplit(" ", 1)[0]
    for suffix in (" c", " pct", " hpa", " v"):  # temperature_c -> temperature
        if words.endswith(suffix):
            words = words[: -len(suffix)]
    if isinstance(value, bool):
        return (
            f"{words} {'yes' if value else 'no'}" if name not in ("running",) else ("running" if value else "stopped")
        )
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            return f"{words} unknown"
        number = nice_number(round(float(value), 2 if abs(value) < 10 else 1))
        unit = point.unit if point is not None and point.unit else ""
        return f"{words} {number}{' ' + unit if unit else ''}"
    if value is None:
        return f"{words} unknown"
    return f"{words} {value}"


def _age(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"
