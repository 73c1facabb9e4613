"""JSON as RFC 8259 defines it, for everything that comes from outside the process, and JSON that is always valid
for everything that leaves it.

Python's ``json`` module accepts ``NaN``, ``Infinity`` and ``-Infinity``, turns ``1e999`` into ``inf``, and
takes ``"\\ud800"`` (half of a surrogate pair) as a string that cannot be encoded to UTF-8. None of these is a
value a client, a device or a provider can mean, and each one, accepted, breaks something later: an event that
cannot be serialised, a row SQLite cannot store, a log line that cannot be written. :func:`loads` refuses them
at the edge with :class:`NotStrictJson` (a ``ValueError``), so the callers' existing "not valid JSON" handling
answers them. :func:`dumps` never produces them, whatever it is given.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, NoReturn

__all__ = ["NotStrictJson", "TooDeep", "dumps", "loads", "sanitize"]


class NotStrictJson(ValueError):
    """Valid for Python's parser, not for JSON: a non-finite number or an unpaired surrogate."""


class TooDeep(NotStrictJson):
    """Arrays and objects nested deeper than Python's recursion limit lets the parser go."""


def _refuse_constant(name: str) -> NoReturn:
    raise NotStrictJson(f"{name} is not a JSON number (numbers must be finite)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise NotStrictJson(f"{text[:40]} is out of range (numbers must be finite)")
    return value


_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")
_ESCAPED_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")
_ESCAPED_SURROGATE_TEXT = re.compile(r"\\u[dD][89a-fA-F]")


def loads(raw: str | bytes | bytearray, *, max_depth: int | None = None) -> Any:
    """Parse strictly; :class:`NotStrictJson` (or the parser's own ``ValueError``) when the text is not JSON, and
    :class:`TooDeep` when arrays and objects nest more than ``max_depth`` levels (or past the recursion limit)."""
    try:
        value = json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        raise TooDeep("arrays and objects are nested too deep") from None
    # Nesting needs a bracket per level: a text with few brackets (a provider's answer has about a dozen) is not
    # walked.
    if max_depth is not None and _brackets(raw) > max_depth and depth_over(value, max_depth):
        raise TooDeep(f"arrays and objects are nested more than {max_depth} levels deep")
    # A surrogate can only come from a \\uD8xx..\\uDFxx escape (raw UTF-8 cannot encode one): look only then.
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    if _ESCAPED_SURROGATE.search(data) and _has_lone_surrogate(value):
        raise NotStrictJson("a string holds an unpaired UTF-16 surrogate (\\ud800-\\udfff), which is not text")
    return value


def _brackets(raw: str | bytes | bytearray) -> int:
    """An upper bound of the nesting depth (brackets within strings counted too)."""
    if isinstance(raw, str):
        return raw.count("[") + raw.count("{")
    return raw.count(b"[") + raw.count(b"{")


def depth_over(value: Any, limit: int) -> bool:
    """Whether arrays and objects nest more than ``limit`` deep (without recursion: the input may be deep)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return False


def _has_lone_surrogate(value: Any) -> bool:
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            if _LONE_SURROGATE.search(node):
                return True
        elif isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return False


def sanitize(value: Any) -> Any:
    """``value`` with every non-finite float made a string ("nan", "inf") and every lone surrogate replaced, so
    that it can be written as JSON and encoded as UTF-8. Only called when the fast path failed."""
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {sanitize(str(k)): sanitize(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [sanitize(v) for v in value]
    return value


def dumps(value: Any, *, sort_keys: bool = False) -> str:
    """Compact JSON that is always valid: a non-finite number or a lone surrogate, which nothing from outside can
    bring in any more but a bug or a device's own reading might, is written as a string ("nan", "inf") or replaced
    (U+FFFD) rather than failing the whole record. Objects JSON has no type for are written as their ``str``."""
    try:
        text = json.dumps(value, separators=(",", ":"), allow_nan=False, default=str, sort_keys=sort_keys)
    except ValueError:
        pass
    else:
        if not (_ESCAPED_SURROGATE_TEXT.search(text) and _has_lone_surrogate(value)):
            return text
    return json.dumps(sanitize(value), separators=(",", ":"), allow_nan=False, default=str, sort_keys=sort_keys)
