"""Device profiles (``hardware/profiles/*.toml``): what a type of device can do and with which parameters.

A profile is the contract a command is validated against before it is accepted: actions, their parameters
(type, range, unit, default) and the deadline a command gets when the client gives none; and the safety limits
that protect the hardware (``[safety]``: minimum interval between actuations, actuations per minute, maximum
on-time with automatic off; ``confirm`` on actions that need an explicit confirmation).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Name = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,62}$")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ParamSpec(Strict):
    type: Literal["int", "float", "bool", "str", "enum"]
    description: str = ""
    unit: str | None = None
    min: float | None = None
    max: float | None = None
    choices: tuple[str, ...] | None = None
    max_length: int = Field(default=256, ge=1, le=4096)
    default: int | float | bool | str | None = None

    @model_validator(mode="after")
    def _coherent(self) -> ParamSpec:
        if self.type == "enum" and not self.choices:
            raise ValueError("an enum parameter needs 'choices'")
        if self.type != "enum" and self.choices is not None:
            raise ValueError("'choices' is only for enum parameters")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is greater than max ({self.max})")
        if (self.min is not None or self.max is not None) and self.type not in ("int", "float"):
            raise ValueError("'min'/'max' are only for int and float parameters")
        return self

    @property
    def required(self) -> bool:
        return self.default is None

    def json_schema(self) -> dict[str, Any]:
        kind = {"int": "integer", "float": "number", "bool": "boolean", "str": "string", "enum": "string"}
        schema: dict[str, Any] = {"type": kind[self.type]}
        if self.description:
            schema["description"] = self.description
        if self.unit:
            schema["x-unit"] = self.unit
        if self.min is not None:
            schema["minimum"] = self.min
        if self.max is not None:
            schema["maximum"] = self.max
        if self.choices:
            schema["enum"] = list(self.choices)
        if self.type == "str":
            schema["maxLength"] = self.max_length
        if self.default is not None:
            schema["default"] = self.default
        return schema


class ActionSpec(Strict):
    description: str = ""
    params: dict[Name, ParamSpec] = Field(default_factory=dict)
    ttl_s: float | None = Field(default=None, gt=0)
    actuates: bool = True  # false for reads: the safety limits do not count them
    safe: bool = False  # moves the device to its safe state (off, stop): never held back by the safety limits
    confirm: bool = False  # the command must carry "confirm": true (an action a technician must mean)

    def json_schema(self) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {name: spec.json_schema() for name, spec in self.params.items()},
            "required": [name for name, spec in self.params.items() if spec.required],
            "additionalProperties": False,
        }


class SafetySpec(Strict):
    """Hardware protection, enforced by the dispatcher for every command whatever its source or priority; only
    ``safe`` actions are exempt, so nothing ever stops a device from being switched off."""

    min_interval_s: float | None = Field(default=None, gt=0, le=86_400)
    max_actuations_per_minute: int | None = Field(default=None, ge=1, le=6_000)
    max_on_s: float | None = Field(default=None, gt=0, le=7 * 86_400)
    on_actions: tuple[Name, ...] = ()  # start the on-time clock
    off_action: Name | None = None  # sent automatically (critical, source "safety") after max_on_s


class TelemetryPoint(Strict):
    """One value a device reports on its own (a measurement or a state), as it is recorded in the outbox."""

    type: Literal["int", "float", "bool", "str"] = "float"
    description: str = ""
    unit: str | None = None
    # The plausible range: a reading outside it is still recorded, flagged ``out_of_range`` (a broken sensor
    # reads -127 °C; dropping that would hide the fault).
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _range(self) -> TelemetryPoint:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is greater than max ({self.max})")
        if (self.min is not None or self.max is not None) and self.type not in ("int", "float"):
            raise ValueError("'min'/'max' are only for int and float points")
        return self


GPIO_KINDS = ("gpio_output", "gpio_pwm", "gpio_input")
_GPIO_ACTIONS = {"gpio_output": {"on", "off"}, "gpio_pwm": {"on", "off", "set"}, "gpio_input": {"read"}}


class InputSpec(Strict):
    """A digital input (button, reed switch, PIR, float switch): its wiring and the names of its two edges."""

    pull_up: bool = True  # internal pull-up: the contact closes to ground, the usual wiring of a button
    bounce_s: float | None = Field(default=0.02, ge=0, le=10)  # edges closer than this are contact bounce
    active_event: Name = "pressed"
    inactive_event: Name = "released"


class Profile(Strict):
    """One device type. The profile's name is its file name without ``.toml``."""

    name: Name
    kind: Literal["gpio_output", "gpio_pwm", "gpio_input", "serial_line"]
    description: str = ""
    default_ttl_s: float = Field(default=300.0, gt=0)
    simulator: Name | None = None
    actions: dict[Name, ActionSpec]
    safety: SafetySpec = SafetySpec()
    input: InputSpec = InputSpec()  # gpio_input only
    pwm_frequency_hz: float = Field(default=100.0, gt=0, le=100_000)  # gpio_pwm only
    # What the device reports on its own (line-protocol T frames, polled registers): name -> point.
    telemetry: dict[Name, TelemetryPoint] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _has_actions(self) -> Profile:
        if not self.actions:
            raise ValueError("a profile needs at least one action")
        safety = self.safety
        named = [*safety.on_actions, *([safety.off_action] if safety.off_action else [])]
        unknown_named = sorted(set(named) - set(self.actions))
        if unknown_named:
            raise ValueError(f"safety names actions the profile does not have: {unknown_named}")
        if safety.max_on_s is not None:
            if not safety.on_actions or safety.off_action is None:
                raise ValueError("safety.max_on_s needs on_actions and an off_action")
            off = self.actions[safety.off_action]
            if any(p.required for p in off.params.values()):
                raise ValueError(f"safety.off_action {safety.off_action!r} must not need parameters")
        allowed = _GPIO_ACTIONS.get(self.kind)
        if allowed is not None:
            unknown = set(self.actions) - allowed
            if unknown:
                raise ValueError(f"{self.kind} profiles support the actions {sorted(allowed)}, not {sorted(unknown)}")
        if self.kind == "gpio_pwm" and "set" in self.actions:
            percent = self.actions["set"].params.get("percent")
            if percent is None or set(self.actions["set"].params) != {"percent"}:
                raise ValueError("a gpio_pwm 'set' action takes one parameter, percent")
        return self

    def ttl_for(self, action: str) -> float:
        spec = self.actions[action]
        return spec.ttl_s if spec.ttl_s is not None else self.default_ttl_s
