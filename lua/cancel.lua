-- Cancel a reserved order: its stock and the user's quota come back, exactly
-- once, and the order is final. Interface: docs/internals.md,
-- "pay.lua / cancel.lua". Every key lives in the item's slot `{s<N>}`.
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
--  2. [string] user_id (the caller; must own the order)
--  3. [string] item_id (must be the order's item: KEYS 2-3 are built from it)
--  4. [int]    closed_ttl_s (TTL given to the order hash once final)
--  5. [int]    now_ms, "" = use Redis TIME
--
-- Replies (`unknown_order`, `forbidden`, `already` and `closed` without the
-- expiry below change nothing):
--  * {"unknown_order"}
--  * {"forbidden"}                      the order belongs to another user
--  * {"ok", "cancelled", stock_after}   cancelled now: stock += qty,
--                                       reserved -= qty, cancelled += qty,
--                                       buyers[user] -= qty (deleted at 0),
--                                       deadline removed, `cancelled` event,
--                                       order TTL set
--  * {"already", "cancelled"}           cancelled before
--  * {"closed", status}                 paid or expired before; or reserved but
--                                       pay_before_ms <= now: then this call
--                                       expires it instead (stock and quota
--                                       returned, `expired` event, order TTL
--                                       set) and answers {"closed", "expired"}

-- Integers handed to redis.call go as strings (see reserve.lua: a Lua number is
-- converted with slow float formatting).
local function int(n)
  return string.format("%d", n)
end

assert(#KEYS == 5, "cancel.lua: expected 5 KEYS, got " .. #KEYS)
assert(#ARGV == 5, "cancel.lua: expected 5 ARGV, got " .. #ARGV)

local order_id, user_id, item_id = ARGV[1], ARGV[2], ARGV[3]
local closed_ttl_s = assert(tonumber(ARGV[4]), "cancel.lua: closed_ttl_s is not a number")

local now
if ARGV[5] == "" then
  local t = redis.call("TIME")
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
else
  now = math.floor(assert(tonumber(ARGV[5]), "cancel.lua: now_ms is not a number"))
end

-- Checks.
local o = redis.call("HMGET", KEYS[1], "user_id", "item_id", "qty", "status",
  "created_ms", "pay_before_ms", "idem_key")
if not o[4] then
  return {"unknown_order"}
end
if o[1] ~= user_id then
  return {"forbidden"}
end
assert(o[2] == item_id, "cancel.lua: order " .. order_id .. " is not of item " .. item_id)
local qty, status, pay_before = tonumber(o[3]), o[4], tonumber(o[6])
local qty_s, neg_qty_s = o[3], int(-tonumber(o[3]))
if status == "cancelled" then
  return {"already", "cancelled"}
end
if status ~= "reserved" then
  return {"closed", status}
end

-- Writes: stock and quota back, then close the order as `final` (expired
-- when the deadline has passed, as expire.lua would have, else cancelled).
local final = "cancelled"
if pay_before <= now then
  final = "expired"
end
local stock_after = redis.call("HINCRBY", KEYS[2], "stock", qty_s)
redis.call("HINCRBY", KEYS[2], "reserved", neg_qty_s)
redis.call("HINCRBY", KEYS[2], final, qty_s)
if redis.call("HINCRBY", KEYS[3], user_id, neg_qty_s) <= 0 then
  redis.call("HDEL", KEYS[3], user_id)
end
redis.call("HSET", KEYS[1], "status", final, "updated_ms", int(now))
redis.call("EXPIRE", KEYS[1], int(closed_ttl_s))
redis.call("ZREM", KEYS[4], order_id .. "|" .. item_id)
redis.call("XADD", KEYS[5], "*",
  "type", final, "order_id", order_id, "item_id", item_id, "user_id", user_id,
  "qty", qty_s, "at_ms", int(now), "created_ms", o[5], "pay_before_ms", o[6],
  "idem_key", o[7])
if final == "expired" then
  return {"closed", "expired"}
end
return {"ok", "cancelled", stock_after}
