"""The local rule-based interpreter: the end of the chain, deterministic, no network, always an answer.

Its sentences are hassil templates generated from the registry: for every device and action, the phrasings an
operator uses ("turn on the valve", "switch the irrigation pump on for 10 minutes", "set fan 2 to 40 percent",
"read pump 1"), with every name the device answers to, plus the verbs and sentences of the user's rules file.
Parameter values and durations are captured as wildcards and parsed here (digits, decimals, number words up to
the thousands), not by hassil's number ranges: a range is expanded into every number it holds, which for a
profile's 0..1,000,000 takes minutes per sentence that does not match.

A match is a command like any other and is validated as one; no match is :class:`NotUnderstood`, whose details
list an example of everything the rules can do.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from gatewayd.config.profiles import ActionSpec, ParamSpec
from gatewayd.interpret.registry import DeviceEntry, Registry, default_names, on_actions

if TYPE_CHECKING:
    from hassil import Intents, RecognizeResult

log = structlog.get_logger("gatewayd.interpret")

LANGUAGE = "en"
SKIP_WORDS = ["please", "kindly", "can you", "could you", "would you", "will you"]

_ON = ["(turn|switch|power) on [the] <dev>", "(turn|switch|power) [the] <dev> on", "(activate|enable) [the] <dev>"]
_OFF = [
    "(turn|switch|power) off [the] <dev>",
    "(turn|switch|power) [the] <dev> off",
    "(deactivate|disable|release) [the] <dev>",
]
_START = ["(start|run) [the] <dev>"]
_STOP = ["(stop|halt) [the] <dev>"]
_READ = [
    "(read|check|query) [the] <dev>",
    "(what is|what's|how is) [the] (status|state|reading) of [the] <dev>",
    "[the] <dev> (status|state)",
    "[the] (status|state) of [the] <dev>",
]
_SET_VERBS = "(set|change|adjust|put)"
_DURATION = "{duration_value} {duration_unit}"
_DURATION_UNITS = {
    "(second|seconds|sec|secs|s)": 1,
    "(minute|minutes|min|mins)": 60,
    "(hour|hours|hr|hrs|h)": 3600,
}
_UNIT_WORDS = {
    "%": "(percent|per cent|pct|%)",
    "s": "(s|sec|secs|second|seconds)",
    "ms": "(ms|millisecond|milliseconds)",
    "min": "(min|minute|minutes)",
    "h": "(h|hour|hours)",
    "°c": "(degrees|degrees celsius|°c|c)",
    "hz": "(hz|hertz)",
    "rpm": "(rpm)",
}
_STRIP_UNITS = sorted(
    {w for words in _UNIT_WORDS.values() for w in words.strip("()").split("|")} | {"second", "minute", "hour"},
    key=len,
    reverse=True,
)
_TEMPLATE_SAFE = re.compile(r"^[^\[\]()<>{}|]+$")
_SLOT_REF = re.compile(r"\{([a-z][a-z0-9_]*)\}")

# --- numbers ---------------------------------------------------------------------------------------------------

_SMALL = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen".split()
    )
}
_TENS = {w: 10 * i for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), start=2)}
_DIGITS = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")


def parse_number(text: str) -> float | None:
    """``40``, ``-2.5``, ``forty five``, ``a hundred``, ``two thousand and ten``, ``an`` (as in "an hour");
    None for anything else. Strict on purpose: a wildcard capture that is not a number is not a match."""
    text = text.strip().lower()
    if _DIGITS.match(text):
        return float(text)
    words = [w for w in text.replace("-", " ").split() if w != "and"]
    if not words:
        return None
    total, current, seen = 0, 0, False
    for i, word in enumerate(words):
        if word in ("a", "an") and i == 0 and (len(words) == 1 or words[1] in ("hundred", "thousand")):
            current, seen = 1, True
        elif word in _SMALL:
            current, seen = current + _SMALL[word], True
        elif word in _TENS:
            current, seen = current + _TENS[word], True
        elif word == "hundred" and seen:
            current *= 100
        elif word == "thousand" and seen:
            total, current = total + current * 1000, 0
        else:
            return None
    return float(total + current)


def _strip_unit(text: str) -> str:
    text = text.strip().lower()
    for word in _STRIP_UNITS:
        if text.endswith(word) and text[: -len(word)].strip():
            head = text[: -len(word)]
            if word == "%" or head.endswith(" "):  # "55%", "55 percent"; not "thirty" losing its "y"
                return head.strip()
    return text


def parse_value(spec: ParamSpec, text: str) -> Any:
    """A captured parameter value in the parameter's type, or None when it is not one."""
    if spec.type in ("int", "float"):
        return parse_number(_strip_unit(text))
    raw = text.strip()
    if spec.type == "bool":
        word = raw.lower()
        if word in ("on", "true", "yes", "enabled", "enable"):
            return True
        if word in ("off", "false", "no", "disabled", "disable"):
            return False
        return None
    if spec.type == "enum":
        assert spec.choices is not None
        wanted = raw.lower().replace(" ", "_")
        return next((c for c in spec.choices if c.lower() == wanted), None)
    return raw or None


# --- sentences -------------------------------------------------------------------------------------------------


def _words(name: str) -> str:
    return name.replace("_", " ")


def _unit(spec: ParamSpec) -> str:
    if not spec.unit:
        return ""
    words = _UNIT_WORDS.get(spec.unit.lower())
    if words is not None:
        return f" [{words}]"
    return f" [{spec.unit}]" if _TEMPLATE_SAFE.match(spec.unit) else ""


def _example_value(spec: ParamSpec) -> str:
    if spec.type in ("int", "float"):
        lo, hi = spec.min if spec.min is not None else 0, spec.max if spec.max is not None else 100
        value = spec.default if isinstance(spec.default, int | float) and lo < spec.default < hi else (lo + hi) / 2
        unit = {"%": " percent", "s": " seconds"}.get((spec.unit or "").lower(), f" {spec.unit}" if spec.unit else "")
        return f"{float(value):g}{unit}"
    if spec.type == "bool":
        return "on"
    if spec.type == "enum":
        assert spec.choices is not None
        return spec.choices[0].replace("_", " ")
    return "text"


def _param_words(name: str, spec: ParamSpec) -> str:
    words = _words(name)
    if spec.unit and words.endswith(" " + spec.unit.lower()):  # ramp_s -> "ramp"
        words = words[: -len(spec.unit) - 1]
    return words


@dataclass(frozen=True)
class Phrasing:
    template: str
    example: str


def _with_optional(base: Phrasing, action: ActionSpec, exclude: str | None) -> list[Phrasing]:
    """The base sentence, and one variant per optional parameter: "... with ramp 5 seconds"."""
    out = [base]
    for name, spec in action.params.items():
        if spec.required or name == exclude:
            continue
        words = _param_words(name, spec)
        out.append(
            Phrasing(
                f"{base.template} (with|and|over) [a] {words} [of] {{v_{name}}}{_unit(spec)}",
                f"{base.example} with {words} {_example_value(spec)}",
            )
        )
    return out


def phrasings(entry: DeviceEntry, action: str, extra_verbs: tuple[str, ...] = ()) -> list[Phrasing]:
    """Every generated sentence for one action of one device, each with an example of it."""
    profile = entry.profile
    spec = profile.actions[action]
    defaults = default_names(entry.name)  # for examples, the first name a person gave it, else the spoken one
    name = next((n for n in entry.names if n not in defaults), entry.names[-1])
    required = [p for p, s in spec.params.items() if s.required]
    out: list[Phrasing] = []
    off = entry.off_action
    ons = on_actions(profile)
    if not required:
        templates: list[str] = []
        if action == "on" or (action in ons and "on" not in profile.actions):
            templates += _ON
        if action == "start":
            templates += _START
        if action == "off" or (action == off and "off" not in profile.actions):
            templates += _OFF
        if action == "stop":
            templates += _STOP
        if action == "read":
            templates += _READ
        if extra_verbs:
            templates.append(f"({'|'.join(extra_verbs)}) [the] <dev>")
        templates.append(f"{_words(action)} [the] <dev>")
        for template in dict.fromkeys(templates):
            example = _render(template, name)
            out.extend(_with_optional(Phrasing(template, example), spec, None))
    elif len(required) == 1 and spec.params[required[0]].type in ("int", "float"):
        param = required[0]
        pspec = spec.params[param]
        target = _words(action.removeprefix("set_")) if action.startswith("set_") else _param_words(param, pspec)
        value = f"{{v_{param}}}{_unit(pspec)}"
        ex_value = _example_value(pspec)
        bases = []
        if action == "set":  # "set fan 2 to 40 percent": the parameter is the device's level
            target = f"({target}|level|output)"
            bases.append(Phrasing(f"{_SET_VERBS} [the] <dev> [{target}] to {value}", f"set {name} to {ex_value}"))
        elif action.startswith("set_"):
            bases.append(
                Phrasing(f"{_SET_VERBS} [the] <dev> [{target}] to {value}", f"set {name} {target} to {ex_value}")
            )
        if action == "set" or action.startswith("set_"):
            bases.append(
                Phrasing(
                    f"{_SET_VERBS} [the] {target} of [the] <dev> to {value}",
                    f"set the {target} of {name} to {ex_value}",
                )
            )
        if extra_verbs:
            verbs = "|".join(extra_verbs)
            bases.append(Phrasing(f"({verbs}) [the] <dev> [to] {value}", f"{extra_verbs[0]} {name} {ex_value}"))
        bases.append(Phrasing(f"{_words(action)} [the] <dev> [to] {value}", f"{_words(action)} {name} {ex_value}"))
        for base in bases:
            out.extend(_with_optional(base, spec, param))
    else:
        parts, examples = [], []
        for param in required:
            pspec = spec.params[param]
            parts.append(f"{_param_words(param, pspec)} [of|to|=] {{v_{param}}}{_unit(pspec)}")
            examples.append(f"{_param_words(param, pspec)} {_example_value(pspec)}")
        base = Phrasing(
            f"{_words(action)} [the] <dev> [with] " + " [and] ".join(parts),
            f"{_words(action)} {name} " + " ".join(examples),
        )
        out.extend(_with_optional(base, spec, None))
    if entry.takes_duration(action):
        out += [Phrasing(f"{p.template} for {_DURATION}", f"{p.example} for 10 minutes") for p in out]
    return out


def _render(template: str, name: str) -> str:
    """A readable example from a simple template: first alternatives, optional parts dropped."""
    text = re.sub(r"\[[^\]]*\]", "", template)
    text = re.sub(r"\(([^)|]*)[^)]*\)", r"\1", text)
    return re.sub(r"\s+", " ", text.replace("<dev>", name)).strip()


# --- the interpreter -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalMatch:
    device: str
    action: str
    params: dict[str, Any]
    duration_s: float | None

    def answer(self) -> dict[str, Any]:
        out: dict[str, Any] = {"device": self.device, "action": self.action, "params": dict(self.params)}
        if self.duration_s is not None:
            out["duration_s"] = self.duration_s
        return out


class LocalRules:
    """Built once per registry (in a thread: it imports hassil, about 20 MB, only when the interpreter is used);
    ``match`` is a pure function of the text."""

    def __init__(self, registry: Registry, intents: Intents, capabilities: list[dict[str, Any]]):
        self.registry = registry
        self._intents = intents
        self.capabilities = capabilities

    @classmethod
    def build(cls, registry: Registry) -> LocalRules:
        from hassil import Intents

        intents: dict[str, Any] = {}
        wildcards: set[str] = {"duration_value"}
        capabilities: list[dict[str, Any]] = []
        for entry in registry.devices.values():
            device_rule = "(" + "|".join(entry.names) + ")"
            rules = {"dev": device_rule, "device": device_rule, "duration": _DURATION}
            for action, spec in entry.profile.actions.items():
                wildcards.update(f"v_{p}" for p in spec.params)
                generated = phrasings(entry, action, registry.rules.verbs.get(action, ()))
                data: list[dict[str, Any]] = [
                    {
                        "sentences": [p.template for p in generated],
                        "expansion_rules": rules,
                        "metadata": {"device": entry.name, "action": action, "params": {}},
                    }
                ]
                for rule in registry.rules.sentences:
                    if rule.device == entry.name and rule.action == action:
                        data.append(
                            {
                                "sentences": [_SLOT_REF.sub(r"{v_\1}", t) for t in rule.templates],
                                "expansion_rules": rules,
                                "metadata": {"device": entry.name, "action": action, "params": dict(rule.params)},
                            }
                        )
                intents[f"{entry.name}.{action}"] = {"data": data}
                capabilities.append(
                    {
                        "device": entry.name,
                        "action": action,
                        "example": generated[0].example,
                        **({"takes_duration": True} if entry.takes_duration(action) else {}),
                    }
                )
        lists: dict[str, Any] = {name: {"wildcard": True} for name in sorted(wildcards)}
        lists["duration_unit"] = {"values": [{"in": k, "out": v} for k, v in _DURATION_UNITS.items()]}
        built = Intents.from_dict({"language": LANGUAGE, "intents": intents, "lists": lists, "skip_words": SKIP_WORDS})
        for intent in built.intents.values():
            # hassil parses templates on first use; parse them now, so a user's sentence it cannot read is dropped
            # here, with a log line, instead of failing every match later. (The loader checks them too, roughly.)
            for block in list(intent.data):
                try:
                    block.sentences  # noqa: B018 - a cached property: parsing is the point
                except Exception as err:
                    intent.data.remove(block)
                    log.error(
                        "interpret_rule_dropped", intent=intent.name, templates=block.sentence_texts, error=str(err)
                    )
        return cls(registry, built, capabilities)

    def match(self, text: str) -> LocalMatch | None:
        """The first parse whose captured values all make sense, or None."""
        from hassil import recognize_all

        for result in recognize_all(text, self._intents, language=LANGUAGE):
            found = self._command(result)
            if found is not None:
                return found
        return None

    def _command(self, result: RecognizeResult) -> LocalMatch | None:
        meta = result.intent_metadata or {}
        device, action = meta.get("device"), meta.get("action")
        entry = self.registry.devices.get(str(device))
        if entry is None or action not in entry.profile.actions:
            return None
        spec = entry.profile.actions[str(action)]
        params: dict[str, Any] = dict(meta.get("params") or {})
        amount: float | None = None
        unit_s: float | None = None
        for name, entity in result.entities.items():
            if name.startswith("v_") and name[2:] in spec.params:
                value = parse_value(spec.params[name[2:]], str(entity.value))
                if value is None:
                    return None
                params[name[2:]] = value
            elif name == "duration_value":
                amount = parse_number(str(entity.value))
                if amount is None or amount <= 0:
                    return None
            elif name == "duration_unit":
                unit_s = float(entity.value)
        duration = amount * unit_s if amount is not None and unit_s is not None else None
        return LocalMatch(entry.name, str(action), params, duration)

    def examples(self) -> Iterator[str]:
        for capability in self.capabilities:
            yield capability["example"]
