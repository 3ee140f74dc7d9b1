-- wrk: a mixed shopper load on one item: browse (GET item), reserve, and now and then pay
-- an order this thread got (same X-User-Id as the reserve).
--   wrk -t1 -c256 -d10s --latency -s loadtest/wrk/mixed.lua http://127.0.0.1:PORT -- ITEM USERS [BROWSE_PCT] [PAY_PCT]
-- Defaults: 60% browse, 30% of the rest pay (when an order is waiting), the rest reserve.
-- wrk does not tell response() which request an answer belongs to (one Lua state serves
-- all of a thread's connections), so answers are classified by their body: an item has
-- "state", a reservation "pay_before", a payment "status":"paid", a refusal "error".
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
package.path = dir .. "?.lua;" .. package.path
local common = require("common")

setup = common.setup
done = common.done

local users, browse_pct, pay_pct
local get_item, make_reserve
local to_pay, head, tail = {}, 1, 0   -- FIFO of {order_id, user_id}

function init(args)
  local item
  item, users = common.args(args, "demo")
  browse_pct = tonumber(args[3] or os.getenv("BROWSE_PCT") or "60")
  pay_pct = tonumber(args[4] or os.getenv("PAY_PCT") or "30")
  local get_tmpl = common.template("GET", "/api/v1/items/" .. item, nil)
  get_item = get_tmpl
  make_reserve = common.template("POST", "/api/v1/items/" .. item .. "/reserve", common.reserve_body())
end

local function pay_request(order)
  return wrk.format("POST", "/api/v1/orders/" .. order[1] .. "/pay",
    { ["X-User-Id"] = order[2], ["Content-Type"] = "application/json" }, "{}")
end

function request()
  local r = math.random(100)
  if r <= browse_pct then
    return get_item(common.user(users))
  end
  if head <= tail and math.random(100) <= pay_pct then
    local order = to_pay[head]
    to_pay[head] = nil
    head = head + 1
    return pay_request(order)
  end
  return make_reserve(common.user(users))
end

function response(status, headers, body)
  common.count_status(status)
  if status == 200 then
    if string.find(body, '"pay_before"', 1, true) then
      common.count_outcome("reserve_ok")
      local oid = string.match(body, '"order_id"%s*:%s*"([^"]+)"')
      local uid = string.match(body, '"user_id"%s*:%s*"([^"]+)"')
      if oid and uid then
        tail = tail + 1
        to_pay[tail] = { oid, uid }
      end
    elseif string.find(body, '"paid"', 1, true) then
      common.count_outcome("pay_ok")
    elseif string.find(body, '"state"', 1, true) then
      common.count_outcome("browse_ok")
    else
      common.count_outcome("ok_other")
    end
  else
    common.count_outcome(common.error_code(body) or ("http_" .. status))
  end
end
