-- Pause or resume the sale of one engine item (an item, a stock bucket, or a
-- bucketed item's own hash): while its field `paused` is "1", reserve.lua
-- answers {"paused"} for it. Orders already made are not touched (pay, cancel
-- and expire go on). Interface: docs/internals.md, "pause.lua".
--
-- ``KEYS``:
--  1. [hash] sk:T:item:<item>
--
-- ``ARGV``:
--  1. [string] item_id (KEYS[1] ends with it)
--  2. [string] "1" pause, "0" resume
--
-- Replies:
--  * {"ok"}             done (also when it already was so)
--  * {"unknown_item"}   no such item: nothing written (a paused flag alone
--                       must never make a hash that looks like an item)

assert(#KEYS == 1, "pause.lua: expected 1 KEYS, got " .. #KEYS)
assert(#ARGV == 2, "pause.lua: expected 2 ARGV, got " .. #ARGV)
assert(string.sub(KEYS[1], -#ARGV[1]) == ARGV[1], "pause.lua: KEYS[1] does not end with item_id")
assert(ARGV[2] == "1" or ARGV[2] == "0", "pause.lua: ARGV[2] must be 1 or 0")

-- Checks.
if redis.call("EXISTS", KEYS[1]) == 0 then
  return {"unknown_item"}
end

-- Writes.
if ARGV[2] == "1" then
  redis.call("HSET", KEYS[1], "paused", "1")
else
  redis.call("HDEL", KEYS[1], "paused")
end
return {"ok"}
