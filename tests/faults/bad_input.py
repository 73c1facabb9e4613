"""What the bad-input fault tests share: the typed error codes a client may be answered with, strategies for command
payloads (valid, and bad in every way a client gets them wrong), and a small TOML writer for mutated configs."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

# Codes a rejected command may carry: each names what is wrong. "internal_error" (a bug) and the generic
# "unavailable" / "http_error" are not in it.
REJECTION_CODES = frozenset(
    {
        "bad_request",  # not JSON, not an object, nested too deep, undecodable body
        "validation_failed",  # the envelope or the parameters
        "unknown_device",
        "payload_too_large",
        "conflict",  # an id already used for another command
        "not_understood",  # {"text": ...} the local rules cannot read
        "confirmation_required",
        "rate_limited",
        "interpret_unavailable",
    }
)

# [http] max_body_bytes and [mqtt] max_payload_bytes in the bundled config.
SIZE_LIMIT = 65536

# What the daemon runs: the bundled config's devices (tests/test_config.py checks the list).
DEVICES = ("pump1", "sensor1", "relay1", "meter1", "relays1")

# Commands that are valid and quick on the bundled config's simulators, with no safety limits in the way.
VALID_ACTIONS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("pump1", "read", {}),
    ("pump1", "set_speed", {"percent": 40}),
    ("pump1", "start", {}),
    ("pump1", "stop", {}),
    ("sensor1", "read", {}),
    ("meter1", "read", {}),
)


ACTION_NAMES = frozenset(
    {"start", "stop", "set_speed", "read", "set_interval", "set_alarm", "identify", "on", "off", "all_off"}
    | {f"{verb}{n}" for verb in ("on", "off") for n in range(1, 9)}
)


@dataclass(frozen=True)
class Payload:
    """What a client sends and what must come of it. ``expect``: "reject" (a typed error, nothing stored), "run"
    (accepted, executed once) or "either" (words the local rules may or may not read). ``codes``: the codes it may
    be rejected with when that is certain (else any of REJECTION_CODES). ``body``: the JSON object, when the
    strategy built one that can carry an id the test assigns (``with_id``)."""

    raw: bytes
    expect: str
    kind: str
    codes: frozenset[str] | None = None
    command_id: str | None = None
    body: dict[str, Any] | None = None

    def with_id(self, command_id: str) -> Payload:
        if self.body is None:
            return self
        body = {**self.body, "id": command_id}
        return Payload(dumps(body), self.expect, self.kind, self.codes, command_id, body)


def dumps(body: Any) -> bytes:
    return json.dumps(body).encode()  # ASCII: a lone surrogate travels as \ud800, which is valid JSON


def payload(body: dict[str, Any], expect: str, kind: str, *codes: str, takes_id: bool = True) -> Payload:
    command_id = body.get("id") if isinstance(body.get("id"), str) else None
    if not_strict_json(body):
        # NaN, Infinity (1e999 too) and unpaired surrogates are refused when the JSON is parsed, before any field
        # is looked at: bad_request, whatever else is wrong or right.
        expect, codes = "reject", ("bad_request",)
        if command_id is not None and not _ID.fullmatch(command_id):
            command_id = None  # the refusal names the id only when it is one (it is read back from broken JSON)
    return Payload(dumps(body), expect, kind, frozenset(codes) or None, command_id, body if takes_id else None)


def not_strict_json(value: Any) -> bool:
    """Whether ``value``, written by Python's json, holds what RFC 8259 JSON cannot: a non-finite number or a
    string with an unpaired surrogate."""
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, float) and not math.isfinite(node):
            return True
        if isinstance(node, str) and _has_surrogate(node):
            return True
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return False


# --- JSON values ---------------------------------------------------------------------------------------------------

big_ints = st.integers(min_value=10**300, max_value=10**4000)  # JSON allows them; float() of one overflows
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    big_ints,
    st.floats(),  # NaN and Infinity too: Python's json reads them
    st.text(max_size=40),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
# Strings that look like what a field wants, but are not: near misses and oddities.
odd_strings = st.one_of(
    st.sampled_from(["", " ", "\x00", "pump1\x00", "PUMP1", "pump 1", "pump1/", "../pump1", "😀", "\ud800x"]),
    st.text(min_size=65, max_size=300),  # over the 64-character limits
    st.text(max_size=20),
)
bad_ids = st.one_of(
    st.sampled_from(["", "has space", "slash/", "semi;colon", "ü", "x" * 129, "\n", "id\x00", "\ud800"]),
    st.sampled_from(["nl\n", " id", "id ", "\tid", "id\r\n"]),  # an id is taken exactly as sent: never trimmed
    st.integers(),
    st.lists(st.text(max_size=3), max_size=2),
    st.text(min_size=129, max_size=200),
)


def _has_surrogate(text: str) -> bool:
    return any(0xD800 <= ord(ch) <= 0xDFFF for ch in text)


def device_codes(value: Any) -> tuple[str, ...]:
    """A device name no device has: unknown_device if it passes the envelope's checks, else validation_failed
    (a name with whitespace around it is refused, not trimmed)."""
    if isinstance(value, str) and 1 <= len(value) <= 64 and value == value.strip() and not _has_surrogate(value):
        return ("unknown_device",)
    return ("validation_failed",)


_FIELDS = ("device", "action", "params", "param", "id", "ttl_s", "priority", "confirm", "extra")


@st.composite
def conflicts(draw: st.DrawFn) -> Payload:
    """A valid command under an id already used for a different one (``before-0`` .. ``before-9``, each a pump1
    set_speed to its own number, accepted before the run): refused ``conflict``, the first one untouched."""
    i = draw(st.integers(0, 9))
    device, action, params = draw(st.sampled_from(VALID_ACTIONS))
    if (device, action) == ("pump1", "set_speed"):
        params = {"percent": draw(st.integers(0, 100).filter(lambda n: n != i))}
    body = {"id": f"before-{i}", "device": device, "action": action, "params": params}
    return payload(body, "reject", "conflict", "conflict", takes_id=False)


@st.composite
def bad_field_commands(draw: st.DrawFn) -> Payload:
    """A valid command with one thing wrong: the rejection is certain, and so is its code."""
    device, action, params = draw(st.sampled_from(VALID_ACTIONS))
    body: dict[str, Any] = {"device": device, "action": action, "params": dict(params)}
    field = draw(st.sampled_from(_FIELDS))
    codes: tuple[str, ...] = ("validation_failed",)
    if field == "device":
        body["device"] = draw(st.one_of(odd_strings, json_values).filter(lambda v: str(v).strip() not in DEVICES))
        codes = device_codes(body["device"])
    elif field == "action":
        body["action"] = draw(
            st.one_of(odd_strings, st.integers(), st.none()).filter(lambda v: str(v).strip() not in ACTION_NAMES)
        )
    elif field == "params":
        body["params"] = draw(st.one_of(st.lists(json_values, max_size=3), st.text(max_size=10), st.integers()))
    elif field == "param":
        if action == "set_speed":
            body["params"]["percent"] = draw(
                st.one_of(
                    st.integers().filter(lambda n: not 0 <= n <= 100),
                    big_ints,
                    st.builds(lambda n: -n, big_ints),
                    st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: not f.is_integer()),
                    st.floats(min_value=101),  # Infinity too
                    st.just(math.nan),
                    st.text(max_size=10),
                    st.booleans(),
                    st.none(),
                    st.lists(st.integers(0, 100), min_size=1, max_size=2),
                )
            )
        else:  # these actions take no parameters
            body["params"][draw(st.text(min_size=1, max_size=12))] = draw(json_values)
    elif field == "id":
        body["id"] = draw(bad_ids)
    elif field == "ttl_s":
        body["ttl_s"] = draw(
            st.one_of(
                st.floats(max_value=0),
                st.integers(max_value=0),
                st.floats(min_value=604_801),  # over the bundled config's max_ttl_s; Infinity too
                st.just(math.nan),
                big_ints,
                st.text(max_size=5),  # "5" too: a duration is a JSON number, never a string
                st.booleans(),  # true is not 1 second
                st.lists(st.integers(), max_size=2),
            )
        )
    elif field == "priority":
        body["priority"] = draw(
            st.one_of(st.text(max_size=10), st.integers(), st.none(), st.lists(st.text(max_size=3), max_size=1)).filter(
                lambda v: not (isinstance(v, str) and v.strip().upper() in ("CRITICAL", "HIGH", "NORMAL", "LOW"))
            )
        )
    elif field == "confirm":
        body["confirm"] = draw(
            st.one_of(
                st.sampled_from(["maybe", "yess", "2", "tru", "", " ", "-1", "yes", "true", "on", "1", "false"]),
                st.integers(),  # 1 and 0 too: a confirmation is the literal true
                st.lists(st.booleans(), max_size=2),
                st.dictionaries(st.text(max_size=3), st.booleans(), max_size=1),
            )
        )
    else:
        key = draw(st.text(min_size=1, max_size=12).filter(lambda k: k not in _ENVELOPE and k != "text"))
        body[key] = draw(json_values)
    return payload(body, "reject", f"bad_{field}", *codes, takes_id=field != "id")


_ENVELOPE = frozenset({"device", "action", "params", "id", "ttl_s", "priority", "confirm"})


@st.composite
def wrong_shapes(draw: st.DrawFn) -> Payload:
    """JSON that is not a command object at all, or an object with none of a command's shape."""
    value = draw(
        st.one_of(
            scalars,
            st.lists(json_values, max_size=4),
            st.dictionaries(
                st.text(max_size=10).filter(lambda k: k not in ("device", "action", "text", "id")),
                json_values,
                max_size=5,
            ),
        )
    )
    if isinstance(value, dict):
        return payload(value, "reject", "wrong_shape", "validation_failed")
    return Payload(dumps(value), "reject", "wrong_shape", frozenset({"bad_request"}))


@st.composite
def not_json(draw: st.DrawFn) -> Payload:
    """Bytes that are not JSON: random bytes, non-UTF-8, JSON cut short, JSON's near relatives."""
    raw = draw(
        st.one_of(
            st.binary(min_size=1, max_size=300),
            st.sampled_from(
                [
                    b"\xff\xfe\x00garbage",
                    b'{"device": "pump1", "action": "read"',  # cut short
                    b"{'device': 'pump1', 'action': 'read'}",  # Python, not JSON
                    b'{"device": "pump1", "action": "read",}',  # trailing comma
                    b'{"device": "pump1"} {"action": "read"}',  # two documents
                    b'\xef\xbb\xbf{"device": "pump1", "action": "read"}',  # a UTF-8 byte order mark
                    b'{"device": "pump1", "action": "\xed\xb3\xbf"}',  # a surrogate encoded in UTF-8
                    b'{"device": "pump1", "action": "read", "params": {"percent": 1' + b"0" * 5000 + b"}}",
                ]
            ),
            st.text(min_size=1, max_size=40).map(lambda t: ("{" + t).encode()),
        )
    )
    if _parses(raw):
        raw = b"}" + raw  # never JSON
    if not raw.strip():
        raw = b"\x00" + raw
    return Payload(raw, "reject", "not_json", frozenset({"bad_request"}))


def _parses(raw: bytes) -> bool:
    try:
        json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return False
    return True


@st.composite
def deep_nesting(draw: st.DrawFn) -> Payload:
    """Arrays or objects nested far deeper than any command: thousands of levels fit in a few kilobytes."""
    depth = draw(st.one_of(st.integers(33, 200), st.integers(900, 1100), st.integers(5_000, 30_000)))
    opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}"), ('[{"b":', "}]")]))
    inner = opener * depth + "1" + closer * depth
    where = draw(st.sampled_from(["top", "param", "device", "id", "ttl_s"]))
    if where == "top":
        text = inner
    elif where == "param":
        text = '{"device": "pump1", "action": "set_speed", "params": {"percent": ' + inner + "}}"
    else:
        text = '{"device": "pump1", "action": "read", "' + where + '": ' + inner + "}"
    if not draw(st.booleans()):
        text = text[: len(text) // 2]  # unbalanced, as often as not
    raw = text.encode()
    code = "bad_request" if len(raw) <= SIZE_LIMIT else "payload_too_large"
    return Payload(raw, "reject", "deep_nesting", frozenset({code}))


@st.composite
def huge(draw: st.DrawFn, limit: int) -> Payload:
    """Over the size limit, as a valid-looking command or as filler."""
    size = draw(st.integers(limit + 1, limit * 3))
    filler = draw(st.sampled_from(["x", "é", " ", "0"]))
    if draw(st.booleans()):
        raw = ('{"device": "pump1", "action": "read", "pad": "' + filler * size + '"}').encode()
    else:
        raw = (filler * size).encode()
    return Payload(raw, "reject", "huge", frozenset({"payload_too_large"}))


@st.composite
def text_oddities(draw: st.DrawFn, max_chars: int = 500) -> Payload:
    """Natural-language requests with a field wrong (certain rejections), or words the local rules may read."""
    oddity = draw(
        st.sampled_from(["type", "blank", "long", "extra", "bad_id", "bad_ttl", "bad_confirm", "bad_user", "words"])
    )
    body: dict[str, Any] = {"text": "read the pump"}
    if oddity == "type":
        body["text"] = draw(st.one_of(st.integers(), st.none(), st.lists(st.text(max_size=5), max_size=2)))
    elif oddity == "blank":
        body["text"] = draw(st.sampled_from(["", " ", "\t\n", "\u3000"]))
    elif oddity == "long":
        body["text"] = draw(st.text(max_size=max_chars)) + "y" * (max_chars + 1)
    elif oddity == "extra":
        body[draw(st.sampled_from(["device", "action", "params", "pad", ""]))] = draw(json_values)
    elif oddity == "bad_id":
        body["id"] = draw(bad_ids)
    elif oddity == "bad_ttl":
        body["ttl_s"] = draw(st.one_of(st.floats(max_value=0), st.text(max_size=5), st.booleans()))
    elif oddity == "bad_confirm":
        body["confirm"] = draw(st.sampled_from(["yes", "true", 1, 0, None, [True]]))
    elif oddity == "bad_user":
        body["user"] = draw(st.one_of(st.just(""), st.text(min_size=129, max_size=140), st.integers()))
    else:
        body["text"] = draw(st.text(min_size=1, max_size=60).filter(lambda t: t.strip() != ""))
        return payload(body, "either", "text_words")
    return payload(body, "reject", f"text_{oddity}", "validation_failed", takes_id=oddity != "bad_id")


# Values that break parsers and stores rather than a field's rules: what Python's json reads but JSON does not allow,
# numbers at and past every limit, booleans where numbers go, and strings a terminal, a log or SQLite may choke on.
hostile_numbers = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324, -0.0, 2**63, -(2**63) - 1, 2**1024]),
    big_ints,
    st.builds(lambda n: -n, big_ints),
    st.booleans(),
)
hostile_strings = st.one_of(
    st.sampled_from(
        [
            "\x00",
            "\x1b[31mred\x1b[0m",  # terminal escapes
            "\r\n\tfield: injected",  # a new log line
            "\u202epump1",  # right-to-left override
            "pu\u200bmp1",  # a zero-width space
            "\ufeff",
            "\ud800",  # unpaired surrogates: not text
            "x\udfffy",
            "'; DROP TABLE commands; --",
            "%s%s%n",
            "\U0010ffff",
            "\x7f\x85\u2028\u2029",
        ]
    ),
    st.text(alphabet=st.characters(exclude_categories=[]), max_size=12),  # surrogates and controls included
)
hostile_values = st.one_of(hostile_numbers, hostile_strings)


def _is_number(value: Any, low: float, high: float) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and low <= value <= high


@st.composite
def hostile_commands(draw: st.DrawFn) -> Payload:
    """A valid command with one field (or a parameter, or an extra key) replaced by a hostile value: refused with a
    typed error, never stored, never a crash."""
    device, action, params = draw(st.sampled_from(VALID_ACTIONS))
    body: dict[str, Any] = {"device": device, "action": action, "params": dict(params)}
    field = draw(st.sampled_from(["device", "action", "id", "ttl_s", "priority", "confirm", "param", "key"]))
    codes: tuple[str, ...] = ("validation_failed",)
    if field == "device":
        body["device"] = draw(hostile_values.filter(lambda v: v not in DEVICES))
        codes = device_codes(body["device"])
    elif field == "action":
        body["action"] = draw(hostile_values.filter(lambda v: v not in ACTION_NAMES))
    elif field == "id":
        body["id"] = draw(hostile_values.filter(lambda v: not (isinstance(v, str) and _ID.fullmatch(v))))
    elif field == "ttl_s":
        body["ttl_s"] = draw(hostile_values.filter(lambda v: not (_is_number(v, 0, 604_800) and v > 0)))
    elif field == "priority":
        body["priority"] = draw(
            hostile_values.filter(
                lambda v: not (isinstance(v, str) and v.upper() in ("CRITICAL", "HIGH", "NORMAL", "LOW"))
            )
        )
    elif field == "confirm":
        body["confirm"] = draw(hostile_values.filter(lambda v: not isinstance(v, bool)))
    elif field == "param":
        if action == "set_speed":
            body["params"]["percent"] = draw(hostile_values.filter(lambda v: not _is_number(v, 0, 100) or v != int(v)))
        else:
            body["params"][draw(hostile_strings.filter(bool))] = draw(hostile_values)
    else:
        body[draw(hostile_strings.filter(lambda k: k not in _ENVELOPE and k != "text"))] = draw(hostile_values)
    return payload(body, "reject", f"hostile_{field}", *codes, takes_id=field != "id")


_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def bad_payloads(limit: int) -> st.SearchStrategy[Payload]:
    return st.one_of(
        bad_field_commands(),
        hostile_commands(),
        wrong_shapes(),
        not_json(),
        deep_nesting(),
        huge(limit),
        text_oddities(),
    )


# --- TOML -----------------------------------------------------------------------------------------------------------

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def toml_string(text: str) -> str:
    out = ['"']
    for ch in text:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch in "\n\t\r\b\f":
            out.append({"\n": "\\n", "\t": "\\t", "\r": "\\r", "\b": "\\b", "\f": "\\f"}[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else toml_string(key)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML for {type(value).__name__}")


def toml_dumps(doc: dict[str, Any]) -> str:
    """A document as TOML: each table's plain values first, then its sub-tables as [a.b] sections."""
    lines: list[str] = []

    def table(prefix: list[str], node: dict[str, Any]) -> None:
        for key, value in node.items():
            if not isinstance(value, dict):
                lines.append(f"{toml_key(key)} = {toml_value(value)}")
        for key, value in node.items():
            if isinstance(value, dict):
                path = [*prefix, key]
                lines.append("")
                lines.append("[" + ".".join(toml_key(p) for p in path) + "]")
                table(path, value)

    table([], doc)
    return "\n".join(lines) + "\n"
