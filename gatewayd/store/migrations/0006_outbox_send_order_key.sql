-- The outbox keyed by its send order, for an SD card (issue 19). Version 3's table had a rowid, an AUTOINCREMENT
-- sequence, three indexes and two triggers: every transaction that added or removed rows rewrote the table's page,
-- the sequence's page, a page of each index and, per row, the counters. Here the table is clustered on
-- (priority, id), the order rows are sent and dropped in, so a batch touches the pages it fills or empties and the
-- counters page once (the next id lives there too, kept by store/outbox.py, one update per batch). The partial
-- index holds only rows stamped before the wall clock was synchronised, so it costs nothing once it is.
CREATE TABLE outbox_keyed (
    priority     INTEGER NOT NULL,         -- 0 command results and critical events, 1 events, 2 telemetry
    id           INTEGER NOT NULL,         -- order of arrival across priorities (outbox_counters.next_id)
    kind         TEXT NOT NULL CHECK (kind IN ('result', 'event', 'telemetry')),
    device       TEXT,
    topic        TEXT NOT NULL,            -- below gatewayd/{gateway_id}/: result/{id}, events, telemetry/{device}
    payload      TEXT NOT NULL,            -- JSON, without the timestamp (added when sent)
    bytes        INTEGER NOT NULL,         -- length of payload, for the byte budget
    ts           REAL NOT NULL,            -- wall-clock estimate that never runs backwards within a boot
    mono         REAL NOT NULL,            -- monotonic reading when observed
    boot_id      TEXT NOT NULL,            -- mono is meaningful only within this boot
    clock_synced INTEGER NOT NULL,         -- 0: the wall clock was not synchronised (ts may be far off)
    PRIMARY KEY (priority, id)
) WITHOUT ROWID;

INSERT INTO outbox_keyed (priority, id, kind, device, topic, payload, bytes, ts, mono, boot_id, clock_synced)
    SELECT priority, id, kind, device, topic, payload, bytes, ts, mono, boot_id, clock_synced FROM outbox;

-- The next id continues the old sequence, so a row's seq (its id, published) never goes back.
INSERT INTO outbox_counters (name, value) VALUES ('next_id', 1 + max(
    (SELECT COALESCE(MAX(id), 0) FROM outbox),
    COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'outbox'), 0)
));
-- Rows and bytes per kind, for the per-class budget and the page (no scan).
INSERT INTO outbox_counters (name, value)
    SELECT 'rows:' || k.kind, (SELECT COUNT(*) FROM outbox WHERE outbox.kind = k.kind)
    FROM (SELECT 'result' AS kind UNION ALL SELECT 'event' UNION ALL SELECT 'telemetry') AS k;
INSERT INTO outbox_counters (name, value)
    SELECT 'bytes:' || k.kind, (SELECT COALESCE(SUM(bytes), 0) FROM outbox WHERE outbox.kind = k.kind)
    FROM (SELECT 'result' AS kind UNION ALL SELECT 'event' UNION ALL SELECT 'telemetry') AS k;

DROP TABLE outbox;  -- with its indexes and triggers
DELETE FROM sqlite_sequence WHERE name = 'outbox';
ALTER TABLE outbox_keyed RENAME TO outbox;
CREATE INDEX outbox_unsynced ON outbox (boot_id) WHERE clock_synced = 0;
