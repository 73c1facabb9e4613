"""The device registry as the interpreters see it, built from the device profiles and the rules file.

One immutable :class:`Registry` per version of the devices and profiles: the names each device answers to, the
prompt and tool schema the LLM providers get, and ``digest``, a hash of all of it that keys the prompt cache (a
profile change makes a new digest, so no cached answer from before it can be used). :func:`check_answer` turns
an answer from any interpreter into a :class:`Command` through the same validation as a structured command.
Pure: no I/O, no clock.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from gatewayd.commands import validate as v
from gatewayd.config.profiles import Profile
from gatewayd.errors import GatewayError
from gatewayd.interpret.errors import UnusableAnswer
from gatewayd.interpret.rules import EMPTY, RulesFile

# Bumped whenever the prompt or the tool schema changes shape: cached answers to the old prompt are not reused.
PROMPT_VERSION = "1"
RUN_TOOL = "run_command"
DECLINE_TOOL = "not_understood"
MAX_DURATION_S = 7 * 86_400.0

_SPACES = re.compile(r"\s+")
_LETTER_DIGIT = re.compile(r"(?<=[a-z])(?=[0-9])|(?<=[0-9])(?=[a-z])")


def normalise(text: str) -> str:
    """What makes two requests the same request: Unicode-normalised, case-folded, single-spaced, without the
    sentence's closing punctuation. "Start the pump!" and " start  the PUMP" share a cache entry."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return _SPACES.sub(" ", text).strip().rstrip(".!?").strip()


def default_names(device: str) -> tuple[str, ...]:
    """A device is always called by its own name, and by that name spoken: ``fan_2`` and ``fan2`` as "fan 2"."""
    spoken = _LETTER_DIGIT.sub(" ", device.replace("_", " "))
    return (device,) if spoken == device else (device, spoken)


def off_action(profile: Profile) -> str | None:
    """The action that ends an on-period ("for 10 minutes"): the profile's safety off action, else off/stop."""
    if profile.safety.off_action is not None:
        return profile.safety.off_action
    for name in ("off", "stop"):
        spec = profile.actions.get(name)
        if spec is not None and not any(p.required for p in spec.params.values()):
            return name
    return None


_CHANNEL_ACTION = re.compile(r"^(on|off)(\d+)$")


def channel_actions(profile: Profile) -> dict[int, tuple[str, str]]:
    """The channels of a multi-channel device, from its actions: ``on3``/``off3`` are channel 3's on and off."""
    found: dict[int, dict[str, str]] = {}
    for action in profile.actions:
        m = _CHANNEL_ACTION.match(action)
        if m:
            found.setdefault(int(m.group(2)), {})[m.group(1)] = action
    return {ch: (pair["on"], pair["off"]) for ch, pair in sorted(found.items()) if len(pair) == 2}


def on_actions(profile: Profile) -> frozenset[str]:
    """Actions that switch something on, and so may take a duration."""
    named = {a for a in ("on", "start") if a in profile.actions}
    return frozenset(named | set(profile.safety.on_actions))


@dataclass(frozen=True)
class DeviceEntry:
    name: str
    profile: Profile
    description: str
    names: tuple[str, ...]  # every name it answers to, its own first

    @property
    def off_action(self) -> str | None:
        return off_action(self.profile)

    def takes_duration(self, action: str) -> bool:
        return self.off_action is not None and action in on_actions(self.profile) and action != self.off_action

    def off_for(self, action: str) -> str | None:
        """What ends an on-period of ``action``: a channel's own off (on3 -> off3), else the device's off action."""
        for on, off in channel_actions(self.profile).values():
            if action == on:
                return off
        return self.off_action


@dataclass(frozen=True)
class Command:
    """A validated interpretation: what would be submitted, and for how long an on-action should last."""

    device: str
    action: str
    params: dict[str, Any]
    duration_s: float | None = None

    def payload(self) -> dict[str, Any]:
        return {"device": self.device, "action": self.action, "params": dict(self.params)}

    def to_api(self) -> dict[str, Any]:
        out = self.payload()
        if self.duration_s is not None:
            out["duration_s"] = self.duration_s
        return out


@dataclass(frozen=True)
class Registry:
    devices: dict[str, DeviceEntry]
    rules: RulesFile = EMPTY
    digest: str = field(default="")
    channels: dict[str, dict[int, str]] = field(default_factory=dict)  # device -> channel -> its label

    @classmethod
    def build(
        cls,
        profiles: Mapping[str, Profile],
        descriptions: Mapping[str, str],
        rules: RulesFile = EMPTY,
        channels: Mapping[str, Mapping[int, str]] | None = None,
    ) -> Registry:
        devices = {}
        for name, profile in profiles.items():
            names = list(default_names(name))
            for other in rules.names.get(name, ()):
                spoken = _SPACES.sub(" ", other.strip()).lower()
                if spoken and spoken not in names:
                    names.append(spoken)
            devices[name] = DeviceEntry(name, profile, descriptions.get(name) or profile.description, tuple(names))
        labels = {
            name: {int(ch): _SPACES.sub(" ", label.strip()).lower() for ch, label in sorted(chans.items())}
            for name, chans in (channels or {}).items()
            if name in devices and chans
        }
        canonical = json.dumps(
            {
                "prompt_version": PROMPT_VERSION,
                "devices": {
                    name: {"names": d.names, "description": d.description, "profile": d.profile.model_dump(mode="json")}
                    for name, d in sorted(devices.items())
                },
                "rules": rules.model_dump(mode="json"),
                "channels": {name: {str(ch): label for ch, label in chans.items()} for name, chans in labels.items()},
            },
            sort_keys=True,
            separators=(",", ":"),
        )
        return cls(devices, rules, hashlib.sha256(canonical.encode()).hexdigest(), labels)

    def profiles(self) -> dict[str, Profile]:
        return {name: d.profile for name, d in self.devices.items()}

    # --- what the LLM providers are given ----------------------------------------------------------------------

    @cached_property
    def prompt(self) -> str:
        catalogue = {}
        for name, d in self.devices.items():
            actions = {}
            for action, spec in d.profile.actions.items():
                entry: dict[str, Any] = {"description": spec.description} if spec.description else {}
                if spec.params:
                    entry["params"] = spec.json_schema()["properties"]
                if d.takes_duration(action):
                    entry["takes_duration"] = True
                actions[action] = entry
            catalogue[name] = {"names": list(d.names), "description": d.description, "actions": actions}
            if self.channels.get(name):  # "the greenhouse valve" is channel 3 (on3/off3) for the providers too
                catalogue[name]["channels"] = {str(ch): label for ch, label in self.channels[name].items()}
        return (
            "You turn an operator's instruction into exactly one command for a device of this gateway, by calling "
            f"{RUN_TOOL} with the device's name, one of its actions and that action's params. If the instruction "
            f"says for how long (an action marked takes_duration), give duration_s in seconds. If it does not map "
            f"to exactly one command of these devices, call {DECLINE_TOOL}. Never invent a device, an action or "
            "a parameter; a parameter's value must be within its range.\nDevices: "
            + json.dumps(catalogue, separators=(",", ":"), sort_keys=True)
        )

    @cached_property
    def tools(self) -> list[dict[str, Any]]:
        """Provider-neutral tool definitions: name, description, JSON-schema parameters."""
        actions = sorted({a for d in self.devices.values() for a in d.profile.actions})
        run = {
            "name": RUN_TOOL,
            "description": "Run one action on one device of this gateway.",
            "parameters": {
                "type": "object",
                "properties": {
                    "device": {"type": "string", "enum": sorted(self.devices)},
                    "action": {"type": "string", "enum": actions},
                    "params": {"type": "object", "description": "The action's parameters, as listed for the device"},
                    "duration_s": {
                        "type": "number",
                        "exclusiveMinimum": 0,
                        "maximum": MAX_DURATION_S,
                        "description": "How long the action lasts before the device is switched off again",
                    },
                },
                "required": ["device", "action", "params"],
                "additionalProperties": False,
            },
        }
        decline = {
            "name": DECLINE_TOOL,
            "description": "The instruction is not one command for these devices.",
            "parameters": {
                "type": "object",
                "properties": {"reason": {"type": "string"}},
                "required": ["reason"],
                "additionalProperties": False,
            },
        }
        return [run, decline]

    @cached_property
    def prompt_chars(self) -> int:
        return len(self.prompt) + len(json.dumps(self.tools))


def understood(command: Command, registry: Registry) -> tuple[str, int | None]:
    """A command in words, as the person who asked can check it, and its channel: "pump1 set_speed percent=40",
    "relays1 on3 (channel 3: greenhouse valve) for 30 min"."""
    entry = registry.devices.get(command.device)
    channel = None
    words = f"{command.device} {command.action}"
    if entry is not None:
        for ch, pair in channel_actions(entry.profile).items():
            if command.action in pair:
                channel = ch
                label = registry.channels.get(command.device, {}).get(ch)
                words += f" (channel {ch}" + (f": {label})" if label else ")")
    for name, value in command.params.items():
        words += f" {name}={_plain(value)}"
    if command.duration_s is not None:
        words += f" for {duration_words(command.duration_s)}"
        if entry is not None:
            off = entry.off_for(command.action)
            if off is not None:
                words += f", then {off}"
    return words, channel


def duration_words(seconds: float) -> str:
    """``630`` -> "10 min 30 s", ``5400`` -> "1 h 30 min": a duration as a person reads it, no float noise."""
    total = round(seconds, 3)
    if total < 60:
        return f"{_plain(total)} s"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if total >= size:
            count = int(total // size)
            parts.append(f"{count} {unit}")
            total -= count * size
    if total:
        parts.append(f"{_plain(round(total, 3))} s")
    return " ".join(parts)


def _plain(value: Any) -> str:
    if isinstance(value, float) and value == int(value):
        return str(int(value))
    return str(value)


def check_answer(answer: Any, registry: Registry) -> Command:
    """The arguments of a ``run_command`` call (or a cached or local command) as a validated :class:`Command`.

    The command part goes through :func:`gatewayd.commands.validate.validate`, the validation of every structured
    command; only the confirmation is left out, since the operator, not the interpreter, confirms. Anything
    unusable raises :class:`UnusableAnswer` with the validation's own details.
    """
    if not isinstance(answer, dict):
        raise UnusableAnswer("the answer is not a JSON object", details={"got": type(answer).__name__})
    unknown = sorted(set(answer) - {"device", "action", "params", "duration_s"})
    if unknown:
        raise UnusableAnswer(f"the answer has unknown fields {unknown}", details={"fields": unknown})
    payload = {"device": answer.get("device"), "action": answer.get("action"), "params": answer.get("params", {})}
    if payload["params"] is None:
        payload["params"] = {}
    try:
        request = v.parse_request({**payload, "confirm": True})
        checked = v.validate(request, registry.profiles(), default_ttl_s=1.0, max_ttl_s=float("inf"))
    except GatewayError as err:
        raise UnusableAnswer(f"the answer is not a valid command: {err.message}", details=err.details) from err
    duration = answer.get("duration_s")
    if duration is not None:
        entry = registry.devices[request.device]
        if isinstance(duration, bool) or not isinstance(duration, int | float) or not 0 < duration <= MAX_DURATION_S:
            raise UnusableAnswer("duration_s must be a number of seconds above 0", details={"duration_s": duration})
        if not entry.takes_duration(request.action):
            raise UnusableAnswer(
                f"{request.device!r} {request.action!r} does not take a duration",
                details={"device": request.device, "action": request.action},
            )
        duration = float(duration)
    return Command(request.device, request.action, dict(checked.params), duration)
