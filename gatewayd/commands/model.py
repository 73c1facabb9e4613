"""The command model: states, priorities, the client's envelope and the stored record."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from gatewayd import strictjson
from gatewayd.clock import Clock
from gatewayd.timefmt import iso


class State(StrEnum):
    RECEIVED = "received"
    ACCEPTED = "accepted"
    QUEUED = "queued"
    DISPATCHED = "dispatched"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    EXPIRED = "expired"
    REJECTED = "rejected"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset({State.SUCCEEDED, State.FAILED, State.EXPIRED, State.REJECTED, State.CANCELLED})
OPEN_STATES = (State.ACCEPTED, State.QUEUED, State.DISPATCHED)


class Priority(IntEnum):
    """Lower runs first."""

    CRITICAL = 0
    HIGH = 1
    NORMAL = 2
    LOW = 3

    @property
    def label(self) -> str:
        return self.name.lower()


def _parse_priority(value: Any) -> Priority:
    if isinstance(value, str) and value.upper() in Priority.__members__:
        return Priority[value.upper()]
    raise ValueError("must be one of critical, high, normal, low")


def quoted(value: Any) -> str:
    """A client's value as it looked in its JSON, cut short: what an error message quotes back."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):  # an integer of more than 4,300 digits, say
        return f"a {type(value).__name__}"
    return text if len(text) <= 40 else text[:37] + "..."


# pydantic's lax mode would take JSON true as 1 second and "5" as five, and "yes" or 1 as confirmation: a client
# that sends those has a bug to be told about, and a confirmation must be the literal true. These run before
# pydantic's own checks (range, finiteness, length), which still apply.
def _seconds(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"must be a number of seconds, not {quoted(value)}")
    return value


def _boolean(value: Any) -> Any:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, not {quoted(value)}")
    return value


def _name(value: Any) -> Any:
    # A device or action is matched exactly: "pump1 " is refused, not taken for pump1, so a client's stray
    # whitespace shows up as the bug it is instead of working here and failing wherever names are compared.
    if not isinstance(value, str):
        raise ValueError(f"must be a string, not {quoted(value)}")
    if value != value.strip():
        raise ValueError(f"must not begin or end with whitespace, got {quoted(value)}")
    return value


ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def _command_id(value: Any) -> Any:
    # The idempotency key is taken exactly as sent or refused: "nl\n" stripped to "nl" would answer a different
    # command's record, or run a second command under a key the client never used.
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise ValueError(f"must be 1 to 128 of A-Z a-z 0-9 . _ : - exactly as sent, got {quoted(value)}")
    return value


Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False), BeforeValidator(_seconds)]
StrictBool = Annotated[bool, BeforeValidator(_boolean)]
Name = Annotated[str, Field(min_length=1, max_length=64), BeforeValidator(_name)]
CommandId = Annotated[str, BeforeValidator(_command_id)]


class CommandRequest(BaseModel):
    """What a client sends (HTTP body, MQTT payload, CLI). Validated against the device profile afterwards.

    Nothing is coerced or trimmed: a value of the wrong JSON type, or a name or id with whitespace around it, is
    refused with the field named."""

    model_config = ConfigDict(extra="forbid")

    device: Name
    action: Name
    params: dict[str, Any] = Field(default_factory=dict)
    id: CommandId | None = None
    ttl_s: Seconds | None = None
    priority: Annotated[Priority, BeforeValidator(_parse_priority)] = Priority.NORMAL
    confirm: StrictBool = False  # required true for actions the profile marks ``confirm``


def new_command_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class Transition:
    state: State
    at: float
    mono: float
    boot_id: str
    detail: str | None = None

    def to_api(self) -> dict[str, Any]:
        out: dict[str, Any] = {"state": self.state.value, "at": iso(self.at)}
        if self.detail:
            out["detail"] = self.detail
        return out


@dataclass
class CommandRecord:
    id: str
    device: str
    action: str
    params: dict[str, Any]
    priority: Priority
    source: str
    user: str | None
    state: State
    created_at: float
    ttl_s: float
    deadline_at: float
    deadline_mono: float
    boot_id: str
    updated_at: float
    seq: int = 0
    result: dict[str, Any] | None = None
    error_code: str | None = None
    error_message: str | None = None
    transitions: list[Transition] = field(default_factory=list)
    interpretation: dict[str, Any] | None = None  # how a natural-language command was understood (interpret)

    def expired(self, clock: Clock) -> str | None:
        """Why this command must not run any more, or None while it may.

        Within one boot the monotonic deadline decides: wall-clock jumps (NTP arriving on a Pi without an RTC)
        cannot stretch or shrink it. Across a reboot only the wall clock is left; if it reads earlier than when
        the command was created, the clock is not trustworthy and the command's age is unknown, so it expires
        rather than risk acting on an old order.
        """
        if self.boot_id == clock.boot_id:
            return "deadline passed" if clock.monotonic() >= self.deadline_mono else None
        now = clock.wall()
        if now < self.created_at:
            return "deadline unknown after reboot (wall clock is behind the command's creation time)"
        return "deadline passed" if now >= self.deadline_at else None

    def same_request(self, device: str, action: str, params: dict[str, Any]) -> bool:
        return (self.device, self.action, self.params) == (device, action, params)

    def to_api(self, *, transitions: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "device": self.device,
            "action": self.action,
            "params": self.params,
            "priority": self.priority.label,
            "source": self.source,
            "user": self.user,
            "state": self.state.value,
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
            "ttl_s": self.ttl_s,
            "deadline_at": iso(self.deadline_at),
            "result": self.result,
            "error": (
                {"code": self.error_code, "message": self.error_message} if self.error_code is not None else None
            ),
        }
        if self.interpretation is not None:
            out["interpretation"] = self.interpretation
        if transitions:
            out["transitions"] = [t.to_api() for t in self.transitions]
        return out


def dumps(value: Any) -> str:
    """How params, results and interpretations are stored: valid JSON whatever a device answered."""
    return strictjson.dumps(value, sort_keys=True)
