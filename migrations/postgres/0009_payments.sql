-- The payment provider's callbacks (issue 14), one row per payment id: what was answered,
-- so that the provider's retries of the same payment get the same answer (and the order
-- is changed once), and what finance reconciles against the provider.
CREATE TABLE IF NOT EXISTS payments (
    payment_id   TEXT PRIMARY KEY,
    order_id     TEXT NOT NULL,
    amount_cents BIGINT NOT NULL,
    status       TEXT NOT NULL,
    http_status  BIGINT NOT NULL,
    answer       TEXT NOT NULL,
    received_ms  BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS payments_by_order ON payments (order_id);
