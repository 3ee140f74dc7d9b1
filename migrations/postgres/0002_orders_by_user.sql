-- A shopper's own orders, newest first (GET /api/v1/orders): the rows of one user_id in
-- (created_ms, order_id) order, read backwards, so the list is an index range scan and
-- LIMIT stops it early. order_id is the tie-break of orders created in the same millisecond.
CREATE INDEX IF NOT EXISTS orders_by_user ON orders (user_id, created_ms, order_id);
