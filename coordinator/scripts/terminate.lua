-- terminate.lua: end a live session from outside its strategy: cancel it, expire it when
-- idle, or fail it (its state is unreadable, or its job failed too many times in a row).
-- KEYS: session pending answers journal logs registry deadlines jobs dead
-- ARGV: sid mode group channel retention_ms now_ms error dead_letter
-- Transitions: running | paused -> cancelled (cancel), failed (expire, fail).
-- KEYS[1..5] session data keys (session, pending, answers, journal, logs)
-- KEYS[6] registry zset   KEYS[7] deadlines zset   KEYS[8] jobs stream   KEYS[9] dead letters
-- ARGV[1] session id   ARGV[2] mode: 'cancel' | 'expire' | 'fail'   ARGV[3] job group
-- ARGV[4] session events channel   ARGV[5] retention ms
-- ARGV[6] now ms for 'expire' ('' = server time)   ARGV[7] error text ('expire', 'fail')
-- ARGV[8] for 'fail': '' or the reason to record the session's job as a dead letter
-- Returns {'OK'} | {'NOT_FOUND'} | {'INVALID_TRANSITION', phase} | {'ALIVE', deadline}
local phase = redis.call('HGET', KEYS[1], 'phase')
if not phase then
  redis.call('ZREM', KEYS[6], ARGV[1])
  redis.call('ZREM', KEYS[7], ARGV[1])
  return {'NOT_FOUND'}
end
if phase == 'completed' or phase == 'failed' or phase == 'cancelled' then
  redis.call('ZREM', KEYS[6], ARGV[1])
  redis.call('ZREM', KEYS[7], ARGV[1])
  return {'INVALID_TRANSITION', phase}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[2] == 'expire' then
  if ARGV[6] ~= '' then now = tonumber(ARGV[6]) end
  local deadline = tonumber(redis.call('HGET', KEYS[1], 'last_activity_at'))
    + tonumber(redis.call('HGET', KEYS[1], 'ttl_ms'))
  if deadline > now then
    redis.call('ZADD', KEYS[7], deadline, ARGV[1])
    return {'ALIVE', deadline}
  end
  redis.call('HSET', KEYS[1], 'phase', 'failed', 'error', ARGV[7])
elseif ARGV[2] == 'fail' then
  redis.call('HSET', KEYS[1], 'phase', 'failed', 'error', ARGV[7])
else
  redis.call('HSET', KEYS[1], 'phase', 'cancelled')
end
redis.call('HSET', KEYS[1], 'finished_at', now, 'remaining', 0)
redis.call('DEL', KEYS[2], KEYS[3])
local job = redis.call('HGET', KEYS[1], 'job')
if ARGV[2] == 'fail' and ARGV[8] ~= '' then
  redis.call('XADD', KEYS[9], 'MAXLEN', '~', 10000, '*', 'sid', ARGV[1], 'job', job or '',
    'reason', ARGV[8], 'error', ARGV[7], 'at', now)
end
if job then
  redis.call('XACK', KEYS[8], ARGV[3], job)
  redis.call('XDEL', KEYS[8], job)
  redis.call('HDEL', KEYS[1], 'job')
end
redis.call('ZREM', KEYS[6], ARGV[1])
redis.call('ZREM', KEYS[7], ARGV[1])
for k = 1, 5 do redis.call('PEXPIRE', KEYS[k], ARGV[5]) end
local nudge = redis.call('HGET', KEYS[1], 'holder_ch')
if nudge then
  redis.call('PUBLISH', nudge, ARGV[1])
end
redis.call('PUBLISH', ARGV[4], redis.call('HGET', KEYS[1], 'phase'))
return {'OK'}
