-- lock_acquire.lua: take a lease and hand out the next fencing token in the same step.
-- Same layout as redis-py's Lock (the value is the owner token, PX is the lease), so its
-- release and extend scripts keep working on our locks.
-- KEYS: lock fence
-- ARGV: token lease_ms fence_field live_prefix
-- KEYS[1] lock key   KEYS[2] fence holder: a session hash (ARGV[3] names the field) or,
--                    with ARGV[3] == '', a plain counter key
-- ARGV[1] owner token   ARGV[2] lease ms   ARGV[3] fence field or ''
-- ARGV[4] liveness channel prefix: a holder named H is alive while ARGV[4]..H has a subscriber
-- Returns {fence, 0} when taken, {fence, -1} when taken from a holder whose connection is
-- gone, {0, pttl} when held by another, {-1, 0} when the session hash is gone (nothing to
-- lock), {-2, 0} when the fence is not a number (corrupt: checked before any write, since a
-- script error would not undo the lease it had already set).
-- A holder is named by its token ('<random>|<worker id>') or, for a session's lock A that the
-- feed took in the live holder's name (handoff: the token is the session's 'ready_token'), by
-- the session's 'holder'. A holder whose liveness channel has no subscriber has lost its
-- connection to Redis (dead, or cut off: the fence refuses its late commit either way), so
-- its lease is not waited out; an unnamed holder's always is.
local current
if ARGV[3] ~= '' then
  if redis.call('EXISTS', KEYS[2]) == 0 then
    return {-1, 0}
  end
  current = redis.call('HGET', KEYS[2], ARGV[3])
else
  current = redis.call('GET', KEYS[2])
end
if current and not tonumber(current) then
  return {-2, 0}
end
local broken, pttl = take_lease(KEYS[1], ARGV[1], ARGV[2],
                                ARGV[3] ~= '' and KEYS[2] or false, ARGV[4])
if not broken then
  return {0, pttl}
end
-- The next fence never repeats one handed out before (see next_fence), even after a
-- failover rolled the counter back. Lock A also counts a try at the session's step.
local fence = next_fence(current)
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[2], ARGV[3], fence)
  redis.call('HINCRBY', KEYS[2], 'tries', 1)
else
  redis.call('SET', KEYS[2], fence)
end
return {tonumber(fence), broken}
