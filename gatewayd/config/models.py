"""The models of ``config.toml``. Unknown keys are errors; every section has working defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gatewayd.config.profiles import Name


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GatewaySection(Section):
    id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")] = "gw-dev"
    mode: Literal["mock", "hardware"] = "mock"
    data_dir: Path = Path("./var")
    profiles_dir: Path = Path("./hardware/profiles")


class LogSection(Section):
    level: Literal["debug", "info", "warning", "error"] = "info"


class HttpSection(Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    max_body_bytes: int = Field(default=64 * 1024, ge=1024, le=16 * 1024 * 1024)


class GpioSection(Section):
    # auto: gpiozero's MockFactory in mock mode, gpiozero's default on a Pi (lgpio on Raspberry Pi OS Bookworm)
    pin_factory: Literal["auto", "mock", "lgpio", "rpigpio", "pigpio", "native"] = "auto"


class ShutdownSection(Section):
    grace_s: float = Field(default=10.0, ge=0, le=600)


class CommandsSection(Section):
    default_ttl_s: float = Field(default=300.0, gt=0)
    max_ttl_s: float = Field(default=7 * 24 * 3600.0, gt=0)
    max_wait_s: float = Field(default=60.0, gt=0, le=3600)
    max_queued_per_device: int = Field(default=1000, ge=1, le=1_000_000)

    @model_validator(mode="after")
    def _ttl_order(self) -> CommandsSection:
        if self.default_ttl_s > self.max_ttl_s:
            raise ValueError("default_ttl_s must not exceed max_ttl_s")
        return self


class StoreSection(Section):
    filename: str = "gatewayd.sqlite3"
    synchronous: Literal["full", "normal"] = "full"
    max_batch: int = Field(default=512, ge=1, le=100_000)


class SerialBusConfig(Section):
    port: str
    # What the bus speaks: the gatewayd line protocol (hardware/PROTOCOL.md) or Modbus RTU (hardware/MODBUS.md).
    protocol: Literal["gatewayd", "modbus_rtu"] = "gatewayd"
    baudrate: int = Field(default=115200, ge=300, le=4_000_000)
    # Character framing, default 8N1. Modbus devices often ship as 8E1 or 8N2: every device on a bus must match.
    bytesize: Literal[7, 8] = 8
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    # Requests put on the line: a token bucket of transactions_burst, refilled at transactions_per_s (None: no
    # limit). For slow devices and shared RS-485 lines; it applies to every request, whatever its priority.
    transactions_per_s: float | None = Field(default=None, gt=0, le=10_000)
    transactions_burst: int = Field(default=1, ge=1, le=10_000)
    response_timeout_s: float = Field(default=1.0, gt=0, le=60)
    simulate: bool | None = None  # None: simulate when gateway.mode is "mock"
    # Reopening a port that disappeared (USB unplugged): pause before attempt n is drawn from
    # [0, min(reconnect_cap_s, reconnect_base_s * 2**n)] (full jitter), for as long as the port stays away.
    reconnect_base_s: float = Field(default=0.05, gt=0, le=10)
    reconnect_cap_s: float = Field(default=1.0, gt=0, le=300)
    # Unsolicited frames (telemetry, events) accepted from each address: a token bucket of inbound_burst frames,
    # refilled at inbound_frames_per_s. Frames over it are dropped and counted; replies to requests never are.
    inbound_frames_per_s: float = Field(default=50.0, gt=0, le=100_000)
    inbound_burst: int = Field(default=100, ge=1, le=100_000)
    # RS-485 turnaround: the pause after a transaction ends (reply or timeout) before the next request goes out,
    # so a device's transceiver has released the line.
    turnaround_s: float = Field(default=0.0, ge=0, le=1)

    @model_validator(mode="after")
    def _reconnect_cap_not_below_base(self) -> SerialBusConfig:
        if self.reconnect_cap_s < self.reconnect_base_s:
            raise ValueError("reconnect_cap_s must not be less than reconnect_base_s")
        return self

    @model_validator(mode="after")
    def _modbus_rtu_is_eight_bits(self) -> SerialBusConfig:
        if self.protocol == "modbus_rtu" and self.bytesize != 8:
            raise ValueError("Modbus RTU frames are 8 data bits: bytesize must be 8")
        return self


class SimulatorConfig(Section):
    latency_s: float = Field(default=0.0, ge=0, le=60)
    # A dead device on a live bus: requests arrive, nothing answers (the gateway sees response timeouts).
    mute: bool = False
    # A device that answers NAK "busy" to the first N requests of each command (the gateway retries those).
    busy_replies: int = Field(default=0, ge=0, le=100)


class DeviceConfig(Section):
    profile: Name
    description: str = ""
    bus: Name | None = None
    address: int | None = Field(default=None, ge=1, le=247)
    pin: int | None = Field(default=None, ge=0, le=53)
    active_high: bool = True
    simulator: SimulatorConfig = SimulatorConfig()


class RetrySettings(Section):
    """A retry policy (gatewayd.resilience.RetryPolicy): pause before retry n is drawn from
    [0, min(cap_s, base_s * multiplier**n)] with full jitter; never past the command's deadline."""

    max_attempts: int = Field(default=3, ge=1, le=20)
    base_s: float = Field(default=0.2, ge=0, le=60)
    multiplier: float = Field(default=2.0, ge=1, le=10)
    cap_s: float = Field(default=5.0, ge=0, le=600)
    jitter: Literal["full", "proportional", "none"] = "full"


class BreakerSettings(Section):
    """A circuit breaker (gatewayd.resilience.CircuitBreaker) per device."""

    window: Literal["count", "time"] = "count"
    window_size: int = Field(default=10, ge=1, le=1000)  # calls, for window = "count"
    window_s: float = Field(default=60.0, gt=0, le=3600)  # seconds, for window = "time"
    failure_rate: float = Field(default=0.5, gt=0, le=1)
    minimum_calls: int = Field(default=5, ge=1, le=1000)
    slow_call_s: float | None = Field(default=None, gt=0, le=600)
    open_s: float = Field(default=30.0, ge=0, le=3600)
    half_open_max_calls: int = Field(default=1, ge=1, le=100)
    half_open_successes: int = Field(default=1, ge=1, le=100)

    @model_validator(mode="after")
    def _window_holds_minimum(self) -> BreakerSettings:
        if self.window == "count" and self.minimum_calls > self.window_size:
            raise ValueError("minimum_calls must not exceed window_size, or the breaker could never open")
        return self


class ResilienceSection(Section):
    save_interval_s: float = Field(default=30.0, gt=0, le=3600)  # breaker states to the store, also on shutdown
    device_retry: RetrySettings = RetrySettings()
    device_breaker: BreakerSettings = BreakerSettings()


class Config(Section):
    gateway: GatewaySection = GatewaySection()
    log: LogSection = LogSection()
    http: HttpSection = HttpSection()
    gpio: GpioSection = GpioSection()
    shutdown: ShutdownSection = ShutdownSection()
    commands: CommandsSection = CommandsSection()
    store: StoreSection = StoreSection()
    resilience: ResilienceSection = ResilienceSection()
    serial: dict[Name, SerialBusConfig] = Field(default_factory=dict)
    devices: dict[Name, DeviceConfig] = Field(default_factory=dict)

    @property
    def db_path(self) -> Path:
        return self.gateway.data_dir / self.store.filename

    def bus_simulated(self, bus: str) -> bool:
        flag = self.serial[bus].simulate
        return self.gateway.mode == "mock" if flag is None else flag
