"""The local rule-based interpreter: the end of the chain, deterministic, no network, always an answer.

A sentence is read in four passes, each a pure function:

1. **Preparation** (:mod:`.lexicon`): case and accents folded, contractions opened, the language guessed from its
   words, durations in words rewritten ("half an hour" -> "30 minutes"), number words turned into digits by
   ``text2num`` in that language, then tokens: words, numbers (ordinals marked), ``%`` and degrees.
2. **Words**: every name a device answers to (its own, the spoken form, the rules file's names, channel labels
   from the configuration, the nouns of its descriptions and their usual translations) is found first, longest
   first; the remaining words map to concepts (on, off, set, question, negation ...). A word nobody knows may be
   a typo: it is corrected when exactly one known word of the same meaning is one edit away (a transposition
   counts as one), never for words of three letters or less, and never when two meanings tie.
3. **Refusals before anything else**: a negated request, two commands in one sentence, an ambiguous name, a
   multi-channel device without its channel, a number nobody asked for, a schedule ("in 10 minutes") are each
   refused with the reason and, where one helps, a question back. Nothing is guessed.
4. **Meaning**: the concept and the device give the action (on/off/start/stop, a channel's on3/off3, the one
   settable parameter the words and the unit point to); numbers become the parameter's value in its unit
   (minutes to seconds, °F to °C, "half" as half the range), durations become ``duration_s``.

Questions ("is the pump running?", "what's the humidity?") come out as a :class:`LocalQuestion`: which devices
and which telemetry points; the service answers them from state and telemetry and never runs a command.

Whole sentences from the user's rules file are hassil templates, matched first (their parameter values and
durations are wildcards parsed here, not hassil number ranges, which expand into every number they hold).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import structlog

from gatewayd.config.profiles import ParamSpec, Profile
from gatewayd.interpret import lexicon as lx
from gatewayd.interpret.registry import DeviceEntry, Registry, channel_actions, default_names, on_actions

if TYPE_CHECKING:
    from hassil import Intents, RecognizeResult

log = structlog.get_logger("gatewayd.interpret")

LANGUAGE = "en"
_DURATION = "{duration_value} {duration_unit}"
_DURATION_UNITS = {
    "(second|seconds|sec|secs|s)": 1,
    "(minute|minutes|min|mins)": 60,
    "(hour|hours|hr|hrs|h)": 3600,
}
_SLOT_REF = re.compile(r"\{([a-z][a-z0-9_]*)\}")
MAX_UNKNOWN_WORDS = 2  # words nobody knows that a sentence may carry ("for the tomatoes") and still be acted on
MAX_SUGGESTIONS = 4

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
    text = text.strip().lower().rstrip("%").strip()
    for word in ("percent", "per cent", "seconds", "second", "secs", "sec", "degrees", "minutes", "minute"):
        if text.endswith(" " + word):
            return text[: -len(word)].strip()
    return text


def parse_value(spec: ParamSpec, text: str) -> Any:
    """A captured parameter value (a rules-file sentence's ``{slot}``) in the parameter's type, or None."""
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


def nice_number(value: float) -> str:
    """A value as a person writes it: no float noise ("1800.01" is never shown), at most 3 significant digits."""
    if value == int(value) and abs(value) < 1e9:
        return str(int(value))
    return f"{float(f'{value:.3g}'):g}"


# --- results ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalMatch:
    device: str
    action: str
    params: dict[str, Any]
    duration_s: float | None
    channel: int | None = None
    language: str = "en"

    def answer(self) -> dict[str, Any]:
        out: dict[str, Any] = {"device": self.device, "action": self.action, "params": dict(self.params)}
        if self.duration_s is not None:
            out["duration_s"] = self.duration_s
        return out


@dataclass(frozen=True)
class Asked:
    """One device a question is about: the telemetry points asked for (empty: all of them), the channel."""

    device: str
    points: tuple[str, ...] = ()
    channel: int | None = None


@dataclass(frozen=True)
class LocalQuestion:
    """A question about state: answered from the devices' state and latest telemetry, never by a command."""

    about: tuple[Asked, ...]
    expects: Literal["on", "off"] | None = None  # a yes/no question: "is the pump running?" expects "on"
    language: str = "en"


Reason = Literal[
    "negated",
    "several_commands",
    "ambiguous_device",
    "missing_channel",
    "no_such_channel",
    "no_device",
    "unknown_device",
    "no_action",
    "unsupported",
    "unexplained_number",
    "scheduled",
    "relative",
    "conditional",
    "ambiguous_value",
    "not_understood",
]


@dataclass(frozen=True)
class LocalRefusal:
    """Why the rules will not act, in words for a person, and (when they know it) the device meant."""

    reason: Reason
    message: str
    device: str | None = None
    channel: int | None = None
    candidates: tuple[str, ...] = ()
    language: str = "en"


Understanding = LocalMatch | LocalQuestion | LocalRefusal


# --- what the registry's devices offer ------------------------------------------------------------------------


@dataclass(frozen=True)
class Ref:
    device: str
    channel: int | None
    tier: int  # 1: a name given to it (its own, the rules file, a channel label); 2: a noun from a description
    valve: bool = False  # named as a valve: open/close mean on/off


@dataclass
class DeviceInfo:
    entry: DeviceEntry
    channels: dict[int, tuple[str, str]]  # channel -> (on action, off action)
    channel_nouns: frozenset[str]
    channel_points: dict[int, str]
    points: dict[str, frozenset[str]]  # telemetry point -> the words that ask for it
    set_actions: list[tuple[str, str, ParamSpec, frozenset[str]]]  # (action, param, spec, target words)
    names_valve: bool

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def profile(self) -> Profile:
        return self.entry.profile


_GENERIC = lx._words(
    "controller node module unit device simulated single phase with on of for and the a an gpio pin output "
    "modbus rtu eastron waveshare channel contact"
)
_SPLIT = re.compile(r"[,:;()/]|\b(?:with|on|of|for|and|at|in|via)\b")
_WORD = re.compile(r"[^\W\d_]+|\d+")


def _phrases(description: str) -> list[tuple[str, ...]]:
    """The noun phrases of a description's first part, "Irrigation pump controller (simulated)" ->
    irrigation pump controller, irrigation pump, pump controller, irrigation, pump, ..."""
    first = _SPLIT.split(lx.fold(description), maxsplit=1)[0]
    words = [w for w in _WORD.findall(first) if not w.isdigit() and not re.match(r"^\d", w)]
    out: list[tuple[str, ...]] = []
    for i in range(len(words)):
        for j in range(i + 1, min(len(words), i + 4) + 1):
            phrase = tuple(words[i:j])
            if all(w in _GENERIC for w in phrase) or len("".join(phrase)) < 3:
                continue
            if phrase[0] in _GENERIC or (phrase[-1] in _GENERIC and len(phrase) > 1):
                continue
            out.append(phrase)
    return out


def _singular(word: str) -> str:
    return word[:-1] if len(word) > 4 and word.endswith("s") and not word.endswith("ss") else word


def _point_words(name: str, description: str) -> frozenset[str]:
    words = [w for w in re.split(r"[_\W]+", lx.fold(name)) if w]
    found: set[str] = set()
    for word in reversed(words):  # the head noun decides: power_factor is a factor, active_power a power
        for key, synonyms in lx.POINT_WORDS.items():
            if word == key or word in synonyms:
                found |= {key, *synonyms}
                break
        if found:
            break
    if not found:
        for word in _WORD.findall(lx.fold(description)):
            for key, synonyms in lx.POINT_WORDS.items():
                if word == key or word in synonyms:
                    found |= {key, *synonyms}
    if not found:
        found |= {w for w in words if len(w) > 2 and not w.isdigit()}
    return frozenset(found)


def _describe(entry: DeviceEntry, labels: Mapping[int, str]) -> DeviceInfo:
    profile = entry.profile
    channels = channel_actions(profile)
    nouns: set[str] = set()
    if channels:
        nouns |= lx.CHANNEL_NOUNS
        for on, off in channels.values():
            for action in (on, off):
                text = lx.fold(profile.actions[action].description)
                nouns |= {_singular(w) for w in re.findall(r"([^\W\d_]+) \d+\b", text)}
        for part in re.findall(r"([^\W\d_]+)\s+\d+\s*-\s*\d+", lx.fold(entry.description)):  # "valves 1-8"
            nouns.add(_singular(part))
        for noun in list(nouns):
            for english, others in lx.TRANSLATIONS.items():
                if noun == english:
                    nouns |= others
    channel_points: dict[int, str] = {}
    for point in profile.telemetry:
        m = re.match(r"^([a-z_]*?)_?(\d+)$", point)
        if m and int(m.group(2)) in channels:
            channel_points[int(m.group(2))] = point
    points = {
        name: _point_words(name, p.description)
        for name, p in profile.telemetry.items()
        if name not in channel_points.values()
    }
    set_actions = []
    for action, spec in profile.actions.items():
        required = [p for p, s in spec.params.items() if s.required]
        if len(required) == 1 and spec.params[required[0]].type in ("int", "float"):
            param = required[0]
            pspec = spec.params[param]
            words = {w for w in re.split(r"[_\W]+", lx.fold(f"{action} {param}")) if len(w) > 1} - {"set", "s", "c"}
            # The parameter's own description, not the action's prose: "Raise an event when the temperature goes
            # above this" must not make "set the temperature to 20" an alarm threshold on a node with no setpoint.
            words |= {w for w in _WORD.findall(lx.fold(pspec.description)) if len(w) > 3}
            for english, others in lx.TRANSLATIONS.items():
                if english in words:
                    words |= others
            for key, synonyms in lx.POINT_WORDS.items():
                if key in words:
                    words |= synonyms
            set_actions.append((action, param, pspec, frozenset(words)))
    valve = any(w in lx.VALVE_WORDS for n in entry.names for w in n.split()) or any(
        w in lx.VALVE_WORDS for p in _phrases(entry.description) for w in p
    )
    del labels
    return DeviceInfo(entry, channels, frozenset(nouns), channel_points, points, set_actions, valve)


# --- tokens ----------------------------------------------------------------------------------------------------


@dataclass
class Tok:
    word: str  # folded
    num: float | None = None
    ordinal: bool = False
    concept: str | None = None
    refs: tuple[Ref, ...] = ()  # set on the first token of a name
    span: int = 1  # tokens the name covers
    used: bool = False  # explained: part of a name, a channel, a value, a duration
    corrected: bool = False


_TOKEN = re.compile(
    r"(?P<num>(?:(?<![\w-])-)?\d+(?:[.,]\d+)?)(?P<ord>ème|eme|ieme|st|nd|rd|th|er|re|º|ª|e(?![a-z])|\.(?=\s+[^\W\d_]))?"
    r"|(?P<deg>°\s*[cf]?)|(?P<word>[^\W\d_]+)|(?P<sym>[%?,&+])"
)
_CONTRACTIONS = [
    (re.compile(r"n't\b"), " not"),
    (re.compile(r"\b(what|that|it|there|how|who|where)'s\b"), r"\1 is"),
    (re.compile(r"'(?:s|d|ll|re|ve|m)\b"), " "),
    (re.compile(r"\b(qu|[ldjmnst])'"), r"\1 "),
]
_QUESTION_START = {"Q"}
_QUESTION_NOISE = lx._words("status state what whats is are how hows the of all everything ? overall")
_TYPO_3 = {"teh": "the", "hte": "the", "adn": "and", "nad": "and", "fro": "for", "ot": "to"}


def prepare(text: str) -> tuple[list[Tok], bool, str]:
    """(tokens, asked with a question mark, language)."""
    low = unicodedata.normalize("NFKC", text).casefold().replace("\u2019", "'").replace("\u2018", "'").replace("`", "'")
    question = "?" in low or "¿" in low
    low = low.replace("¿", " ").replace("¡", " ").replace("?", " ? ")
    for pattern, repl in _CONTRACTIONS:
        low = pattern.sub(repl, low)
    low = re.sub(r"(?<=[^\W\d_])-(?=[^\W\d_])", " ", low)  # "est-elle", "de-energise"
    lang = lx.guess_language(lx.fold(w) for w in re.findall(r"[^\W\d_]+", low))
    low = lx.rewrite(low, lang)
    if re.search(r"[^\W\d_]", low):
        low = lx.after_digits(lx.words_to_digits(low, lang))
    tokens: list[Tok] = []
    for m in _TOKEN.finditer(low):
        if m.group("num") is not None:
            raw = m.group("num")
            if "," in raw and lang == "en":
                for part in raw.split(","):
                    tokens.append(Tok(part, num=float(part)))
                continue
            value = float(raw.replace(",", "."))
            tokens.append(Tok(raw, num=value, ordinal=m.group("ord") is not None))
        elif m.group("deg") is not None:
            tokens.append(Tok("°f" if m.group("deg").endswith("f") else "°c"))
        elif m.group("word") is not None:
            tokens.append(Tok(lx.fold(m.group("word"))))
        else:
            tokens.append(Tok(m.group("sym")))
    return tokens, question, lang


# --- typos -----------------------------------------------------------------------------------------------------


def _osa(a: str, b: str) -> int:
    """Optimal string alignment distance (Levenshtein plus adjacent transpositions)."""
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        prev2, prev = prev, cur
    return prev[-1]


class Speller:
    """Bounded correction by a symmetric-delete index: a word's one-letter deletions point back to the known
    words that share them, so the candidates one edit away are found with a few dictionary lookups, whatever the
    vocabulary's size; each is then checked with the true distance. A correction is made only when every
    candidate at the best distance means the same thing (a near-tie between meanings is no correction)."""

    def __init__(self, vocabulary: Mapping[str, str]):
        self._meaning = dict(vocabulary)  # word -> what it means (a concept, or a name key)
        self._index: dict[str, set[str]] = {}
        for word in self._meaning:
            if len(word) >= 4:
                for key in self._deletes(word):
                    self._index.setdefault(key, set()).add(word)

    @staticmethod
    def _deletes(word: str) -> set[str]:
        return {word} | {word[:i] + word[i + 1 :] for i in range(len(word))}

    def correct(self, word: str) -> str | None:
        if len(word) < 4 or not word.isalpha():
            return _TYPO_3.get(word)
        found: set[str] = set()
        for key in self._deletes(word):
            found |= self._index.get(key, set())
        close = [w for w in found if w != word and _osa(word, w) == 1]
        if not close:
            return None
        meanings = {self._meaning[w] for w in close}
        if len(meanings) != 1:
            return None
        return min(close)


# --- the interpreter -------------------------------------------------------------------------------------------

_ACT_CLASSES = {
    "ON": "on",
    "START": "start",
    "PART_ON": "on",
    "OFF": "off",
    "STOP": "stop",
    "PART_OFF": "off",
    "OPEN": "open",
    "CLOSE": "close",
    "SET": "set",
    "READ": "read",
    "IDENTIFY": "identify",
}
_POSITIVE = {"on", "start", "open"}
_VERB_GROUP = {
    "on": "switch",
    "off": "switch",
    "start": "switch",
    "stop": "switch",
    "open": "switch",
    "close": "switch",
}
_NEGATIVE = {"off", "stop", "close"}


@dataclass
class _Parse:
    tokens: list[Tok]
    question: bool
    lang: str
    mentions: list[tuple[int, tuple[Ref, ...]]] = field(default_factory=list)
    channels: list[tuple[int, int, str | None]] = field(default_factory=list)  # (token index, channel, noun)
    unknown: list[str] = field(default_factory=list)


class LocalRules:
    """Built once per registry (in a thread: it imports hassil, about 20 MB, and text2num, only when the
    interpreter is used); :meth:`understand` is a pure function of the text."""

    def __init__(
        self,
        registry: Registry,
        intents: Intents | None,
        capabilities: list[dict[str, Any]],
        infos: dict[str, DeviceInfo],
        names: dict[tuple[str, ...], tuple[Ref, ...]],
        phrases: dict[tuple[str, ...], str],
    ):
        self.registry = registry
        self._intents = intents
        self.capabilities = capabilities
        self._infos = infos
        self._names = names
        self._name_len = max((len(k) for k in names), default=1)
        self._phrases = phrases
        self._phrase_len = max((len(k) for k in phrases), default=1)
        vocabulary: dict[str, str] = dict(lx.CONCEPTS)
        for lang_words in lx.LANGUAGE_ONLY.values():
            vocabulary.update(lang_words)
        for key in names:
            for word in key:
                if not word.isdigit():
                    vocabulary.setdefault(word, "NAME:" + "|".join(sorted({r.device for r in names[key]})))
        for words in (*lx.POINT_WORDS.values(), lx.STATE_ON, lx.STATE_OFF, lx.CHANNEL_NOUNS):
            for word in words:
                vocabulary.setdefault(word, "WORD:" + word)
        for unit in lx.TIME_UNITS:
            vocabulary.setdefault(unit, "TIME")
        for info in infos.values():
            for _, _, _, words in info.set_actions:
                for word in words:
                    vocabulary.setdefault(word, "WORD:" + word)
            for words in info.points.values():
                for word in words:
                    vocabulary.setdefault(word, "WORD:" + word)
            for noun in info.channel_nouns:
                vocabulary.setdefault(noun, "WORD:" + noun)
        for key in phrases:
            for word in key:
                vocabulary.setdefault(word, "WORD:" + word)
        for word in (*lx.LEVELS, *lx.PERCENT, *lx.CELSIUS, *lx.FAHRENHEIT, *lx.ORDINALS, *lx.NUMBER_MARK):
            vocabulary.setdefault(word, "WORD:" + word)
        self._known = frozenset(vocabulary)
        self._point_vocab = frozenset(w for info in infos.values() for words in info.points.values() for w in words)
        self._speller = Speller(vocabulary)

    # --- building ----------------------------------------------------------------------------------------------

    @classmethod
    def build(cls, registry: Registry) -> LocalRules:
        infos = {name: _describe(entry, registry.channels.get(name, {})) for name, entry in registry.devices.items()}
        names: dict[tuple[str, ...], list[Ref]] = {}

        def add(phrase: Iterable[str], ref: Ref) -> None:
            key = tuple(t.word for t in prepare(" ".join(phrase))[0])
            if not key:
                return
            refs = names.setdefault(key, [])
            if not any(r.device == ref.device and r.channel == ref.channel and r.tier <= ref.tier for r in refs):
                refs[:] = [r for r in refs if not (r.device == ref.device and r.channel == ref.channel)] + [ref]

        for name, entry in registry.devices.items():
            info = infos[name]
            for spoken in entry.names:
                valve = any(w in lx.VALVE_WORDS for w in spoken.split())
                add([spoken], Ref(name, None, 1, valve))
            for channel, label in registry.channels.get(name, {}).items():
                valve = any(w in lx.VALVE_WORDS for w in lx.fold(label).split())
                add([label], Ref(name, channel, 1, valve))
            for description in dict.fromkeys([entry.description, entry.profile.description]):
                for phrase in _phrases(description):
                    valve = any(w in lx.VALVE_WORDS for w in phrase)
                    add(phrase, Ref(name, None, 2, valve))
                    for i, word in enumerate(phrase):  # "die Pumpe", "la vanne": the usual translations
                        for other in lx.TRANSLATIONS.get(word, ()):
                            translated = (*phrase[:i], other, *phrase[i + 1 :])
                            if len(translated) == 1:
                                add(translated, Ref(name, None, 2, valve or other in lx.VALVE_WORDS))
            del info
        phrases = dict(lx.PHRASES)
        for verb_action, verbs in registry.rules.verbs.items():
            for verb in verbs:
                key = tuple(t.word for t in prepare(verb)[0])
                if key:
                    phrases[key] = f"ACTION:{verb_action}"
        for entry in registry.devices.values():
            for action in entry.profile.actions:
                if action in ("on", "off", "start", "stop", "read", "identify") or action in channel_actions_set(
                    entry.profile
                ):
                    continue
                key = tuple(lx.fold(w) for w in action.split("_"))
                if key[0] == "set" or len(key) < 2:
                    if len(key) == 1:
                        phrases.setdefault(key, f"ACTION:{action}")
                    continue
                phrases.setdefault(key, f"ACTION:{action}")
        intents = _rules_intents(registry)
        capabilities: list[dict[str, Any]] = []
        local = cls(registry, intents, capabilities, infos, {k: tuple(v) for k, v in names.items()}, phrases)
        for warm in ("turn on one", "schalte eins ein", "enciende uno", "allume un"):  # text2num's first calls
            local.understand(warm)
        for name, entry in registry.devices.items():
            for action in entry.profile.actions:
                capabilities.append(
                    {
                        "device": name,
                        "action": action,
                        "example": local.example(name, action),
                        **({"takes_duration": True} if entry.takes_duration(action) else {}),
                    }
                )
        return local

    # --- examples ----------------------------------------------------------------------------------------------

    def _spoken(self, device: str) -> str:
        entry = self.registry.devices[device]
        defaults = default_names(device)
        return next((n for n in entry.names if n not in defaults), device)

    def example(self, device: str, action: str, channel: int | None = None) -> str:
        """A sentence these rules understand as exactly this action of this device (and channel)."""
        info = self._infos[device]
        name = self._spoken(device)
        for ch, (on, off) in info.channels.items():
            if action in (on, off):
                label = self.registry.channels.get(device, {}).get(ch)
                target = f"the {label}" if label else f"channel {ch} of {name}"
                return f"turn {'on' if action == on else 'off'} {target}"
        if action in ("on", "off", "start", "stop", "read", "identify"):
            verb = {"on": "turn on", "off": "turn off"}.get(action, action)
            return f"{verb} {name}"
        if info.channels and action == info.entry.off_action:
            return f"turn off all channels of {name}"
        for set_action, param, spec, _ in info.set_actions:
            if set_action == action:
                target = " ".join(w for w in action.split("_") if w != "set") or _words(param)
                return f"set {name} {target} to {_example_value(spec)}"
        return f"{_words(action)} {name}"

    def suggestions(self, refusal: LocalRefusal, text: str = "") -> list[str]:
        """The closest sentences that would work: for the device named (and its channel), few, no duplicates."""
        devices = [refusal.device] if refusal.device else list(refusal.candidates)
        if not devices:
            return []
        words = {t.word for t in prepare(text)[0]} if text else set()
        wanted: set[str] = set()
        for word in words:
            concept = lx.CONCEPTS.get(word)
            if concept in _ACT_CLASSES:
                wanted.add(_ACT_CLASSES[concept])
        scored: list[tuple[int, int, str]] = []
        for i, device in enumerate(devices):
            info = self._infos.get(device)
            if info is None:
                continue
            for j, action in enumerate(info.profile.actions):
                channel = None
                for ch, (on, off) in info.channels.items():
                    if action in (on, off):
                        channel = ch
                if channel is not None and channel != (refusal.channel or 1):
                    continue  # one channel's sentences, the one named, else the first as a pattern
                kind = self._kind(info, action)
                score = 0 if kind in wanted else 1
                scored.append((score, i * 100 + j, self.example(device, action, channel)))
        if len(devices) > 1:  # several devices: the closest sentence of each
            best: dict[int, tuple[int, int, str]] = {}
            for item in scored:
                key = item[1] // 100
                if key not in best or item < best[key]:
                    best[key] = item
            scored = list(best.values())
            scored.sort(key=lambda item: item[1])
            return list(dict.fromkeys(s for _, _, s in scored))[: MAX_SUGGESTIONS + 1]
        out = [s for _, _, s in sorted(scored)]
        return list(dict.fromkeys(out))[:MAX_SUGGESTIONS]

    def _kind(self, info: DeviceInfo, action: str) -> str:
        for on, off in info.channels.values():
            if action == on:
                return "on"
            if action == off:
                return "off"
        if any(action == a for a, *_ in info.set_actions):
            return "set"
        return action

    def examples(self) -> Iterator[str]:
        for capability in self.capabilities:
            yield capability["example"]

    # --- matching ----------------------------------------------------------------------------------------------

    def match(self, text: str) -> LocalMatch | None:
        """The command the text asks for, or None (a question or a refusal is None here)."""
        found = self.understand(text)
        return found if isinstance(found, LocalMatch) else None

    def understand(self, text: str) -> Understanding:
        ruled = self._from_rules_file(text)
        if ruled is not None:
            return ruled
        tokens, question, lang = prepare(text)
        if len(tokens) > 60:
            return LocalRefusal("not_understood", "too long for the local rules: one short command, please")
        p = _Parse(tokens, question, lang)
        self._words(p)
        return self._meaning(p)

    def _words(self, p: _Parse) -> None:
        toks = p.tokens
        # typos first, on words nobody knows
        for tok in toks:
            if tok.num is None and tok.word not in self._known and tok.word.isalpha():
                fixed = self._speller.correct(tok.word)
                if fixed is None and _singular(tok.word) in self._known:
                    fixed = _singular(tok.word)
                if fixed is not None:
                    tok.word, tok.corrected = fixed, fixed != _singular(tok.word)
        i = 0
        while i < len(toks):
            found = False
            for n in range(min(self._name_len, len(toks) - i), 0, -1):
                key = tuple(t.word for t in toks[i : i + n])
                refs = self._names.get(key)
                if refs is None and n == 1:
                    refs = self._names.get((_singular(key[0]),))
                if refs is not None and not (n == 1 and toks[i].num is not None):
                    toks[i].refs, toks[i].span = refs, n
                    for t in toks[i : i + n]:
                        t.used = True
                    p.mentions.append((i, refs))
                    i += n
                    found = True
                    break
            if found:
                continue
            for n in range(min(self._phrase_len, len(toks) - i), 1, -1):
                key = tuple(t.word for t in toks[i : i + n])
                concept = self._phrases.get(key)
                if concept is not None:
                    toks[i].concept = concept
                    for t in toks[i + 1 : i + n]:
                        t.concept = "FILLER"
                    i += n
                    found = True
                    break
            if found:
                continue
            tok = toks[i]
            if tok.num is None:
                concept = lx.LANGUAGE_ONLY.get(p.lang, {}).get(tok.word) or lx.CONCEPTS.get(tok.word)
                if concept is None and (tok.word,) in self._phrases:
                    concept = self._phrases[(tok.word,)]
                tok.concept = concept
            i += 1

    # --- meaning -----------------------------------------------------------------------------------------------

    def _meaning(self, p: _Parse) -> Understanding:
        toks, lang = p.tokens, p.lang
        words = [t for t in toks if t.num is None]
        if not words:
            return LocalRefusal("not_understood", "there are no words to act on", language=lang)
        concepts = [t.concept for t in toks]
        first = next((t for t in toks if t.concept not in ("FILLER", "TO", "OF", None) or t.refs or t.num), None)
        has = set(concepts)
        verb_classes = [_ACT_CLASSES[c] for c in concepts if c in _ACT_CLASSES and c not in ("PART_ON", "PART_OFF")]
        question = bool(first is not None and first.concept in _QUESTION_START) or (
            p.question and not verb_classes and "MODAL" not in has
        )
        if "MODAL" in has and first is not None and first.concept == "MODAL":
            question = False
        if not question and "IF" in has and "READ" in has:
            question = True  # "check if the pump is running"
        if not question and not verb_classes and any(t.word in lx.COPULAS for t in toks):
            question = True  # "the pump is on", "I think the valve is open": said of a state, not asked for
        if not question and not any(t.num is not None and not t.used for t in toks):
            particles = [c for c in concepts if c in ("PART_ON", "PART_OFF")]
            point_words = {t.word for t in toks} & self._point_vocab
            named = any(t.refs for t in toks)
            if not verb_classes and not particles and ({"STATUS", "Q"} & has or point_words):
                question = True  # "pump1 status", "sensor battery", "meter reading"
            elif verb_classes == ["read"] and point_words and not named:
                question = True  # "check the battery": a reading, from what the gateway knows
        # "no 3" is "number 3"; otherwise a negation word negates
        negated = any(
            t.concept == "NEG" and not (t.word in lx.NUMBER_MARK and i + 1 < len(toks) and toks[i + 1].num is not None)
            for i, t in enumerate(toks)
        )
        if not question and {"COND", "IF"} & has:
            return LocalRefusal(
                "conditional",
                "I don't act on conditions (if, unless, when): say what should happen now",
                language=lang,
            )
        if not question and "HEDGE" in has:
            return LocalRefusal(
                "not_understood", "maybe? Say plainly what should happen, and I'll do it", language=lang
            )
        if not question and "LATER" in has:
            return LocalRefusal(
                "scheduled",
                'I can\'t schedule a command for later: say it when it should happen ("for 10 minutes" sets how '
                "long something stays on)",
                language=lang,
            )
        if not question and "VAGUE" in has:
            return LocalRefusal(
                "not_understood", 'for how long? Say it in time ("for 10 minutes"), and I\'ll do it', language=lang
            )
        if not question and "REPEAT" in has:
            return LocalRefusal(
                "several_commands", "one command at a time: say it once, and again when it's done", language=lang
            )
        if negated and not question:
            return LocalRefusal(
                "negated",
                'I don\'t act on negated requests: say only what should happen (for example "stop the pump")',
                language=lang,
            )
        self._channels(p)
        # the devices meant
        refs = self._resolve(p, question)
        if isinstance(refs, LocalRefusal):
            return refs
        if question:
            return self._question(p, refs)
        return self._command(p, refs)

    def _channels(self, p: _Parse) -> None:
        """Channel numbers: "relay 3", "channel 3", "third relay", "relays1 3", "ch3", "#3"."""
        toks = p.tokens
        channel_nouns: set[str] = set()
        for info in self._infos.values():
            channel_nouns |= info.channel_nouns
        for i, tok in enumerate(toks):
            nxt = i + 1
            if nxt < len(toks) and toks[nxt].word in lx.NUMBER_MARK and toks[nxt].num is None:
                nxt += 1
            is_noun = tok.word in channel_nouns or _singular(tok.word) in channel_nouns
            if is_noun and nxt < len(toks) and _is_int(toks[nxt]) and not _time_or_unit_follows(toks, nxt):
                toks[nxt].used = True
                tok.used = True
                p.channels.append((i, int(toks[nxt].num or 0), _singular(tok.word)))
                self._channel_mention(p, i, _singular(tok.word))
                k = nxt + 1  # "relays 3 and 4", "relay 3, 4": more channels, so more than one command
                while k + 1 < len(toks) and (toks[k].concept == "CONJ" or toks[k].word in (",", "&", "+")):
                    if not _is_int(toks[k + 1]) or _time_or_unit_follows(toks, k + 1):
                        break
                    toks[k + 1].used = True
                    p.channels.append((k + 1, int(toks[k + 1].num or 0), _singular(tok.word)))
                    k += 2
                continue
            ordinal = lx.ORDINALS.get(tok.word) if tok.num is None else (int(tok.num) if tok.ordinal else None)
            if ordinal is not None and not tok.used:
                j = i + 1
                while j < len(toks) and toks[j].concept in ("FILLER", "TO") and not toks[j].refs:
                    j += 1
                if j < len(toks) and (
                    toks[j].word in channel_nouns or _singular(toks[j].word) in channel_nouns or toks[j].refs
                ):
                    tok.used = True
                    p.channels.append((i, ordinal, _singular(toks[j].word)))
        # a number right after the name of a multi-channel device: "relays1 3", "the relay board 3"
        for index, refs in p.mentions:
            end = index + toks[index].span
            if end < len(toks) and _is_int(toks[end]) and not toks[end].used:
                if any(self._infos[r.device].channels for r in refs) and not _time_or_unit_follows(toks, end):
                    toks[end].used = True
                    p.channels.append((end, int(toks[end].num or 0), None))

    def _channel_mention(self, p: _Parse, index: int, noun: str) -> None:
        """A one-word name before a channel number ("valve 6") means a device with channels: "valve" is also
        relay1's name, but relay1 has no channel 6."""
        for k, (at, refs) in enumerate(p.mentions):
            if at != index or p.tokens[at].span != 1:
                continue
            kept = [r for r in refs if self._infos[r.device].channels]
            for name, info in self._infos.items():
                if info.channels and noun in info.channel_nouns and not any(r.device == name for r in kept):
                    kept.append(Ref(name, None, 2, noun in lx.VALVE_WORDS))
            if kept:
                p.mentions[k] = (at, tuple(kept))

    def _resolve(self, p: _Parse, question: bool) -> list[Ref] | LocalRefusal:
        """The devices the sentence names, as refs narrowed by every mention; several only for a question."""
        lang = p.lang
        groups: list[tuple[Ref, ...]] = [refs for _, refs in p.mentions]
        noun_channels = [(c, noun) for _, c, noun in p.channels]
        if noun_channels and not groups:
            # "channel 3", "relay 3": the multi-channel devices whose channels go by that noun
            noun = noun_channels[0][1]
            refs = tuple(
                Ref(name, None, 2, noun in lx.VALVE_WORDS if noun else False)
                for name, info in self._infos.items()
                if info.channels and (noun is None or noun in info.channel_nouns or noun in lx.CHANNEL_NOUNS)
            )
            if refs:
                groups.append(refs)
        if not groups:
            return []
        channels = sorted({c for c, _ in noun_channels})
        valve_word = any(noun in lx.VALVE_WORDS for _, noun in noun_channels if noun)
        # every mention must agree on one device (a channel's own label carries its channel)
        candidates: dict[str, list[Ref]] = {}
        for refs in groups:
            for ref in refs:
                candidates.setdefault(ref.device, []).append(ref)
        common = [d for d in candidates if all(any(r.device == d for r in g) for g in groups)]
        if channels:  # a channel number is only for a device that has channels
            with_channels = [d for d in common if self._infos[d].channels]
            if with_channels:
                common = with_channels
        if not common:
            if question:
                out: list[Ref] = []
                for refs in groups:
                    best = min(r.tier for r in refs)
                    out.extend(r for r in refs if r.tier == best)
                return _dedupe(out)
            named = sorted({min(g, key=lambda r: r.tier).device for g in groups})
            return LocalRefusal(
                "several_commands",
                f"one command for one device at a time, please: this names {_join(named, lang)}",
                candidates=tuple(named),
                language=lang,
            )
        best_tier = min(
            max(min(r.tier for r in candidates[d] if r in g) for g in groups if any(r.device == d for r in g))
            for d in common
        )
        chosen = [
            d
            for d in common
            if max(min(r.tier for r in candidates[d] if r in g) for g in groups if any(r.device == d for r in g))
            == best_tier
        ]
        if len(chosen) > 1 and any(t.concept == "ALL" for t in p.tokens):  # "all relays": the board's
            chosen = [d for d in chosen if self._infos[d].channels] or chosen
        label_channels = {r.channel for d in chosen for r in candidates[d] if r.channel is not None}
        all_channels = sorted(set(channels) | label_channels)
        if len(all_channels) > 1:
            return LocalRefusal(
                "several_commands",
                f"one channel at a time, please: this names channels {_join([str(c) for c in all_channels], lang)}",
                device=chosen[0],
                language=lang,
            )
        channel = all_channels[0] if all_channels else None
        if len(chosen) > 1 and not question:
            options = ", ".join(f"{d} ({self.registry.devices[d].description})" for d in chosen)
            return LocalRefusal(
                "ambiguous_device",
                f"which one do you mean: {options}?",
                candidates=tuple(chosen),
                language=lang,
            )
        out = []
        for d in chosen:
            valve = valve_word or any(r.valve for r in candidates[d])
            out.append(Ref(d, channel, best_tier, valve))
        return out

    def _question(self, p: _Parse, refs: list[Ref]) -> Understanding:
        toks, lang = p.tokens, p.lang
        asked_words = {t.word for t in toks if t.num is None and (not t.used or (t.refs and t.span == 1))}
        expects: Literal["on", "off"] | None = None
        if asked_words & lx.STATE_ON or "PART_ON" in {t.concept for t in toks}:
            expects = "on"
        elif asked_words & lx.STATE_OFF or "PART_OFF" in {t.concept for t in toks}:
            expects = "off"
        about: list[Asked] = []
        devices = [r.device for r in refs] or list(self._infos)
        for ref in refs or [Ref(d, None, 3) for d in devices]:
            info = self._infos[ref.device]
            points = tuple(name for name, words in info.points.items() if asked_words & words)
            if ref.channel is not None:
                if ref.channel not in info.channels:
                    return self._no_channel(info, ref.channel, lang)
                about.append(
                    Asked(
                        ref.device,
                        (info.channel_points[ref.channel],) if ref.channel in info.channel_points else (),
                        ref.channel,
                    )
                )
            elif points or refs:
                about.append(Asked(ref.device, points))
        if not about and {t.concept for t in toks} & {"Q", "STATUS"} and not asked_words - _QUESTION_NOISE:
            about = [Asked(d) for d in self._infos]  # "what's the status?": every device
        if not about:
            if refs:
                return LocalRefusal("not_understood", "which reading do you mean?", language=lang)
            return LocalRefusal(
                "no_device",
                'which device do you mean? Ask for example "is the pump running?" or "what is the humidity?"',
                candidates=tuple(self._infos),
                language=lang,
            )
        return LocalQuestion(tuple(about), expects, lang)

    def _no_channel(self, info: DeviceInfo, channel: int, lang: str) -> LocalRefusal:
        numbers = sorted(info.channels)
        if not numbers:
            return LocalRefusal(
                "no_such_channel", f"{info.name} has no channels (no {channel})", device=info.name, language=lang
            )
        return LocalRefusal(
            "no_such_channel",
            f"{info.name} has channels {numbers[0]} to {numbers[-1]}, not {channel}",
            device=info.name,
            language=lang,
        )

    def _command(self, p: _Parse, refs: list[Ref]) -> Understanding:
        toks, lang = p.tokens, p.lang
        concepts = [t.concept for t in toks]
        has = set(concepts)
        for word in ("IN", "UNTIL"):
            for i, t in enumerate(toks):
                if (
                    t.concept == word
                    and i + 1 < len(toks)
                    and toks[i + 1].num is not None
                    and _time_follows(toks, i + 1)
                ):
                    return LocalRefusal(
                        "scheduled",
                        'I can\'t schedule a command for later: say it when it should happen ("for 10 minutes" '
                        "sets how long something stays on)",
                        language=lang,
                    )
        if "BY" in has and _absolute_target(toks):
            for t in toks:  # "lower the pump to 20 %": a value after all, said as a change
                if t.concept == "BY":
                    t.concept = "SET"
            has = {t.concept for t in toks}
        if "BY" in has:
            return LocalRefusal(
                "relative",
                'I only set values, not change them by an amount: say the value (for example "set the pump speed '
                'to 60 percent")',
                device=refs[0].device if len(refs) == 1 else None,
                language=lang,
            )
        # the particle "on" of "relay 3 on relays1" is a preposition
        for i, t in enumerate(toks):
            if t.concept == "PART_ON" and i > 0:
                before = any(x.refs or x.used or x.concept == "ALL" for x in toks[:i])
                j = i + 1
                while j < len(toks) and toks[j].concept in ("FILLER", "OF", "TO") and not toks[j].refs:
                    j += 1
                if before and j < len(toks) and toks[j].refs:
                    t.concept = "OF"
        # "turn of the pump", "switch the pump of": "of" for "off" right after the verb, or at the end
        if "PVERB" in has and not {"PART_ON", "PART_OFF"} & {t.concept for t in toks}:
            for i, t in enumerate(toks):
                if t.word == "of" and (
                    (i > 0 and toks[i - 1].concept == "PVERB") or i == len(toks) - 1 or toks[i + 1].word == "?"
                ):
                    t.concept, t.corrected = "PART_OFF", True
        concepts = [t.concept for t in toks]
        specific = [c.split(":", 1)[1] for c in concepts if c and c.startswith("ACTION:")]
        particles = [_ACT_CLASSES[c] for c in concepts if c in ("PART_ON", "PART_OFF")]
        verbs = [_ACT_CLASSES[c] for c in concepts if c in _ACT_CLASSES and c not in ("PART_ON", "PART_OFF")]
        everything = "ALL" in concepts
        # numbers: durations, values
        extras = self._optional_params(p, refs)
        values, duration, problem = self._numbers(p)
        if problem is not None:
            return problem
        levels = [lx.LEVELS[t.word] for t in toks if t.word in lx.LEVELS and not t.used and t.concept != "FILLER"]
        kinds = set(verbs) | set(particles)
        if "set" in kinds and not values and not levels and kinds - {"set"}:
            kinds.discard("set")  # "make the sensor blink", "put the pump on": the other verb says what
            verbs = [v for v in verbs if v != "set"]
        if len(values) == 1 and values[0][1] == "s?" and kinds & (_POSITIVE | {"open"}) and "set" not in kinds:
            if duration is None:  # "open the valve 20 min": how long, said without "for"
                duration, values = values[0][0], []
        values = [(v, "s" if u == "s?" else u) for v, u in values]
        if {"open", "close"} & kinds:
            if not any(r.valve for r in refs) and refs:
                return LocalRefusal(
                    "not_understood",
                    f'open or close {refs[0].device}? It is not a valve I know of: say "on" or "off"',
                    device=refs[0].device,
                    channel=refs[0].channel,
                    language=lang,
                )
            kinds = {("on" if k == "open" else "off" if k == "close" else k) for k in kinds}
        positive = kinds & _POSITIVE
        negative = kinds & _NEGATIVE
        if positive and negative and not (verbs and set(verbs) <= {"set"}):
            return LocalRefusal(
                "several_commands",
                "that asks for on and off at once: one command at a time, please",
                device=refs[0].device if len(refs) == 1 else None,
                language=lang,
            )
        distinct_verbs = {_VERB_GROUP.get(v, v) for v in verbs} | ({"switch"} if positive or negative else set())
        distinct_verbs -= {"set"} if (positive or negative) and not values and not levels else set()
        if specific:
            distinct_verbs.add("specific")
        conj = any(c == "CONJ" or t.word in (",", "&", "+") for c, t in zip(concepts, toks, strict=True))
        if len(distinct_verbs) > 1 and conj and not (distinct_verbs <= {"switch", "set"} and not values):
            return LocalRefusal(
                "several_commands",
                "one command at a time, please: send each on its own",
                device=refs[0].device if len(refs) == 1 else None,
                language=lang,
            )
        if not refs and (values or levels):
            # "set the interval to 30 seconds": the one device with a setting of that name
            words = {t.word for t in toks if t.num is None and not t.used and t.concept not in ("SET", "TO", "FILLER")}
            owners = sorted({name for name, info in self._infos.items() for *_, w in info.set_actions if words & w})
            if len(owners) == 1:
                refs = [Ref(owners[0], None, 3)]
        if not refs:
            if not (kinds or specific or values or levels):
                return self._nothing(p)
            known_words = [t.word for t in toks if t.num is None and t.concept is None and not t.used and t.word != "?"]
            if known_words:
                return LocalRefusal(
                    "unknown_device",
                    f'I don\'t know a device called "{" ".join(known_words[:4])}"; the devices are '
                    f"{_join(list(self._infos), lang)}",
                    candidates=tuple(self._infos),
                    language=lang,
                )
            return LocalRefusal(
                "no_device",
                f"which device? The devices are {_join(list(self._infos), lang)}",
                candidates=tuple(self._infos),
                language=lang,
            )
        ref = refs[0]
        info = self._infos[ref.device]
        if len(p.unknown) > MAX_UNKNOWN_WORDS:
            return LocalRefusal(
                "not_understood",
                f'I don\'t understand "{" ".join(p.unknown)}"',
                device=ref.device,
                channel=ref.channel,
                language=lang,
            )
        if ref.channel is not None and ref.channel not in info.channels:
            return self._no_channel(info, ref.channel, lang)
        # which action
        action: str | None = None
        params: dict[str, Any] = {}
        if specific:
            names = set(specific)
            if len(names) > 1:
                return LocalRefusal("several_commands", "one command at a time, please", device=ref.device)
            action = specific[0]
            if action not in info.profile.actions:
                return self._cannot(info, _words(action), lang)
        elif values and (positive or negative) and "set" not in kinds and values[0][1] is None:
            shown = nice_number(values[0][0])
            return LocalRefusal(
                "unexplained_number",
                f"what is {shown}? There is no {ref.device} {shown}: say the value with its unit, or leave it out",
                device=ref.device,
                language=lang,
            )
        elif values or levels or (kinds & {"set"} and not (positive or negative)):
            chosen = self._set_action(p, info, values, levels)
            if isinstance(chosen, LocalRefusal):
                return chosen
            action, params = chosen
        elif everything and negative:
            if info.channels and info.entry.off_action:
                action = info.entry.off_action
            else:
                return LocalRefusal(
                    "several_commands", "one device at a time, please", device=ref.device, language=lang
                )
        elif everything and positive:
            return LocalRefusal(
                "several_commands",
                f"one channel at a time, please: which channel of {ref.device}?",
                device=ref.device,
                language=lang,
            )
        elif positive or negative:
            on = bool(positive)
            word = sorted(positive or negative)[0]
            if info.channels:
                if ref.channel is None:
                    if not on and info.entry.off_action and info.entry.off_action not in _channel_set(info):
                        action = info.entry.off_action  # the board's own safe state: every channel off
                    else:
                        first, last = min(info.channels), max(info.channels)
                        return LocalRefusal(
                            "missing_channel",
                            f"which channel of {ref.device}? ({first} to {last}, e.g. "
                            f'"{self.example(ref.device, info.channels[first][0 if on else 1])}")',
                            device=ref.device,
                            language=lang,
                        )
                else:
                    action = info.channels[ref.channel][0 if on else 1]
            else:
                action = _switch_action(info, word, on)
                if action is None:
                    return self._cannot(info, word, lang)
        elif "read" in kinds:
            action = "read" if "read" in info.profile.actions else None
            if action is None:
                return self._cannot(info, "read", lang)
        elif "identify" in kinds:
            action = "identify" if "identify" in info.profile.actions else None
            if action is None:
                return self._cannot(info, "identify", lang)
        elif "PVERB" in has:
            return LocalRefusal(
                "not_understood",
                f'on or off? Say "turn {ref.device} on" or "turn {ref.device} off"',
                device=ref.device,
                channel=ref.channel,
                language=lang,
            )
        else:
            return LocalRefusal(
                "no_action",
                f"what should {ref.device} do?",
                device=ref.device,
                channel=ref.channel,
                language=lang,
            )
        assert action is not None
        for extra_action, param, value in extras:
            if extra_action != action:
                return LocalRefusal(
                    "not_understood",
                    f"{_words(param)} goes with {extra_action}, not {action}",
                    device=ref.device,
                    language=lang,
                )
            params[param] = value
        if ref.channel is not None and action not in _channel_set(info):
            return LocalRefusal(
                "not_understood",
                f"{action} is for the whole of {ref.device}, not channel {ref.channel}",
                device=ref.device,
                channel=ref.channel,
                language=lang,
            )
        spec = info.profile.actions[action]
        if duration is not None:
            if not info.entry.takes_duration(action):
                # "identify the sensor for 10 seconds": the action's own seconds parameter
                seconds = [n for n, s in spec.params.items() if not s.required and (s.unit or "").lower() == "s"]
                if seconds and seconds[0] not in params:
                    params[seconds[0]] = _typed(spec.params[seconds[0]], duration)
                    duration = None
                else:
                    return LocalRefusal(
                        "unsupported",
                        f"{ref.device} {action} does not take a duration",
                        device=ref.device,
                        channel=ref.channel,
                        language=lang,
                    )
        return LocalMatch(ref.device, action, params, duration, ref.channel, lang)

    def _optional_params(self, p: _Parse, refs: list[Ref]) -> list[tuple[str, str, Any]]:
        """An optional parameter named by its word, its value right after: "... with ramp 5 seconds"."""
        toks = p.tokens
        found: list[tuple[str, str, Any]] = []
        if len(refs) != 1:
            return found
        profile = self._infos[refs[0].device].profile
        for action, spec in profile.actions.items():
            for param, pspec in spec.params.items():
                if pspec.required or pspec.type not in ("int", "float"):
                    continue
                unit = (pspec.unit or "").lower()
                word = lx.fold(param.removesuffix("_" + unit) if unit else param).replace("_", " ")
                for i, tok in enumerate(toks):
                    if tok.word != word or tok.used:
                        continue
                    j = i + 1
                    while j < len(toks) and toks[j].concept in ("OF", "TO", "FILLER") and toks[j].num is None:
                        j += 1
                    if j < len(toks) and toks[j].num is not None and not toks[j].used:
                        number = float(toks[j].num or 0)
                        tok.used = toks[j].used = True
                        nxt = toks[j + 1] if j + 1 < len(toks) else None
                        if nxt is not None and nxt.word in lx.TIME_UNITS:
                            nxt.used = True
                            number = number * lx.TIME_UNITS[nxt.word] / lx.TIME_UNITS.get(unit, 1.0)
                        elif nxt is not None and nxt.word in (lx.PERCENT | lx.CELSIUS):
                            nxt.used = True
                        found.append((action, param, _typed(pspec, number)))
        return found

    def _nothing(self, p: _Parse) -> LocalRefusal:
        return LocalRefusal("not_understood", "I don't understand this as a command for a device", language=p.lang)

    def _cannot(self, info: DeviceInfo, what: str, lang: str) -> LocalRefusal:
        return LocalRefusal(
            "unsupported",
            f"{info.name} cannot {what}: it can {_join([_words(a) for a in info.profile.actions], lang, 'or')}",
            device=info.name,
            language=lang,
        )

    def _numbers(self, p: _Parse) -> tuple[list[tuple[float, str | None]], float | None, LocalRefusal | None]:
        """The values (number, unit word) and the duration in seconds; numbers nobody asked for are refused."""
        toks, lang = p.tokens, p.lang
        values: list[tuple[float, str | None]] = []
        duration: float | None = None
        i = 0
        while i < len(toks):
            tok = toks[i]
            if tok.num is None or tok.used:
                if tok.num is None and not tok.used and tok.concept is None and tok.word.isalpha():
                    if not (tok.word in lx.LEVELS or tok.word in lx.STATE_ON or tok.word in lx.STATE_OFF):
                        p.unknown.append(tok.word)
                i += 1
                continue
            # a time: "10 minutes", "1 h 30 min", "10 minutes and 30 seconds"
            if _time_follows(toks, i):
                total, j = 0.0, i
                while j + 1 < len(toks) and toks[j].num is not None and toks[j + 1].word in lx.TIME_UNITS:
                    total += float(toks[j].num or 0) * lx.TIME_UNITS[toks[j + 1].word]
                    toks[j].used = toks[j + 1].used = True
                    j += 2
                    if j < len(toks) and toks[j].concept == "CONJ" and j + 2 < len(toks) and _time_follows(toks, j + 1):
                        toks[j].concept = "FILLER"
                        j += 1
                marker = _before(toks, i)
                after = toks[j].word if j < len(toks) else ""
                if marker == "FOR" or after == "lang":
                    if duration is not None:
                        return (
                            values,
                            duration,
                            LocalRefusal("several_commands", "two durations: one, please", language=lang),
                        )
                    if total <= 0:
                        return (
                            values,
                            duration,
                            LocalRefusal("unsupported", "a duration must be longer than zero", language=lang),
                        )
                    duration = total
                    if after == "lang":
                        toks[j].concept = "FILLER"
                else:  # "set the interval to 5 minutes" (a value); "open the valve 20 min" (unmarked: "s?")
                    values.append((total, "s" if marker == "TO" else "s?"))
                i = j
                continue
            unit: str | None = None
            nxt = toks[i + 1].word if i + 1 < len(toks) else ""
            if nxt in lx.PERCENT:
                unit = "%"
            elif nxt in lx.FAHRENHEIT or (
                nxt in lx.CELSIUS and i + 2 < len(toks) and toks[i + 2].word in lx.FAHRENHEIT
            ):
                unit = "°f"
            elif nxt in lx.CELSIUS:
                unit = "°c"
            tok.used = True
            if unit is not None:
                toks[i + 1].used = True
                if i + 2 < len(toks) and toks[i + 2].word in (lx.FAHRENHEIT | lx.CELSIUS) and toks[i + 2].num is None:
                    toks[i + 2].used = True
            values.append((float(tok.num), unit))
            i += 1
        if len(values) > 1:
            shown = " and ".join(nice_number(v) + (f" {u}" if u else "") for v, u in values)
            return (
                values,
                duration,
                LocalRefusal(
                    "unexplained_number",
                    f"I see several numbers ({shown}) and take only one value: say it once, with its unit",
                    language=lang,
                ),
            )
        return values, duration, None

    def _set_action(
        self, p: _Parse, info: DeviceInfo, values: list[tuple[float, str | None]], levels: list[float]
    ) -> tuple[str, dict[str, Any]] | LocalRefusal:
        lang = p.lang
        if not info.set_actions:
            shown = nice_number(values[0][0]) if values else "a value"
            return LocalRefusal(
                "unexplained_number",
                f"{info.name} takes no value ({shown}): it can "
                f"{_join([_words(a) for a in info.profile.actions], lang, 'or')}",
                device=info.name,
                language=lang,
            )
        if not values and not levels:
            return LocalRefusal(
                "not_understood",
                f'to what value? e.g. "{self.example(info.name, info.set_actions[0][0])}"',
                device=info.name,
                language=lang,
            )
        words = {t.word for t in p.tokens if t.num is None}
        unit = values[0][1] if values else None
        scored = []
        for action, param, spec, target in info.set_actions:
            score = len(words & target)
            pu = (spec.unit or "").lower()
            if unit is not None:
                fits = (
                    (unit == "%" and pu == "%")
                    or (unit == "s" and pu in ("s", "min", "h", "ms"))
                    or (unit in ("°c", "°f") and pu in ("°c", "c"))
                )
                if not fits:
                    continue
                score += 1
            scored.append((score, action, param, spec))
        if not scored:
            return LocalRefusal(
                "ambiguous_value",
                f"{info.name} has no setting in that unit: "
                + "; ".join(f'"{self.example(info.name, a)}"' for a, *_ in info.set_actions),
                device=info.name,
                language=lang,
            )
        best = max(s for s, *_ in scored)
        top = [s for s in scored if s[0] == best]
        if len(top) > 1:
            return LocalRefusal(
                "ambiguous_value",
                f"which setting of {info.name}? "
                + " or ".join(f'"{self.example(info.name, a)}"' for _, a, _, _ in top),
                device=info.name,
                language=lang,
            )
        _, action, param, spec = top[0]
        if values:
            number, vunit = values[0]
            value = _convert(number, vunit, spec)
        else:
            if spec.min is None or spec.max is None:
                return LocalRefusal("ambiguous_value", f"{param} has no range to take a level of", device=info.name)
            value = spec.min + levels[0] * (spec.max - spec.min)
        return action, {param: _typed(spec, value)}

    # --- the rules file ----------------------------------------------------------------------------------------

    def _from_rules_file(self, text: str) -> LocalMatch | None:
        if self._intents is None or not self._intents.intents:
            return None
        from hassil import recognize_all

        for result in recognize_all(text, self._intents, language=LANGUAGE):
            found = self._rule_command(result)
            if found is not None:
                return found
        return None

    def _rule_command(self, result: RecognizeResult) -> LocalMatch | None:
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


# --- helpers ---------------------------------------------------------------------------------------------------


def _rules_intents(registry: Registry) -> Intents | None:
    """The rules file's whole sentences as hassil intents (None without any)."""
    if not registry.rules.sentences:
        return None
    from hassil import Intents

    intents: dict[str, Any] = {}
    wildcards: set[str] = {"duration_value"}
    for i, rule in enumerate(registry.rules.sentences):
        entry = registry.devices.get(rule.device)
        if entry is None or rule.action not in entry.profile.actions:
            continue
        device_rule = "(" + "|".join(entry.names) + ")"
        rules = {"dev": device_rule, "device": device_rule, "duration": _DURATION}
        wildcards.update(f"v_{p}" for p in entry.profile.actions[rule.action].params)
        intents[f"rule{i}.{rule.device}.{rule.action}"] = {
            "data": [
                {
                    "sentences": [_SLOT_REF.sub(r"{v_\1}", t) for t in rule.templates],
                    "expansion_rules": rules,
                    "metadata": {"device": rule.device, "action": rule.action, "params": dict(rule.params)},
                }
            ]
        }
    if not intents:
        return None
    lists: dict[str, Any] = {name: {"wildcard": True} for name in sorted(wildcards)}
    lists["duration_unit"] = {"values": [{"in": k, "out": v} for k, v in _DURATION_UNITS.items()]}
    skip = ["please", "kindly", "can you", "could you", "would you", "will you"]
    built = Intents.from_dict({"language": LANGUAGE, "intents": intents, "lists": lists, "skip_words": skip})
    for intent in built.intents.values():
        # hassil parses templates on first use; parse them now, so a user's sentence it cannot read is dropped
        # here, with a log line, instead of failing every match later. (The loader checks them too, roughly.)
        for block in list(intent.data):
            try:
                block.sentences  # noqa: B018 - a cached property: parsing is the point
            except Exception as err:
                intent.data.remove(block)
                log.error("interpret_rule_dropped", intent=intent.name, templates=block.sentence_texts, error=str(err))
    return built


def channel_actions_set(profile: Profile) -> set[str]:
    return {a for pair in channel_actions(profile).values() for a in pair}


def _channel_set(info: DeviceInfo) -> set[str]:
    return {a for pair in info.channels.values() for a in pair}


def _switch_action(info: DeviceInfo, word: str, on: bool) -> str | None:
    actions = info.profile.actions
    if on:
        order = ["start", "on"] if word == "start" else ["on", "start"]
        found = next((a for a in order if a in actions), None)
        if found is None:
            named = sorted(on_actions(info.profile))
            found = named[0] if len(named) == 1 else None
        return found
    order = ["stop", "off"] if word == "stop" else ["off", "stop"]
    found = next((a for a in order if a in actions), None)
    if found is None:
        off = info.entry.off_action
        found = off if off is not None and not any(p.required for p in actions[off].params.values()) else None
    return found


def _is_int(tok: Tok) -> bool:
    return tok.num is not None and tok.num == int(tok.num) and tok.num > 0 and not tok.used


def _time_follows(toks: list[Tok], i: int) -> bool:
    return toks[i].num is not None and i + 1 < len(toks) and toks[i + 1].word in lx.TIME_UNITS


def _time_or_unit_follows(toks: list[Tok], i: int) -> bool:
    if i + 1 >= len(toks):
        return False
    word = toks[i + 1].word
    return word in lx.TIME_UNITS or word in lx.PERCENT or word in lx.CELSIUS or word in lx.FAHRENHEIT


_SOFT = frozenset({"a", "an", "the", "about", "around", "approximately", "roughly", "just", "another", "un", "une"})


def _absolute_target(toks: list[Tok]) -> bool:
    """ "to 20 %", "auf 40", "al máximo": a value to reach, not an amount to change by ("by 10 %")."""
    for i, tok in enumerate(toks):
        if tok.concept == "TO" and tok.word not in ("a", "en"):
            j = i + 1
            while j < len(toks) and toks[j].concept == "FILLER":
                j += 1
            if j < len(toks) and (toks[j].num is not None or toks[j].word in lx.LEVELS):
                return not any(t.word in ("by", "um") for t in toks)
    return False


def _before(toks: list[Tok], i: int) -> str | None:
    j = i - 1
    while (
        j >= 0 and (toks[j].concept == "FILLER" or toks[j].word in _SOFT) and toks[j].word not in ("for", "pour", "por")
    ):
        j -= 1
    return toks[j].concept if j >= 0 else None


def _convert(number: float, unit: str | None, spec: ParamSpec) -> float:
    pu = (spec.unit or "").lower()
    if unit == "°f" and pu in ("°c", "c"):
        return round((number - 32) * 5 / 9, 2)
    if unit == "s" and pu in lx.TIME_UNITS:
        return number / lx.TIME_UNITS[pu]
    return number


def _typed(spec: ParamSpec, value: float) -> Any:
    if spec.type == "int" and value == int(value):
        return int(value)
    return float(value)


def _dedupe(refs: list[Ref]) -> list[Ref]:
    seen: dict[tuple[str, int | None], Ref] = {}
    for ref in refs:
        seen.setdefault((ref.device, ref.channel), ref)
    return list(seen.values())


def _join(items: list[str], lang: str = "en", word: str = "and") -> str:
    del lang  # refusals are worded in English, whatever the request's language
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + f" {word} " + items[-1]


def _words(name: str) -> str:
    return name.replace("_", " ")


def _example_value(spec: ParamSpec) -> str:
    if spec.type in ("int", "float"):
        lo = spec.min if spec.min is not None else 0
        hi = spec.max if spec.max is not None else 100
        value: float = next((v for v in (50.0, 30.0, 10.0, 5.0, 1.0) if lo < v < hi), (lo + hi) / 2)
        unit = {"%": " percent", "s": " seconds", "°c": " degrees"}.get(
            (spec.unit or "").lower(), f" {spec.unit}" if spec.unit else ""
        )
        return f"{nice_number(value)}{unit}"
    if spec.type == "bool":
        return "on"
    if spec.type == "enum":
        assert spec.choices is not None
        return spec.choices[0].replace("_", " ")
    return "text"
