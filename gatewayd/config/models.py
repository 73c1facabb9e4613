"""The models of ``config.toml``. Unknown keys are errors; every section has working defaults."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import unquote, urlsplit

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


class HttpLimits(Section):
    """Token buckets per client (user, else address) and endpoint: reads and writes have their own allowance."""

    enabled: bool = True
    read_per_s: float = Field(default=100.0, gt=0, le=100_000)
    read_burst: int = Field(default=200, ge=1, le=100_000)
    write_per_s: float = Field(default=50.0, gt=0, le=100_000)
    write_burst: int = Field(default=100, ge=1, le=100_000)
    max_clients: int = Field(default=1000, ge=1, le=100_000)


# A token's stored hash, as ``gatewayd hash-token`` prints it: scrypt$<log2 n>$<r>$<p>$<salt>$<key>$<tag>
# (base64url; the tag, 16 bits that find the entry without a scrypt per configured token, is optional).
TOKEN_HASH_PATTERN = (
    r"^scrypt\$[0-9]{1,2}\$[0-9]{1,2}\$[0-9]\$[A-Za-z0-9_-]{16,88}\$[A-Za-z0-9_-]{32,88}(\$[A-Za-z0-9_-]{3})?$"
)


class AuthToken(Section):
    """One credential: who holds it, what it may do, and the scrypt hash of the secret (never the secret)."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.@-]{1,64}$")]
    role: Literal["viewer", "operator", "admin"]
    hash: Annotated[str, Field(pattern=TOKEN_HASH_PATTERN)]

    @model_validator(mode="after")
    def _cost_in_bounds(self) -> AuthToken:
        log2_n, r, p = (int(x) for x in self.hash.split("$")[1:4])
        # Bounded so that a verification stays well under a second and under 64 MiB on a Pi.
        if not (10 <= log2_n <= 18 and 1 <= r <= 16 and 1 <= p <= 4 and 128 * r * (2**log2_n) <= 64 * 1024**2):
            raise ValueError("hash: scrypt cost out of range (log2 n 10-18, r 1-16, p 1-4, at most 64 MiB)")
        return self


class AuthSection(Section):
    """Access to the page and the API. Disabled (the default), every request may do everything, which is only
    allowed on a loopback bind; enabled, reading needs a viewer token (or ``anonymous_read``) and every change an
    operator or admin token, as a bearer token or through the login form's session cookie."""

    enabled: bool = False
    anonymous_read: bool = False  # enabled: GET requests (page, API, /metrics) need no token
    tokens: list[AuthToken] = Field(default_factory=list)
    session_ttl_s: float = Field(default=8 * 3600.0, gt=0, le=30 * 86_400)
    max_sessions: int = Field(default=1000, ge=1, le=100_000)
    cookie_secure: bool = False  # set the cookie's Secure flag (only when the page is served over HTTPS)
    # Failed logins (and failed bearer tokens): a bucket of login_burst per client address and per user name,
    # refilled at login_refill_per_min; past it, 429 with Retry-After.
    login_burst: int = Field(default=5, ge=1, le=1000)
    login_refill_per_min: float = Field(default=2.0, gt=0, le=6000)

    @model_validator(mode="after")
    def _unique_names(self) -> AuthSection:
        names = [t.name for t in self.tokens]
        if len(names) != len(set(names)):
            raise ValueError("tokens: each name may appear once")
        if "anonymous" in names:
            raise ValueError("tokens: the name 'anonymous' is reserved for unauthenticated readers")
        return self


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class HttpSection(Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    max_body_bytes: int = Field(default=64 * 1024, ge=1024, le=16 * 1024 * 1024)
    # A client must send a request's complete headers within this of connecting (or of the previous answer on a
    # kept-alive connection), however slowly it trickles them; and no more than max_connections at once.
    header_timeout_s: float = Field(default=10.0, gt=0, le=600)
    max_connections: int = Field(default=64, ge=1, le=10_000)
    limits: HttpLimits = HttpLimits()
    auth: AuthSection = AuthSection()
    history_interval_s: float = Field(default=10.0, gt=0, le=600)  # the page's hour charts: one sample this often
    live_interval_s: float = Field(default=2.0, gt=0, le=60)  # the page's live updates: status pushed this often

    @model_validator(mode="after")
    def _open_only_on_loopback(self) -> HttpSection:
        if not self.auth.enabled and not is_loopback(self.host):
            raise ValueError(
                f"host {self.host!r} is reachable from the network: set [http.auth] enabled = true "
                "(with tokens) before binding anything but a loopback address"
            )
        return self


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
    # Critical commands (an emergency stop) may queue this many beyond max_queued_per_device: a reserve of their
    # own, not an unbounded bypass, so a flood of "critical" commands cannot grow the queue and the store for ever.
    critical_reserve_per_device: int = Field(default=32, ge=1, le=100_000)
    # The store and the dispatcher are compared this often: an open command in the store that no queue holds and
    # no device executes is a gap (counted by gatewayd_dispatcher_gaps_total, which should stay 0), and is queued.
    reconcile_interval_s: float = Field(default=10.0, gt=0, le=3600)
    # Finished commands are kept this long, and at most this many commands in all, then deleted with their
    # transitions, so months of traffic do not fill the SD card. An id sent again after its command was deleted
    # is a new command. Every prune_interval_s, the oldest go first.
    keep_final_s: float = Field(default=7 * 24 * 3600.0, ge=60, le=3650 * 86_400)
    keep_max: int = Field(default=100_000, ge=100, le=100_000_000)
    prune_interval_s: float = Field(default=60.0, gt=0, le=86_400)

    @model_validator(mode="after")
    def _ttl_order(self) -> CommandsSection:
        if self.default_ttl_s > self.max_ttl_s:
            raise ValueError("default_ttl_s must not exceed max_ttl_s")
        return self


class StoreSection(Section):
    filename: str = "gatewayd.sqlite3"
    synchronous: Literal["full", "normal"] = "full"
    max_batch: int = Field(default=512, ge=1, le=100_000)
    # New commands are refused (503 storage_full) while the data directory's filesystem has less than this free:
    # the rest is the reserve in which commands already accepted finish and their results reach the outbox.
    # Keep it below outbox.min_free_bytes, so telemetry gives way first.
    min_free_bytes: int = Field(default=32 * 1024 * 1024, ge=0, le=1024**4)
    space_check_s: float = Field(default=2.0, gt=0, le=300)  # the free space is measured this often
    # The WAL is made this many frames long at each start (zeros, written and synced once): commits then overwrite
    # it in place instead of growing it, which a disk error right after can undo (docs/operations.md, "The
    # database lost"). 1,200 frames of 4 KiB pages are about 5 MB; 0 turns it off.
    wal_preallocate_frames: int = Field(default=1_200, ge=0, le=100_000)


class BusSimulatorConfig(Section):
    """How a simulated bus's line behaves in mock mode (faults of the line itself, for every device on it)."""

    byte_at_a_time: bool = False  # every byte a write of its own, as a slow USB adapter delivers them
    byte_pause_s: float = Field(default=0.0, ge=0, le=1)
    baudrate: int | None = Field(default=None, ge=50, le=10_000_000)  # pace the output to a UART's rate


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
    simulator: BusSimulatorConfig = BusSimulatorConfig()  # mock mode only

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


class ModbusTcpConfig(Section):
    """A Modbus TCP connection (hardware/MODBUS.md): a device that speaks Modbus TCP itself (an energy meter, an
    inverter, an I/O module, a PLC), or a gateway or serial server with RS-485 units behind it. One request at a time
    on it, as on a serial bus; the devices on it name it as their ``bus`` and give their ``unit_id``."""

    host: Annotated[str, Field(pattern=r"^[A-Za-z0-9:][A-Za-z0-9.:_-]{0,252}$")]  # a name, an IPv4 or IPv6 address
    port: int = Field(default=502, ge=1, le=65535)
    # "socket": Modbus TCP (the MBAP header, whose transaction id pairs each reply with its request). "rtu": Modbus
    # RTU frames with their CRC, carried over TCP as they are, as a serial server in transparent mode passes them
    # to and from its RS-485 port ("RTU over TCP"); the unit ids are then RTU addresses, 1-247.
    framer: Literal["socket", "rtu"] = "socket"
    response_timeout_s: float = Field(default=1.0, gt=0, le=60)
    connect_timeout_s: float = Field(default=3.0, gt=0, le=60)  # an unanswered connection attempt gives up then
    # Requests sent on the connection: a token bucket of transactions_burst, refilled at transactions_per_s (None:
    # no limit). For devices that serve a few requests a second, and for gateways with a slow line behind them.
    transactions_per_s: float | None = Field(default=None, gt=0, le=10_000)
    transactions_burst: int = Field(default=1, ge=1, le=10_000)
    turnaround_s: float = Field(default=0.0, ge=0, le=1)  # a pause after each transaction, for a slow gateway
    # A connection that is refused or lost is opened again: the pause before attempt n is drawn from
    # [0, min(reconnect_cap_s, reconnect_base_s * 2**n)] (full jitter), for as long as the host stays away.
    reconnect_base_s: float = Field(default=0.1, gt=0, le=10)
    reconnect_cap_s: float = Field(default=5.0, gt=0, le=300)
    simulate: bool | None = None  # None: simulate when gateway.mode is "mock" (pymodbus's TCP server on loopback)

    @model_validator(mode="after")
    def _reconnect_cap_not_below_base(self) -> ModbusTcpConfig:
        if self.reconnect_cap_s < self.reconnect_base_s:
            raise ValueError("reconnect_cap_s must not be less than reconnect_base_s")
        return self

    def simulated(self, mode: str) -> bool:
        return mode == "mock" if self.simulate is None else self.simulate


class SimulatorConfig(Section):
    latency_s: float = Field(default=0.0, ge=0, le=60)
    # A dead device on a live bus: requests arrive, nothing answers (the gateway sees response timeouts).
    mute: bool = False
    # A device that answers NAK "busy" to the first N requests of each command (the gateway retries those).
    busy_replies: int = Field(default=0, ge=0, le=100)
    # Faults on the wire, drawn per reply from the device's own seeded generator (see simulator.Faults).
    garbage: float = Field(default=0.0, ge=0, le=1)  # noise bytes before a reply
    partial: float = Field(default=0.0, ge=0, le=1)  # a reply cut short
    drop: float = Field(default=0.0, ge=0, le=1)  # a reply lost
    corrupt: float = Field(default=0.0, ge=0, le=1)  # a reply with a wrong CRC
    telemetry_hz: float | None = Field(default=None, ge=0, le=10_000)  # unsolicited T frames/s (None: the model's)
    seed: int = 0


ChannelLabel = Annotated[str, Field(min_length=1, max_length=60, pattern=r"^[^\W\d_][\w .'-]*$")]


class DeviceConfig(Section):
    profile: Name
    description: str = ""
    bus: Name | None = None
    address: int | None = Field(default=None, ge=1, le=247)
    # A device on a Modbus TCP connection: its unit identifier, 0-255 (a device that is the TCP server itself often
    # answers on 1, 0 or 255; units behind a gateway keep their RS-485 address, 1-247).
    unit_id: int | None = Field(default=None, ge=0, le=255)
    pin: int | None = Field(default=None, ge=0, le=53)
    active_high: bool = True
    simulator: SimulatorConfig = SimulatorConfig()
    # Names of a multi-channel device's channels, for natural-language commands: {3 = "greenhouse valve"}.
    channels: dict[Annotated[int, Field(ge=1, le=64)], ChannelLabel] = Field(default_factory=dict)


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


class OutboxSection(Section):
    """The durable outbox (results, events, telemetry waiting for the uplink) and its limits on the SD card."""

    # When the outbox holds more than max_bytes of payload, or the data directory's filesystem has less than
    # min_free_bytes free, the oldest telemetry is dropped (and counted); results and events never are.
    max_bytes: int = Field(default=64 * 1024 * 1024, ge=16 * 1024, le=64 * 1024**3)
    # Telemetry's own budget within max_bytes (None: all of it): past it the oldest telemetry is dropped even when
    # results and events leave room, so a long outage cannot fill the outbox with readings.
    telemetry_max_bytes: int | None = Field(default=None, ge=16 * 1024, le=64 * 1024**3)
    min_free_bytes: int = Field(default=100 * 1024 * 1024, ge=0, le=1024**4)
    # Telemetry is written behind (the durability contract): while the uplink keeps pace a reading goes from memory
    # to the broker and never touches the disk; one the broker has not acknowledged write_behind_s after it was
    # recorded (the link down or slow) is written to the outbox then, in one transaction with everything else held.
    # A power loss costs at most this much of the latest telemetry. 0 makes telemetry durable, as results and events
    # always are: each reading committed as it comes (the loss window is 0), and sent from the outbox.
    write_behind_s: float = Field(default=1.0, ge=0, le=60)
    flush_interval_s: float = Field(default=0.5, gt=0, le=60)  # longest pause between two looks at what is held
    max_pending: int = Field(default=10_000, ge=10, le=1_000_000)  # telemetry held in memory at most (oldest dropped)


class TelemetrySection(Section):
    # Is the wall clock trustworthy? "kernel": ask the kernel (adjtimex: chrony, ntpd and systemd-timesyncd keep
    # it), "synced"/"unsynced": fixed answers (hardware with an RTC; tests).
    clock_sync: Literal["kernel", "synced", "unsynced"] = "kernel"
    sync_check_s: float = Field(default=10.0, gt=0, le=3600)
    recent_per_device: int = Field(default=120, ge=1, le=10_000)  # readings kept in memory for the status page
    # Several readings in one MQTT message: "off" (one message per reading, on telemetry/<device>), "device"
    # (readings of one device together, on telemetry/<device>) or "gateway" (of every device, on telemetry), each
    # message {"samples": [reading, ...]} with each reading as it would be sent alone; at most batch_max readings.
    # Fewer messages for the broker and the link; what is waiting is sent at once, no reading waits to fill a batch.
    batch: Literal["off", "device", "gateway"] = "off"
    batch_max: int = Field(default=50, ge=1, le=1000)
    # A reading waits at most this long for others to go out with it: in one message when batch is on, else in one
    # write to the broker's socket, their acknowledgements in one read. Polls of many devices end within a few ms of
    # each other; sending each alone costs the gateway a wake-up and a system call per reading (measured: 2.5x the
    # CPU per message, bench/telemetry.py). 0: each reading at once.
    batch_wait_s: float = Field(default=0.02, ge=0, le=1)


class MqttTls(Section):
    ca_file: Path | None = None  # the broker's CA; None: the system's trust store
    cert_file: Path | None = None  # client certificate, for brokers that authenticate clients by certificate
    key_file: Path | None = None

    @model_validator(mode="after")
    def _pair(self) -> MqttTls:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


class MqttSection(Section):
    """The uplink. Offline is a normal state: the daemon starts and works without a broker and catches up."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    username: str | None = None
    password_env: str | None = None  # the NAME of the environment variable holding the password, never the password
    client_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.:-]{1,64}$")  # default: gatewayd-<gateway.id>
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    tls: MqttTls | None = None  # a [mqtt.tls] table turns TLS on
    # A PUBACK missing this long means the link is gone (faster than waiting 1.5 keepalives) and it is reopened.
    puback_timeout_s: float = Field(default=5.0, gt=0, le=300)
    # Reconnecting: for the first reconnect_fast_for_s of an outage, pauses of at most reconnect_base_s (jittered),
    # so a broker that restarts or a link that blinked is found again within about that; past it, the pauses grow
    # (x2 per attempt, jittered) up to reconnect_cap_s, sparing a broker that stays away (and its network).
    reconnect_base_s: float = Field(default=0.5, gt=0, le=60)
    reconnect_fast_for_s: float = Field(default=120.0, ge=0, le=86_400)
    reconnect_cap_s: float = Field(default=30.0, gt=0, le=3600)
    telemetry_qos: Literal[0, 1] = 1
    # The backlog (the outbox) is drained beside live traffic, paced by the broker's acknowledgements: up to
    # max_inflight messages await their PUBACK, fewer while acknowledgements slow down. drain_messages_per_s caps
    # it further (a token bucket of drain_burst; 0: no cap, the broker's pace).
    drain_messages_per_s: float = Field(default=0.0, ge=0, le=1_000_000)
    drain_burst: int = Field(default=100, ge=1, le=100_000)
    max_inflight: int = Field(default=50, ge=1, le=1000)  # outbox publishes awaiting their PUBACK at once
    max_payload_bytes: int = Field(default=64 * 1024, ge=256, le=16 * 1024 * 1024)  # larger commands are refused
    # Commands from the cmd topic: this many taken at once (committed, or interpreted then committed), and at most
    # commands_per_s a second (burst commands_burst): past that they wait their turn, unacknowledged, in the order
    # they came; critical ones draw on a reserve of their own first (critical_per_s, critical_burst).
    intake_concurrency: int = Field(default=32, ge=1, le=1000)
    commands_per_s: float = Field(default=100.0, gt=0, le=1_000_000)
    commands_burst: int = Field(default=200, ge=1, le=1_000_000)
    critical_per_s: float = Field(default=5.0, gt=0, le=1_000_000)
    critical_burst: int = Field(default=20, ge=1, le=1_000_000)
    # A command waits at most this long for its turn (commands_per_s * max_wait_s waiting at once); one that would
    # wait longer is refused with rate_limited: a publisher that does not wait for acknowledgements, not a backlog.
    max_wait_s: float = Field(default=10.0, gt=0, le=3600)
    # Start-up: READY (systemd, /readyz) waits this long at most for the uplink's first subscription, so that a
    # command published after "ready" is never lost; a broker that refuses the first connection ends the wait.
    ready_wait_s: float = Field(default=5.0, ge=0, le=300)
    ha_discovery: bool = False  # announce devices to Home Assistant (MQTT discovery)
    discovery_prefix: str = Field(default="homeassistant", pattern=r"^[A-Za-z0-9_/-]{1,64}$")

    @model_validator(mode="after")
    def _reconnect_cap_not_below_base(self) -> MqttSection:
        if self.reconnect_cap_s < self.reconnect_base_s:
            raise ValueError("reconnect_cap_s must not be less than reconnect_base_s")
        return self


class ResilienceSection(Section):
    save_interval_s: float = Field(default=30.0, gt=0, le=3600)  # breaker states to the store, also on shutdown
    device_retry: RetrySettings = RetrySettings()
    device_breaker: BreakerSettings = BreakerSettings()


class ProviderConfig(Section):
    """One LLM provider of the natural-language interpreter (gatewayd.interpret). The key is read from the
    environment variable named by ``api_key_env``; the key itself is never in a file or a log."""

    type: Literal["openai", "anthropic", "ollama"]  # openai: any OpenAI-compatible chat-completions API
    base_url: Annotated[str, Field(pattern=r"^https?://[^\s/]+(/\S*)?$", max_length=500)]
    model: Annotated[str, Field(min_length=1, max_length=200)]
    api_key_env: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")] | None = None  # None: no key
    enabled: bool = True
    priority: int = Field(default=1, ge=0, le=100)  # lower is tried first; equal priorities share the load
    weight: float = Field(default=1.0, gt=0, le=1000)  # share among equal priorities (balance = "weighted")
    timeout_s: float = Field(default=10.0, gt=0, le=300)  # one HTTP attempt, cut short by the request deadline
    connect_timeout_s: float = Field(default=2.0, gt=0, le=60)
    rpm: int = Field(default=60, ge=1, le=1_000_000)  # requests per minute
    tpm: int = Field(default=100_000, ge=100, le=1_000_000_000)  # tokens (in + out) per minute
    max_tokens: int = Field(default=256, ge=16, le=32_000)  # the answer's length cap, asked of the model
    price_in_per_mtok: float = Field(default=0.0, ge=0, le=10_000)  # per million input tokens, budget currency
    price_out_per_mtok: float = Field(default=0.0, ge=0, le=10_000)
    # Whether calls leave this network: cloud providers are skipped together while the connectivity breaker is
    # open. None: decided from base_url (loopback and private addresses are local).
    cloud: bool | None = None
    # Seconds without an answer after which the next provider is asked too (the first answer wins, the other call
    # is cancelled). None: from this provider's observed latency (interpret.hedge_quantile, bounded).
    hedge_after_s: float | None = Field(default=None, gt=0, le=300)


def _interpret_retry() -> RetrySettings:
    return RetrySettings(max_attempts=3, base_s=0.2, multiplier=2.0, cap_s=2.0)


def _interpret_breaker() -> BreakerSettings:
    return BreakerSettings(window_size=10, minimum_calls=4, failure_rate=0.5, open_s=30.0)


class InterpretSection(Section):
    """Natural-language commands: LLM providers with failover, ending in local rules that always answer."""

    enabled: bool = True
    deadline_s: float = Field(default=5.0, gt=0, le=120)  # one request, every retry and fallback included
    local_reserve_s: float = Field(default=0.5, gt=0, le=60)  # kept back from the providers for the local rules
    balance: Literal["weighted", "latency"] = "weighted"  # order among providers of equal priority
    max_hint_s: float = Field(default=10.0, ge=0, le=600)  # a Retry-After longer than this fails over at once
    # Hedging: a provider that has not answered within its hedge delay gets the next provider asked alongside it.
    # The delay is the provider's hedge_after_s, else this quantile of its recent answers' latency, kept within
    # [hedge_min_s, hedge_max_s] (hedge_max_s until it has answered a few times; hedge_min_s while its last call
    # was too slow: timed out, cut off, or outrun by a hedge), and never more than half of the attempt's timeout.
    hedge: bool = True
    hedge_quantile: float = Field(default=0.95, ge=0.5, le=1.0)
    hedge_min_s: float = Field(default=0.25, gt=0, le=60)
    hedge_max_s: float = Field(default=1.0, gt=0, le=120)
    retry: RetrySettings = Field(default_factory=_interpret_retry)  # per provider, within the deadline
    breaker: BreakerSettings = Field(default_factory=_interpret_breaker)  # per provider
    # Connection errors from this many cloud providers in a row (fewer if fewer are configured) mean the link is
    # down: every cloud provider is skipped until a probe (a health check or one request) gets an answer.
    connectivity_providers: int = Field(default=2, ge=1, le=100)
    connectivity_open_s: float = Field(default=30.0, ge=0, le=3600)
    health_interval_s: float = Field(default=60.0, gt=0, le=86_400)  # token-free checks (model lists)
    cache_ttl_s: float = Field(default=86_400.0, ge=0, le=365 * 86_400)  # 0: no prompt cache
    cache_max_entries: int = Field(default=10_000, ge=1, le=10_000_000)
    daily_budget: float | None = Field(default=None, ge=0)  # provider spend per UTC day; None: no limit
    user_rate_per_minute: float = Field(default=30.0, gt=0, le=100_000)  # natural-language requests per user
    user_burst: int = Field(default=10, ge=1, le=100_000)
    max_text_chars: int = Field(default=500, ge=10, le=10_000)
    rules_file: Path | None = None  # the user's local rules (names, sentences); relative to the config file
    providers: dict[Name, ProviderConfig] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _reserve_fits(self) -> InterpretSection:
        if self.local_reserve_s >= self.deadline_s:
            raise ValueError("local_reserve_s must be less than deadline_s, or no provider could ever be asked")
        if self.hedge_min_s > self.hedge_max_s:
            raise ValueError("hedge_min_s must not exceed hedge_max_s")
        return self


class Config(Section):
    gateway: GatewaySection = GatewaySection()
    log: LogSection = LogSection()
    http: HttpSection = HttpSection()
    gpio: GpioSection = GpioSection()
    shutdown: ShutdownSection = ShutdownSection()
    commands: CommandsSection = CommandsSection()
    store: StoreSection = StoreSection()
    resilience: ResilienceSection = ResilienceSection()
    outbox: OutboxSection = OutboxSection()
    telemetry: TelemetrySection = TelemetrySection()
    mqtt: MqttSection = MqttSection()
    interpret: InterpretSection = InterpretSection()
    serial: dict[Name, SerialBusConfig] = Field(default_factory=dict)
    modbus_tcp: dict[Name, ModbusTcpConfig] = Field(default_factory=dict)
    devices: dict[Name, DeviceConfig] = Field(default_factory=dict)

    @property
    def db_path(self) -> Path:
        return self.gateway.data_dir / self.store.filename

    def secrets(self, environ: Mapping[str, str]) -> dict[str, str]:
        """The secret values this configuration points at, by where they are named: the environment variables of
        ``mqtt.password_env`` and of each provider's ``api_key_env`` (enabled or not: the value is in the
        environment all the same), and a password written into a provider's ``base_url``. What the log redacts
        (gatewayd.observability.logging)."""
        found: dict[str, str] = {}
        if self.mqtt.password_env and environ.get(self.mqtt.password_env):
            found[f"mqtt.password_env ({self.mqtt.password_env})"] = environ[self.mqtt.password_env]
        for name, provider in self.interpret.providers.items():
            if provider.api_key_env and environ.get(provider.api_key_env):
                found[f"interpret.providers.{name}.api_key_env ({provider.api_key_env})"] = environ[
                    provider.api_key_env
                ]
            password = urlsplit(provider.base_url).password
            if password:
                found[f"interpret.providers.{name}.base_url"] = unquote(password)
                found[f"interpret.providers.{name}.base_url (as written)"] = password
        return found

    def bus_simulated(self, bus: str) -> bool:
        flag = self.serial[bus].simulate
        return self.gateway.mode == "mock" if flag is None else flag
