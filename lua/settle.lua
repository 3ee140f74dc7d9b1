-- A payment provider's confirmed payment of an order (POST /webhooks/payments): a
-- reserved order becomes paid; an order that closed before the money came (expired
-- or cancelled: its units and quota already returned) becomes `refund_due`, so the
-- payment is recorded and owed back, never dropped. Interface: docs/internals.md,
-- "settle.lua / refund.lua". Every key lives in the order's item's slot.
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
--  3. [int]    closed_ttl_s (TTL given to the order hash once final)
--  4. [int]    now_ms, "" = use Redis TIME
--  5. [string] floor "E:S", "" = none (lua/lib/seq.lua)
--  6. [string] the database's record of the order when its hash may have outlived
--              its TTL, "" = none (lua/lib/order.lua, load_or_restore)
--
-- An error reply `FENCED <why>` when the shard is fenced or behind the floor:
-- nothing changed. Else (the provider is not a shopper: no owner check):
--  * {"unknown_order"}
--  * {"ok", "paid", stock_after}        paid now, as pay.lua
--  * {"ok", "refund_due", stock_after, expired_now}  closed before (cancelled or
--                                       expired, or reserved past its deadline: then
--                                       expired by this call first, as expire.lua,
--                                       and `expired_now` is 1, else 0): status
--                                       `refund_due`, `refund_of` = the closing
--                                       status, `refund_due` event; no unit moves
--  * {"already", status}                paid, refund_due or refunded before:
--                                       nothing changed
--
-- Runs after the preludes lua/lib/seq.lua and lua/lib/order.lua.

assert(#KEYS == 6, "settle.lua: expected 6 KEYS, got " .. #KEYS)
assert(#ARGV == 6, "settle.lua: expected 6 ARGV, got " .. #ARGV)

local c, fenced = order_call("settle.lua", ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5])
if fenced then return fenced end

local o = load_or_restore(c, ARGV[6])
if not o then return {"unknown_order"} end
check_item(c, o)

if o.status == "reserved" and o.pay_before > c.now then
  return {"ok", "paid", pay_order(c, o)}
end
local expired_now = 0
if o.status == "reserved" then
  expire_order(c, o)
  o.status = "expired"
  expired_now = 1
end
if o.status == "cancelled" or o.status == "expired" then
  close_order(c, o, "refund_due", o.status)
  return {"ok", "refund_due", tonumber(redis.call("HGET", KEYS[2], "stock")), expired_now}
end
return {"already", o.status}
