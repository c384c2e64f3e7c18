-- Shared prelude, prepended to every script at load time (Redis Lua has no require).
--
-- day_of(seconds) -> 'YYYY-MM-DD' and month_of(seconds) -> 'YYYY-MM' for a Unix time in
-- seconds, UTC, proleptic Gregorian. Redis scripts have no os.date, so the civil date is
-- computed from the day count.
local function day_of(seconds)
  local z = math.floor(seconds / 86400) + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local month = mp < 10 and mp + 3 or mp - 9
  local year = yoe + era * 400
  if month <= 2 then year = year + 1 end
  local day = doy - math.floor((153 * mp + 2) / 5) + 1
  return string.format('%04d-%02d-%02d', year, month, day)
end

local function month_of(seconds)
  return string.sub(day_of(seconds), 1, 7)
end

-- now() -> seconds, microseconds since the epoch, from the server clock.
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]), tonumber(t[1]) * 1000000 + tonumber(t[2])
end
