-- The operator's pause switches (issue 14): one per item, and one for every sale (the
-- row `paused_all` of `controls`). Redis and the embedded engine enforce them; the
-- database keeps them across a restart and a rebuild of Redis.
ALTER TABLE items ADD COLUMN IF NOT EXISTS paused BOOLEAN NOT NULL DEFAULT FALSE;
CREATE TABLE IF NOT EXISTS controls (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    updated_ms BIGINT NOT NULL
);
