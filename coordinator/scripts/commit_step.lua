-- commit_step.lua: apply one strategy step (pause, complete or fail) exactly once, fenced.
-- A worker computed the step under lock A; this checks that its lease is still the newest
-- (fence), that nobody applied this round already (asked), and that the session still runs.
-- KEYS: session pending answers journal logs registry deadlines jobs dead lock fed fed_prev
--       running completed failed
-- ARGV: sid fence asked token group channel released_channel holder holder_channel
--       backstop_ms retention_ms journal_entry progress custom query_deadline llm_calls
--       prompt_chars prompt_tokens outcome event activity *rest
-- Transitions: running -> paused | completed | failed.
-- KEYS[1..5] session data keys (session, pending, answers, journal, logs)
-- KEYS[6] registry zset   KEYS[7] deadlines zset   KEYS[8] jobs stream   KEYS[9] dead letters
-- KEYS[10] lock A   KEYS[11] feed tokens of this round   KEYS[12] of the round before
-- KEYS[13] running sessions zset   KEYS[14] completed sessions zset   KEYS[15] failed ones
-- (the phase indexes: the session leaves the first, an end files it in its phase's, trimmed
-- of entries past the retention on the way)
-- ARGV[1] session id      ARGV[2] fence           ARGV[3] asked the step started from
-- ARGV[4] lock token      ARGV[5] job group       ARGV[6] session events channel
-- ARGV[7] lock released channel                   ARGV[8] holder worker id
-- ARGV[9] holder nudge channel                    ARGV[10] backstop expiry ms
-- ARGV[11] retention ms   ARGV[12] journal entry or ''   ARGV[13] packed progress or ''
-- ARGV[14] packed custom metrics (the strategy's whole set, ctx.metric) or ''
-- ARGV[15] for a pause: the earliest deadline of its queries (Unix ms) or '' (none)
-- ARGV[16] llm calls      ARGV[17] prompt chars   ARGV[18] prompt tokens
-- ARGV[19] outcome: 'pause' | 'complete' | 'fail'
-- ARGV[20] event message for the session channel (a pause carries its queries, so waiters
--          need not read them back)
-- ARGV[21] the shard's activity channel: the new phase is published there as
--          '<sid> <phase>' (paused, completed or failed)
-- ARGV[22] number of log entries L, then L packed log entries, then by outcome:
--   pause:    packed query id list, N, then N pairs (query id, packed query)
--   complete: packed result
--   fail:     error text, and optionally its type (errors.FAILURE_TYPES) and traceback
-- Returns {'OK'} | {'NOT_FOUND'} | {'FENCED', fence} | {'STALE', asked}
--       | {'INVALID_TRANSITION', phase} | {'BAD_ARG', name} | {'CORRUPT', field}
-- Reads the session hash once and writes it once (each redis.call costs about a microsecond
-- on top of its work, and this runs for every step).
-- A pause files the session in the deadlines (KEYS[7]): from now on only its host owes it
-- anything, so from now on it can idle. Its time queued and running never counted.
-- Arguments, and the numbers read from the session, are checked before the first write:
-- Redis does not undo a script's writes when a later command fails.
-- whole(i, lo, hi), ARGV[i] as a bounded whole number, comes from _prelude.lua.
if #KEYS ~= 15 or #ARGV < 23 then
  return {'BAD_ARG', 'arity'}
end
if ARGV[1] == '' then return {'BAD_ARG', 'sid'} end
for _, a in ipairs({{3, 'asked'}, {16, 'llm_calls'}, {17, 'prompt_chars'},
                    {18, 'prompt_tokens'}}) do
  if not whole(a[1], 0, 2^48) then return {'BAD_ARG', a[2]} end
end
if not whole(2, 0, 2^53 - 1) then return {'BAD_ARG', 'fence'} end
if not whole(10, 1, 2^48) then return {'BAD_ARG', 'backstop_ms'} end
if not whole(11, 0, 2^48) then return {'BAD_ARG', 'retention_ms'} end
local qdl = false
if ARGV[15] ~= '' then
  qdl = whole(15, 0, 2^48)
  if not qdl then return {'BAD_ARG', 'query_deadline'} end
end
local outcome = ARGV[19]
if outcome ~= 'pause' and outcome ~= 'complete' and outcome ~= 'fail' then
  return {'BAD_ARG', 'outcome'}
end
-- The rest: L log entries, then by outcome exactly what the header says, nothing more.
local nlogs = whole(22, 0, #ARGV)
if not nlogs then return {'BAD_ARG', 'rest'} end
local i = 23 + nlogs
if outcome == 'pause' then
  local n = whole(i + 1, 1, #ARGV)
  if not n or #ARGV ~= i + 1 + 2 * n then return {'BAD_ARG', 'rest'} end
elseif #ARGV ~= i and not (outcome == 'fail' and #ARGV == i + 2) then
  return {'BAD_ARG', 'rest'}
end
-- ARGV[from..to] to one command per 1,000 arguments (Lua's unpack has a stack limit).
local function each_chunk(cmd, key, from, to)
  for a = from, to, 1000 do
    redis.call(cmd, key, unpack(ARGV, a, math.min(a + 999, to)))
  end
end
local f = redis.call('HMGET', KEYS[1], 'phase', 'fence', 'asked', 'job', 'ttl_ms',
  'm:llm_calls', 'm:prompt_chars', 'm:prompt_tokens', 'm:pauses', 'bx_at', 'm:logs')
local phase = f[1]
if not phase then
  return {'NOT_FOUND'}
end
if f[2] ~= ARGV[2] then
  return {'FENCED', f[2]}
end
if phase ~= 'running' then
  return {'INVALID_TRANSITION', phase}
end
-- The numbers this script computes with (asked, ttl_ms: always set; the counters and bx_at
-- once first written), and the job id it acknowledges.
for j, n in ipairs({{3, 'asked'}, {5, 'ttl_ms'}, {6, 'm:llm_calls'}, {7, 'm:prompt_chars'},
                    {8, 'm:prompt_tokens'}, {9, 'm:pauses'}, {10, 'bx_at'},
                    {11, 'm:logs'}}) do
  local v = tonumber(f[n[1]])
  if (f[n[1]] or j <= 2) and (v == nil or v ~= v or v == math.huge or v == -math.huge) then
    return {'CORRUPT', n[2]}
  end
end
if f[4] and not string.match(f[4], '^%d+%-%d+$') then
  return {'CORRUPT', 'job'}
end
local asked = tonumber(f[3])
if asked ~= tonumber(ARGV[3]) then
  return {'STALE', asked}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[12] ~= '' then
  redis.call('RPUSH', KEYS[4], ARGV[12])
end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[12])
if redis.call('EXISTS', KEYS[11]) == 1 then
  redis.call('RENAME', KEYS[11], KEYS[12])  -- a retried feed of this round is still known
end
i = 23
if nlogs > 0 then
  each_chunk('RPUSH', KEYS[5], i, i + nlogs - 1)
  redis.call('LTRIM', KEYS[5], -20, -1)
end
i = i + nlogs
local set = {'last_activity_at', now, 'holder', ARGV[8], 'holder_ch', ARGV[9],
  'tries', 0,
  'm:llm_calls', tonumber(f[6] or '0') + tonumber(ARGV[16]),
  'm:prompt_chars', tonumber(f[7] or '0') + tonumber(ARGV[17]),
  'm:prompt_tokens', tonumber(f[8] or '0') + tonumber(ARGV[18])}
if nlogs > 0 then  -- the count of log entries ever kept (their numbers); unset until the first
  set[#set + 1] = 'm:logs'
  set[#set + 1] = tonumber(f[11] or '0') + nlogs
end
if ARGV[13] ~= '' then
  set[#set + 1] = 'progress'
  set[#set + 1] = ARGV[13]
end
if ARGV[14] ~= '' then
  set[#set + 1] = 'custom'
  set[#set + 1] = ARGV[14]
end
if f[4] then
  redis.call('XACK', KEYS[8], ARGV[5], f[4])
  redis.call('XDEL', KEYS[8], f[4])
end
redis.call('HDEL', KEYS[1], 'job', 'last_error', 'qdl')
redis.call('ZREM', KEYS[13], ARGV[1])
local add
if outcome == 'pause' then
  local n = tonumber(ARGV[i + 1])
  add = {'phase', 'paused', 'asked', asked + 1, 'remaining', n, 'expected', n, 'paused_at', now,
    'qids', ARGV[i], 'cq_tokens', ARGV[18], 'm:pauses', tonumber(f[9] or '0') + 1}
  each_chunk('HSET', KEYS[2], i + 2, i + 1 + 2 * n)
  redis.call('ZADD', KEYS[6], now, ARGV[1])
  local due = now + tonumber(f[5])
  if qdl then
    add[#add + 1] = 'qdl'
    add[#add + 1] = qdl
    if qdl < due then due = qdl end
  end
  redis.call('ZADD', KEYS[7], due, ARGV[1])
  -- The backstop expiry, as in feed.lua: the new round's queries, the journal and the
  -- logs (new keys, at first) always; the session hash and the previous round's feed
  -- tokens only once the last refresh is an eighth of the slack old.
  redis.call('PEXPIRE', KEYS[2], ARGV[10])
  redis.call('PEXPIRE', KEYS[4], ARGV[10])
  redis.call('PEXPIRE', KEYS[5], ARGV[10])
  if now - tonumber(f[10] or '0') >= (tonumber(ARGV[10]) - tonumber(f[5])) / 8 then
    redis.call('PEXPIRE', KEYS[1], ARGV[10])
    redis.call('PEXPIRE', KEYS[12], ARGV[10])
    add[#add + 1] = 'bx_at'
    add[#add + 1] = now
  end
else
  local done = KEYS[14]
  if outcome == 'complete' then
    add = {'phase', 'completed', 'result', ARGV[i]}
  else
    done = KEYS[15]
    add = {'phase', 'failed', 'error', ARGV[i], 'error_type', ARGV[i + 1] or 'strategy_error'}
    if ARGV[i + 2] and ARGV[i + 2] ~= '' then
      add[#add + 1] = 'traceback'
      add[#add + 1] = ARGV[i + 2]
    end
  end
  redis.call('ZREMRANGEBYSCORE', done, '-inf', string.format('(%.0f', now - tonumber(ARGV[11])))
  redis.call('ZADD', done, now, ARGV[1])
  for _, v in ipairs({'finished_at', now, 'remaining', 0, 'cq_tokens', 0}) do
    add[#add + 1] = v
  end
  redis.call('ZREM', KEYS[6], ARGV[1])
  redis.call('ZREM', KEYS[7], ARGV[1])
  for k = 1, 5 do redis.call('PEXPIRE', KEYS[k], ARGV[11]) end
  redis.call('PEXPIRE', KEYS[12], ARGV[11])
end
for _, v in ipairs(add) do set[#set + 1] = v end
redis.call('HSET', KEYS[1], unpack(set))
if redis.call('GET', KEYS[10]) == ARGV[4] then
  redis.call('DEL', KEYS[10])
  redis.call('SPUBLISH', ARGV[7], '1')
end
redis.call('SPUBLISH', ARGV[6], ARGV[20])
redis.call('SPUBLISH', ARGV[21], ARGV[1] .. ' ' .. add[2])  -- add[2]: the new phase
return {'OK'}
