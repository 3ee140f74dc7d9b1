-- Prelude of pay.lua, cancel.lua and expire.lua: src/engine/scripts.rs joins it
-- in front of each of them at build time (a script run with EVALSHA cannot load
-- another one). It only defines functions: nothing runs and no key is read
-- before the script's own argument-count asserts. Interfaces: docs/internals.md.
--
-- The three scripts share their KEYS (all in the item's slot `{s<N>}`):
--  1. [hash]   sk:T:order:<order_id>
--  2. [hash]   sk:T:item:<item>
--  3. [hash]   sk:T:buyers:<item>
--  4. [zset]   sk:T:deadlines
--  5. [stream] sk:T:events
--  6. [hash]   sk:T:seq        the shard's write sequence (lua/lib/seq.lua)
-- A failed check changes nothing; the writes below run only after every check.
-- The prelude lua/lib/seq.lua comes before this one.

-- Integers handed to redis.call go as strings (see reserve.lua: a Lua number is
-- converted with slow float formatting).
local function int(n)
  return string.format("%d", n)
end

-- The call: the script's name (for its errors), the order and item ids, the
-- TTL of a closed order and `now` in ms (`now_ms` "" = Redis TIME); and the
-- shard's epoch, or nil and the `FENCED` error reply to answer (`floor`: see
-- lua/lib/seq.lua).
local function order_call(script, order_id, item_id, closed_ttl_s, now_ms, floor)
  local epoch, fenced = check_seq(KEYS[6], floor)
  if fenced then
    return nil, fenced
  end
  local c = {script = script, order_id = order_id, item_id = item_id,
    member = order_id .. "|" .. item_id, epoch = epoch}
  c.closed_ttl_s = assert(tonumber(closed_ttl_s), script .. ": closed_ttl_s is not a number")
  if now_ms ~= "" then
    c.now = math.floor(assert(tonumber(now_ms), script .. ": now_ms is not a number"))
  else
    local t = redis.call("TIME")
    c.now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return c
end

-- The order hash KEYS[1] (fields as stored, `qty_s` is `qty`), or nil.
local function load_order()
  local o = redis.call("HMGET", KEYS[1], "user_id", "item_id", "qty", "status",
    "created_ms", "pay_before_ms", "idem_key", "price_cents", "refund_of")
  if not o[4] then
    return nil
  end
  -- reserve.lua writes `idem_key` only when there is one; `price_cents` is absent in
  -- orders made before prices were kept, `refund_of` until a refund (refund.lua).
  return {user_id = o[1], item_id = o[2], qty_s = o[3], status = o[4],
    created_ms = o[5], pay_before_ms = o[6], idem_key = o[7] or "", price_s = o[8] or "",
    refund_of = o[9] or ""}
end

-- Splits the text `s` at every `|` (empty parts kept).
local function split_bars(s)
  local parts, i = {}, 1
  while true do
    local j = string.find(s, "|", i, true)
    if not j then
      parts[#parts + 1] = string.sub(s, i)
      return parts
    end
    parts[#parts + 1] = string.sub(s, i, j - 1)
    i = j + 1
  end
end

-- The order hash KEYS[1] as load_order() reads it; when there is none and the
-- caller passed the database's record of the order (`record`, non-empty: a closed
-- order whose hash outlived its TTL, packed as an event: status|order_id|item_id|
-- user_id|qty|updated_ms|created_ms|pay_before_ms|idem_key|price_cents|refund_of),
-- the hash is written back from it first, with the closed TTL. Its effects on the
-- item's counters and buyers are already there: only the hash comes back. Only a
-- closed order is restored (an open one missing from Redis is a state loss:
-- lua/lib/seq.lua, the gateway fences its shard instead).
local function load_or_restore(c, record)
  local o = load_order()
  if o or record == "" then
    return o
  end
  local r = split_bars(record)
  assert(#r == 11, c.script .. ": the order record has " .. #r .. " parts, not 11")
  assert(r[2] == c.order_id and r[3] == c.item_id, c.script .. ": the record is of another order or item")
  assert(r[1] ~= "reserved", c.script .. ": an open order is never restored from a record")
  local fields = {"item_id", r[3], "user_id", r[4], "qty", r[5], "status", r[1], "updated_ms", r[6],
    "created_ms", r[7], "pay_before_ms", r[8]}
  for i, name in ipairs({"idem_key", "price_cents", "refund_of"}) do
    if r[8 + i] ~= "" then
      fields[#fields + 1] = name
      fields[#fields + 1] = r[8 + i]
    end
  end
  redis.call("HSET", KEYS[1], unpack(fields))
  redis.call("EXPIRE", KEYS[1], int(c.closed_ttl_s))
  return load_order()
end

-- Asserts the order is of the call's item (KEYS 2-3 are built from it), then
-- reads the numbers the checks and writes use.
local function check_item(c, o)
  assert(o.item_id == c.item_id, c.script .. ": order " .. c.order_id .. " is not of item " .. c.item_id)
  o.pay_before, o.neg_qty_s = tonumber(o.pay_before_ms), int(-tonumber(o.qty_s))
end

-- Returns the order's units: stock += qty, reserved -= qty, `counter` += qty,
-- buyers[user] -= qty (deleted at 0). Answers the stock after.
local function give_back(o, counter)
  local stock_after = redis.call("HINCRBY", KEYS[2], "stock", o.qty_s)
  redis.call("HINCRBY", KEYS[2], "reserved", o.neg_qty_s)
  redis.call("HINCRBY", KEYS[2], counter, o.qty_s)
  if redis.call("HINCRBY", KEYS[3], o.user_id, o.neg_qty_s) <= 0 then
    redis.call("HDEL", KEYS[3], o.user_id)
  end
  return stock_after
end

-- Makes the order `final`: status and updated_ms set (and `refund_of` when given:
-- refund.lua), order TTL set, deadline member removed, `final` event XADDed (the
-- whole order, as every event, packed into one field `o` as reserve.lua writes it;
-- `q` the call's sequence).
local function close_order(c, o, final, refund_of)
  local now_s = int(c.now)
  if refund_of then
    o.refund_of = refund_of
    redis.call("HSET", KEYS[1], "status", final, "updated_ms", now_s, "refund_of", refund_of)
  else
    redis.call("HSET", KEYS[1], "status", final, "updated_ms", now_s)
  end
  redis.call("EXPIRE", KEYS[1], int(c.closed_ttl_s))
  redis.call("ZREM", KEYS[4], c.member)
  redis.call("XADD", KEYS[5], "*", "o", table.concat({final, c.order_id, c.item_id, o.user_id, o.qty_s,
    now_s, o.created_ms, o.pay_before_ms, o.idem_key, o.price_s, o.refund_of}, "|"), "q", next_seq(KEYS[6], c.epoch))
end

-- Pays a reserved order: its units move from `reserved` to `paid` (stock does not
-- change) and it closes as `paid`. Answers the stock.
local function pay_order(c, o)
  redis.call("HINCRBY", KEYS[2], "reserved", o.neg_qty_s)
  redis.call("HINCRBY", KEYS[2], "paid", o.qty_s)
  close_order(c, o, "paid")
  return tonumber(redis.call("HGET", KEYS[2], "stock"))
end

-- Expires a reserved order: its stock and quota come back, exactly once.
-- Answers the stock after.
local function expire_order(c, o)
  local stock_after = give_back(o, "expired")
  close_order(c, o, "expired")
  return stock_after
end

-- The checks of pay.lua and cancel.lua, in their order, for `user_id` moving the
-- order to `target`: returns the reserved order, or nil and the reply. A reserved
-- order whose deadline has passed is expired here instead, as expire.lua would,
-- and answered {"closed", "expired"}.
local function open_order_of(c, user_id, target)
  local o = load_order()
  if not o then
    return nil, {"unknown_order"}
  end
  if o.user_id ~= user_id then
    return nil, {"forbidden"}
  end
  check_item(c, o)
  if o.status == target then
    return nil, {"already", target}
  end
  if o.status ~= "reserved" then
    return nil, {"closed", o.status}
  end
  if o.pay_before <= c.now then
    expire_order(c, o)
    return nil, {"closed", "expired"}
  end
  return o
end
