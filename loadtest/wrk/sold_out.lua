-- wrk: the sold-out path. Same request shape as reserve.lua, aimed at an item whose stock
-- is gone, so every answer should be 410 sold_out (from the gateway's local flag).
--   wrk -t1 -c256 -d10s --latency -s loadtest/wrk/sold_out.lua http://127.0.0.1:PORT -- ITEM USERS
-- Counts statuses and, for non-200 answers, the error code (so a 410 `ended` is not taken
-- for a 410 `sold_out`).
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
package.path = dir .. "?.lua;" .. package.path
require("common").reserve_requests("sold-out", true)
