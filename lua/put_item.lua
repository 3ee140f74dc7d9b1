-- Create or replace a sale item. A replacement keeps the units held by open
-- and paid orders: stock = stock_total - reserved - paid, and the counters
-- (reserved, paid, cancelled, expired) are kept. Interface:
-- docs/internals.md, "put_item.lua".
--
-- ``KEYS``:
--  1. [hash] sk:T:item:<item>
--
-- ``ARGV``:
--  1. [string] item_id (KEYS[1] ends with it)
--  2. [string] name
--  3. [int]    price_cents
--  4. [int]    stock_total (>= 0)
--  5. [int]    per_user_limit (>= 1)
--  6. [int]    starts_ms
--  7. [int]    ends_ms
--  8. [int]    buckets, optional (absent = 1): the item's stock buckets
--              (docs/internals.md, "Stock buckets"), kept in the hash
--
-- Replies:
--  * {"ok", stock}          written: new item, stock = stock_total; or
--                           replaced, stock = stock_total - reserved - paid
--  * {"below_held", held}   stock_total < reserved + paid: nothing changed

assert(#KEYS == 1, "put_item.lua: expected 1 KEYS, got " .. #KEYS)
assert(#ARGV == 7 or #ARGV == 8, "put_item.lua: expected 7 or 8 ARGV, got " .. #ARGV)

local function int(i, what)
  local n = tonumber(ARGV[i])
  assert(n and n == math.floor(n), "put_item.lua: " .. what .. " is not an integer")
  return n
end

local item_id, name = ARGV[1], ARGV[2]
local price_cents, stock_total = int(3, "price_cents"), int(4, "stock_total")
local limit, starts_ms, ends_ms = int(5, "per_user_limit"), int(6, "starts_ms"), int(7, "ends_ms")
local buckets = 1
if #ARGV == 8 then
  buckets = int(8, "buckets")
end
assert(buckets >= 1, "put_item.lua: buckets < 1")
assert(string.sub(KEYS[1], -#item_id) == item_id, "put_item.lua: KEYS[1] does not end with item_id")
assert(stock_total >= 0, "put_item.lua: stock_total < 0")
assert(limit >= 1, "put_item.lua: per_user_limit < 1")

-- Checks.
local c = redis.call("HMGET", KEYS[1], "reserved", "paid")
local held = tonumber(c[1] or "0") + tonumber(c[2] or "0")
if stock_total < held then
  return {"below_held", held}
end

-- Writes. HSETNX: a new item's counters start at 0, a replaced item's stay.
local stock = stock_total - held
redis.call("HSET", KEYS[1],
  "name", name, "price_cents", price_cents, "stock_total", stock_total,
  "stock", stock, "per_user_limit", limit, "starts_ms", starts_ms,
  "ends_ms", ends_ms, "buckets", buckets)
for _, counter in ipairs({"reserved", "paid", "cancelled", "expired"}) do
  redis.call("HSETNX", KEYS[1], counter, 0)
end
return {"ok", stock}
