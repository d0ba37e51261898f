-- step_begin.lua: take lock A and read what a step needs, in one command.
-- The same lease and fence as lock_acquire.lua (this is its hot-path form: a worker starting
-- a step would otherwise spend a command on the lock and three on reads, every step).
-- KEYS: lock session pending answers journal
-- ARGV: token lease_ms with_journal live_prefix
-- KEYS[1] lock A   KEYS[2] session hash   KEYS[3] pending   KEYS[4] answers   KEYS[5] journal
-- ARGV[1] owner token   ARGV[2] lease ms   ARGV[3] '1' to include the journal
-- ARGV[4] liveness channel prefix: a holder named H is alive while ARGV[4]..H has a subscriber
-- Returns {-1, 0} when the session is gone, {-2, 0} when its fence is not a number (corrupt;
-- checked before any write), {0, pttl} when another holds the lock, else
-- {fence, 0 or -1, session fields (flat), pending (flat), answers (flat), journal or false},
-- -1 saying the lock was taken from a holder whose connection is gone (as lock_acquire.lua).
if redis.call('EXISTS', KEYS[2]) == 0 then
  return {-1, 0}
end
local current = redis.call('HGET', KEYS[2], 'fence')
if current and not tonumber(current) then
  return {-2, 0}
end
-- Held by a gone holder (see take_lease in _prelude.lua): taken over; by a live one: wait.
local broken, pttl = take_lease(KEYS[1], ARGV[1], ARGV[2], KEYS[2], ARGV[4])
if not broken then
  return {0, pttl}
end
-- A new fence (never one handed out before, see next_fence) and one more try at this step
-- (commit_step.lua resets tries; a step that keeps failing is dead-lettered on its count).
local fence = next_fence(current)
redis.call('HSET', KEYS[2], 'fence', fence)
redis.call('HINCRBY', KEYS[2], 'tries', 1)
local journal = false
if ARGV[3] == '1' then
  journal = redis.call('LRANGE', KEYS[5], 0, -1)
end
return {tonumber(fence), broken, redis.call('HGETALL', KEYS[2]), redis.call('HGETALL', KEYS[3]),
        redis.call('HGETALL', KEYS[4]), journal}
