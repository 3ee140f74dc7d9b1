-- Reserve units for a batch of shoppers: the only script that takes stock.
-- Interface: docs/internals.md, "reserve.lua". Every key lives in one slot
-- `{s<N>}`: the requests of a batch are of items of the same shard.
--
-- A batch is N >= 1 requests, decided one after the other in the order given:
-- each sees the writes of the ones before it, and a failed check of one
-- changes nothing and does not affect the others. The gateway sends what
-- queued up for a shard while its previous call was in flight (no timer), so
-- N is 1 at low load and grows with the load.
--
-- ``KEYS``: 3 shared, then 4 per request (request i at 3 + 4(i-1) + 1..4):
--  1. [zset]   sk:T:deadlines            "<order_id>|<item_id>" scored by pay_before_ms
--  2. [stream] sk:T:events               order events
--  3. [hash]   sk:T:seq                  the shard's write sequence (lua/lib/seq.lua),
--              and its field `paused` ("1": every sale is paused)
--  then per request:
--  +1 [hash]   sk:T:item:<item>          the item (stock and counters; field
--              `paused` = "1" while the operator has paused it)
--  +2 [hash]   sk:T:buyers:<item>        user id -> units held (reserved + paid)
--  +3 [hash]   sk:T:order:<order_id>     the new order (must not exist yet)
--  +4 [string] sk:T:idem:<item>:<user>:<key>  idempotency key; not touched when
--              the request's idem_key is ""
--
-- ``ARGV``: 4 shared, then 5 per request (request i at 4 + 5(i-1) + 1..5):
--  1. [int]    payment_timeout_ms
--  2. [int]    idem_ttl_s
--  3. [int]    now_ms, "" = use Redis TIME
--  4. [string] floor "E:S", "" = none (lua/lib/seq.lua)
--  then per request:
--  +1 [string] item_id
--  +2 [string] user_id
--  +3 [int]    qty
--  +4 [string] order_id (its KEYS +3 ends with it)
--  +5 [string] idem_key, "" = none
--
-- An error reply `FENCED <why>` when the shard is fenced or behind the floor
-- (lua/lib/seq.lua): nothing was decided. Else an array of N replies, one per
-- request in order. Checks, in this order; a failed check changes nothing:
--  * {"duplicate", order_id, qty, status, created_ms, pay_before_ms}
--      the idempotency key (or, for a retried call, the order key itself)
--      already names an order of this user and item: that order, nothing
--      changed. If the idempotency key outlived its order hash:
--      {"duplicate", order_id, 0, "", 0, 0}.
--  * {"unknown_item"}
--  * {"paused"}                          the item, or every sale, is paused
--  * {"not_started", starts_ms}          now < starts_ms
--  * {"ended", ends_ms}                  now >= ends_ms
--  * {"bad_qty", per_user_limit}         qty not an integer in 1..per_user_limit
--  * {"limit_reached", held, per_user_limit}  held + qty > per_user_limit
--  * {"sold_out", stock}                 stock < qty
--  * {"ok", order_id, created_ms, pay_before_ms, stock_after}
--      stock -= qty, reserved += qty, buyers[user] += qty, order hash written
--      (item_id, user_id, qty, status, created_ms, pay_before_ms, price_cents =
--      the item's unit price now, and idem_key when there is one; no TTL), idempotency key SET EX, deadline added,
--      `reserved` event added (see docs/internals.md).
--
-- Writes per request: the buyer (one HSETNX for a first purchase), the order
-- hash, the idempotency key. Writes per batch, at its end: each item's stock and
-- reserved (one HSET per item), the deadlines (one ZADD), the events (one stream
-- entry whose field `o` holds the packed events, one per line, and whose field
-- `q` is the call's sequence "E:S").
--
-- Runs after the prelude lua/lib/seq.lua (joined by src/engine/scripts.rs),
-- which defines check_seq() and next_seq().

-- Numbers handed to redis.call are written as strings: a Lua number would be converted
-- with the C library's float formatting, which costs microseconds for a 13-digit
-- millisecond timestamp (measured: over half of this script's time).
local function int(n)
  return string.format("%d", n)
end

local n = (#KEYS - 3) / 4
if n < 1 or n ~= math.floor(n) then error("reserve.lua: expected 3 + 4N KEYS, got " .. #KEYS) end
if #ARGV ~= 4 + 5 * n then error("reserve.lua: expected 4 + 5N ARGV for N = " .. n .. ", got " .. #ARGV) end

local timeout_ms = assert(tonumber(ARGV[1]), "reserve.lua: payment_timeout_ms is not a number")
local idem_ttl_s = assert(tonumber(ARGV[2]), "reserve.lua: idem_ttl_s is not a number")

local now
if ARGV[3] == "" then
  local t = redis.call("TIME")
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
else
  now = math.floor(assert(tonumber(ARGV[3]), "reserve.lua: now_ms is not a number"))
end
local now_s, pay_before = int(now), now + timeout_ms
local pay_before_s = int(pay_before)

local epoch, fenced, all_paused = check_seq(KEYS[3], ARGV[4])
if fenced then
  return fenced
end

-- The order named `id` as a duplicate reply of a request for `user_id` and
-- `item_id`; its hash key is `order_key` with its last `#order_id` characters
-- swapped for `id` (same prefix, so same slot).
local function duplicate(order_key, order_id, id, user_id, item_id)
  local key = string.sub(order_key, 1, #order_key - #order_id) .. id
  local o = redis.call("HMGET", key, "qty", "status", "created_ms", "pay_before_ms", "user_id", "item_id")
  if not o[2] then
    return {"duplicate", id, 0, "", 0, 0}
  end
  assert(o[5] == user_id and o[6] == item_id, "reserve.lua: order " .. id .. " belongs to another user or item")
  return {"duplicate", id, tonumber(o[1]), o[2], tonumber(o[3]), tonumber(o[4])}
end

-- What the batch writes once, at its end (`flush`), instead of once per request:
-- the items' counters (read once per item, kept here as the requests change them),
-- the deadlines (one ZADD) and the events (one stream entry).
local items, dirty = {}, {}
local deadlines, events = {}, {}

-- The item at `item_key` as this batch sees it, or false when there is none.
local function item_of(item_key)
  local it = items[item_key]
  if it == nil then
    local h = redis.call("HMGET", item_key, "stock", "per_user_limit", "starts_ms", "ends_ms", "reserved", "paused",
      "price_cents")
    if h[1] then
      it = {stock = tonumber(h[1]), limit = tonumber(h[2]), starts_ms = tonumber(h[3]), ends_ms = tonumber(h[4]),
        reserved = tonumber(h[5] or "0"), paused = h[6] == "1", price_s = h[7] or ""}
    else
      it = false
    end
    items[item_key] = it
  end
  return it
end

local function flush()
  for _, item_key in ipairs(dirty) do
    local it = items[item_key]
    redis.call("HSET", item_key, "stock", int(it.stock), "reserved", int(it.reserved))
  end
  if #deadlines > 0 then
    redis.call("ZADD", KEYS[1], unpack(deadlines))
  end
  if #events > 0 then
    -- One entry for the batch: its field `o` holds the packed events, one per line.
    redis.call("XADD", KEYS[2], "*", "o", table.concat(events, "\n"), "q", next_seq(KEYS[3], epoch))
  end
end

-- One request: its keys are KEYS[kb + 1..4] (item, buyers, order, idem), its
-- arguments ARGV[ab + 1..5].
local function reserve(kb, ab)
  local item_key, buyers_key, order_key, idem_key_name = KEYS[kb + 1], KEYS[kb + 2], KEYS[kb + 3], KEYS[kb + 4]
  local item_id, user_id, order_id, idem_key = ARGV[ab + 1], ARGV[ab + 2], ARGV[ab + 4], ARGV[ab + 5]
  local qty = tonumber(ARGV[ab + 3])
  assert(string.sub(order_key, -#order_id) == order_id, "reserve.lua: the order key does not end with order_id")

  -- Checks.
  if idem_key ~= "" then
    local existing = redis.call("GET", idem_key_name)
    if existing then
      return duplicate(order_key, order_id, existing, user_id, item_id)
    end
  end
  if redis.call("EXISTS", order_key) == 1 then
    return duplicate(order_key, order_id, order_id, user_id, item_id)
  end
  local item = item_of(item_key)
  if not item then
    return {"unknown_item"}
  end
  if all_paused or item.paused then
    return {"paused"}
  end
  local limit = item.limit
  if now < item.starts_ms then
    return {"not_started", item.starts_ms}
  end
  if now >= item.ends_ms then
    return {"ended", item.ends_ms}
  end
  if not qty or qty ~= math.floor(qty) or qty < 1 or qty > limit then
    return {"bad_qty", limit}
  end
  local qty_s = int(qty)
  if item.stock < qty then
    local held = tonumber(redis.call("HGET", buyers_key, user_id) or "0")
    if held + qty > limit then
      return {"limit_reached", held, limit}
    end
    return {"sold_out", item.stock}
  end
  -- The user's first units of the item (the common case) take one call: the check
  -- (held 0, and qty <= limit above) and the write.
  if redis.call("HSETNX", buyers_key, user_id, qty_s) == 0 then
    local held = tonumber(redis.call("HGET", buyers_key, user_id) or "0")
    if held + qty > limit then
      return {"limit_reached", held, limit}
    end
    redis.call("HINCRBY", buyers_key, user_id, qty_s)
  end

  -- Writes.
  if idem_key ~= "" then
    redis.call("HSET", order_key, "item_id", item_id, "user_id", user_id, "qty", qty_s, "status", "reserved",
      "created_ms", now_s, "pay_before_ms", pay_before_s, "price_cents", item.price_s, "idem_key", idem_key)
    redis.call("SET", idem_key_name, order_id, "EX", int(idem_ttl_s))
  else
    redis.call("HSET", order_key, "item_id", item_id, "user_id", user_id, "qty", qty_s, "status", "reserved",
      "created_ms", now_s, "pay_before_ms", pay_before_s, "price_cents", item.price_s)
  end
  if not item.dirty then
    item.dirty = true
    dirty[#dirty + 1] = item_key
  end
  item.stock = item.stock - qty
  item.reserved = item.reserved + qty
  deadlines[#deadlines + 1] = pay_before_s
  deadlines[#deadlines + 1] = order_id .. "|" .. item_id
  -- The packed event: status|order_id|item_id|user_id|qty|at_ms|created_ms|pay_before_ms|idem_key|
  -- price_cents|refund_of (empty: not a refund)
  events[#events + 1] = table.concat({"reserved", order_id, item_id, user_id, qty_s, now_s, now_s, pay_before_s,
    idem_key, item.price_s, ""}, "|")
  return {"ok", order_id, now, pay_before, item.stock}
end

-- The batch's shared writes happen even when a request raises an error (a bug: an
-- order of another user under an idempotency key): what the requests before it
-- wrote (their buyers and orders) is never left without its stock, deadline and event.
local replies = {}
local ok, err = pcall(function()
  for i = 1, n do
    replies[i] = reserve(3 + 4 * (i - 1), 4 + 5 * (i - 1))
  end
end)
flush()
if not ok then
  error(err)
end
return replies
