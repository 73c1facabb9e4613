"""The user's local rules file: other names for devices, other verbs for actions, and whole sentences mapped to a
command. It extends what the local interpreter derives from the device profiles (see :mod:`.local`), and the
device names also reach the LLM providers' prompt, so "the irrigation pump" means ``pump1`` on every path. The
file is optional: when the one named in the configuration does not exist the rules come from the profiles alone
(logged at start); a file that exists and is wrong is a configuration error.

```toml
[names]
pump1 = ["irrigation pump", "water pump"]

[verbs]
start = ["water with"]           # "water with the irrigation pump"

[[sentences]]
device = "pump1"
action = "set_speed"
templates = ["water (gently|slowly)"]
params = { percent = 30 }
```

Templates use the hassil syntax: ``(a|b)`` alternatives, ``[word]`` optional, ``{percent}`` the value of the
action's parameter ``percent``, ``<device>`` any name of the rule's device, ``<duration>`` a duration ("10
minutes", for actions that switch something on). Checked without importing hassil: the loader runs at every start.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gatewayd.commands.validate import check_param
from gatewayd.config.profiles import Name, Profile

Phrase = Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[^\[\]()<>{}|]+$")]
Template = Annotated[str, Field(min_length=1, max_length=300)]

_SLOT = re.compile(r"\{([^{}]*)\}")
_RULE = re.compile(r"<([^<>]*)>")
_PAIRS = {"(": ")", "[": "]", "{": "}", "<": ">"}
RULE_NAMES = frozenset({"device", "duration"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SentenceRule(_Strict):
    device: Name
    action: Name
    templates: Annotated[tuple[Template, ...], Field(min_length=1, max_length=100)]
    params: dict[Name, int | float | bool | str] = Field(default_factory=dict)  # fixed values for this sentence


class RulesFile(_Strict):
    names: dict[Name, tuple[Phrase, ...]] = Field(default_factory=dict)  # device -> other names
    verbs: dict[Name, tuple[Phrase, ...]] = Field(default_factory=dict)  # action -> other verbs
    sentences: tuple[SentenceRule, ...] = ()


EMPTY = RulesFile()


def template_problem(template: str) -> str | None:
    """What is wrong with a template's brackets, or None. hassil reports the rest when it builds the rules."""
    stack: list[str] = []
    for char in template:
        if char in _PAIRS:
            if stack and stack[-1] in "{<":
                return f"{char!r} inside a slot or rule reference"
            stack.append(char)
        elif char in _PAIRS.values():
            if not stack or _PAIRS[stack.pop()] != char:
                return f"unbalanced {char!r}"
    if stack:
        return f"unclosed {stack[-1]!r}"
    if not template.strip(" ()[]|"):
        return "matches nothing"
    return None


def check_rules(rules: RulesFile, device_profiles: Mapping[str, Profile]) -> list[tuple[str, str]]:
    """(key path, problem) for every rule that names something the configuration does not have."""
    problems: list[tuple[str, str]] = []
    for device in rules.names:
        if device not in device_profiles:
            problems.append((f"names.{device}", f"no device named {device!r}"))
    actions = {action for profile in device_profiles.values() for action in profile.actions}
    for action in rules.verbs:
        if action not in actions:
            problems.append((f"verbs.{action}", f"no device has an action {action!r}"))
    for i, rule in enumerate(rules.sentences):
        key = f"sentences.{i}"
        profile = device_profiles.get(rule.device)
        if profile is None:
            problems.append((f"{key}.device", f"no device named {rule.device!r}"))
            continue
        spec = profile.actions.get(rule.action)
        if spec is None:
            problems.append((f"{key}.action", f"device {rule.device!r} has no action {rule.action!r}"))
            continue
        for name, value in rule.params.items():
            param = spec.params.get(name)
            if param is None:
                problems.append((f"{key}.params.{name}", f"action {rule.action!r} has no parameter {name!r}"))
                continue
            _, problem = check_param(param, value)
            if problem is not None:
                problems.append((f"{key}.params.{name}", problem))
        for j, template in enumerate(rule.templates):
            where = f"{key}.templates.{j}"
            problem = template_problem(template)
            if problem is not None:
                problems.append((where, problem))
                continue
            for slot in _SLOT.findall(template):
                if slot not in spec.params:
                    problems.append((where, f"{{{slot}}} is not a parameter of {rule.action!r}"))
                elif slot in rule.params:
                    problems.append((where, f"{{{slot}}} is also fixed in params"))
            for ref in _RULE.findall(template):
                if ref not in RULE_NAMES:
                    problems.append((where, f"<{ref}> is not a known rule (use <device> or <duration>)"))
    return problems


def read_rules(path: Path) -> tuple[RulesFile, list[tuple[str, str]]]:
    """The parsed file and the problems found reading it ([] when sound); ``EMPTY`` when it cannot be used."""
    try:
        data: Any = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return EMPTY, [("", "file not found")]
    except (OSError, UnicodeDecodeError) as err:
        return EMPTY, [("", f"cannot read: {err}")]
    except tomllib.TOMLDecodeError as err:
        return EMPTY, [("", f"not valid TOML: {err}")]
    except RecursionError:  # tomllib recurses into nested arrays and inline tables
        return EMPTY, [("", "not valid TOML: arrays or tables nested too deeply")]
    try:
        return RulesFile.model_validate(data), []
    except ValidationError as exc:
        problems = []
        for e in exc.errors():
            message = "unknown key" if e["type"] == "extra_forbidden" else str(e["msg"])
            problems.append((".".join(str(p) for p in e["loc"]), message))
        return EMPTY, problems


def load_rules(path: Path | None, device_profiles: Mapping[str, Profile]) -> tuple[RulesFile, list[tuple[str, str]]]:
    if path is None:
        return EMPTY, []
    rules, problems = read_rules(path)
    if problems:
        return EMPTY, problems
    problems = check_rules(rules, device_profiles)
    return (EMPTY, problems) if problems else (rules, [])
