-- Expire a reserved order whose payment deadline has passed: its stock and
-- the user's quota come back, exactly once. Called by the sweeper for each
-- due member of the shard's deadline set. Interface: docs/internals.md,
-- "expire.lua". Every key lives in the item's slot `{s<N>}`.
--
-- ``KEYS``:
--  1. [hash]   sk:T:order:<order_id>
--  2. [hash]   sk:T:item:<item>
--  3. [hash]   sk:T:buyers:<item>
--  4. [zset]   sk:T:deadlines
--  5. [stream] sk:T:events
--  6. [hash]   sk:T:seq        the shard's write sequence (lua/lib/seq.lua)
--
-- ``ARGV``:
--  1. [string] order_id
--  2. [string] item_id (from the deadline member "<order_id>|<item_id>")
--  3. [int]    closed_ttl_s (TTL given to the order hash once final)
--  4. [int]    now_ms, "" = use Redis TIME
--  5. [string] floor "E:S", "" = none (lua/lib/seq.lua)
--
-- An error reply `FENCED <why>` when the shard is fenced or behind the floor
-- (lua/lib/seq.lua): nothing changed. Else replies:
--  * {"expired", stock_after}    expired now: stock += qty, reserved -= qty,
--                                expired += qty, buyers[user] -= qty (deleted
--                                at 0), deadline removed, `expired` event,
--                                order TTL set
--  * {"not_due", pay_before_ms}  still reserved, deadline in the future:
--                                nothing changed
--  * {"not_reserved", status}    paid, cancelled or expired before: only the
--                                deadline member is removed
--  * {"unknown_order"}           no such order: only the deadline member is
--                                removed
--
-- Runs after the preludes lua/lib/seq.lua and lua/lib/order.lua (joined by
-- src/engine/scripts.rs), which define the sequence check, int(), order_call(),
-- the order loading and checks, and the writes that close an order and give
-- its stock back.

assert(#KEYS == 6, "expire.lua: expected 6 KEYS, got " .. #KEYS)
assert(#ARGV == 5, "expire.lua: expected 5 ARGV, got " .. #ARGV)

local c, fenced = order_call("expire.lua", ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5])
if fenced then return fenced end

-- Checks.
local o = load_order()
if not o then
  redis.call("ZREM", KEYS[4], c.member)
  return {"unknown_order"}
end
check_item(c, o)
if o.status ~= "reserved" then
  redis.call("ZREM", KEYS[4], c.member)
  return {"not_reserved", o.status}
end
if o.pay_before > c.now then
  return {"not_due", o.pay_before}
end

-- Writes.
return {"expired", expire_order(c, o)}
