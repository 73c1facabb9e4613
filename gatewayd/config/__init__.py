from gatewayd.config.loader import LoadedConfig, load_config, load_profiles
from gatewayd.config.models import Config, DeviceConfig, SerialBusConfig
from gatewayd.config.profiles import ActionSpec, ParamSpec, Profile

__all__ = [
    "ActionSpec",
    "Config",
    "DeviceConfig",
    "LoadedConfig",
    "ParamSpec",
    "Profile",
    "SerialBusConfig",
    "load_config",
    "load_profiles",
]
