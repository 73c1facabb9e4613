-- Natural-language commands (gatewayd/interpret): how each command was interpreted, the prompt cache, the spend
-- ledger, and the ends of on-periods ("for 10 minutes") still to be sent.
ALTER TABLE commands ADD COLUMN interpretation TEXT;  -- JSON: provider, model, attempts, cached, latency, degraded, cost

CREATE TABLE interpret_cache (
    key        TEXT PRIMARY KEY,           -- sha256 of the prompt version, registry digest, provider, model and text
    registry   TEXT NOT NULL,              -- registry digest: rows of an older one are purged when devices change
    provider   TEXT NOT NULL,
    model      TEXT NOT NULL,
    text       TEXT NOT NULL,              -- the normalised request text
    command    TEXT NOT NULL,              -- JSON: device, action, params, duration_s
    cost       REAL NOT NULL,              -- what the answer cost: each hit saves as much
    created_at REAL NOT NULL,              -- wall clock; a row from the future (clock stepped back) is not used
    expires_at REAL NOT NULL
);
CREATE INDEX interpret_cache_expiry ON interpret_cache (expires_at);

CREATE TABLE interpret_spend (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    at         REAL NOT NULL,              -- wall clock
    day        TEXT NOT NULL,              -- UTC date (YYYY-MM-DD): the day the daily budget counts it in
    provider   TEXT NOT NULL,
    model      TEXT NOT NULL,
    tokens_in  INTEGER NOT NULL,
    tokens_out INTEGER NOT NULL,
    cost       REAL NOT NULL,
    estimated  INTEGER NOT NULL            -- 1: the provider reported no usage; the tokens are our estimate
);
CREATE INDEX interpret_spend_day ON interpret_spend (day, provider);

CREATE TABLE interpret_followups (
    command_id TEXT PRIMARY KEY,           -- the command that switched something on
    device     TEXT NOT NULL,
    action     TEXT NOT NULL,              -- the off action, submitted after_s after that command succeeded
    after_s    REAL NOT NULL,
    user       TEXT,
    created_at REAL NOT NULL
);
