-- wrk script for request_service: every request is a POST /orders with a JSON body and a
-- ref unique to the run (WRK_RUN names the run, the thread and a counter make the rest).
-- Counts 2xx / 5xx / other answers per thread and prints them at the end with the
-- latency percentiles, as one line .ci/service reads:
--   wrk-result requests=N 2xx=N 5xx=N other=N p50_us=N p99_us=N
--
--   WRK_RUN=a wrk -t2 -c16 -d4s -s examples/wrk/orders.lua http://127.0.0.1:PORT

local threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("id", #threads)
end

function init(args)
  prefix = "wrk" .. (os.getenv("WRK_RUN") or "") .. "-" .. id .. "-"
  counter = 0
  s2, s5, other = 0, 0, 0
end

function request()
  counter = counter + 1
  local body = '{"customer":"wrk-' .. id .. '","amount":' .. (counter % 997 + 1) ..
               ',"ref":"' .. prefix .. counter .. '"}'
  return wrk.format("POST", "/orders", {["Content-Type"] = "application/json"}, body)
end

function response(status, headers, body)
  if status >= 200 and status < 300 then
    s2 = s2 + 1
  elseif status >= 500 then
    s5 = s5 + 1
  else
    other = other + 1
  end
end

function done(summary, latency, requests)
  local t2, t5, tother = 0, 0, 0
  for _, thread in ipairs(threads) do
    t2 = t2 + thread:get("s2")
    t5 = t5 + thread:get("s5")
    tother = tother + thread:get("other")
  end
  io.write(string.format("wrk-result requests=%d 2xx=%d 5xx=%d other=%d errors=%d p50_us=%d p99_us=%d\n",
                         summary.requests, t2, t5, tother,
                         summary.errors.connect + summary.errors.read + summary.errors.write +
                         summary.errors.timeout,
                         latency:percentile(50), latency:percentile(99)))
end
