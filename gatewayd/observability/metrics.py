"""Prometheus metrics shared by all components, in one registry that the web server exposes at ``/metrics``.

Labels name things the configuration names (a retry policy, a limiter, a breaker, a bulkhead) and outcomes from
short fixed lists, never per-request values (user, key, command id): a keyed limiter over 10,000 users is one
label value, not 10,000, so the series count stays bounded on a device with little memory.
"""

from __future__ import annotations

from functools import lru_cache

from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)  # process_resident_memory_bytes, process_cpu_seconds_total, open fds

# --- retry ---------------------------------------------------------------------------------------------------

RETRY_ATTEMPTS = Counter(
    "gatewayd_retry_attempts",
    "Calls made under a retry policy, by outcome (success, transient, permanent).",
    ["policy", "outcome"],
    registry=REGISTRY,
)
RETRY_GAVE_UP = Counter(
    "gatewayd_retry_gave_up",
    "Retry loops that gave up, by reason (attempts, deadline, hint_too_long, hint_past_deadline).",
    ["policy", "reason"],
    registry=REGISTRY,
)
RETRY_HINTS = Counter(
    "gatewayd_retry_hints",
    "Server retry hints (Retry-After, retry-after-ms), by outcome (used, refused).",
    ["policy", "outcome"],
    registry=REGISTRY,
)

# --- rate limits ---------------------------------------------------------------------------------------------

RATE_LIMIT_DECISIONS = Counter(
    "gatewayd_rate_limit_decisions",
    "Rate limiter decisions, by outcome (allowed, limited, bypassed: a critical request let through).",
    ["limiter", "outcome"],
    registry=REGISTRY,
)
RATE_LIMIT_KEYS = Gauge(
    "gatewayd_rate_limit_keys",
    "Keys (users, devices, endpoints) a keyed limiter currently tracks.",
    ["limiter"],
    registry=REGISTRY,
)
RATE_LIMIT_EVICTIONS = Counter(
    "gatewayd_rate_limit_evictions",
    "Keys dropped from a keyed limiter, by reason (idle: full or unused; lru: the key-count bound).",
    ["limiter", "reason"],
    registry=REGISTRY,
)
ADAPTIVE_RATE = Gauge(
    "gatewayd_adaptive_rate",
    "Current refill rate (tokens per second) an adaptive limiter has settled on.",
    ["limiter"],
    registry=REGISTRY,
)

# --- circuit breakers ----------------------------------------------------------------------------------------

BREAKER_STATE = Gauge(
    "gatewayd_breaker_state",
    "Circuit breaker state: 0 closed, 1 open, 2 half-open.",
    ["breaker"],
    registry=REGISTRY,
)
BREAKER_TRANSITIONS = Counter(
    "gatewayd_breaker_transitions",
    "Circuit breaker state changes.",
    ["breaker", "from_state", "to_state"],
    registry=REGISTRY,
)
BREAKER_CALLS = Counter(
    "gatewayd_breaker_calls",
    "Calls through a circuit breaker, by outcome (success, failure, slow, ignored, rejected).",
    ["breaker", "outcome"],
    registry=REGISTRY,
)

# --- bulkheads -----------------------------------------------------------------------------------------------

BULKHEAD_ACTIVE = Gauge("gatewayd_bulkhead_active", "Calls holding a bulkhead slot.", ["bulkhead"], registry=REGISTRY)
BULKHEAD_QUEUED = Gauge(
    "gatewayd_bulkhead_queued", "Calls waiting for a bulkhead slot.", ["bulkhead"], registry=REGISTRY
)
BULKHEAD_REJECTED = Counter(
    "gatewayd_bulkhead_rejected",
    "Calls a bulkhead turned away, by reason (queue_full, wait_timeout).",
    ["bulkhead", "reason"],
    registry=REGISTRY,
)

# --- persisted resilience state ------------------------------------------------------------------------------

RESILIENCE_STATE_SAVES = Counter(
    "gatewayd_resilience_state_saves",
    "Saves of breaker, limiter and adaptive-rate state to the store, by outcome (ok, failed).",
    ["outcome"],
    registry=REGISTRY,
)
RESILIENCE_STATE_SKIPPED = Counter(
    "gatewayd_resilience_state_rows_skipped",
    "Stored state rows not restored, by reason (unknown_key, wrong_kind, corrupt).",
    ["reason"],
    registry=REGISTRY,
)


@lru_cache(maxsize=4096)
def _child(metric: Counter | Gauge, labels: tuple[str, ...]) -> Counter | Gauge:
    return metric.labels(*labels)


def counter(metric: Counter, *labels: str) -> Counter:
    """A labelled child, cached: ``labels()`` takes a lock and builds a key on every call otherwise."""
    child = _child(metric, labels)
    assert isinstance(child, Counter)
    return child


def gauge(metric: Gauge, *labels: str) -> Gauge:
    child = _child(metric, labels)
    assert isinstance(child, Gauge)
    return child


# --- serial buses --------------------------------------------------------------------------------------------

SERIAL_INBOUND_DROPPED = Counter(
    "gatewayd_serial_inbound_dropped",
    "Unsolicited frames (telemetry, events) a serial bus dropped: their device sent more than its inbound rate.",
    ["bus"],
    registry=REGISTRY,
)
SERIAL_BAD_FRAMES = Counter(
    "gatewayd_serial_bad_frames",
    "Lines a serial bus received that were not a valid frame, by reason (gatewayd.devices.framing.REASONS: "
    "no_start, no_checksum, bad_checksum, malformed, not_object, too_long; mismatched_reply: an R naming another "
    "command).",
    ["bus", "reason"],
    registry=REGISTRY,
)

# --- telemetry and the outbox ----------------------------------------------------------------------------------

TELEMETRY_RECORDS = Counter(
    "gatewayd_telemetry_records",
    "Telemetry and event records from devices (into the outbox when the uplink is enabled).",
    ["kind"],
    registry=REGISTRY,
)
TELEMETRY_DROPPED = Counter(
    "gatewayd_telemetry_dropped",
    "Telemetry records dropped, by reason: budget (outbox byte budget or disk-free watermark), "
    "pending (more arrived between two flushes than may be held in memory), invalid (not an object), "
    "storage_full (not stored while the storage is full: the reserve is for accepted commands).",
    ["reason"],
    registry=REGISTRY,
)
TELEMETRY_PATH = Counter(
    "gatewayd_telemetry_forwarded",
    "Telemetry records by the way they took to the broker: live (from memory, acknowledged within "
    "[outbox] write_behind_s, never written to disk) or stored (written to the outbox: the uplink was down or "
    "slow, or telemetry is durable).",
    ["path"],
    registry=REGISTRY,
)
TELEMETRY_HELD = Gauge(
    "gatewayd_telemetry_held",
    "Telemetry records in memory, not yet acknowledged by the broker nor written to the outbox (what a power "
    "loss would cost, at most [outbox] write_behind_s of readings).",
    registry=REGISTRY,
)
OUTBOX_ROWS = Gauge("gatewayd_outbox_rows", "Records waiting in the outbox.", registry=REGISTRY)
OUTBOX_BACKLOG = Gauge(
    "gatewayd_outbox_backlog",
    "1 from the moment telemetry had to be written to the outbox (the uplink down or not keeping pace) until "
    "the outbox is empty again; 0 while everything goes out live.",
    registry=REGISTRY,
)
OUTBOX_BYTES = Gauge("gatewayd_outbox_bytes", "Payload bytes waiting in the outbox.", registry=REGISTRY)
OUTBOX_OLDEST_AGE = Gauge(
    "gatewayd_outbox_oldest_age_seconds",
    "Age of the oldest record waiting in the outbox (0 when empty).",
    registry=REGISTRY,
)
CLOCK_SYNCED = Gauge(
    "gatewayd_clock_synchronised", "1 when the wall clock is synchronised (NTP), 0 before.", registry=REGISTRY
)

# --- storage ---------------------------------------------------------------------------------------------------

STORAGE_FULL = Gauge(
    "gatewayd_storage_full",
    "1 while new commands are refused because the data directory's filesystem is below its reserve "
    "([store] min_free_bytes) or SQLite said the disk is full.",
    registry=REGISTRY,
)
DISPATCHER_GAPS = Counter(
    "gatewayd_dispatcher_gaps",
    "Open commands found in the store that no queue held and no device executed (then queued again); should "
    "stay 0: each one is a defect, logged as dispatcher_gap.",
    ["found_by"],
    registry=REGISTRY,
)
COMMANDS_PRUNED = Counter(
    "gatewayd_commands_pruned",
    "Finished commands deleted with their transitions, past [commands] keep_final_s or keep_max.",
    registry=REGISTRY,
)
STORAGE_FREE_BYTES = Gauge(
    "gatewayd_storage_free_bytes", "Free bytes on the data directory's filesystem (last check).", registry=REGISTRY
)
STORE_LOST = Gauge(
    "gatewayd_store_lost",
    "1 once the database file was deleted, replaced or turned unwritable while the gateway ran: every write is "
    "refused (503 store_lost) until a restart; /healthz says why.",
    registry=REGISTRY,
)

# --- MQTT uplink -----------------------------------------------------------------------------------------------

UPLINK_CONNECTED = Gauge("gatewayd_uplink_connected", "1 while connected to the MQTT broker.", registry=REGISTRY)
UPLINK_DRAIN_WINDOW = Gauge(
    "gatewayd_uplink_drain_window",
    "Outbox messages the drain may have awaiting their PUBACK at once: grown while acknowledgements come back "
    "promptly, cut when they slow down.",
    registry=REGISTRY,
)
UPLINK_PUBLISHED = Counter(
    "gatewayd_uplink_published",
    "Outbox records the broker acknowledged (and that were then deleted), by kind.",
    ["kind"],
    registry=REGISTRY,
)
UPLINK_COMMANDS = Counter(
    "gatewayd_uplink_commands",
    "Commands received over MQTT, by outcome: accepted, duplicate, rejected, redeliver (not committed, not acked).",
    ["outcome"],
    registry=REGISTRY,
)
