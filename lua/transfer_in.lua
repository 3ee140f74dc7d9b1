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
--  6. [string] the donor step's mark "E:S" (transfer_out.lua's reply), "" = not
--              known (a record written before marks were carried)
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
-- field `q` = the call's sequence "E:S", and field `d` = the donor step's mark when
-- known: the persistence worker records it as the donor shard's mark, so a Redis that
-- lost the donor's step (and its event) is found behind the database and rebuilt,
-- never left holding units the destination was credited with.
--
-- Runs after the prelude lua/lib/seq.lua.

assert(#KEYS == 4, "transfer_in.lua: expected 4 KEYS, got " .. #KEYS)
assert(#ARGV == 6, "transfer_in.lua: expected 6 ARGV, got " .. #ARGV)

local id, from = ARGV[1], ARGV[3]
local units = tonumber(ARGV[2])
assert(units and units >= 1 and units == math.floor(units), "transfer_in.lua: units is not an integer >= 1")
local now = tonumber(ARGV[4])
assert(now and now == math.floor(now), "transfer_in.lua: now_ms is not an integer")
assert(id ~= "" and not string.find(id, "|", 1, true), "transfer_in.lua: bad transfer id")
assert(from ~= "" and not string.find(from, "|", 1, true), "transfer_in.lua: bad donor")
local donor_mark = ARGV[6]
assert(donor_mark == "" or string.match(donor_mark, "^%d+:%d+$"), "transfer_in.lua: the donor's mark is not E:S")

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
local entry = {"x", "in|" .. id .. "|" .. bucket .. "|" .. from .. "|" .. units .. "|" .. at,
  "q", next_seq(KEYS[4], epoch)}
if donor_mark ~= "" then
  entry[#entry + 1] = "d"
  entry[#entry + 1] = donor_mark
end
redis.call("XADD", KEYS[3], "*", unpack(entry))
return {"credited", stock}
