"""structlog JSON logging: one object per line on stdout (journald picks it up), secrets redacted.

Standard-library records (aiohttp, asyncio) go through the same renderer, so every line is JSON.

Secrets are redacted by value: whoever reads a secret registers it (:func:`register_secrets`: the supervisor, at
start and on SIGHUP, for the provider API keys and the MQTT password read from the environment; the web server for
each bearer token it has verified), and every occurrence of it, or of its URL, JSON, repr or base64 forms, is
replaced in every string of every line: fields, messages, exception messages and tracebacks. Tracebacks carry no
frame locals. Fields named like a secret (``api_key``, ``token``, ``password``, ``authorization``, ``cookie``, ...)
are redacted too when they hold text (a flag such as ``auth=False`` stays readable), and so are strings shaped like
one (``Bearer ...``, ``sk-...``), for secrets nobody registered (a token a client got wrong).
"""

from __future__ import annotations

import base64
import json
import logging
import re
import sys
import threading
from collections.abc import Iterable, MutableMapping
from typing import Any, TextIO
from urllib.parse import quote, quote_plus

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
REDACTED = "[REDACTED]"
_SECRET_KEY = re.compile(r"(^|_)(api_?key|token|secret|password|passwd|authorization|auth|cookie)$", re.I)
_SECRET_VALUE = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]{8,}|\b(sk-[A-Za-z0-9_-]{8,}|sk-ant-[A-Za-z0-9_-]{8,})")
# A shorter secret could not be replaced without mangling ordinary words in every line: it is refused, and said so.
MIN_SECRET_CHARS = 4
_MIN_ENCODED_CHARS = 8  # an encoded form shorter than this is too likely to occur by chance

log = structlog.get_logger("gatewayd.observability.logging")


def _base64_forms(raw: bytes) -> set[str]:
    """The part of the base64 text of ``raw`` that is the same wherever ``raw`` sits in a longer encoded value
    (``Basic base64(user:password)``): one per alignment, standard and URL-safe alphabets, no padding."""
    out: set[str] = set()
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + raw).decode("ascii")
        stable = encoded[-(-8 * offset // 6) : 8 * (offset + len(raw)) // 6]
        out.update((stable, stable.translate(str.maketrans("+/", "-_"))))
    return out


def encodings(secret: str) -> set[str]:
    """The forms of ``secret`` a log line may carry: as is, in a URL, in JSON, in a repr, in base64."""
    forms = {secret, quote(secret, safe=""), quote(secret), quote_plus(secret), json.dumps(secret)[1:-1]}
    forms.add(repr(secret)[1:-1])
    forms.update(_base64_forms(secret.encode("utf-8")))
    return {f for f in forms if f == secret or len(f) >= _MIN_ENCODED_CHARS}


class Secrets:
    """The values known to be secret, by where they came from, and one pattern that finds any of their forms."""

    def __init__(self) -> None:
        self._by_source: dict[str, frozenset[str]] = {}
        self._pattern: re.Pattern[str] | None = None
        self._lock = threading.Lock()  # standard-library records may be logged from worker threads

    def set(self, source: str, values: Iterable[str | None]) -> None:
        """The secrets ``source`` holds now (replacing what it held before; none: forget it)."""
        kept = frozenset(v for v in values if v)
        with self._lock:
            if kept:
                self._by_source[source] = kept
            else:
                self._by_source.pop(source, None)
            self._compile()

    def add(self, source: str, value: str) -> None:
        """One more secret for ``source`` (a bearer token once verified)."""
        with self._lock:
            held = self._by_source.get(source, frozenset())
            if value and value not in held:
                self._by_source[source] = held | {value}
                self._compile()

    def clear(self) -> None:
        with self._lock:
            self._by_source.clear()
            self._pattern = None

    def _compile(self) -> None:
        forms: set[str] = set()
        for values in self._by_source.values():
            for value in values:
                if len(value) >= MIN_SECRET_CHARS:
                    forms |= encodings(value)
        # Longest first: a form that contains another is replaced whole.
        ordered = sorted(forms, key=lambda f: (-len(f), f))
        self._pattern = re.compile("|".join(re.escape(f) for f in ordered)) if ordered else None

    def scrub(self, text: str) -> str:
        pattern = self._pattern
        return text if pattern is None else pattern.sub(REDACTED, text)


SECRETS = Secrets()


def register_secrets(source: str, values: Iterable[str | None]) -> None:
    """Tell the log which values ``source`` holds that must never appear in it (replacing what it said before).
    A value shorter than :data:`MIN_SECRET_CHARS` cannot be redacted without mangling every line: that is logged
    (the source only), and the value is not."""
    values = list(values)
    short = sum(1 for v in values if v and len(v) < MIN_SECRET_CHARS)
    SECRETS.set(source, values)
    if short:
        log.warning("secret_too_short_to_redact", source=source, count=short, min_chars=MIN_SECRET_CHARS)


def add_secret(source: str, value: str) -> None:
    SECRETS.add(source, value)


def scrub(text: str) -> str:
    """``text`` with every registered secret, in any of its forms, replaced: for text that leaves the process by
    another way than the log (an API answer, a stored error message)."""
    return _SECRET_VALUE.sub(lambda m: (m.group(1) or "") + REDACTED, SECRETS.scrub(text))


def _named_secret(key: Any, value: Any) -> bool:
    # A flag, a number or nothing under a secret's name (auth=False) says nothing secret.
    if value is None or isinstance(value, bool | int | float):
        return False
    return isinstance(key, str) and _SECRET_KEY.search(key) is not None


def _redact_value(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {
            (scrub(k) if isinstance(k, str) else k): REDACTED if _named_secret(k, v) else _redact_value(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact_value(v) for v in value]
    if isinstance(value, bytes | bytearray):
        return scrub(bytes(value).decode("utf-8", "backslashreplace"))
    return scrub(repr(value))  # what the JSON renderer would write for it, redacted


def redact(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """API keys, passwords and tokens never reach the log, whether passed as a field or embedded in a message or
    an exception (the last processor before rendering: everything it sees is what will be written)."""
    for key, value in list(event.items()):
        event[key] = REDACTED if _named_secret(key, value) else _redact_value(value)
    return event


# Exceptions as structured data, without the frames' local variables: a local may hold anything (a key, a
# request's headers) under any name.
_tracebacks = structlog.processors.ExceptionRenderer(structlog.tracebacks.ExceptionDictTransformer(show_locals=False))


def configure(level: str = "info", stream: TextIO | None = None) -> None:
    """(Re)configure logging. Safe to call again on SIGHUP to change the level; the registered secrets stay."""
    stream = stream or sys.stdout
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    final: list[Any] = [
        _tracebacks,
        redact,
        structlog.processors.JSONRenderer(),
    ]
    structlog.configure(
        processors=[*shared, *final],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.WriteLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(LEVELS[level])
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
