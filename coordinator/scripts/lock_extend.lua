-- lock_extend.lua: renew a lease this owner still holds (redis-py's extend, with
-- replace_ttl: the lease becomes ``lease_ms`` from now).
-- KEYS: lock
-- ARGV: token lease_ms
-- KEYS[1] lock key
-- ARGV[1] owner token   ARGV[2] lease ms
-- Returns 1 when renewed, 0 when the token no longer owns the lock.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
