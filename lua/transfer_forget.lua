-- Forget a transfer record (issue 13: stock buckets): on the donor (its `xout`
-- hash) once the destination has credited the transfer; on the destination (its
-- `xin` hash) once the donor has forgotten it. In that order the donor's record
-- always outlives the destination's, so a replay of transfer_in.lua can only
-- happen while the destination still remembers the id: never a second credit.
-- Changes no stock, writes no event. Interface: docs/internals.md, "Stock buckets".
--
-- ``KEYS``: 1. [hash] sk:T:xout:<bucket> or sk:T:xin:<bucket>
-- ``ARGV``: 1. [string] transfer id
--
-- Reply: {"forgotten", 1} removed, {"forgotten", 0} there was no such record.

assert(#KEYS == 1, "transfer_forget.lua: expected 1 KEYS, got " .. #KEYS)
assert(#ARGV == 1, "transfer_forget.lua: expected 1 ARGV, got " .. #ARGV)
return {"forgotten", redis.call("HDEL", KEYS[1], ARGV[1])}
