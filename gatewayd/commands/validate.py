"""Validation of a command against its device's profile. Pure: no I/O, no clock.

Every problem is reported with the offending field, so a client (or a technician at the CLI) can fix them all
at once: ``{"code": "validation_failed", "details": {"errors": [{"field": "params.percent", ...}]}}``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from gatewayd import strictjson
from gatewayd.commands.model import CommandRequest, quoted
from gatewayd.config.profiles import ParamSpec, Profile
from gatewayd.errors import BadRequest, UnknownDevice, ValidationFailed

# A command is flat (params hold numbers, strings and booleans); this much nesting is already nonsense, and far
# below where decoding, validating or echoing a value back in an error would hit Python's recursion limit.
MAX_JSON_DEPTH = 32


def decode_json(raw: bytes | bytearray, what: str) -> Any:
    """A client's JSON (an HTTP body, an MQTT payload), or BadRequest: never another exception, however broken,
    huge or deeply nested the bytes are."""
    try:
        return strictjson.loads(raw, max_depth=MAX_JSON_DEPTH)
    except strictjson.TooDeep:
        raise BadRequest(
            f"{what} is nested more than {MAX_JSON_DEPTH} levels deep", details={"max_depth": MAX_JSON_DEPTH}
        ) from None
    except strictjson.NotStrictJson as err:
        raise BadRequest(f"{what} is not valid JSON: {err}", details={"reason": "not_strict_json"}) from None
    except (ValueError, UnicodeDecodeError) as err:
        raise BadRequest(f"{what} is not valid JSON: {err}") from None


@dataclass(frozen=True)
class Validated:
    request: CommandRequest
    params: dict[str, Any]
    profile: Profile
    ttl_s: float


def parse_request(payload: Any) -> CommandRequest:
    """The envelope: a JSON object with device, action, params, and optional id, ttl_s, priority."""
    if not isinstance(payload, dict):
        raise BadRequest("the body must be a JSON object", details={"got": type(payload).__name__})
    try:
        return CommandRequest.model_validate(payload)
    except ValidationError as exc:
        raise ValidationFailed("the command is not valid", details={"errors": field_errors(exc)}) from None


def field_errors(exc: ValidationError) -> list[dict[str, str]]:
    """pydantic's errors as the API reports them: the field's dotted path and what is wrong with it."""
    return [{"field": ".".join(str(p) for p in e["loc"]) or "(body)", "message": _message(e)} for e in exc.errors()]


def _message(e: Mapping[str, Any]) -> str:
    if e["type"] == "extra_forbidden":
        return "unknown field"
    return str(e["msg"]).removeprefix("Value error, ")


def validate(
    request: CommandRequest,
    device_profiles: Mapping[str, Profile],
    *,
    default_ttl_s: float,
    max_ttl_s: float,
) -> Validated:
    profile = device_profiles.get(request.device)
    if profile is None:
        raise UnknownDevice(
            f"no device named {request.device!r}",
            details={"field": "device", "device": request.device, "known": sorted(device_profiles)},
        )
    action = profile.actions.get(request.action)
    if action is None:
        raise ValidationFailed(
            f"device {request.device!r} has no action {request.action!r}",
            details={
                "errors": [{"field": "action", "message": "unknown action", "value": request.action}],
                "actions": sorted(profile.actions),
            },
        )
    errors: list[dict[str, Any]] = []
    params: dict[str, Any] = {}
    if action.confirm and not request.confirm:
        errors.append(
            {"field": "confirm", "message": f'action {request.action!r} needs confirmation: send "confirm": true'}
        )
    for name in request.params:
        if name not in action.params:
            errors.append({"field": f"params.{name}", "message": "unknown parameter"})
    for name, spec in action.params.items():
        if name not in request.params:
            if spec.required:
                errors.append({"field": f"params.{name}", "message": "required parameter is missing"})
            else:
                params[name] = spec.default
            continue
        value, problem = check_param(spec, request.params[name])
        if problem is not None:
            errors.append({"field": f"params.{name}", "message": problem, "value": request.params[name]})
        else:
            params[name] = value
    ttl_s = request.ttl_s if request.ttl_s is not None else profile.ttl_for(request.action)
    if ttl_s > max_ttl_s:
        errors.append({"field": "ttl_s", "message": f"must be at most {max_ttl_s:g}", "value": ttl_s})
    if errors:
        raise ValidationFailed(f"the command for {request.device!r} is not valid", details={"errors": errors})
    return Validated(request, params, profile, ttl_s)


def check_param(spec: ParamSpec, value: Any) -> tuple[Any, str | None]:
    """(normalised value, None) or (None, what is wrong)."""
    if spec.type == "bool":
        return (value, None) if isinstance(value, bool) else (None, "must be true or false")
    if spec.type in ("int", "float"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None, f"must be {_number_kind(spec)}, not {quoted(value)}"
        if isinstance(value, float) and not math.isfinite(value):
            return None, "must be a finite number"
        if spec.type == "int":
            if isinstance(value, float) and not value.is_integer():
                return None, f"must be {_number_kind(spec)}, not {quoted(value)}"
            value = int(value)
        # Compared before any conversion to float: Python compares an int of any size with a float exactly, while
        # float() of a JSON integer with 400 digits raises OverflowError.
        if spec.min is not None and value < spec.min:
            return None, f"must be at least {spec.min:g}{_unit(spec)}"
        if spec.max is not None and value > spec.max:
            return None, f"must be at most {spec.max:g}{_unit(spec)}"
        if spec.type == "float":
            try:
                value = float(value)
            except OverflowError:
                return None, "must be a finite number"
        return value, None
    if not isinstance(value, str):
        return None, "must be a string"
    if spec.type == "enum":
        assert spec.choices is not None
        return (value, None) if value in spec.choices else (None, f"must be one of {', '.join(spec.choices)}")
    if len(value) > spec.max_length:
        return None, f"must be at most {spec.max_length} characters"
    return value, None


def _number_kind(spec: ParamSpec) -> str:
    """What a numeric parameter takes, in words: "a whole number from 0 to 100 %", "a number of at least 0 s"."""
    kind = "a whole number" if spec.type == "int" else "a number"
    if spec.min is not None and spec.max is not None:
        return f"{kind} from {spec.min:g} to {spec.max:g}{_unit(spec)}"
    if spec.min is not None:
        return f"{kind} of at least {spec.min:g}{_unit(spec)}"
    if spec.max is not None:
        return f"{kind} of at most {spec.max:g}{_unit(spec)}"
    return f"{kind} ({spec.unit})" if spec.unit else kind


def _unit(spec: ParamSpec) -> str:
    return f" {spec.unit}" if spec.unit else ""
