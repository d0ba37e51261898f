-- feed.lua: record one answer of the current round; on the last one, queue the resume job.
-- KEYS[1..5] session data keys (session, pending, answers, journal, logs)
-- KEYS[6] registry zset   KEYS[7] deadlines zset   KEYS[8] jobs stream   KEYS[9] dead letters
-- ARGV[1] session id   ARGV[2] query id   ARGV[3] packed answer
-- ARGV[4] response chars   ARGV[5] response tokens   ARGV[6] backstop expiry ms
-- ARGV[7] jobs wake channel   ARGV[8] this feed call's token (random, unique per call)
-- KEYS[10] feed tokens of this round   KEYS[11] feed tokens of the round before
-- Returns {'ACCEPTED', remaining} | {'READY', asked} | {'NOT_FOUND'} | {'UNKNOWN_QUERY'}
--       | {'ALREADY_RESPONDED'} | {'INVALID_TRANSITION', phase}
local phase = redis.call('HGET', KEYS[1], 'phase')
if not phase then
  return {'NOT_FOUND'}
end
-- A client retries a call whose reply it lost: the same token means this answer was already
-- recorded by this very call, so answer as the first time did instead of refusing it.
if redis.call('HGET', KEYS[1], 'ready_token') == ARGV[8] then
  return {'READY', tonumber(redis.call('HGET', KEYS[1], 'ready_asked'))}
end
if redis.call('HGET', KEYS[10], ARGV[2]) == ARGV[8] then
  return {'ACCEPTED', math.max(0, tonumber(redis.call('HGET', KEYS[1], 'remaining')))}
end
if redis.call('HGET', KEYS[11], ARGV[2]) == ARGV[8] then
  return {'ACCEPTED', 0}
end
if phase ~= 'paused' then
  return {'INVALID_TRANSITION', phase}
end
if redis.call('HEXISTS', KEYS[3], ARGV[2]) == 1 then
  return {'ALREADY_RESPONDED'}
end
if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 0 then
  return {'UNKNOWN_QUERY'}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
redis.call('HSET', KEYS[10], ARGV[2], ARGV[8])
redis.call('PEXPIRE', KEYS[10], ARGV[6])
local remaining = redis.call('HINCRBY', KEYS[1], 'remaining', -1)
redis.call('HINCRBY', KEYS[1], 'm:response_chars', ARGV[4])
redis.call('HINCRBY', KEYS[1], 'm:response_tokens', ARGV[5])
redis.call('HSET', KEYS[1], 'last_activity_at', now)
local ttl = tonumber(redis.call('HGET', KEYS[1], 'ttl_ms'))
redis.call('ZADD', KEYS[7], now + ttl, ARGV[1])
for i = 1, 5 do redis.call('PEXPIRE', KEYS[i], ARGV[6]) end
if remaining > 0 then
  redis.call('ZADD', KEYS[6], 'XX', now, ARGV[1])
  return {'ACCEPTED', remaining}
end
local asked = redis.call('HGET', KEYS[1], 'asked')
redis.call('HSET', KEYS[1], 'phase', 'running', 'ready_token', ARGV[8], 'ready_asked', asked)
redis.call('HINCRBY', KEYS[1], 'm:rounds', 1)
redis.call('ZREM', KEYS[6], ARGV[1])
local job = redis.call('XADD', KEYS[8], '*', 'k', 'resume', 'sid', ARGV[1], 'a', asked)
redis.call('HSET', KEYS[1], 'job', job)
-- The live holder is told directly; the other workers are woken only when no holder heard
-- it (the job is in the stream either way, and idle workers poll it within a wait slice).
local nudge = redis.call('HGET', KEYS[1], 'holder_ch')
if not nudge or redis.call('PUBLISH', nudge, ARGV[1]) == 0 then
  redis.call('PUBLISH', ARGV[7], ARGV[1])
end
return {'READY', tonumber(asked)}
