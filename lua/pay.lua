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
--  6. [hash]   sk:T:seq        the shard's write sequence (lua/lib/seq.lua)
--
-- ``ARGV``:
--  1. [string] order_id
--  2. [string] user_id (the caller; must own the order)
--  3. [string] item_id (must be the order's item: KEYS 2-3 are built from it)
--  4. [int]    closed_ttl_s (TTL given to the order hash once final)
--  5. [int]    now_ms, "" = use Redis TIME
--  6. [string] floor "E:S", "" = none (lua/lib/seq.lua)
--
-- An error reply `FENCED <why>` when the shard is fenced or behind the floor
-- (lua/lib/seq.lua): nothing changed. Else replies (`unknown_order`, `forbidden`, `already` and `closed` without the
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
--
-- Runs after the preludes lua/lib/seq.lua and lua/lib/order.lua (joined by
-- src/engine/scripts.rs), which define the sequence check, int(), order_call(),
-- the order loading and checks, and the writes that close an order and give
-- its stock back.

assert(#KEYS == 6, "pay.lua: expected 6 KEYS, got " .. #KEYS)
assert(#ARGV == 6, "pay.lua: expected 6 ARGV, got " .. #ARGV)

local c, fenced = order_call("pay.lua", ARGV[1], ARGV[3], ARGV[4], ARGV[5], ARGV[6])
if fenced then return fenced end

-- Checks (ARGV[2] is the caller), and the expiry of an order past its deadline.
local o, refused = open_order_of(c, ARGV[2], "paid")
if refused then return refused end

-- Writes: the units move from `reserved` to `paid`; stock does not change.
return {"ok", "paid", pay_order(c, o)}
