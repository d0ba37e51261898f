-- create.lua: a new session, and the start job that will run it to its first event.
-- KEYS: session pending answers journal logs registry deadlines jobs dead running
-- ARGV: sid strategy input budget ttl_ms backstop_ms wake_channel activity
-- Transition: (none) -> running.
-- KEYS[1..5] session data keys (session, pending, answers, journal, logs)
-- KEYS[6] registry zset   KEYS[7] deadlines zset   KEYS[8] jobs stream   KEYS[9] dead letters
-- KEYS[10] running sessions zset (the phase index list_sessions reads)
-- ARGV[1] session id   ARGV[2] strategy name   ARGV[3] packed input   ARGV[4] packed budget or ''
-- ARGV[5] idle ttl ms  ARGV[6] backstop expiry ms   ARGV[7] jobs wake channel
-- ARGV[8] the shard's activity channel: a new session publishes '<sid> running' there
-- Returns {'OK', job id} | {'CONFLICT'} | {'BAD_ARG', name}. A random id (128 bits) can
-- only exist already when this very call is retried after its reply was lost; an id made
-- from an idempotency key exists when that key started a session before. Either way the
-- same request is answered as the first time was, and another strategy or input under the
-- same id is refused ({'CONFLICT'}), writing nothing.
-- A new session runs (its start job waits for a worker): nobody idles, so it is not filed
-- in the deadlines (commit_step.lua files it when it pauses, waiting for its host).
-- Arguments are checked before the first write: Redis does not undo a script's writes when a
-- later command fails, so a refused call must fail before it has written anything.
-- whole(i, lo, hi), ARGV[i] as a bounded whole number, comes from _prelude.lua.
if #KEYS ~= 10 or #ARGV ~= 8 then
  return {'BAD_ARG', 'arity'}
end
if ARGV[1] == '' then return {'BAD_ARG', 'sid'} end
if ARGV[2] == '' then return {'BAD_ARG', 'strategy'} end
if ARGV[3] == '' then return {'BAD_ARG', 'input'} end
local ttl = whole(5, 1, 315360000000)  -- ten years (settings.MAX_TTL_S)
if not ttl then return {'BAD_ARG', 'ttl_ms'} end
if not whole(6, 1, 2^48) then return {'BAD_ARG', 'backstop_ms'} end
if redis.call('EXISTS', KEYS[1]) == 1 then
  local was = redis.call('HMGET', KEYS[1], 'strategy', 'input')
  if was[1] ~= ARGV[2] or was[2] ~= ARGV[3] then
    return {'CONFLICT'}
  end
  return {'OK', redis.call('HGET', KEYS[1], 'job') or ''}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- The job first: XADD is the one command here that can still fail (a namespace key of the
-- wrong type), and then nothing is written.
local job = redis.call('XADD', KEYS[8], '*', 'k', 'start', 'sid', ARGV[1], 'a', 0)
redis.call('HSET', KEYS[1],
  'phase', 'running', 'asked', 0, 'remaining', 0, 'fence', 0,
  'strategy', ARGV[2], 'input', ARGV[3], 'job', job,
  'started_at', now, 'last_activity_at', now, 'ttl_ms', ARGV[5], 'bx_at', now)
if ARGV[4] ~= '' then
  redis.call('HSET', KEYS[1], 'budget', ARGV[4])
end
redis.call('PEXPIRE', KEYS[1], ARGV[6])
redis.call('ZADD', KEYS[10], now, ARGV[1])
redis.call('SPUBLISH', ARGV[7], ARGV[1])
redis.call('SPUBLISH', ARGV[8], ARGV[1] .. ' running')
return {'OK', job}
