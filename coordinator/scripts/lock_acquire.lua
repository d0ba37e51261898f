-- lock_acquire.lua: take a lease and hand out the next fencing token in the same step.
-- Same layout as redis-py's Lock (the value is the owner token, PX is the lease), so its
-- release and extend scripts keep working on our locks.
-- KEYS: lock fence
-- ARGV: token lease_ms fence_field
-- KEYS[1] lock key   KEYS[2] fence holder: a session hash (ARGV[3] names the field) or,
--                    with ARGV[3] == '', a plain counter key
-- ARGV[1] owner token   ARGV[2] lease ms   ARGV[3] fence field or ''
-- Returns {fence, 0} when taken, {0, pttl} when held by another, {-1, 0} when the session
-- hash is gone (nothing to lock), {-2, 0} when the fence is not a number (corrupt: checked
-- before any write, since a script error would not undo the lease it had already set).
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
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  if ARGV[3] ~= '' then
    return {redis.call('HINCRBY', KEYS[2], ARGV[3], 1), 0}
  end
  return {redis.call('INCR', KEYS[2]), 0}
end
return {0, redis.call('PTTL', KEYS[1])}
