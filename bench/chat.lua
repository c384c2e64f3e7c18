-- POST /v1/chat/completions bodies for wrk, with the gateway key in Authorization.
--
--   wrk -s bench/chat.lua URL -- PATH KEY MODEL MODE STREAM SALT LIMIT NOSTORE
--
-- MODE    unique: every request a new body (a cache miss); fixed: one body (a cache hit)
-- STREAM  1 to ask for "stream": true
-- SALT    makes this run's bodies unlike any earlier run's
-- LIMIT   after this many responses a thread stops and prints "WRKLIMIT" (0: run for -d);
--         wrk itself waits out -d, so the harness sends it SIGINT on that line
-- NOSTORE 1 to send Cache-Control: no-store (looked up, never written to the cache)
-- done() prints one line "WRKJSON {...}" with counts, errors, cache hits (responses with
-- x-gateway-cache: hit) and latency percentiles (µs).

local threads = {}

function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  path, model, mode, salt = args[1], args[3], args[4], args[6]
  limit = tonumber(args[7]) or 0
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["Authorization"] = "Bearer " .. args[2]
  if args[8] == "1" then wrk.headers["Cache-Control"] = "no-store" end
  head = '{"model":"' .. model .. '","max_tokens":64,"messages":['
    .. '{"role":"system","content":"You are a terse assistant."},'
    .. '{"role":"user","content":"bench ' .. salt .. ' question '
  tail = '"}]' .. (args[5] == "1" and ',"stream":true' or '') .. '}'
  fixed = wrk.format(nil, path, nil, head .. 'always the same' .. tail)
  counter, responses, hits = 0, 0, 0
end

function request()
  if mode == "fixed" then return fixed end
  counter = counter + 1
  return wrk.format(nil, path, nil, head .. tid .. "-" .. counter .. tail)
end

function response(status, headers, body)
  responses = responses + 1
  if headers["x-gateway-cache"] == "hit" then hits = hits + 1 end
  if limit > 0 and responses == limit then
    io.write("WRKLIMIT\n")
    io.stdout:flush()
    wrk.thread:stop()
  end
end

function done(summary, latency, requests)
  local e, cached = summary.errors, 0
  for _, thread in ipairs(threads) do cached = cached + thread:get("hits") end
  io.write(string.format(
    'WRKJSON {"requests":%d,"cache_hits":%d,"duration_us":%d,"connect_errors":%d,"read_errors":%d,'
    .. '"write_errors":%d,"status_errors":%d,"timeouts":%d,'
    .. '"p50_us":%d,"p90_us":%d,"p99_us":%d,"mean_us":%.1f,"max_us":%d}\n',
    summary.requests, cached, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max))
end
