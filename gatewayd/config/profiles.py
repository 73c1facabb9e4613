"""Device profiles (``hardware/profiles/*.toml``): what a type of device can do and with which parameters.

A profile is the contract a command is validated against before it is accepted: actions, their parameters
(type, range, unit, default) and the deadline a command gets when the client gives none.
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

    def json_schema(self) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {name: spec.json_schema() for name, spec in self.params.items()},
            "required": [name for name, spec in self.params.items() if spec.required],
            "additionalProperties": False,
        }


class Profile(Strict):
    """One device type. The profile's name is its file name without ``.toml``."""

    name: Name
    kind: Literal["gpio_output", "serial_line"]
    description: str = ""
    default_ttl_s: float = Field(default=300.0, gt=0)
    simulator: Name | None = None
    actions: dict[Name, ActionSpec]

    @model_validator(mode="after")
    def _has_actions(self) -> Profile:
        if not self.actions:
            raise ValueError("a profile needs at least one action")
        if self.kind == "gpio_output":
            unknown = set(self.actions) - {"on", "off"}
            if unknown:
                raise ValueError(f"gpio_output profiles support the actions on and off, not {sorted(unknown)}")
        return self

    def ttl_for(self, action: str) -> float:
        spec = self.actions[action]
        return spec.ttl_s if spec.ttl_s is not None else self.default_ttl_s
