-- Commands and every transition of their lifecycle (see DESIGN.md, "Command lifecycle").
CREATE TABLE commands (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,  -- arrival order, breaks priority ties
    id            TEXT NOT NULL UNIQUE,               -- client idempotency key, or generated
    device        TEXT NOT NULL,
    action        TEXT NOT NULL,
    params        TEXT NOT NULL,                      -- JSON object, validated against the profile
    priority      INTEGER NOT NULL,                   -- 0 critical .. 3 low
    source        TEXT NOT NULL,                      -- http, cli, mqtt, ...
    user          TEXT,
    state         TEXT NOT NULL,
    created_at    REAL NOT NULL,                      -- wall clock, for display
    ttl_s         REAL NOT NULL,
    deadline_at   REAL NOT NULL,                      -- wall-clock deadline, used only across reboots
    deadline_mono REAL NOT NULL,                      -- monotonic deadline, authoritative within boot_id
    boot_id       TEXT NOT NULL,
    updated_at    REAL NOT NULL,
    result        TEXT,                               -- JSON object
    error_code    TEXT,
    error_message TEXT
);

CREATE INDEX commands_open ON commands (state) WHERE state IN ('accepted', 'queued', 'dispatched');
CREATE INDEX commands_device ON commands (device, seq);

CREATE TABLE transitions (
    command_seq INTEGER NOT NULL REFERENCES commands (seq) ON DELETE CASCADE,
    state       TEXT NOT NULL,
    at          REAL NOT NULL,                        -- wall clock, for display
    mono        REAL NOT NULL,                        -- monotonic clock of boot_id: orders within a boot
    boot_id     TEXT NOT NULL,
    detail      TEXT
);

CREATE INDEX transitions_command ON transitions (command_seq);
