"""One exception root for the whole daemon.

Every error carries a stable ``code`` (used by the API, the CLI and the logs) and an HTTP status. Errors are
split into transient (worth retrying later: the device or the disk may recover) and permanent (retrying the
same thing can never succeed). Foreign errors are translated at the boundary with ``raise ... from err``.
"""

from __future__ import annotations

import math
from typing import Any


class GatewayError(Exception):
    code = "internal_error"
    status = 500
    transient = False

    def __init__(self, message: str, *, details: dict[str, Any] | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.details = details or {}
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": self.details}


class TransientError(GatewayError):
    transient = True
    status = 503
    code = "unavailable"


class PermanentError(GatewayError):
    transient = False


# --- configuration -----------------------------------------------------------------------------------------


class ConfigError(PermanentError):
    """A configuration file (or environment override) is invalid. ``problems`` lists every problem found."""

    code = "config_invalid"

    def __init__(self, problems: list[ConfigProblem]):
        self.problems = problems
        super().__init__(f"{len(problems)} configuration problem(s)", details={"problems": [str(p) for p in problems]})


class ConfigProblem:
    __slots__ = ("file", "key", "message")

    def __init__(self, file: str, key: str, message: str):
        self.file, self.key, self.message = file, key, message

    def __str__(self) -> str:
        return f"{self.file}: {self.key or '(file)'}: {self.message}"

    def __repr__(self) -> str:
        return f"ConfigProblem({self.file!r}, {self.key!r}, {self.message!r})"


# --- store ---------------------------------------------------------------------------------------------------


class StoreError(PermanentError):
    code = "store_error"


class StoreCorrupt(StoreError):
    code = "store_corrupt"


class StoreUnavailable(TransientError):
    """The database cannot take writes right now (disk full, I/O error, closing)."""

    code = "store_unavailable"


class StorageFull(StoreUnavailable):
    """The data directory's filesystem is full, or below the reserve kept for commands already accepted
    (``[store] min_free_bytes``): new work is refused until space is freed. SQLite's SQLITE_FULL ("database or
    disk is full") and ENOSPC become this too. ``retry_after_s`` is a hint for the client: freeing space usually
    takes someone's action, so it is not short."""

    code = "storage_full"
    status = 503

    def __init__(self, message: str, *, details: dict[str, Any] | None = None, retry_after_s: float = 30.0):
        super().__init__(message, details={**(details or {}), "retry_after_s": retry_after_s})
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}


class StoreLost(StoreUnavailable):
    """The database file the gateway opened is gone (deleted, moved, its directory too), was replaced by another
    file, or can no longer be written (read-only filesystem, permissions, persistent I/O errors). Nothing written
    now would be durable, so every write is refused until the gateway is restarted; the message says what
    happened and what to do. A subclass of :class:`StoreUnavailable`: whoever treats that as "not committed" (the
    MQTT uplink does not acknowledge the message, so the broker keeps it) does the right thing with this too."""

    code = "store_lost"
    status = 503


# --- requests and commands -----------------------------------------------------------------------------------


class BadRequest(PermanentError):
    code = "bad_request"
    status = 400


class RetainedCommand(BadRequest):
    """A command that reached us as an MQTT retained message: the broker replays it to every new subscription, so
    it would run again at every restart and reconnect, on an order of unknown age. Refused, never run."""

    code = "retained_command"


class PayloadTooLarge(PermanentError):
    code = "payload_too_large"
    status = 413


class UnsupportedMediaType(PermanentError):
    """A body of a type this route does not read: the JSON API takes ``application/json`` only, so a body a web page
    could send elsewhere without asking first (a form, ``text/plain``) never reaches it."""

    code = "unsupported_media_type"
    status = 415


class Unauthenticated(PermanentError):
    """No credentials, or credentials that are not valid."""

    code = "unauthenticated"
    status = 401


class InvalidCredentials(Unauthenticated):
    code = "invalid_credentials"


class Forbidden(PermanentError):
    """Who you are is known, and that is not enough for this request."""

    code = "forbidden"
    status = 403


class CsrfFailed(Forbidden):
    """A state-changing request a browser sent on behalf of another site (its Origin, Sec-Fetch-Site or Referer
    says so), or a cookie session's request without its CSRF token."""

    code = "csrf_failed"


class NotFound(PermanentError):
    code = "not_found"
    status = 404


class UnknownDevice(NotFound):
    code = "unknown_device"


class UnknownCommand(NotFound):
    code = "unknown_command"


class ValidationFailed(PermanentError):
    code = "validation_failed"
    status = 422


class Conflict(PermanentError):
    code = "conflict"
    status = 409


class ShuttingDown(TransientError):
    code = "shutting_down"
    status = 503


class QueueFull(TransientError):
    code = "queue_full"
    status = 503


class WaitTimeout(TransientError):
    code = "wait_timeout"
    status = 504


# --- devices ---------------------------------------------------------------------------------------------------


class DeviceError(GatewayError):
    code = "device_error"
    status = 502


class DeviceUnavailable(TransientError):
    code = "device_unavailable"


class DeviceTimeout(TransientError):
    code = "device_timeout"
    status = 504


class DeviceBusy(TransientError):
    """The device answered that it cannot take a request right now (NAK code ``busy``): worth retrying soon."""

    code = "device_busy"
    status = 503


class DeviceRejected(PermanentError):
    """The device answered, and said no (NAK): retrying the same request will not help."""

    code = "device_rejected"
    status = 422


class ProtocolError(TransientError):
    """Bytes on the wire that do not form a valid frame (bad CRC, garbage, oversize)."""

    code = "protocol_error"


class SafetyLimited(DeviceRejected):
    """The device's safety limits refuse this actuation now (too soon after the last, too many per minute)."""

    code = "safety_limit"
    status = 429
