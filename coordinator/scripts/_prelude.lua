-- _prelude.lua: helpers every script gets, spliced in after its header (a Redis script
-- cannot load another, so coordinator/scripts/__init__.py puts them together once).
-- ARGV[i] as a whole number in [lo, hi], else nil. Digits only: tonumber would also take
-- 'inf', 'nan', '1e20', ' 5' and '0x10'. Up to 16 digits (fences are clock microseconds);
-- with hi at most 2^53 - 1 every accepted value is exact in Lua's doubles.
local function whole(i, lo, hi)
  local s = ARGV[i]
  if type(s) ~= 'string' or #s > 16 or not string.match(s, '^%d+$') then return nil end
  local n = tonumber(s)
  if n < lo or n > hi then return nil end
  return n
end
-- next_fence(current): the fencing token after ``current``: the server's clock in
-- microseconds, or current + 1 when that is not above it. A counter alone would hand out a
-- token twice once a failover rolled it back (the lost increments are issued again); the
-- clock has moved on by then. Returned as a whole-number string (a Lua number would be
-- written as '1.7e+15'); 2^53 microseconds is year 2255, so doubles hold it exactly.
local function next_fence(current)
  local t = redis.call('TIME')
  local n = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local after = (tonumber(current) or 0) + 1
  if after > n then n = after end
  return string.format('%.0f', n)
end
-- take_lease(lock, token, lease_ms, session or false, live_prefix): SET NX PX, or take over a
-- lease whose named holder is gone. A holder is named by its token ('<random>|<worker id>')
-- or, for a lease the feed took in the live holder's name (handoff), by the session's
-- holder; one whose liveness channel (live_prefix .. id) has no subscriber has lost its
-- connection to Redis (dead, or cut off: the fence refuses its late commit either way), so
-- its lease is not waited out; an unnamed holder's always is. Returns 0 (taken), -1 (taken
-- from a gone holder), or false and the live holder's pttl.
local function take_lease(lock, token, lease, session, live_prefix)
  if redis.call('SET', lock, token, 'NX', 'PX', lease) then
    return 0
  end
  local owner = redis.call('GET', lock)
  local bar = string.find(owner, '|', 1, true)
  local holder
  if bar and bar < #owner then
    holder = string.sub(owner, bar + 1)
  elseif session then
    local h = redis.call('HMGET', session, 'ready_token', 'holder')
    if h[1] == owner then holder = h[2] end
  end
  if not holder or redis.call('PUBSUB', 'SHARDNUMSUB', live_prefix .. holder)[2] ~= 0 then
    return false, redis.call('PTTL', lock)
  end
  redis.call('SET', lock, token, 'PX', lease)
  return -1
end
