-- Shared helpers for the wrk scripts in this folder (loaded with require).
--
-- wrk runs one Lua state per thread plus one for setup()/done(). Each thread counts the
-- answers it got in its own globals; done() reads them with thread:get() (wrk's documented
-- way) and prints a histogram, then one machine-readable line:
--   WRK_JSON {"requests":..,"duration_us":..,"rps":..,"latency_us":{..},"errors":{..},
--             "statuses":{"200":..},"outcomes":{..}}
-- which loadtest/run parses. Every figure in it comes from wrk's own counters.
--
-- Script arguments (after `--`): ITEM USERS [more]. ITEM may be a list, `a,b,c` (reserve.lua,
-- sold_out.lua: a multi-item sale, the items in turn). USERS = N draws user ids u1..uN at
-- random; USERS = 0 gives every request a user never seen before (per run).
-- Environment: QTY (default 1), the units every reservation asks for: {"qty":QTY}
-- (loadtest/run --qty N sets it).

local M = {}

local threads = {}

-- Called in the setup state, once per thread, before the threads start (and before their
-- init()). Hands every thread an id and a per-run nonce for unique user ids. WRK_ID (set by
-- loadtest/run when several wrk run side by side, one per gateway) is part of the nonce:
-- started in the same second, they would otherwise send the same user ids.
function M.setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
  local nonce = string.format("%x", os.time() % 0xffffff)
  if os.getenv("WRK_ID") then nonce = nonce .. "w" .. os.getenv("WRK_ID") end
  thread:set("run_nonce", nonce)
end

-- Parse `-- ITEM USERS ...` (with env fallbacks ITEM/USERS) in the thread state.
function M.args(args, default_item)
  local item = args[1] or os.getenv("ITEM") or default_item or "demo"
  local users = tonumber(args[2] or os.getenv("USERS") or "100000") or 100000
  -- Distinct seed per thread so threads do not draw the same user sequence.
  math.randomseed(os.time() * 1000 + (tid or 0) * 7919 + math.floor(os.clock() * 1e6))
  statuses = {}
  outcomes = {}
  return item, users
end

-- The reserve request's body: {"qty":N} with N from the QTY environment variable (1).
function M.reserve_body()
  local qty = tonumber(os.getenv("QTY") or "1")
  if not qty or qty < 1 or qty ~= math.floor(qty) then
    error("QTY must be a whole number >= 1, got " .. tostring(os.getenv("QTY")))
  end
  return string.format('{"qty":%d}', qty)
end

local counter = 0
-- A user id: random among u1..uN, or never seen before when users == 0.
function M.user(users)
  if users > 0 then
    return "u" .. math.random(users)
  end
  counter = counter + 1
  return "r" .. (run_nonce or "0") .. "t" .. (tid or 0) .. "n" .. counter
end

-- A request template made with wrk.format, split around the user id so that request()
-- only concatenates three strings (building a whole request per call is expensive, see
-- wrk's SCRIPTING). Returns a function uid -> request string.
function M.template(method, path, body)
  local mark = "\1UID\1"
  local headers = { ["X-User-Id"] = mark }
  if body then headers["Content-Type"] = "application/json" end
  local s = wrk.format(method, path, headers, body)
  local i, j = string.find(s, mark, 1, true)
  local pre, post = string.sub(s, 1, i - 1), string.sub(s, j + 1)
  return function(uid) return pre .. uid .. post end
end

function M.count_status(status)
  statuses[status] = (statuses[status] or 0) + 1
end

function M.count_outcome(name)
  outcomes[name] = (outcomes[name] or 0) + 1
end

-- The refusal code of an error body, or nil.
function M.error_code(body)
  return body and string.match(body, '"error"%s*:%s*"([^"]*)"')
end

local function json_obj(t)
  local keys = {}
  for k in pairs(t) do keys[#keys + 1] = tostring(k) end
  table.sort(keys)
  local parts = {}
  for _, k in ipairs(keys) do
    local v = t[k]
    if v == nil then v = t[tonumber(k)] end
    parts[#parts + 1] = string.format('"%s":%s', k, tostring(v))
  end
  return "{" .. table.concat(parts, ",") .. "}"
end

local function merge(into, from)
  for k, v in pairs(from or {}) do
    local key = tostring(k)
    into[key] = (into[key] or 0) + v
  end
end

function M.done(summary, latency, requests)
  local statuses_all, outcomes_all = {}, {}
  for _, thread in ipairs(threads) do
    merge(statuses_all, thread:get("statuses"))
    merge(outcomes_all, thread:get("outcomes"))
  end
  local secs = summary.duration / 1e6
  local rps = secs > 0 and summary.requests / secs or 0

  io.write("------------------------------\n")
  io.write("status histogram (all threads):\n")
  local keys = {}
  for k in pairs(statuses_all) do keys[#keys + 1] = k end
  table.sort(keys)
  local counted = 0
  for _, k in ipairs(keys) do
    io.write(string.format("  %s  %d\n", k, statuses_all[k]))
    counted = counted + statuses_all[k]
  end
  local okeys = {}
  for k in pairs(outcomes_all) do okeys[#okeys + 1] = k end
  if #okeys > 0 then
    table.sort(okeys)
    io.write("outcomes:\n")
    for _, k in ipairs(okeys) do io.write(string.format("  %-16s %d\n", k, outcomes_all[k])) end
  end
  local e = summary.errors
  io.write(string.format(
    "requests %d in %.2fs = %.0f req/s; counted answers %d; socket errors connect %d read %d write %d timeout %d\n",
    summary.requests, secs, rps, counted, e.connect, e.read, e.write, e.timeout))

  local lat = {
    mean = string.format("%.1f", latency.mean),
    max = latency.max,
    p50 = latency:percentile(50.0),
    p90 = latency:percentile(90.0),
    p95 = latency:percentile(95.0),
    p99 = latency:percentile(99.0),
    p999 = latency:percentile(99.9),
  }
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"rps":%.1f,"bytes":%d,"latency_us":%s,"errors":%s,"statuses":%s,"outcomes":%s}\n',
    summary.requests, summary.duration, rps, summary.bytes, json_obj(lat),
    json_obj({ connect = e.connect, read = e.read, write = e.write, status = e.status, timeout = e.timeout }),
    json_obj(statuses_all), json_obj(outcomes_all)))
end

-- The reserve request, as reserve.lua and sold_out.lua send it: POST
-- /api/v1/items/ITEM/reserve {"qty":QTY} with X-User-Id drawn among USERS. Installs wrk's
-- globals (setup, init, request, response, done). `default_item` when no ITEM is given;
-- `count_outcomes`: also count each refusal's error code (so a 410 `ended` is not taken
-- for a 410 `sold_out`).
-- ITEM may be a comma-separated list (a multi-item sale): each request goes to the next item
-- in turn, and each 200 is also counted as outcome `ok:<item_id>` from its body (wrk does not
-- tell response() which request an answer belongs to), so the checks can run per item. One
-- item: no body is read, as before.
function M.reserve_requests(default_item, count_outcomes)
  local users, makes, next_item, per_item
  setup = M.setup
  done = M.done
  init = function(args)
    local items
    items, users = M.args(args, default_item)
    makes = {}
    for item in string.gmatch(items, "[^,]+") do
      makes[#makes + 1] = M.template("POST", "/api/v1/items/" .. item .. "/reserve", M.reserve_body())
    end
    next_item = 0
    per_item = #makes > 1
  end
  request = function()
    next_item = next_item % #makes + 1
    return makes[next_item](M.user(users))
  end
  response = function(status, headers, body)
    M.count_status(status)
    if per_item and status == 200 then
      local item = body and string.match(body, '"item_id"%s*:%s*"([^"]*)"')
      if item then M.count_outcome("ok:" .. item) end
    end
    if count_outcomes and status ~= 200 then
      M.count_outcome(M.error_code(body) or ("http_" .. status))
    end
  end
end

return M
