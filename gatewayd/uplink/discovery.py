"""Home Assistant MQTT discovery: each device appears in Home Assistant with its telemetry and actions.

Pure: builds (topic, payload) pairs from the device registry; the uplink publishes them retained on connect.
Telemetry points become ``sensor`` entities reading ``telemetry/{device}``; actions without parameters become
``button`` entities and actions with one number parameter ``number`` entities, both publishing a command on
``cmd``. Everything is unavailable while the gateway's ``status`` is not ``online``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from gatewayd.config.profiles import Profile


def discovery_messages(
    gateway_id: str, base: str, prefix: str, devices: Mapping[str, Profile]
) -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []
    for name, profile in devices.items():
        node = f"gatewayd_{gateway_id}_{name}"
        common: dict[str, Any] = {
            "availability_topic": f"{base}/status",
            "device": {
                "identifiers": [node],
                "name": name,
                "model": profile.name,
                "manufacturer": "gatewayd",
                "via_device": f"gatewayd_{gateway_id}",
            },
        }
        for point, spec in profile.telemetry.items():
            config = {
                **common,
                "name": point.replace("_", " "),
                "unique_id": f"{node}_{point}",
                "state_topic": f"{base}/telemetry/{name}",
                "value_template": f"{{{{ value_json['values'][{json.dumps(point)}] }}}}",
            }
            if spec.unit:
                config["unit_of_measurement"] = spec.unit
            component = "binary_sensor" if spec.type == "bool" else "sensor"
            if component == "binary_sensor":
                config["payload_on"], config["payload_off"] = "True", "False"
            out.append((f"{prefix}/{component}/{node}/{point}/config", _dumps(config)))
        for action, action_spec in profile.actions.items():
            params = action_spec.params
            command = {"device": name, "action": action}
            if not any(p.required for p in params.values()):
                config = {
                    **common,
                    "name": action.replace("_", " "),
                    "unique_id": f"{node}_{action}",
                    "command_topic": f"{base}/cmd",
                    "payload_press": json.dumps(command, separators=(",", ":")),
                }
                out.append((f"{prefix}/button/{node}/{action}/config", _dumps(config)))
            elif len(params) == 1:
                [(param, pspec)] = params.items()
                if pspec.type not in ("int", "float"):
                    continue
                value = "{{ value | int }}" if pspec.type == "int" else "{{ value }}"
                template = json.dumps(command, separators=(",", ":"))[:-1] + f',"params":{{"{param}":{value}}}}}'
                config = {
                    **common,
                    "name": f"{action} {param}".replace("_", " "),
                    "unique_id": f"{node}_{action}_{param}",
                    "command_topic": f"{base}/cmd",
                    "command_template": template,
                    "min": pspec.min if pspec.min is not None else 0,
                    "max": pspec.max if pspec.max is not None else 100,
                    "mode": "box",
                }
                if pspec.unit:
                    config["unit_of_measurement"] = pspec.unit
                out.append((f"{prefix}/number/{node}/{action}/config", _dumps(config)))
    return out


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()
