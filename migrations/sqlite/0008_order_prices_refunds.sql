-- Payments and refunds (issue 14): the unit price an order was reserved at (NULL for
-- orders made before prices were kept), the times it became `refund_due` (paid for after
-- it closed) and `refunded`, and what a refund came from: `paid`, `paid+restock` (its units
-- returned to the sale), `cancelled` or `expired` (a late payment refunded).
ALTER TABLE orders ADD COLUMN price_cents BIGINT;
ALTER TABLE orders ADD COLUMN refund_of TEXT;
ALTER TABLE orders ADD COLUMN refund_due_ms BIGINT;
ALTER TABLE orders ADD COLUMN refunded_ms BIGINT;
