-- settle_request: replace a reservation by the actual cost, add it to the lifetime and
-- monthly totals and append the usage record. Idempotent per request id: a retried
-- settlement of the same request changes nothing.
--
-- KEYS[1]  {id}:spend   hash    total, m:YYYY-MM, reserved (nano-USD)
-- KEYS[2]  {id}:resv    hash    request id -> reserved amount (nano-USD) or 's' once settled
-- KEYS[3]  {id}:lease   zset    request id -> lease expiry (µs)
-- KEYS[4]  {id}:usage   stream  usage records, ids are Redis time
-- KEYS[5]  {id}:totals  hash    per model and day/month: requests, input, output, cost
--                               fields 'd|YYYY-MM-DD|model|cost', 'm|YYYY-MM|model|cost'...
-- ARGV[1]  request id
-- ARGV[2]  actual cost, nano-USD (integer; 0 for a cache hit)
-- ARGV[3]  1 to write a usage record, 0 to only release (no provider served it)
-- ARGV[4]  retention of usage records, ms
-- ARGV[5]  how long the settled mark is kept against retries, ms
-- KEYS[6]  {id}:key     hash    monthly, hard: the caps, read when the lease ran out
-- KEYS[7]  optional: {id}:cache:<sha>, where to store the response
-- ARGV[6]  model name, ARGV[7] input tokens, ARGV[8] output tokens
-- ARGV[9]  the cache entry (msgpack) when KEYS[7] is given, ARGV[10] its TTL in seconds
-- ARGV[11] valid until, µs of Redis time (0: no bound): no earlier attempt's settled mark
--          can have expired before then
-- ARGV[12..] more usage record fields, name/value pairs
--
-- Returns {settled, stream id, charged}: settled 1 the first time, 0 for a repeat, -1
-- refused as too late to be told from a repeat; charged is the cost written, less than
-- ARGV[2] only when a late settlement had to be cut to fit under a cap.

local request_id, cost = ARGV[1], tonumber(ARGV[2])
local record, retention_ms, mark_ms = ARGV[3] == '1', tonumber(ARGV[4]), tonumber(ARGV[5])

-- Checked before anything is written: a script that fails midway keeps its first writes.
local function countable(n) return n and n >= 0 and n <= 2^53 and n == math.floor(n) end
if not (countable(cost) and countable(tonumber(ARGV[7])) and countable(tonumber(ARGV[8]))) then
  return redis.error_reply('settle_request: cost and tokens must be whole numbers from 0 to 2^53')
end

local held = redis.call('HGET', KEYS[2], request_id)
if held == 's' then return {0, '', 0} end

local seconds, now_us = now()
-- Neither reservation nor mark, past the bound: an earlier attempt may have landed and
-- its mark been swept since (a command delivered late, after a partition). Recording
-- now could charge twice; the lease has given the reservation back already.
local valid_until = tonumber(ARGV[11]) or 0
if record and not held and valid_until > 0 and now_us > valid_until then
  return {-1, '', 0}
end
local day = day_of(seconds)
local month = string.sub(day, 1, 7)
if held then
  redis.call('HINCRBY', KEYS[1], 'reserved', -tonumber(held))
elseif record and cost > 0 then
  -- The lease ran out first, and an admission gave its capacity back: the cost now
  -- counts against the caps like a new reservation would, and is cut to what fits.
  local caps = redis.call('HMGET', KEYS[6], 'monthly', 'hard')
  local spend = redis.call('HMGET', KEYS[1], 'total', 'm:' .. month, 'reserved')
  local total, month_total = tonumber(spend[1]) or 0, tonumber(spend[2]) or 0
  local reserved = tonumber(spend[3]) or 0
  local monthly, hard = tonumber(caps[1]) or 0, tonumber(caps[2]) or 0
  if hard > 0 then cost = math.min(cost, hard - total - reserved) end
  if monthly > 0 then cost = math.min(cost, monthly - month_total - reserved) end
  cost = math.max(cost, 0)
end
redis.call('HSET', KEYS[2], request_id, 's')
redis.call('ZADD', KEYS[3], now_us + mark_ms * 1000, request_id)

if not record then return {1, '', 0} end
local model, input, output = ARGV[6], ARGV[7], ARGV[8]
local charged = string.format('%.0f', cost)
if cost > 0 then
  redis.call('HINCRBY', KEYS[1], 'total', charged)
  redis.call('HINCRBY', KEYS[1], 'm:' .. month, charged)
end
for _, period in ipairs({'d|' .. day, 'm|' .. month}) do
  local prefix = period .. '|' .. model .. '|'
  redis.call('HINCRBY', KEYS[5], prefix .. 'requests', 1)
  redis.call('HINCRBY', KEYS[5], prefix .. 'input', input)
  redis.call('HINCRBY', KEYS[5], prefix .. 'output', output)
  redis.call('HINCRBY', KEYS[5], prefix .. 'cost', charged)
end
if KEYS[7] then redis.call('SET', KEYS[7], ARGV[9], 'EX', ARGV[10]) end
local min_id = math.floor(now_us / 1000) - retention_ms
local fields = {'cost', charged, 'model', model, 'input_tokens', input, 'output_tokens', output}
for i = 12, #ARGV do fields[#fields + 1] = ARGV[i] end
local id = redis.call('XADD', KEYS[4], 'MINID', '~', min_id, '*', unpack(fields))
return {1, id, cost}
