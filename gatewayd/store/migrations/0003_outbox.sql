-- The durable outbox: command results, events and telemetry on their way to the uplink. A row is deleted only
-- after the broker acknowledged it (PUBACK). Rows are sent in (priority, id) order: id is the order of arrival,
-- so the records of one device and one kind keep their order.
CREATE TABLE outbox (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    kind         TEXT NOT NULL CHECK (kind IN ('result', 'event', 'telemetry')),
    priority     INTEGER NOT NULL,         -- 0 command results and critical events, 1 events, 2 telemetry
    device       TEXT,
    topic        TEXT NOT NULL,            -- below gatewayd/{gateway_id}/: result/{id}, events, telemetry/{device}
    payload      TEXT NOT NULL,            -- JSON, without the timestamp (added when sent)
    bytes        INTEGER NOT NULL,         -- length of payload, for the byte budget
    ts           REAL NOT NULL,            -- wall-clock estimate that never runs backwards within a boot
    mono         REAL NOT NULL,            -- monotonic reading when observed
    boot_id      TEXT NOT NULL,            -- mono is meaningful only within this boot
    clock_synced INTEGER NOT NULL          -- 0: the wall clock was not synchronised (ts may be far off)
);
CREATE INDEX outbox_send_order ON outbox (priority, id);
CREATE INDEX outbox_unsynced ON outbox (boot_id, clock_synced) WHERE clock_synced = 0;

-- Counters that must survive a restart (telemetry dropped for the byte budget, for example).
CREATE TABLE outbox_counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT INTO outbox_counters (name, value) VALUES ('bytes', 0), ('rows', 0), ('telemetry_dropped', 0);

CREATE INDEX outbox_by_kind ON outbox (kind, id);

-- The byte budget is checked on every flush: a running total kept by the database itself is exact across
-- crashes and costs nothing to read, where SUM(bytes) over a full outbox would scan it.
CREATE TRIGGER outbox_count_insert AFTER INSERT ON outbox BEGIN
    UPDATE outbox_counters SET value = value + NEW.bytes WHERE name = 'bytes';
    UPDATE outbox_counters SET value = value + 1 WHERE name = 'rows';
END;
CREATE TRIGGER outbox_count_delete AFTER DELETE ON outbox BEGIN
    UPDATE outbox_counters SET value = value - OLD.bytes WHERE name = 'bytes';
    UPDATE outbox_counters SET value = value - 1 WHERE name = 'rows';
END;
