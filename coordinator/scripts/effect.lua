-- effect.lua: record one durable result of a step in its session, once: the first recorder
-- wins, and every caller (a racing stale worker included) gets the value that was kept.
-- A side effect's result (field 'fx:<name>#<n>') or a ctx.state op's result ('st:<seq>'),
-- written by workers/effects.py right after the effect ran or the op applied, so a replay
-- of the session on any worker returns it instead of running the effect again.
-- KEYS: session
-- ARGV: field value
-- KEYS[1] session hash
-- ARGV[1] field: 'fx:...' or 'st:...' (never one of the session's own fields)
-- ARGV[2] packed result (msgpack, never empty)
-- Returns {'OK', value} (recorded now) | {'RECORDED', value} (recorded before: that value)
--       | {'NOT_FOUND'} | {'INVALID_TRANSITION', phase} | {'BAD_ARG', name}
-- A recorded value is returned whatever the phase, so a stale caller reads what the others
-- saw; a new one is written only while the session runs (a step is owed or in flight): the
-- hash of an ended session is not written again, and a missing hash is never created.
-- No TTL is touched: the record lives and expires with the session hash it is in.
if #KEYS ~= 1 or #ARGV ~= 2 then
  return {'BAD_ARG', 'arity'}
end
local prefix = string.sub(ARGV[1], 1, 3)
if (prefix ~= 'fx:' and prefix ~= 'st:') or #ARGV[1] < 4 then
  return {'BAD_ARG', 'field'}
end
if ARGV[2] == '' then return {'BAD_ARG', 'value'} end
local f = redis.call('HMGET', KEYS[1], 'phase', ARGV[1])
local phase = f[1]
if not phase then
  return {'NOT_FOUND'}
end
if f[2] then
  return {'RECORDED', f[2]}
end
if phase ~= 'running' then
  return {'INVALID_TRANSITION', phase}
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return {'OK', ARGV[2]}
