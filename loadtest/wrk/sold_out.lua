-- wrk: the sold-out path. Same request shape as reserve.lua, aimed at an item whose stock
-- is gone, so every answer should be 410 sold_out (from the gateway's local flag).
--   wrk -t1 -c256 -d10s --latency -s loadtest/wrk/sold_out.lua http://127.0.0.1:PORT -- ITEM USERS
-- Counts statuses and, for non-200 answers, the error code (so a 410 `ended` is not taken
-- for a 410 `sold_out`).
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
package.path = dir .. "?.lua;" .. package.path
local common = require("common")

setup = common.setup
done = common.done

local users, make

function init(args)
  local item
  item, users = common.args(args, "sold-out")
  make = common.template("POST", "/api/v1/items/" .. item .. "/reserve", common.reserve_body())
end

function request()
  return make(common.user(users))
end

function response(status, headers, body)
  common.count_status(status)
  if status ~= 200 then
    common.count_outcome(common.error_code(body) or ("http_" .. status))
  end
end
