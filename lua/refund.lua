-- Refund an order (POST /admin/v1/orders/{id}/refund): `paid` or `refund_due`
-- becomes `refunded`, exactly once. Interface: docs/internals.md, "settle.lua /
-- refund.lua". Every key lives in the order's item's slot.
--
-- ``KEYS`` (as pay.lua):
--  1. [hash]   sk:T:order:<order_id>
--  2. [hash]   sk:T:item:<item>
--  3. [hash]   sk:T:buyers:<item>
--  4. [zset]   sk:T:deadlines
--  5. [stream] sk:T:events
--  6. [hash]   sk:T:seq        the shard's write sequence (lua/lib/seq.lua)
--
-- ``ARGV``:
--  1. [string] order_id
--  2. [string] item_id (must be the order's item: KEYS 2-3 are built from it)
--  3. [string] restock: "1" = the units and the buyer's quota return to the sale
--  4. [int]    closed_ttl_s (TTL given to the order hash once final)
--  5. [int]    now_ms, "" = use Redis TIME
--  6. [string] floor "E:S", "" = none (lua/lib/seq.lua)
--  7. [string] the database's record of the order when its hash may have outlived
--              its TTL, "" = none (lua/lib/order.lua, load_or_restore)
--
-- An error reply `FENCED <why>` when the shard is fenced or behind the floor:
-- nothing changed. Else:
--  * {"unknown_order"}
--  * {"ok", "refunded", stock_after}  refunded now; `refunded` += qty; from `paid`
--                                     with restock: stock += qty, paid -= qty,
--                                     buyers[user] -= qty (deleted at 0),
--                                     `refund_of` "paid+restock"; without: the
--                                     units stay out of the sale (paid and the
--                                     buyer's units unchanged), `refund_of`
--                                     "paid"; from `refund_due` (its units came
--                                     back when it closed) `refund_of` stays;
--                                     `refunded` event, order TTL set
--  * {"already", "refunded"}          refunded before: nothing changed
--  * {"closed", status}               reserved, cancelled or expired: nothing to
--                                     refund, nothing changed
--
-- Runs after the preludes lua/lib/seq.lua and lua/lib/order.lua.

assert(#KEYS == 6, "refund.lua: expected 6 KEYS, got " .. #KEYS)
assert(#ARGV == 7, "refund.lua: expected 7 ARGV, got " .. #ARGV)
assert(ARGV[3] == "0" or ARGV[3] == "1", "refund.lua: restock is not 0 or 1")

local c, fenced = order_call("refund.lua", ARGV[1], ARGV[2], ARGV[4], ARGV[5], ARGV[6])
if fenced then return fenced end

local o = load_or_restore(c, ARGV[7])
if not o then return {"unknown_order"} end
check_item(c, o)

if o.status == "refunded" then
  return {"already", "refunded"}
end
local refund_of
if o.status == "paid" and ARGV[3] == "1" then
  refund_of = "paid+restock"
  redis.call("HINCRBY", KEYS[2], "stock", o.qty_s)
  redis.call("HINCRBY", KEYS[2], "paid", o.neg_qty_s)
  if redis.call("HINCRBY", KEYS[3], o.user_id, o.neg_qty_s) <= 0 then
    redis.call("HDEL", KEYS[3], o.user_id)
  end
elseif o.status == "paid" then
  refund_of = "paid"
elseif o.status == "refund_due" then
  refund_of = o.refund_of
else
  return {"closed", o.status}
end
redis.call("HINCRBY", KEYS[2], "refunded", o.qty_s)
close_order(c, o, "refunded", refund_of)
return {"ok", "refunded", tonumber(redis.call("HGET", KEYS[2], "stock"))}
