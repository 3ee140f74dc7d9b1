-- Stock buckets (issue 13): each transfer of units between two buckets of an item, from
-- its stream events (lua/transfer_out.lua, lua/transfer_in.lua): `out_ms` once the donor
-- gave the units, `in_ms` once the destination was credited. A bucket's share of the
-- item's stock is its initial share plus what it received, less what it gave.
CREATE TABLE IF NOT EXISTS bucket_transfers (
    transfer_id TEXT PRIMARY KEY,
    item_id     TEXT NOT NULL,
    from_bucket BIGINT NOT NULL,
    to_bucket   BIGINT NOT NULL,
    units       BIGINT NOT NULL,
    out_ms      BIGINT,
    in_ms       BIGINT
);

CREATE INDEX IF NOT EXISTS bucket_transfers_by_item ON bucket_transfers (item_id);
