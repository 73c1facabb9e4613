-- Breaker states, limiter levels and adaptive rates, so a restart does not hammer a target that was failing
-- or hand every client a fresh burst (see gatewayd/resilience/state.py). One row per registered tool.
CREATE TABLE resilience_state (
    key      TEXT PRIMARY KEY,                        -- the name the tool was registered under
    kind     TEXT NOT NULL,                           -- circuit_breaker, token_bucket, keyed_limiter, ...
    state    TEXT NOT NULL,                           -- JSON: the tool's snapshot, times as remaining durations
    saved_at REAL NOT NULL,                           -- wall clock: downtime across a reboot, when trustworthy
    boot_id  TEXT NOT NULL                            -- same boot: the monotonic reading in state is still valid
);
