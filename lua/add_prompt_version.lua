-- add_prompt_version: store a new, immutable version of a template under the next
-- number. The number is taken and the text stored in one atomic step, so versions pushed
-- at the same moment by any number of replicas are distinct and gap-free. The first
-- version becomes the active one.
--
-- Idempotent per push id: a push resent after its answer was lost gets the version it
-- already has, not a second one.
--
-- KEYS[1]  prompt:{name}:meta      hash  latest, active, created:<version> (s),
--                                        push:<push id> -> version
-- KEYS[2]  prompt:{name}:versions  hash  version -> template text
-- ARGV[1]  template text
-- ARGV[2]  push id, chosen by the caller for this push
--
-- Returns {version, active version}

local text, push = ARGV[1], 'push:' .. ARGV[2]
local pushed = redis.call('HGET', KEYS[1], push)
if pushed then
  return {tonumber(pushed), tonumber(redis.call('HGET', KEYS[1], 'active'))}
end

local seconds = now()
local version = redis.call('HINCRBY', KEYS[1], 'latest', 1)
redis.call('HSET', KEYS[2], version, text)
redis.call('HSET', KEYS[1], 'created:' .. version, seconds, push, version)
if version == 1 then redis.call('HSET', KEYS[1], 'active', 1) end
return {version, tonumber(redis.call('HGET', KEYS[1], 'active'))}
