-- Prelude of every script that changes stock or an order (reserve, pay, cancel,
-- expire; src/engine/scripts.rs joins it in front of them): the shard's write
-- sequence, which tells a gateway that this Redis has lost writes the database
-- already holds (docs/internals.md, "State loss"). It only defines functions.
--
-- [hash] sk:T:seq   e      epoch: raised by each repair (absent = 0)
--                   s      writes of this epoch: one per call that wrote events
--                   fence  present while the shard must not change: why, as text
--                   paused "1" while the operator has paused every sale
--                          (POST /admin/v1/pause); only reserve.lua reads it
--
-- A gateway passes a floor "E:S": the highest (epoch, seq) it knows was written
-- (carried by the persisted events). A shard below it has lost writes.

-- Refuses while the shard is fenced or behind `floor` ("" = no floor): returns
-- nil and an error reply `FENCED <why>` (a shard found behind is fenced first, so
-- every gateway refuses until the repair lifts it). Else returns the epoch, nil,
-- and whether every sale is paused (read in the same call: free for reserve.lua).
local function check_seq(seq_key, floor)
  local q = redis.call("HMGET", seq_key, "e", "s", "fence", "paused")
  if q[3] then
    return nil, redis.error_reply("FENCED " .. q[3])
  end
  local e, s = tonumber(q[1] or "0"), tonumber(q[2] or "0")
  if floor ~= "" then
    local fe, fs = string.match(floor, "^(%d+):(%d+)$")
    assert(fe, "seq: the floor is not E:S")
    fe, fs = tonumber(fe), tonumber(fs)
    if e < fe or (e == fe and s < fs) then
      local why = "shard at " .. e .. ":" .. s .. ", behind " .. floor
      redis.call("HSET", seq_key, "fence", why)
      return nil, redis.error_reply("FENCED " .. why)
    end
  end
  return e, nil, q[4] == "1"
end

-- The sequence of this call's events, "E:S" (their stream entries' field `q`):
-- the first call asks Redis, later ones (a batch) reuse it.
local seq_of_call
local function next_seq(seq_key, e)
  if not seq_of_call then
    seq_of_call = string.format("%d:%d", e, redis.call("HINCRBY", seq_key, "s", 1))
  end
  return seq_of_call
end
