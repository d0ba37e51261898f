-- lock_release.lua: redis-py's compare-and-delete release, plus a wake-up for waiters so
-- they need not poll.
-- KEYS: lock
-- ARGV: token released_channel
-- KEYS[1] lock key
-- ARGV[1] owner token   ARGV[2] released channel
-- Returns 1 when released, 0 when the token no longer owned the lock.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('SPUBLISH', ARGV[2], '1')
return 1
