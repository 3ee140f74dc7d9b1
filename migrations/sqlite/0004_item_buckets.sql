-- Stock buckets (issue 13): how many engine items an item's stock is split over.
ALTER TABLE items ADD COLUMN buckets BIGINT NOT NULL DEFAULT 1;
