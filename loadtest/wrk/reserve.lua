-- wrk: POST /api/v1/items/ITEM/reserve {"qty":QTY} (QTY from the environment, default 1)
-- with X-User-Id drawn among USERS.
--   wrk -t1 -c256 -d10s --latency -s loadtest/wrk/reserve.lua http://127.0.0.1:PORT -- ITEM USERS
-- USERS = 0: every request is a new user (the pure reserve path on a big-stock item).
-- ITEM = a,b,c: a multi-item sale, the items in turn; 200s also counted per item (ok:<id>).
-- Prints a status histogram and a WRK_JSON line (see common.lua).
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
package.path = dir .. "?.lua;" .. package.path
require("common").reserve_requests("demo", false)
