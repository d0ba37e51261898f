-- terminate.lua: end a live session from outside its strategy: cancel it, expire it when
-- idle, or fail it (its state is unreadable, or its job failed too many times in a row).
-- KEYS: session pending answers journal logs registry deadlines jobs dead fed fed_prev
--       running failed cancelled
-- ARGV: sid mode group channel retention_ms now_ms error dead_letter error_type traceback
--       activity
-- Transitions: running | paused -> cancelled (cancel), failed (fail).
-- Transition: paused -> failed (expire).
-- KEYS[1..5] session data keys (session, pending, answers, journal, logs)
-- KEYS[6] registry zset   KEYS[7] deadlines zset   KEYS[8] jobs stream   KEYS[9] dead letters
-- KEYS[10] feed tokens of this round   KEYS[11] of the round before
-- KEYS[12] running sessions zset   KEYS[13] failed sessions zset   KEYS[14] cancelled ones
-- ARGV[1] session id   ARGV[2] mode: 'cancel' | 'expire' | 'fail'   ARGV[3] job group
-- ARGV[4] session events channel   ARGV[5] retention ms
-- ARGV[6] now ms for 'expire' ('' = server time)   ARGV[7] error text ('expire', 'fail')
-- ARGV[8] for 'fail': '' or the reason to record the session's job as a dead letter
-- ARGV[9] for 'fail': the failure's type (errors.FAILURE_TYPES; 'expire' is 'expired')
-- ARGV[10] for 'fail': '' or the traceback to keep with the error
-- ARGV[11] the shard's activity channel: the end is published there as '<sid> <phase>'
-- Returns {'OK'} | {'NOT_FOUND'} | {'INVALID_TRANSITION', phase} | {'ALIVE', deadline}
--       | {'DUE', query deadline} | {'BUSY'} | {'BAD_ARG', name} | {'CORRUPT', field}
-- 'expire' of a session whose round has a query deadline (field qdl) that passed returns
-- {'DUE'} and changes nothing: the GC then answers those queries with their defaults, or
-- fails the session (``coordinator.gc``).
-- 'expire' ends only an idle session: one paused past its deadline, waiting for its host.
-- A running session ({'BUSY'}) is owed a step by the workers, whether its job is queued or
-- a step is in flight, so none of that time counts against its ttl; it leaves the deadlines
-- (where only paused sessions belong) and is filed again when it pauses.
-- Every key of an ended session, the feed tokens included, expires after the retention.
-- Arguments are checked before the first write (a refusal writes nothing, not even the
-- index clean-up below): Redis does not undo a script's writes when a later command fails.
-- whole(i, lo, hi), ARGV[i] as a bounded whole number, comes from _prelude.lua.
if #KEYS ~= 14 or #ARGV ~= 11 then
  return {'BAD_ARG', 'arity'}
end
local mode = ARGV[2]
if ARGV[1] == '' then return {'BAD_ARG', 'sid'} end
if mode ~= 'cancel' and mode ~= 'expire' and mode ~= 'fail' then
  return {'BAD_ARG', 'mode'}
end
if not whole(5, 0, 2^48) then return {'BAD_ARG', 'retention_ms'} end
local clock = nil
if ARGV[6] ~= '' then
  clock = whole(6, 0, 2^48)
  if not clock then return {'BAD_ARG', 'now_ms'} end
end
local phase = redis.call('HGET', KEYS[1], 'phase')
if not phase then
  redis.call('ZREM', KEYS[6], ARGV[1])
  redis.call('ZREM', KEYS[7], ARGV[1])
  redis.call('ZREM', KEYS[12], ARGV[1])
  return {'NOT_FOUND'}
end
if phase == 'completed' or phase == 'failed' or phase == 'cancelled' then
  redis.call('ZREM', KEYS[6], ARGV[1])
  redis.call('ZREM', KEYS[7], ARGV[1])
  redis.call('ZREM', KEYS[12], ARGV[1])
  return {'INVALID_TRANSITION', phase}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[2] == 'expire' then
  if phase == 'running' then
    redis.call('ZREM', KEYS[7], ARGV[1])
    return {'BUSY'}
  end
  if clock then now = clock end
  local c = redis.call('HMGET', KEYS[1], 'last_activity_at', 'ttl_ms', 'qdl')
  local names = {'last_activity_at', 'ttl_ms'}
  for j = 1, 2 do
    local n = tonumber(c[j])
    if n == nil or n ~= n or n == math.huge or n == -math.huge then
      return {'CORRUPT', names[j]}
    end
  end
  local deadline = tonumber(c[1]) + tonumber(c[2])
  local qdl = tonumber(c[3] or '')
  if qdl and qdl <= now then
    return {'DUE', c[3]}
  end
  if qdl and qdl < deadline then deadline = qdl end
  if deadline > now then
    redis.call('ZADD', KEYS[7], deadline, ARGV[1])
    return {'ALIVE', deadline}
  end
  redis.call('HSET', KEYS[1], 'phase', 'failed', 'error', ARGV[7], 'error_type', 'expired')
elseif ARGV[2] == 'fail' then
  redis.call('HSET', KEYS[1], 'phase', 'failed', 'error', ARGV[7],
    'error_type', ARGV[9] ~= '' and ARGV[9] or 'worker_error')
  if ARGV[10] ~= '' then redis.call('HSET', KEYS[1], 'traceback', ARGV[10]) end
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
  -- Only a stream entry id can be acknowledged (a corrupt field is just dropped), so failing
  -- an unreadable session cannot itself fail half-way.
  if string.match(job, '^%d+%-%d+$') then
    redis.call('XACK', KEYS[8], ARGV[3], job)
    redis.call('XDEL', KEYS[8], job)
  end
  redis.call('HDEL', KEYS[1], 'job')
end
redis.call('ZREM', KEYS[6], ARGV[1])
redis.call('ZREM', KEYS[7], ARGV[1])
redis.call('ZREM', KEYS[12], ARGV[1])
local done = ARGV[2] == 'cancel' and KEYS[14] or KEYS[13]
redis.call('ZREMRANGEBYSCORE', done, '-inf', string.format('(%.0f', now - tonumber(ARGV[5])))
redis.call('ZADD', done, now, ARGV[1])
for k = 1, 5 do redis.call('PEXPIRE', KEYS[k], ARGV[5]) end
redis.call('PEXPIRE', KEYS[10], ARGV[5])
redis.call('PEXPIRE', KEYS[11], ARGV[5])
local nudge = redis.call('HGET', KEYS[1], 'holder_ch')
if nudge then
  redis.call('SPUBLISH', nudge, ARGV[1])
end
local ended = redis.call('HGET', KEYS[1], 'phase')
redis.call('SPUBLISH', ARGV[4], ended)
redis.call('SPUBLISH', ARGV[11], ARGV[1] .. ' ' .. ended)
return {'OK'}
