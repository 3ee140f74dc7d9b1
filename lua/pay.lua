-- Pay a reserved order: its units move from `reserved` to `paid` (stock does
-- not change) and the order is final. Interface: docs/internals.md,
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
--  * {"forbidden"}                  the order belongs to another user
--  * {"ok", "paid", stock_after}    paid now: reserved -= qty, paid += qty,
--                                   deadline removed, `paid` event, order TTL set
--  * {"already", "paid"}            paid before
--  * {"closed", status}             cancelled or expired before; or reserved but
--                                   pay_before_ms <= now: then this call expires
--                                   it first (stock and quota returned, `expired`
--                                   event, order TTL set) and answers
--                                   {"closed", "expired"}

-- Integers handed to redis.call go as strings (see reserve.lua: a Lua number is
-- converted with slow float formatting).
local function int(n)
  return string.format("%d", n)
end

assert(#KEYS == 5, "pay.lua: expected 5 KEYS, got " .. #KEYS)
assert(#ARGV == 5, "pay.lua: expected 5 ARGV, got " .. #ARGV)

local order_id, user_id, item_id = ARGV[1], ARGV[2], ARGV[3]
local closed_ttl_s = assert(tonumber(ARGV[4]), "pay.lua: closed_ttl_s is not a number")

local now
if ARGV[5] == "" then
  local t = redis.call("TIME")
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
else
  now = math.floor(assert(tonumber(ARGV[5]), "pay.lua: now_ms is not a number"))
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
assert(o[2] == item_id, "pay.lua: order " .. order_id .. " is not of item " .. item_id)
local qty, status, pay_before = tonumber(o[3]), o[4], tonumber(o[6])
local qty_s, neg_qty_s = o[3], int(-tonumber(o[3]))
if status == "paid" then
  return {"already", "paid"}
end
if status ~= "reserved" then
  return {"closed", status}
end

-- Writes: move the units, then close the order as `final` (expired when the
-- deadline has passed, as expire.lua would have; else paid).
local final, stock_after
redis.call("HINCRBY", KEYS[2], "reserved", neg_qty_s)
if pay_before <= now then
  final = "expired"
  stock_after = redis.call("HINCRBY", KEYS[2], "stock", qty_s)
  redis.call("HINCRBY", KEYS[2], "expired", qty_s)
  if redis.call("HINCRBY", KEYS[3], user_id, neg_qty_s) <= 0 then
    redis.call("HDEL", KEYS[3], user_id)
  end
else
  final = "paid"
  stock_after = tonumber(redis.call("HGET", KEYS[2], "stock"))
  redis.call("HINCRBY", KEYS[2], "paid", qty_s)
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
return {"ok", "paid", stock_after}
