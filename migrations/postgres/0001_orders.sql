-- Orders as the persistence worker (or the embedded engine's journal) writes them.
-- Times are milliseconds since the Unix epoch (one representation in both databases).
CREATE TABLE IF NOT EXISTS items (
    item_id        TEXT PRIMARY KEY,
    name           TEXT NOT NULL,
    price_cents    BIGINT NOT NULL,
    stock_total    BIGINT NOT NULL,
    per_user_limit BIGINT NOT NULL,
    starts_ms      BIGINT NOT NULL,
    ends_ms        BIGINT NOT NULL,
    updated_ms     BIGINT NOT NULL
);

CREATE TABLE IF NOT EXISTS orders (
    order_id      TEXT PRIMARY KEY,
    item_id       TEXT NOT NULL,
    user_id       TEXT NOT NULL,
    qty           BIGINT NOT NULL,
    status        TEXT NOT NULL,
    idem_key      TEXT NOT NULL DEFAULT '',
    created_ms    BIGINT NOT NULL,
    pay_before_ms BIGINT NOT NULL,
    updated_ms    BIGINT NOT NULL,
    paid_ms       BIGINT,
    cancelled_ms  BIGINT,
    expired_ms    BIGINT
);

CREATE INDEX IF NOT EXISTS orders_by_item ON orders (item_id, status);
