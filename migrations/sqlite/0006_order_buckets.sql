-- Stock buckets (issue 13): the bucket an order was made in (0: the item's own, for an
-- item of one bucket; 1..=B for an item of B > 1). `item_id` is always the item's.
ALTER TABLE orders ADD COLUMN bucket BIGINT NOT NULL DEFAULT 0;
