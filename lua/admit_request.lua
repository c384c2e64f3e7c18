-- admit_request: authenticate a key, check its model, sliding window and spend caps,
-- and, if everything passes, record the request in the window and reserve its
-- worst-case cost. One atomic step, so replicas can never over-admit.
--
-- KEYS[1]  {id}:key     hash   hash, revoked, models, rate, monthly, hard
-- KEYS[2]  {id}:window  zset   request id -> admission time (µs)
-- KEYS[3]  {id}:spend   hash   total, m:YYYY-MM, reserved (nano-USD)
-- KEYS[4]  {id}:resv    hash   request id -> reserved amount (nano-USD) or 's' once settled
-- KEYS[5]  {id}:lease   zset   request id -> lease expiry (µs)
-- KEYS[6]  optional: {id}:cache:<sha>, the response cache entry to read once admitted
-- ARGV[1]  SHA-256 of the raw key, hex
-- ARGV[2]  model name the client asked for
-- ARGV[3]  request id (makes a retried call idempotent)
-- ARGV[4]  reservation, nano-USD (integer)
-- ARGV[5]  lease, ms: how long the reservation lives if it is never settled
--
-- Returns {status, limit, remaining, reset_ms, detail, cap_used_ppm, cache entry or false,
--          now (µs of Redis time, when admitted)}
--   status 0 admitted (also for a replayed request id), 1 unknown key, 2 revoked,
--   3 model not allowed, 4 rate limited, 5 monthly cap, 6 lifetime cap
--   limit/remaining: the window (0/-1 when unlimited); reset_ms: until a slot frees
--   detail (for 5 and 6): the cap, nano-USD, as a string
--   cap_used_ppm: (settled + open reservations) / cap in parts per million, the larger of
--   the monthly and lifetime ratios, counting this request's reservation when admitted;
--   -1 when the key has no cap or the decision came before the spend was read

local key_hash, model, request_id = ARGV[1], ARGV[2], ARGV[3]
local amount, lease_ms = tonumber(ARGV[4]), tonumber(ARGV[5])
local WINDOW_US = 60000000

local key = redis.call('HMGET', KEYS[1], 'hash', 'revoked', 'models', 'rate', 'monthly', 'hard')
if key[1] ~= key_hash then return {1, 0, 0, 0, '', -1} end
if key[2] == '1' then return {2, 0, 0, 0, '', -1} end
if key[3] ~= '' and not string.find(key[3], '\n' .. model .. '\n', 1, true) then
  return {3, 0, 0, 0, '', -1}
end
local rate, monthly, hard = tonumber(key[4]), tonumber(key[5]), tonumber(key[6])

local seconds, now_us = now()

-- A replayed call (the first one timed out after running) must not reserve twice.
if redis.call('HEXISTS', KEYS[4], request_id) == 1 then
  return {0, rate, -1, 0, '', -1, false, now_us}
end

-- Leases of workers that died: give their capacity back.
local expired = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', now_us, 'LIMIT', 0, 256)
for _, rid in ipairs(expired) do
  local held = redis.call('HGET', KEYS[4], rid)
  if held and held ~= 's' then redis.call('HINCRBY', KEYS[3], 'reserved', -tonumber(held)) end
  redis.call('HDEL', KEYS[4], rid)
end
if #expired > 0 then redis.call('ZREM', KEYS[5], unpack(expired)) end

local count, reset_ms = 0, 60000
if rate > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now_us - WINDOW_US)
  count = redis.call('ZCARD', KEYS[2])
  if count > 0 then
    local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
    reset_ms = math.ceil((tonumber(oldest[2]) + WINDOW_US - now_us) / 1000)
  end
  if count >= rate then return {4, rate, 0, reset_ms, '', -1} end
end

local spend = redis.call('HMGET', KEYS[3], 'total', 'm:' .. month_of(seconds), 'reserved')
local total, month_total = tonumber(spend[1]) or 0, tonumber(spend[2]) or 0
local reserved = tonumber(spend[3]) or 0

-- How much of the tighter cap is spoken for once `held` more is reserved.
local function used_ppm(held)
  local ppm = -1
  if hard > 0 then ppm = math.floor((total + reserved + held) * 1000000 / hard) end
  if monthly > 0 then
    ppm = math.max(ppm, math.floor((month_total + reserved + held) * 1000000 / monthly))
  end
  return ppm
end

if hard > 0 and total + reserved + amount > hard then
  return {6, rate, 0, 0, key[6], used_ppm(0)}
end
if monthly > 0 and month_total + reserved + amount > monthly then
  return {5, rate, 0, 0, key[5], used_ppm(0)}
end

if rate > 0 then
  redis.call('ZADD', KEYS[2], now_us, request_id)
  redis.call('PEXPIRE', KEYS[2], 60000)
end
redis.call('HSET', KEYS[4], request_id, amount)
redis.call('ZADD', KEYS[5], now_us + lease_ms * 1000, request_id)
redis.call('HINCRBY', KEYS[3], 'reserved', amount)
local entry = false
if KEYS[6] then entry = redis.call('GET', KEYS[6]) end
if rate > 0 then
  return {0, rate, rate - count - 1, reset_ms, '', used_ppm(amount), entry, now_us}
end
return {0, 0, -1, 0, '', used_ppm(amount), entry, now_us}
