-- Take up to `want` units out of a stock bucket, for a named transfer to another
-- bucket of the same item (issue 13: stock buckets). The first of a transfer's
-- two steps; transfer_in.lua on the destination's slot is the second. Between
-- them the units are "in transit": recorded here, in the bucket's `xout` hash,
-- until transfer_forget.lua drops the record once the destination holds them.
-- Interface: docs/internals.md, "Stock buckets".
--
-- ``KEYS`` (one slot: the donor bucket's shard):
--  1. [hash]   sk:T:item:<bucket>        the donor bucket (stock and counters)
--  2. [hash]   sk:T:xout:<bucket>        transfer id -> "<units>|<to bucket>|<at_ms>|<E:S>"
--                                        (E:S: the mark of this step's event; records
--                                        written before it existed have three parts)
--  3. [stream] sk:T:events               the shard's events
--  4. [hash]   sk:T:seq                  the shard's write sequence (lua/lib/seq.lua)
--
-- ``ARGV``:
--  1. [string] transfer id (unique; a replay with the same id changes nothing)
--  2. [int]    want, >= 1
--  3. [string] the destination bucket's id
--  4. [int]    now_ms
--  5. [string] floor "E:S", "" = none (lua/lib/seq.lua)
--
-- An error reply `FENCED <why>` when the shard is fenced or behind the floor.
-- Else, checks in this order; a refusal changes nothing:
--  * {"taken", units, stock, mark}  the id was taken before (a replay): as recorded
--                                (mark "" for a record without one)
--  * {"unknown_item"}
--  * {"empty", in_transit}       no stock here; `in_transit` = transfers out of
--                                this bucket not yet forgotten (units may be on
--                                their way to another bucket)
--  * {"taken", units, stock_after, mark}  units = min(want, stock): stock and
--                                stock_total (the bucket's share) -= units, the
--                                record written, a transfer event added; `mark` is
--                                the event's "E:S", which the credit carries to the
--                                destination's event (so the database learns how far
--                                this shard got even if this event is lost with Redis)
--
-- The event: one stream entry, field `x` = "out|<id>|<bucket>|<to>|<units>|<at_ms>"
-- and field `q` = the call's sequence "E:S".
--
-- Runs after the prelude lua/lib/seq.lua.

assert(#KEYS == 4, "transfer_out.lua: expected 4 KEYS, got " .. #KEYS)
assert(#ARGV == 5, "transfer_out.lua: expected 5 ARGV, got " .. #ARGV)

local id, dest = ARGV[1], ARGV[3]
local want = tonumber(ARGV[2])
assert(want and want >= 1 and want == math.floor(want), "transfer_out.lua: want is not an integer >= 1")
local now = tonumber(ARGV[4])
assert(now and now == math.floor(now), "transfer_out.lua: now_ms is not an integer")
assert(id ~= "" and not string.find(id, "|", 1, true), "transfer_out.lua: bad transfer id")
assert(dest ~= "" and not string.find(dest, "|", 1, true), "transfer_out.lua: bad destination")

local epoch, fenced = check_seq(KEYS[4], ARGV[5])
if fenced then
  return fenced
end

local done = redis.call("HGET", KEYS[2], id)
if done then
  local units = tonumber(string.match(done, "^(%d+)|"))
  local mark = string.match(done, "^%d+|[^|]*|%d+|(%d+:%d+)$") or ""
  return {"taken", units, tonumber(redis.call("HGET", KEYS[1], "stock") or "0"), mark}
end

local stock = redis.call("HGET", KEYS[1], "stock")
if not stock then
  return {"unknown_item"}
end
stock = tonumber(stock)
if stock <= 0 then
  return {"empty", redis.call("HLEN", KEYS[2])}
end

local units = math.min(want, stock)
local bucket = string.match(KEYS[1], "^sk:{[^}]*}:item:(.*)$")
local at = string.format("%d", now)
local mark = next_seq(KEYS[4], epoch)
redis.call("HINCRBY", KEYS[1], "stock", -units)
redis.call("HINCRBY", KEYS[1], "stock_total", -units)
redis.call("HSET", KEYS[2], id, units .. "|" .. dest .. "|" .. at .. "|" .. mark)
redis.call("XADD", KEYS[3], "*",
  "x", "out|" .. id .. "|" .. bucket .. "|" .. dest .. "|" .. units .. "|" .. at,
  "q", mark)
return {"taken", units, stock - units, mark}
