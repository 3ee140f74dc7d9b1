-- The operator's pause switches (issue 14): one per item, and one for every sale (the
-- row `paused_all` of `controls`). The embedded engine enforces them; the database
-- keeps them across a restart.
ALTER TABLE items ADD COLUMN paused BOOLEAN NOT NULL DEFAULT 0;
CREATE TABLE IF NOT EXISTS controls (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    updated_ms BIGINT NOT NULL
);
