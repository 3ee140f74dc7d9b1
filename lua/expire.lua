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
--
-- ``ARGV``:
--  1. [string] order_id
--  2. [string] item_id (from the deadline member "<order_id>|<item_id>")
--  3. [int]    closed_ttl_s (TTL given to the order hash once final)
--  4. [int]    now_ms, "" = use Redis TIME
--
-- Replies:
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

-- Integers handed to redis.call go as strings (see reserve.lua: a Lua number is
-- converted with slow float formatting).
local function int(n)
  return string.format("%d", n)
end

assert(#KEYS == 5, "expire.lua: expected 5 KEYS, got " .. #KEYS)
assert(#ARGV == 4, "expire.lua: expected 4 ARGV, got " .. #ARGV)

local order_id, item_id = ARGV[1], ARGV[2]
local closed_ttl_s = assert(tonumber(ARGV[3]), "expire.lua: closed_ttl_s is not a number")
local member = order_id .. "|" .. item_id

local now
if ARGV[4] == "" then
  local t = redis.call("TIME")
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
else
  now = math.floor(assert(tonumber(ARGV[4]), "expire.lua: now_ms is not a number"))
end

-- Checks.
local o = redis.call("HMGET", KEYS[1], "user_id", "item_id", "qty", "status",
  "created_ms", "pay_before_ms", "idem_key")
if not o[4] then
  redis.call("ZREM", KEYS[4], member)
  return {"unknown_order"}
end
assert(o[2] == item_id, "expire.lua: order " .. order_id .. " is not of item " .. item_id)
local user_id, qty, status, pay_before = o[1], tonumber(o[3]), o[4], tonumber(o[6])
local qty_s, neg_qty_s = o[3], int(-tonumber(o[3]))
if status ~= "reserved" then
  redis.call("ZREM", KEYS[4], member)
  return {"not_reserved", status}
end
if pay_before > now then
  return {"not_due", pay_before}
end

-- Writes.
local stock_after = redis.call("HINCRBY", KEYS[2], "stock", qty_s)
redis.call("HINCRBY", KEYS[2], "reserved", neg_qty_s)
redis.call("HINCRBY", KEYS[2], "expired", qty_s)
if redis.call("HINCRBY", KEYS[3], user_id, neg_qty_s) <= 0 then
  redis.call("HDEL", KEYS[3], user_id)
end
redis.call("HSET", KEYS[1], "status", "expired", "updated_ms", int(now))
redis.call("EXPIRE", KEYS[1], int(closed_ttl_s))
redis.call("ZREM", KEYS[4], member)
redis.call("XADD", KEYS[5], "*",
  "type", "expired", "order_id", order_id, "item_id", item_id, "user_id", user_id,
  "qty", qty_s, "at_ms", int(now), "created_ms", o[5], "pay_before_ms", o[6],
  "idem_key", o[7])
return {"expired", stock_after}
