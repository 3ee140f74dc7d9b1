-- Credit a transfer's units to its destination bucket, once (issue 13: stock
-- buckets). The second of a transfer's two steps, after transfer_out.lua on the
-- donor's slot; replayed by whoever finds the donor's record still there (the
-- gateway that started it, or any gateway's recovery after it died), so the
-- transfer id is recorded here and a second credit changes nothing.
-- Interface: docs/internals.md, "Stock buckets".
--
-- ``KEYS`` (one slot: the destination bucket's shard):
--  1. [hash]   sk:T:item:<bucket>        the destination bucket
--  2. [hash]   sk:T:xin:<bucket>         transfer id -> "<units>|<from bucket>|<at_ms>"
--  3. [stream] sk:T:events               the shard's events
--  4. [hash]   sk:T:seq                  the shard's write sequence (lua/lib/seq.lua)
--
-- ``ARGV``:
--  1. [string] transfer id
--  2. [int]    units, >= 1 (what transfer_out.lua took)
--  3. [string] the donor bucket's id
--  4. [int]    now_ms
--  5. [string] floor "E:S", "" = none (lua/lib/seq.lua)
--
-- An error reply `FENCED <why>` when the shard is fenced or behind the floor.
-- Else:
--  * {"already", stock}          credited before: nothing changed
--  * {"unknown_item"}            no such bucket: nothing changed (the units stay
--                                in transit, recorded at the donor)
--  * {"credited", stock_after}   stock and stock_total += units, the id
--                                recorded, a transfer event added
--
-- The event: one stream entry, field `x` = "in|<id>|<bucket>|<from>|<units>|<at_ms>"
-- and field `q` = the call's sequence "E:S".
--
-- Runs after the prelude lua/lib/seq.lua.

assert(#KEYS == 4, "transfer_in.lua: expected 4 KEYS, got " .. #KEYS)
assert(#ARGV == 5, "transfer_in.lua: expected 5 ARGV, got " .. #ARGV)

local id, from = ARGV[1], ARGV[3]
local units = tonumber(ARGV[2])
assert(units and units >= 1 and units == math.floor(units), "transfer_in.lua: units is not an integer >= 1")
local now = tonumber(ARGV[4])
assert(now and now == math.floor(now), "transfer_in.lua: now_ms is not an integer")
assert(id ~= "" and not string.find(id, "|", 1, true), "transfer_in.lua: bad transfer id")
assert(from ~= "" and not string.find(from, "|", 1, true), "transfer_in.lua: bad donor")

local epoch, fenced = check_seq(KEYS[4], ARGV[5])
if fenced then
  return fenced
end

if redis.call("HEXISTS", KEYS[2], id) == 1 then
  return {"already", tonumber(redis.call("HGET", KEYS[1], "stock") or "0")}
end
if redis.call("EXISTS", KEYS[1]) == 0 then
  return {"unknown_item"}
end

local bucket = string.match(KEYS[1], "^sk:{[^}]*}:item:(.*)$")
local at = string.format("%d", now)
local stock = redis.call("HINCRBY", KEYS[1], "stock", units)
redis.call("HINCRBY", KEYS[1], "stock_total", units)
redis.call("HSET", KEYS[2], id, units .. "|" .. from .. "|" .. at)
redis.call("XADD", KEYS[3], "*",
  "x", "in|" .. id .. "|" .. bucket .. "|" .. from .. "|" .. units .. "|" .. at,
  "q", next_seq(KEYS[4], epoch))
return {"credited", stock}
