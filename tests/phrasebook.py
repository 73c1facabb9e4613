"""The phrasebook (tests/phrasebook.txt): reading it, and scoring what the local rules make of each utterance.

Shared by tests/test_phrasebook.py (the targets) and bench/phrasebook.py (the figures). An outcome is *right*
when a command is exactly the expected one (device, action, every parameter, the duration), a question is about
the expected devices (and points, where given), a refusal is a refusal (for the expected reason, where given).
A *false command* is any command that is not exactly the one expected: a refusal would have been better.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gatewayd.config import load_config
from gatewayd.errors import GatewayError
from gatewayd.interpret.local import LocalMatch, LocalQuestion, LocalRefusal, LocalRules, Understanding
from gatewayd.interpret.registry import Registry, check_answer
from gatewayd.interpret.rules import load_rules

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PHRASEBOOK = HERE / "phrasebook.txt"


@dataclass(frozen=True)
class Entry:
    category: str
    text: str
    expected: str  # as written: "pump1 start for=600", "? sensor1:humidity_pct", "!negated"

    @property
    def kind(self) -> str:
        return (
            "refusal" if self.expected.startswith("!") else "question" if self.expected.startswith("?") else "command"
        )


def load(path: Path = PHRASEBOOK) -> list[Entry]:
    entries: list[Entry] = []
    category = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            category = line[3:].strip()
            continue
        if not line.strip() or line.startswith("#"):
            continue
        text, sep, expected = line.rpartition("=>")
        if not sep:
            raise ValueError(f"no '=>' in {line!r}")
        entries.append(Entry(category, text.strip(), expected.strip()))
    return entries


def bundled_registry() -> Registry:
    loaded = load_config(ROOT / "config.toml")
    cfg = loaded.config
    profiles = {name: loaded.profiles[dev.profile] for name, dev in cfg.devices.items()}
    rules, problems = load_rules(cfg.interpret.rules_file, profiles)
    assert not problems, problems
    return Registry.build(
        profiles,
        {name: dev.description for name, dev in cfg.devices.items()},
        rules,
        {name: dev.channels for name, dev in cfg.devices.items() if dev.channels},
    )


def _number(raw: str) -> float:
    return float(raw)


def _command(found: LocalMatch, registry: Registry) -> tuple[str, str, dict[str, Any], float | None] | None:
    """The command as it would be submitted (validated like any other), or None when validation refuses it."""
    try:
        command = check_answer(found.answer(), registry)
    except GatewayError:
        return None
    return command.device, command.action, dict(command.params), command.duration_s


@dataclass(frozen=True)
class Score:
    right: bool
    false_command: bool
    got: str


def score(entry: Entry, found: Understanding, registry: Registry) -> Score:
    if isinstance(found, LocalMatch):
        command = _command(found, registry)
        if command is None:  # the validation refuses it (out of range ...): a refusal, as the daemon answers
            return Score(entry.kind == "refusal" and entry.expected == "!", False, "! (validation)")
        device, action, params, duration = command
        got = f"{device} {action}" + "".join(
            f" {k}={v:g}" if isinstance(v, float) else f" {k}={v}" for k, v in params.items()
        )
        got += f" for={duration:g}" if duration is not None else ""
        if entry.kind != "command":
            return Score(False, True, got)
        words = entry.expected.split()
        want_params: dict[str, float] = {}
        want_duration: float | None = None
        for word in words[2:]:
            key, _, value = word.partition("=")
            if key == "for":
                want_duration = _number(value)
            else:
                want_params[key] = _number(value)
        same = (device, action) == (words[0], words[1])
        defaults = {k: v for k, v in params.items() if k not in want_params}
        spec = registry.devices[device].profile.actions[action].params if same else {}
        same = same and all(k in params and math.isclose(float(params[k]), v) for k, v in want_params.items())
        same = same and all(spec[k].default == v for k, v in defaults.items())
        same = same and (
            (want_duration is None and duration is None)
            or (want_duration is not None and duration is not None and math.isclose(duration, want_duration))
        )
        return Score(same, not same, got)
    if isinstance(found, LocalQuestion):
        got = "? " + " ".join(f"{a.device}" + (f":{','.join(a.points)}" if a.points else "") for a in found.about)
        if entry.kind != "question":
            return Score(False, False, got)
        want = [w.split(":") for w in entry.expected[1:].split()]
        devices = {a.device for a in found.about}
        ok = devices == {w[0] for w in want}
        for w in want:
            if len(w) > 1:
                asked = next((a for a in found.about if a.device == w[0]), None)
                ok = ok and asked is not None and w[1] in asked.points
        return Score(ok, False, got)
    assert isinstance(found, LocalRefusal)
    got = f"!{found.reason}"
    if entry.kind != "refusal":
        return Score(False, False, got)
    reason = entry.expected[1:]
    return Score(not reason or reason == found.reason, False, got)


def run(local: LocalRules, entries: list[Entry]) -> list[tuple[Entry, Score]]:
    return [(entry, score(entry, local.understand(entry.text), local.registry)) for entry in entries]
