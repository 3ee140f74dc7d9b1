-- Reserve `qty` units of one item for one user: the only script that takes
-- stock. Interface: docs/internals.md, "reserve.lua". Every key lives in the
-- item's slot `{s<N>}`.
--
-- ``KEYS``:
--  1. [hash]   sk:T:item:<item>          the item (stock and counters)
--  2. [hash]   sk:T:buyers:<item>        user id -> units held (reserved + paid)
--  3. [hash]   sk:T:order:<order_id>     the new order (must not exist yet)
--  4. [string] sk:T:idem:<item>:<user>:<key>  idempotency key; not touched when
--              ARGV[7] is ""
--  5. [zset]   sk:T:deadlines            "<order_id>|<item_id>" scored by pay_before_ms
--  6. [stream] sk:T:events               order events
--
-- ``ARGV``:
--  1. [string] item_id
--  2. [string] user_id
--  3. [int]    qty
--  4. [string] order_id (KEYS[3] ends with it)
--  5. [int]    payment_timeout_ms
--  6. [int]    idem_ttl_s
--  7. [string] idem_key, "" = none
--  8. [int]    now_ms, "" = use Redis TIME
--
-- Checks, in this order; a failed check changes nothing. Replies:
--  * {"duplicate", order_id, qty, status, created_ms, pay_before_ms}
--      the idempotency key (or, for a retried call, KEYS[3] itself) already
--      names an order of this user and item: that order, nothing changed.
--      If the idempotency key outlived its order hash: {"duplicate", order_id,
--      0, "", 0, 0}.
--  * {"unknown_item"}
--  * {"not_started", starts_ms}          now < starts_ms
--  * {"ended", ends_ms}                  now >= ends_ms
--  * {"bad_qty", per_user_limit}         qty not an integer in 1..per_user_limit
--  * {"limit_reached", held, per_user_limit}  held + qty > per_user_limit
--  * {"sold_out", stock}                 stock < qty
--  * {"ok", order_id, created_ms, pay_before_ms, stock_after}
--      stock -= qty, reserved += qty, buyers[user] += qty, order hash written
--      (no TTL), idempotency key SET EX, deadline ZADDed, `reserved` event XADDed.

-- Numbers handed to redis.call are written as strings: a Lua number would be converted
-- with the C library's float formatting, which costs microseconds for a 13-digit
-- millisecond timestamp (measured: over half of this script's time).
local function int(n)
  return string.format("%d", n)
end

if #KEYS ~= 6 then error("reserve.lua: expected 6 KEYS") end
if #ARGV ~= 8 then error("reserve.lua: expected 8 ARGV") end

local item_id, user_id, order_id, idem_key = ARGV[1], ARGV[2], ARGV[4], ARGV[7]
local qty = tonumber(ARGV[3])
local timeout_ms = assert(tonumber(ARGV[5]), "reserve.lua: payment_timeout_ms is not a number")
local idem_ttl_s = assert(tonumber(ARGV[6]), "reserve.lua: idem_ttl_s is not a number")
assert(string.sub(KEYS[3], -#order_id) == order_id, "reserve.lua: KEYS[3] does not end with order_id")

local now
if ARGV[8] == "" then
  local t = redis.call("TIME")
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
else
  now = math.floor(assert(tonumber(ARGV[8]), "reserve.lua: now_ms is not a number"))
end

-- The order named `id` as a duplicate reply; its hash key is KEYS[3] with the
-- id swapped (same prefix, so same slot).
local function duplicate(id)
  local key = string.sub(KEYS[3], 1, #KEYS[3] - #order_id) .. id
  local o = redis.call("HMGET", key, "qty", "status", "created_ms", "pay_before_ms", "user_id", "item_id")
  if not o[2] then
    return {"duplicate", id, 0, "", 0, 0}
  end
  assert(o[5] == user_id and o[6] == item_id, "reserve.lua: order " .. id .. " belongs to another user or item")
  return {"duplicate", id, tonumber(o[1]), o[2], tonumber(o[3]), tonumber(o[4])}
end

-- Checks.
if idem_key ~= "" then
  local existing = redis.call("GET", KEYS[4])
  if existing then
    return duplicate(existing)
  end
end
if redis.call("EXISTS", KEYS[3]) == 1 then
  return duplicate(order_id)
end

local item = redis.call("HMGET", KEYS[1], "stock", "per_user_limit", "starts_ms", "ends_ms", "reserved")
if not item[1] then
  return {"unknown_item"}
end
local stock, limit = tonumber(item[1]), tonumber(item[2])
local starts_ms, ends_ms = tonumber(item[3]), tonumber(item[4])
if now < starts_ms then
  return {"not_started", starts_ms}
end
if now >= ends_ms then
  return {"ended", ends_ms}
end
if not qty or qty ~= math.floor(qty) or qty < 1 or qty > limit then
  return {"bad_qty", limit}
end
local held = tonumber(redis.call("HGET", KEYS[2], user_id) or "0")
if held + qty > limit then
  return {"limit_reached", held, limit}
end
if stock < qty then
  return {"sold_out", stock}
end

-- Writes.
local pay_before = now + timeout_ms
local now_s, pay_before_s, qty_s = int(now), int(pay_before), int(qty)
local stock_after = stock - qty
local reserved = tonumber(item[5] or "0") + qty
redis.call("HSET", KEYS[1], "stock", int(stock_after), "reserved", int(reserved))
redis.call("HINCRBY", KEYS[2], user_id, qty_s)
redis.call("HSET", KEYS[3],
  "order_id", order_id, "item_id", item_id, "user_id", user_id, "qty", qty_s,
  "status", "reserved", "created_ms", now_s, "pay_before_ms", pay_before_s,
  "updated_ms", now_s, "idem_key", idem_key)
if idem_key ~= "" then
  redis.call("SET", KEYS[4], order_id, "EX", ARGV[6])
end
redis.call("ZADD", KEYS[5], pay_before_s, order_id .. "|" .. item_id)
redis.call("XADD", KEYS[6], "*",
  "type", "reserved", "order_id", order_id, "item_id", item_id, "user_id", user_id,
  "qty", qty_s, "at_ms", now_s, "created_ms", now_s, "pay_before_ms", pay_before_s,
  "idem_key", idem_key)
return {"ok", order_id, now, pay_before, stock_after}
