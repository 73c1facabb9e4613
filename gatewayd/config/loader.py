"""Load ``config.toml``, apply ``GATEWAYD_<SECTION>__<KEY>`` overrides, load the device profiles, and check
that everything fits together. Every problem is collected (with its file and key path) before failing, so
``gatewayd check-config`` can show them all at once.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from gatewayd.config.models import Config, DeviceConfig
from gatewayd.config.profiles import GPIO_KINDS, Profile
from gatewayd.errors import ConfigError, ConfigProblem

ENV_PREFIX = "GATEWAYD_"
KNOWN_SIMULATORS = frozenset({"pump", "sensor_node"})
# gatewayd.devices.modbus_sim.MODELS (not imported here: check-config must not load pymodbus).
MODBUS_SIMULATORS = frozenset(
    {"eastron_sdm120", "eastron_sdm630", "waveshare_relay8", "fronius_symo", "advantech_adam6017"}
)
# The serial profile kinds and the bus protocol each speaks.
SERIAL_PROTOCOLS = {"serial_line": "gatewayd", "modbus_rtu": "modbus_rtu"}


@dataclass(frozen=True)
class LoadedConfig:
    config: Config
    profiles: dict[str, Profile]
    path: Path
    overrides: dict[str, str] = field(default_factory=dict)  # dotted key -> environment variable


def env_overrides(environ: Mapping[str, str]) -> dict[tuple[str, ...], tuple[str, str]]:
    """``GATEWAYD_HTTP__PORT=8081`` -> ``{("http", "port"): ("GATEWAYD_HTTP__PORT", "8081")}``.

    Only variables with a ``__`` separator are overrides, so ``GATEWAYD_URL`` (used by the CLI) is not one.
    """
    found: dict[tuple[str, ...], tuple[str, str]] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        parts = tuple(p.lower() for p in name[len(ENV_PREFIX) :].split("__"))
        found[parts] = (name, value)
    return found


def _parse_env_value(raw: str) -> Any:
    """Values are TOML literals when they parse as one (``8081``, ``true``, ``[1, 2]``), strings otherwise."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except (tomllib.TOMLDecodeError, RecursionError):  # tomllib recurses into nested arrays and tables
        return raw


def _apply_overrides(
    data: dict[str, Any], overrides: dict[tuple[str, ...], tuple[str, str]], problems: list[ConfigProblem]
) -> None:
    for path, (var, raw) in sorted(overrides.items()):
        if "" in path:  # GATEWAYD_HTTP____PORT, GATEWAYD___X: a part missing between the separators
            problems.append(ConfigProblem(f"env {var}", ".".join(path), "not a key: a part between '__' is empty"))
            continue
        node: Any = data
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                problems.append(ConfigProblem(f"env {var}", ".".join(path[: i + 1]), "is not a table"))
                break
            node = child
        else:
            node[path[-1]] = _parse_env_value(raw)


def _loc(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc)


def _describe(err: Mapping[str, Any]) -> str:
    message = str(err["msg"])
    if err["type"] == "extra_forbidden":
        return "unknown key"
    value = err.get("input")
    if err["type"] != "missing" and not isinstance(value, dict | list):
        message += f" (got {value!r})"
    return message


def _validation_problems(
    exc: ValidationError, file: str, overrides: dict[tuple[str, ...], tuple[str, str]] | None = None
) -> list[ConfigProblem]:
    problems = []
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"])
        source = file
        for path, (var, _) in (overrides or {}).items():
            # The override's own key, or an unknown section it created (GATEWAYD_HTPP__PORT: 'htpp').
            if loc[: len(path)] == path or (err["type"] == "extra_forbidden" and path[: len(loc)] == loc):
                source = f"env {var}"
        problems.append(ConfigProblem(source, _loc(err["loc"]), _describe(err)))
    return problems


def _read_toml(path: Path, problems: list[ConfigProblem]) -> dict[str, Any] | None:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        problems.append(ConfigProblem(str(path), "", "file not found"))
        return None
    except (OSError, UnicodeDecodeError) as err:
        problems.append(ConfigProblem(str(path), "", f"cannot read: {err}"))
        return None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        problems.append(ConfigProblem(str(path), "", f"not valid TOML: {err}"))
        return None
    except RecursionError:  # tomllib recurses into nested arrays and inline tables
        problems.append(ConfigProblem(str(path), "", "not valid TOML: arrays or tables nested too deeply"))
        return None


def load_profiles(directory: Path, problems: list[ConfigProblem]) -> dict[str, Profile]:
    profiles: dict[str, Profile] = {}
    if not directory.is_dir():
        problems.append(ConfigProblem(str(directory), "", "profiles directory not found"))
        return profiles
    for path in sorted(directory.glob("*.toml")):
        data = _read_toml(path, problems)
        if data is None:
            continue
        if "name" in data:
            problems.append(ConfigProblem(str(path), "name", "unknown key (a profile is named by its file name)"))
            continue
        try:
            profiles[path.stem] = Profile.model_validate({"name": path.stem, **data})
        except ValidationError as exc:
            problems.extend(_validation_problems(exc, str(path)))
    return profiles


def _cross_check(cfg: Config, profiles: dict[str, Profile], file: str) -> list[ConfigProblem]:
    problems: list[ConfigProblem] = []
    pins: dict[int, str] = {}
    addresses: dict[tuple[str, int], str] = {}  # (bus, address or unit id) -> device
    for bus in sorted(set(cfg.serial) & set(cfg.modbus_tcp)):
        problems.append(
            ConfigProblem(file, f"modbus_tcp.{bus}", f"[serial.{bus}] has this name: devices name their bus, once")
        )
    for name, dev in cfg.devices.items():
        key = f"devices.{name}"
        profile = profiles.get(dev.profile)
        if profile is None:
            problems.append(ConfigProblem(file, f"{key}.profile", f"unknown profile {dev.profile!r}"))
            continue
        problems.extend(_check_channels(dev, profile, key, file))
        if profile.kind in GPIO_KINDS:
            if dev.pin is None:
                problems.append(ConfigProblem(file, f"{key}.pin", "a GPIO device needs a pin"))
            elif dev.pin in pins:
                problems.append(ConfigProblem(file, f"{key}.pin", f"pin {dev.pin} is already used by {pins[dev.pin]}"))
            else:
                pins[dev.pin] = name
        elif profile.kind in SERIAL_PROTOCOLS:
            if dev.bus is None:
                problems.append(ConfigProblem(file, f"{key}.bus", "a serial device needs a bus"))
                continue
            if dev.bus in cfg.modbus_tcp:
                problems.extend(_check_tcp_device(cfg, name, dev, profile, addresses, file))
                continue
            if dev.bus not in cfg.serial:
                problems.append(
                    ConfigProblem(
                        file, f"{key}.bus", f"unknown bus {dev.bus!r} (no [serial.{dev.bus}] or [modbus_tcp.{dev.bus}])"
                    )
                )
                continue
            protocol = cfg.serial[dev.bus].protocol
            if protocol != SERIAL_PROTOCOLS[profile.kind]:
                problems.append(_speaks(profile, f"bus {dev.bus!r} is protocol {protocol!r}", key, file))
            if dev.unit_id is not None:
                problems.append(
                    ConfigProblem(file, f"{key}.unit_id", "unit_id is for Modbus TCP connections: give an address")
                )
            if dev.address is None:
                problems.append(ConfigProblem(file, f"{key}.address", "a serial device needs an address"))
            else:
                problems.extend(_claim(addresses, dev.bus, dev.address, name, f"{key}.address", file))
            if cfg.bus_simulated(dev.bus):
                problems.extend(_simulator_problems(profile, key, file))
    return problems


def _check_tcp_device(
    cfg: Config, name: str, dev: DeviceConfig, profile: Profile, addresses: dict[tuple[str, int], str], file: str
) -> list[ConfigProblem]:
    """A device on a Modbus TCP connection: a Modbus profile, and a unit id of its own on the connection."""
    key = f"devices.{name}"
    assert dev.bus is not None
    connection = cfg.modbus_tcp[dev.bus]
    problems: list[ConfigProblem] = []
    if profile.kind != "modbus_rtu":
        problems.append(_speaks(profile, f"{dev.bus!r} is a Modbus TCP connection", key, file))
    if dev.address is not None:
        problems.append(
            ConfigProblem(file, f"{key}.address", "a device on a Modbus TCP connection has a unit_id, not an address")
        )
    if dev.unit_id is None:
        problems.append(ConfigProblem(file, f"{key}.unit_id", "a device on a Modbus TCP connection needs a unit_id"))
    elif connection.framer == "rtu" and not 1 <= dev.unit_id <= 247:
        problems.append(
            ConfigProblem(
                file, f"{key}.unit_id", "RTU over TCP reaches units on RS-485: a unit_id is an address, 1 to 247"
            )
        )
    else:
        problems.extend(_claim(addresses, dev.bus, dev.unit_id, name, f"{key}.unit_id", file))
    if connection.simulated(cfg.gateway.mode):
        problems.extend(_simulator_problems(profile, key, file))
    return problems


def _speaks(profile: Profile, but: str, key: str, file: str) -> ConfigProblem:
    return ConfigProblem(
        file, f"{key}.bus", f"profile {profile.name!r} speaks {SERIAL_PROTOCOLS[profile.kind]}, but {but}"
    )


def _claim(
    addresses: dict[tuple[str, int], str], bus: str, address: int, name: str, where: str, file: str
) -> list[ConfigProblem]:
    """One device per address (or unit id) on a bus."""
    other = addresses.setdefault((bus, address), name)
    if other == name:
        return []
    what = "address" if where.endswith(".address") else "unit id"
    return [ConfigProblem(file, where, f"{what} {address} on {bus} is used by {other}")]


def _simulator_problems(profile: Profile, key: str, file: str) -> list[ConfigProblem]:
    """Mock mode simulates the device: its profile must name a simulator model there is."""
    if profile.simulator is None:
        return [ConfigProblem(file, f"{key}.profile", f"profile {profile.name!r} has no simulator for mock mode")]
    if profile.simulator not in (MODBUS_SIMULATORS if profile.kind == "modbus_rtu" else KNOWN_SIMULATORS):
        return [ConfigProblem(file, f"{key}.profile", f"unknown simulator {profile.simulator!r}")]
    return []


def _check_channels(dev: DeviceConfig, profile: Profile, key: str, file: str) -> list[ConfigProblem]:
    """Channel labels name channels the profile has (its on3/off3 actions), each label once."""
    problems: list[ConfigProblem] = []
    if not dev.channels:
        return problems
    from gatewayd.interpret.registry import channel_actions  # only configurations that label channels load it

    have = sorted(channel_actions(profile))
    seen: dict[str, int] = {}
    for channel, label in sorted(dev.channels.items()):
        where = f"{key}.channels.{channel}"
        if not have:
            problems.append(ConfigProblem(file, where, f"profile {profile.name!r} has no channels (no on1/off1 ...)"))
            break
        if channel not in have:
            problems.append(
                ConfigProblem(file, where, f"profile {profile.name!r} has channels {have[0]} to {have[-1]}")
            )
        spoken = " ".join(label.lower().split())
        if spoken in seen:
            problems.append(ConfigProblem(file, where, f"{label!r} already names channel {seen[spoken]}"))
        seen[spoken] = channel
    return problems


def _resolve(cfg: Config, base: Path) -> Config:
    gw = cfg.gateway
    data_dir = gw.data_dir if gw.data_dir.is_absolute() else base / gw.data_dir
    profiles_dir = gw.profiles_dir if gw.profiles_dir.is_absolute() else base / gw.profiles_dir
    new_gw = gw.model_copy(update={"data_dir": data_dir, "profiles_dir": profiles_dir})
    update: dict[str, Any] = {"gateway": new_gw}
    tls = cfg.mqtt.tls
    if tls is not None:
        files = {k: (v if v is None or v.is_absolute() else base / v) for k, v in tls.model_dump().items()}
        update["mqtt"] = cfg.mqtt.model_copy(update={"tls": tls.model_copy(update=files)})
    rules = cfg.interpret.rules_file
    if rules is not None and not rules.is_absolute():
        update["interpret"] = cfg.interpret.model_copy(update={"rules_file": base / rules})
    return cfg.model_copy(update=update)


def _check_interpret(cfg: Config, profiles: dict[str, Profile]) -> list[ConfigProblem]:
    """The natural-language rules file, against the devices it names (gatewayd.interpret.rules)."""
    path = cfg.interpret.rules_file
    if not cfg.interpret.enabled or path is None or not path.exists():
        return []  # the rules file is optional: without it the local rules come from the profiles alone
    from gatewayd.interpret.rules import load_rules  # only configurations that name a rules file load it

    device_profiles = {name: profiles[dev.profile] for name, dev in cfg.devices.items() if dev.profile in profiles}
    _, found = load_rules(path, device_profiles)
    return [ConfigProblem(str(path), key, problem) for key, problem in found]


def load_config(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> LoadedConfig:
    """Load and check everything; raise :class:`ConfigError` listing every problem found.

    Relative paths in the file are relative to the file's directory, so the bundled config works from anywhere.
    """
    path = Path(path).absolute()
    environ = os.environ if environ is None else environ
    problems: list[ConfigProblem] = []
    data = _read_toml(path, problems)
    if data is None:
        raise ConfigError(problems)
    overrides = env_overrides(environ)
    _apply_overrides(data, overrides, problems)
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        problems.extend(_validation_problems(exc, str(path), overrides))
        raise ConfigError(problems) from None
    cfg = _resolve(cfg, path.parent)
    profiles = load_profiles(cfg.gateway.profiles_dir, problems)
    problems.extend(_cross_check(cfg, profiles, str(path)))
    problems.extend(_check_interpret(cfg, profiles))
    if problems:
        raise ConfigError(problems)
    dotted = {".".join(p): var for p, (var, _) in overrides.items()}
    return LoadedConfig(cfg, profiles, path, dotted)
