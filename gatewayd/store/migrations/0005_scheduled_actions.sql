-- Scheduled actions: what the gateway will send by itself later, durable before the command that asks for it is
-- acknowledged. The switch-off after a profile's max_on_s, the end of a natural-language on-period ("on for ten
-- minutes"), and whatever else comes due at a time. One table for all of them, so that every one survives a
-- restart, fires late rather than never, and can be seen and cancelled the same way.
CREATE TABLE scheduled_actions (
    id          TEXT PRIMARY KEY,   -- gateway-made; the command it fires is "~<id>" ("~" is no client's)
    kind        TEXT NOT NULL,      -- max_on | on_period
    device      TEXT NOT NULL,
    action      TEXT NOT NULL,      -- what is sent when it is due (an off action)
    priority    INTEGER NOT NULL,   -- of the command it sends: 0 critical (max_on) .. 3 low
    source      TEXT NOT NULL,      -- of that command: safety | interpret
    after       TEXT NOT NULL,      -- the command whose dispatch starts the clock (it may act from then on)
    delay_s     REAL NOT NULL,      -- due this long after that dispatch
    state       TEXT NOT NULL,      -- waiting (for the dispatch) | armed | fired | cancelled
    due_at      REAL,               -- wall clock, once armed: used across a reboot
    due_mono    REAL,               -- monotonic, once armed: authoritative within boot_id
    boot_id     TEXT,
    user        TEXT,
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL,
    fired_as    TEXT,               -- the id of the command it sent
    reason      TEXT                -- why it was cancelled, or late
);
CREATE INDEX scheduled_open ON scheduled_actions (state) WHERE state IN ('waiting', 'armed');
CREATE INDEX scheduled_after ON scheduled_actions (after);
CREATE INDEX scheduled_device ON scheduled_actions (device, state);

-- The natural-language follow-ups pending at the upgrade carry over: their on command succeeded (or is still
-- open), so they are armed from their creation (the earliest their on can have acted) or wait for it.
INSERT INTO scheduled_actions (id, kind, device, action, priority, source, after, delay_s, state, due_at, due_mono,
                               boot_id, user, created_at, updated_at)
SELECT 'followup-' || lower(hex(randomblob(8))), 'on_period', f.device, f.action, 1, 'interpret', f.command_id,
       f.after_s, 'armed', f.created_at + f.after_s, NULL, NULL, f.user, f.created_at, f.created_at
FROM interpret_followups f;

DROP TABLE interpret_followups;
