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


# --- Modbus RTU mapping (profiles of kind "modbus_rtu") ------------------------------------------------------------

ModbusTable = Literal["coil", "discrete", "holding", "input"]
ModbusType = Literal["uint16", "int16", "uint32", "int32", "float32"]
BIT_TABLES = ("coil", "discrete")
REGISTER_WORDS: dict[str, int] = {"uint16": 1, "int16": 1, "uint32": 2, "int32": 2, "float32": 2}
INT_RANGES: dict[str, tuple[int, int]] = {
    "uint16": (0, 0xFFFF),
    "int16": (-0x8000, 0x7FFF),
    "uint32": (0, 0xFFFF_FFFF),
    "int32": (-0x8000_0000, 0x7FFF_FFFF),
}
ModbusAddress = Annotated[int, Field(ge=0, le=65535)]
_REGISTER_FORMAT = ("type", "word_order", "scale", "offset")


def _register_format_problem(given: set[str], type_: ModbusType, address: int, scale: float, where: str) -> str | None:
    """What is wrong with a register's type, word order and scale, or None."""
    if scale == 0:
        return "scale must not be 0"
    if "word_order" in given and REGISTER_WORDS[type_] == 1:
        return f"word_order is for 32-bit types, not {type_}"
    if address + REGISTER_WORDS[type_] - 1 > 65535:
        return f"a {type_} at {where} address {address} runs past register 65535"
    return None


class ModbusPoint(Strict):
    """Where a telemetry point lives on a Modbus unit. The engineering value is ``raw * scale + offset``."""

    table: ModbusTable
    address: ModbusAddress
    type: ModbusType | None = None  # registers only; uint16 when not given
    word_order: Literal["big", "little"] = "big"  # 32-bit types: "big" = the first register holds the high word
    scale: float = Field(default=1.0, allow_inf_nan=False)
    offset: float = Field(default=0.0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _coherent(self) -> ModbusPoint:
        if self.table in BIT_TABLES:
            extra = [name for name in _REGISTER_FORMAT if name in self.model_fields_set]
            if extra:
                raise ValueError(f"a {self.table} is one bit: {', '.join(extra)} do not apply")
            return self
        problem = _register_format_problem(self.model_fields_set, self.register_type, self.address, self.scale, "")
        if problem:
            raise ValueError(problem)
        return self

    @property
    def register_type(self) -> ModbusType:
        return self.type or "uint16"

    @property
    def size(self) -> int:
        """Bits or registers the point occupies."""
        return 1 if self.table in BIT_TABLES else REGISTER_WORDS[self.register_type]


class ModbusAction(Strict):
    """What an action does on a Modbus unit: write one coil or holding register (a 32-bit type: two), with a fixed
    ``value`` or a parameter's (``param``, register value = (param - offset) / scale); or read telemetry points
    (``read = "telemetry"`` for all of them, or a list of names) and return their values.

    Writes set absolute values, never toggles or increments, so one that is repeated (a retry after a lost reply,
    a command run again after a crash) leaves the device as a single write would: Modbus carries no command id."""

    write: Literal["coil", "holding"] | None = None
    read: Literal["telemetry"] | tuple[Name, ...] | None = None
    address: ModbusAddress | None = None
    value: bool | int | float | None = None
    param: Name | None = None
    type: ModbusType | None = None  # holding only; uint16 when not given
    word_order: Literal["big", "little"] = "big"
    scale: float = Field(default=1.0, allow_inf_nan=False)
    offset: float = Field(default=0.0, allow_inf_nan=False)
    # The Modbus function: 5 (one coil) or 15 (multiple coils); 6 (one register) or 16 (multiple registers). Some
    # devices (Eastron meters) accept only 16. Default: 5 for a coil, 6 for a 16-bit register, 16 for 32-bit.
    function: Literal[5, 6, 15, 16] | None = None

    @model_validator(mode="after")
    def _coherent(self) -> ModbusAction:
        given = self.model_fields_set
        if (self.write is None) == (self.read is None):
            raise ValueError("a modbus mapping needs exactly one of 'write' or 'read'")
        if self.read is not None:
            extra = sorted(given - {"read"})
            if extra:
                raise ValueError(f"a read reads telemetry points: {', '.join(extra)} do not apply")
            if isinstance(self.read, tuple) and not self.read:
                raise ValueError('read needs at least one point name (or "telemetry" for all)')
            return self
        if self.address is None:
            raise ValueError("a write needs an address")
        if (self.value is None) == (self.param is None):
            raise ValueError("a write needs exactly one of 'value' (fixed) or 'param' (from the command)")
        if self.write == "coil":
            extra = [name for name in _REGISTER_FORMAT if name in given]
            if extra:
                raise ValueError(f"a coil is one bit: {', '.join(extra)} do not apply")
            if self.value is not None and not isinstance(self.value, bool):
                raise ValueError(f"a coil takes true or false, not {self.value!r}")
            if self.function not in (None, 5, 15):
                raise ValueError(f"function {self.function} does not write coils (5 or 15 do)")
            return self
        if isinstance(self.value, bool):
            raise ValueError(f"a holding register takes a number, not {self.value!r}")
        problem = _register_format_problem(given, self.register_type, self.address, self.scale, "holding")
        if problem:
            raise ValueError(problem)
        if self.function in (5, 15):
            raise ValueError(f"function {self.function} writes coils, not holding registers (6 or 16 do)")
        if self.function == 6 and REGISTER_WORDS[self.register_type] != 1:
            raise ValueError(f"function 6 writes one register; a {self.register_type} needs function 16")
        if self.value is not None:
            problem = raw_range_problem(self.register_type, self.scale, self.offset, self.value, self.value)
            if problem:
                raise ValueError(f"value {self.value!r} {problem}")
        return self

    @property
    def register_type(self) -> ModbusType:
        return self.type or "uint16"

    @property
    def function_code(self) -> int:
        if self.function is not None:
            return self.function
        if self.write == "coil":
            return 5
        return 6 if REGISTER_WORDS[self.register_type] == 1 else 16


def raw_range_problem(type_: ModbusType, scale: float, offset: float, low: float, high: float) -> str | None:
    """Why engineering values ``low``..``high`` do not fit a register of ``type_`` after scaling, or None."""
    if type_ == "float32":
        return None
    lo, hi = INT_RANGES[type_]
    ends = sorted(round((v - offset) / scale) for v in (low, high))
    if ends[0] < lo or ends[1] > hi:
        return f"gives register values {ends[0]}..{ends[1]}, outside {type_} ({lo}..{hi})"
    return None


class ActionSpec(Strict):
    description: str = ""
    params: dict[Name, ParamSpec] = Field(default_factory=dict)
    ttl_s: float | None = Field(default=None, gt=0)
    actuates: bool = True  # false for reads: the safety limits do not count them
    safe: bool = False  # moves the device to its safe state (off, stop): never held back by the safety limits
    confirm: bool = False  # the command must carry "confirm": true (an action a technician must mean)
    modbus: ModbusAction | None = None  # modbus_rtu profiles: the coil or register it writes, or what it reads

    @model_validator(mode="after")
    def _modbus_params(self) -> ActionSpec:
        """A Modbus write uses exactly the parameter it names, of a type the coil or register can take."""
        m = self.modbus
        if m is None:
            return self
        if m.read is not None:
            if self.actuates:
                raise ValueError("a modbus read does not move the device: set actuates = false")
            if self.params:
                raise ValueError(f"a modbus read takes no parameters, not {sorted(self.params)}")
            return self
        if m.param is not None and m.param not in self.params:
            raise ValueError(f"modbus param {m.param!r} is not a parameter of this action ({sorted(self.params)})")
        unused = sorted(set(self.params) - ({m.param} if m.param else set()))
        if unused:
            raise ValueError(f"parameters {unused} are not written by the modbus mapping")
        if m.param is None:
            return self
        spec = self.params[m.param]
        if m.write == "coil":
            if spec.type != "bool":
                raise ValueError(f"a coil takes true or false: parameter {m.param!r} must be a bool, not {spec.type}")
            return self
        if spec.type not in ("int", "float"):
            raise ValueError(f"a holding register takes a number: parameter {m.param!r} is a {spec.type}")
        if m.register_type != "float32":
            if spec.min is None or spec.max is None:
                raise ValueError(
                    f"parameter {m.param!r} needs min and max: a {m.register_type} register holds a bounded range"
                )
            problem = raw_range_problem(m.register_type, m.scale, m.offset, spec.min, spec.max)
            if problem:
                raise ValueError(f"parameter {m.param!r} ({spec.min:g}..{spec.max:g}) {problem}")
        return self

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
    modbus: ModbusPoint | None = None  # modbus_rtu profiles: the coil or register(s) it is polled from

    @model_validator(mode="after")
    def _range(self) -> TelemetryPoint:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is greater than max ({self.max})")
        if (self.min is not None or self.max is not None) and self.type not in ("int", "float"):
            raise ValueError("'min'/'max' are only for int and float points")
        return self

    @model_validator(mode="after")
    def _modbus_type(self) -> TelemetryPoint:
        """The point's type must be what its coil or register decodes to."""
        m = self.modbus
        if m is None:
            return self
        if m.table in BIT_TABLES:
            if self.type != "bool":
                raise ValueError(f'a {m.table} reads as true or false: set type = "bool", not {self.type!r}')
            return self
        if self.type not in ("int", "float"):
            raise ValueError(f'a {m.table} register reads as a number: set type = "int" or "float", not "{self.type}"')
        if self.type == "int" and (
            m.register_type == "float32" or not (m.scale.is_integer() and m.offset.is_integer())
        ):
            raise ValueError('a float32 register or a fractional scale or offset gives fractions: set type = "float"')
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
    kind: Literal["gpio_output", "gpio_pwm", "gpio_input", "serial_line", "modbus_rtu"]
    description: str = ""
    default_ttl_s: float = Field(default=300.0, gt=0)
    simulator: Name | None = None
    actions: dict[Name, ActionSpec]
    safety: SafetySpec = SafetySpec()
    input: InputSpec = InputSpec()  # gpio_input only
    pwm_frequency_hz: float = Field(default=100.0, gt=0, le=100_000)  # gpio_pwm only
    # What the device reports on its own (line-protocol T frames, polled registers): name -> point.
    telemetry: dict[Name, TelemetryPoint] = Field(default_factory=dict)
    # modbus_rtu only: read every telemetry point this often and record them (one record per poll).
    poll_interval_s: float | None = Field(default=None, gt=0, le=86_400)

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

    @model_validator(mode="after")
    def _modbus_mapped(self) -> Profile:
        """A modbus_rtu profile maps every action and telemetry point onto its unit; other kinds map none."""
        unmapped = sorted(n for n, a in self.actions.items() if a.modbus is None)
        unpolled = sorted(n for n, p in self.telemetry.items() if p.modbus is None)
        if self.kind != "modbus_rtu":
            mapped = sorted(set(self.actions) - set(unmapped)) + sorted(set(self.telemetry) - set(unpolled))
            if mapped:
                raise ValueError(f"modbus mappings are for modbus_rtu profiles, not {self.kind} ({mapped})")
            if self.poll_interval_s is not None:
                raise ValueError(f"poll_interval_s is for modbus_rtu profiles, not {self.kind}")
            return self
        if unmapped:
            raise ValueError(f"a modbus_rtu profile maps every action to its unit: {unmapped} have no 'modbus'")
        if unpolled:
            raise ValueError(
                f"a modbus_rtu profile reads every telemetry point from its unit: {unpolled} have no 'modbus'"
            )
        if self.poll_interval_s is not None and not self.telemetry:
            raise ValueError("poll_interval_s needs telemetry points to poll")
        for name, action in self.actions.items():
            read = action.modbus.read if action.modbus is not None else None
            if isinstance(read, tuple):
                unknown = sorted(set(read) - set(self.telemetry))
                if unknown:
                    raise ValueError(f"action {name!r} reads {unknown}, which are not telemetry points")
            elif read == "telemetry" and not self.telemetry:
                raise ValueError(f"action {name!r} reads the telemetry points, but the profile has none")
        return self

    def ttl_for(self, action: str) -> float:
        spec = self.actions[action]
        return spec.ttl_s if spec.ttl_s is not None else self.default_ttl_s
