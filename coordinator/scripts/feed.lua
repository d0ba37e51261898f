-- feed.lua: record one answer of the current round; on the last one, queue the resume job.
-- KEYS: session pending answers journal logs registry deadlines jobs dead lock fed fed_prev
--       running
-- ARGV: sid query_id answer response_chars response_tokens backstop_ms wake_channel token
--       lease_ms round exact channel prompt_delta provided activity
-- KEYS[1..5] session data keys (session, pending, answers, journal, logs)
-- KEYS[6] registry zset   KEYS[7] deadlines zset   KEYS[8] jobs stream   KEYS[9] dead letters
-- KEYS[10] lock A   KEYS[11] feed tokens of this round   KEYS[12] of the round before
-- KEYS[13] running sessions zset (the phase index: the last answer moves the session there)
-- ARGV[1] session id   ARGV[2] query id   ARGV[3] packed answer
-- ARGV[4] response chars   ARGV[5] response tokens   ARGV[6] backstop expiry ms
-- ARGV[7] jobs wake channel   ARGV[8] this feed call's token (random, unique per call)
-- ARGV[9] lease ms of lock A
-- ARGV[10] the round the caller answers (as shown to it), or 0 when it does not say
-- ARGV[11] '1': the round must be the session's (the host named it); '0': the round is the
--          last one this registry showed, and only a session behind it is refused (it went
--          back: a failover), since the host may have seen later rounds elsewhere
-- ARGV[12] session events channel: an answer that leaves others missing publishes 'a' there
--          (observers such as the HTTP API's event stream show it; waiters ignore it)
-- ARGV[13] prompt token correction: the host's prompt_tokens for this query less the
--          estimate counted when it was asked (a signed whole number; 0 when not given)
-- ARGV[14] which counts the host provided: '' or 'p' (prompt) and/or 'c' (completion)
-- ARGV[15] the shard's activity channel: the last answer of a round publishes
--          '<sid> running' there (the namespace-wide event stream shows it)
-- Transition: paused -> running (the last answer of a round).
-- Returns {'ACCEPTED', remaining} | {'READY', asked} | {'NOT_FOUND'} | {'UNKNOWN_QUERY'}
--       | {'ALREADY_RESPONDED'} | {'INVALID_TRANSITION', phase} | {'STALE_ROUND', asked}
--       | {'BAD_ARG', name}
--       | {'CORRUPT', field}
-- Reads the session hash once and writes it once: each redis.call costs about a microsecond
-- on top of its work, and this script runs for every answer.
-- The idle deadline (KEYS[7]) is the host's: an answer that leaves some missing moves it; the
-- last one takes the session out, since from then on a worker owes it the step.
-- Arguments, and the numbers read from the session, are checked before the first write:
-- Redis does not undo a script's writes when a later command fails.
-- whole(i, lo, hi), ARGV[i] as a bounded whole number, comes from _prelude.lua.
if #KEYS ~= 13 or #ARGV ~= 15 then
  return {'BAD_ARG', 'arity'}
end
if ARGV[1] == '' then return {'BAD_ARG', 'sid'} end
if ARGV[2] == '' then return {'BAD_ARG', 'query_id'} end
if ARGV[8] == '' then return {'BAD_ARG', 'token'} end
local chars, tokens = whole(4, 0, 2^48), whole(5, 0, 2^48)
if not chars then return {'BAD_ARG', 'response_chars'} end
if not tokens then return {'BAD_ARG', 'response_tokens'} end
local backstop = whole(6, 1, 2^48)
if not backstop then return {'BAD_ARG', 'backstop_ms'} end
if not whole(9, 1, 2^48) then return {'BAD_ARG', 'lease_ms'} end
local round = whole(10, 0, 2^48)
if not round then return {'BAD_ARG', 'round'} end
if ARGV[11] ~= '0' and ARGV[11] ~= '1' then return {'BAD_ARG', 'exact'} end
if #ARGV[13] > 17 or not string.match(ARGV[13], '^%-?%d+$') then
  return {'BAD_ARG', 'prompt_delta'}
end
local delta = tonumber(ARGV[13])
if not string.match(ARGV[14], '^p?c?$') then return {'BAD_ARG', 'provided'} end
local f = redis.call('HMGET', KEYS[1], 'phase', 'ready_token', 'ready_asked', 'remaining',
  'ttl_ms', 'asked', 'm:response_chars', 'm:response_tokens', 'm:rounds', 'holder_ch', 'fence',
  'tries', 'holder', 'bx_at', 'm:prompt_tokens', 'm:fed', 'm:ptok_prov', 'm:rtok_prov', 'qdl')
local phase = f[1]
if not phase then
  return {'NOT_FOUND'}
end
-- The numbers this script computes with: a hash changed behind the coordinator's back is
-- refused here, not half-way through the writes. remaining, ttl_ms and asked are always set;
-- the others once first written.
local function stored(v)
  local n = tonumber(v)
  if n == nil or n ~= n or n == math.huge or n == -math.huge then return nil end
  return n
end
for j, n in ipairs({{4, 'remaining'}, {5, 'ttl_ms'}, {6, 'asked'}, {3, 'ready_asked'},
                    {7, 'm:response_chars'}, {8, 'm:response_tokens'}, {9, 'm:rounds'},
                    {14, 'bx_at'}, {12, 'tries'}, {15, 'm:prompt_tokens'}, {16, 'm:fed'},
                    {17, 'm:ptok_prov'}, {18, 'm:rtok_prov'}, {19, 'qdl'}}) do
  local v = f[n[1]]
  if (v or j <= 3) and not stored(v) then
    return {'CORRUPT', n[2]}
  end
end
-- A client retries a call whose reply it lost: the same token means this answer was already
-- recorded by this very call, so answer as the first time did instead of refusing it.
if f[2] == ARGV[8] and f[3] then
  return {'READY', tonumber(f[3])}
end
if redis.call('HGET', KEYS[11], ARGV[2]) == ARGV[8] then
  return {'ACCEPTED', math.max(0, tonumber(f[4]))}
end
if redis.call('HGET', KEYS[12], ARGV[2]) == ARGV[8] then
  return {'ACCEPTED', 0}
end
if phase ~= 'paused' then
  return {'INVALID_TRANSITION', phase}
end
-- Query ids restart every round (q-0, q-1, ...): an answer meant for another round than the
-- session is at (answered by another caller meanwhile, or a failover rolled the session
-- back to an earlier pause) would answer the wrong question. Refused, never applied.
if round ~= 0 and (round > tonumber(f[6]) or (ARGV[11] == '1' and round ~= tonumber(f[6])))
then
  return {'STALE_ROUND', tonumber(f[6])}
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
redis.call('HSET', KEYS[11], ARGV[2], ARGV[8])
redis.call('PEXPIRE', KEYS[11], ARGV[6])
local remaining = tonumber(f[4]) - 1
local set = {'remaining', remaining, 'last_activity_at', now,
  'm:response_chars', tonumber(f[7] or '0') + chars,
  'm:response_tokens', tonumber(f[8] or '0') + tokens,
  'm:fed', tonumber(f[16] or '0') + 1}
if delta ~= 0 then
  set[#set + 1] = 'm:prompt_tokens'
  set[#set + 1] = math.max(0, tonumber(f[15] or '0') + delta)
end
if string.find(ARGV[14], 'p', 1, true) then
  set[#set + 1] = 'm:ptok_prov'
  set[#set + 1] = tonumber(f[17] or '0') + 1
end
if string.find(ARGV[14], 'c', 1, true) then
  set[#set + 1] = 'm:rtok_prov'
  set[#set + 1] = tonumber(f[18] or '0') + 1
end
-- The backstop expiry moves with the deadline. This round's answers are new (and get it
-- always); the other keys were given it at the last refresh (``bx_at``), which is renewed
-- only once an eighth of the slack beyond the deadline has passed since: the keys then
-- outlive any deadline by at least 7/8 of (retention + lease), and a burst of feeds costs
-- one PEXPIRE each, not five.
redis.call('PEXPIRE', KEYS[3], ARGV[6])
if now - tonumber(f[14] or '0') >= (backstop - tonumber(f[5])) / 8 then
  for i = 1, 5 do redis.call('PEXPIRE', KEYS[i], ARGV[6]) end
  set[#set + 1] = 'bx_at'
  set[#set + 1] = now
end
if remaining > 0 then
  redis.call('HSET', KEYS[1], unpack(set))
  redis.call('ZADD', KEYS[6], 'XX', now, ARGV[1])
  -- idle deadline, or the round's earliest query deadline when that comes first
  local due = now + tonumber(f[5])
  if f[19] and tonumber(f[19]) < due then due = tonumber(f[19]) end
  redis.call('ZADD', KEYS[7], due, ARGV[1])
  redis.call('SPUBLISH', ARGV[12], 'a')
  return {'ACCEPTED', remaining}
end
local asked = f[6]
redis.call('ZREM', KEYS[6], ARGV[1])
redis.call('ZREM', KEYS[7], ARGV[1])
redis.call('ZADD', KEYS[13], now, ARGV[1])
-- The live holder is handed the step: this script takes lock A in its name (fence bumped,
-- lease set, the feed token as owner) and the nudge carries the round's answers, so the
-- holder resumes with no read and commits with one command. It is handed over only when
-- the holder's connection hears it (SPUBLISH counts the receivers) and the lock is free;
-- otherwise the holder gets a plain nudge (it takes the lock itself). The job goes to the
-- stream either way, for recovery; its field 'h' names the holder that heard of it, so the
-- worker reading it leaves it to that holder. When no holder heard, the workers are woken.
-- Handoff message: lines 'H', session id, fence, lock token, round, tries at this step,
-- N, then N times: query id, byte length, packed answer.
local nudge = f[10]
local heard = false
if nudge then
  local fence = tonumber(f[11] or '0')
  if fence and redis.call('EXISTS', KEYS[10]) == 0 then
    local ans = redis.call('HGETALL', KEYS[3])
    local nfence, tries = next_fence(fence), tonumber(f[12] or '0') + 1
    local parts = {'H', ARGV[1], nfence, ARGV[8], asked, tries, #ans / 2}
    for j = 1, #ans, 2 do
      parts[#parts + 1] = ans[j]
      parts[#parts + 1] = #ans[j + 1]
      parts[#parts + 1] = ans[j + 1]
    end
    if redis.call('SPUBLISH', nudge, table.concat(parts, '\n')) > 0 then
      redis.call('SET', KEYS[10], ARGV[8], 'PX', ARGV[9])
      set[#set + 1] = 'fence'
      set[#set + 1] = nfence
      set[#set + 1] = 'tries'
      set[#set + 1] = tries
      heard = true
    end
  else
    heard = redis.call('SPUBLISH', nudge, ARGV[1]) > 0
  end
end
local job
if heard then
  job = redis.call('XADD', KEYS[8], '*', 'k', 'resume', 'sid', ARGV[1], 'a', asked,
                   'h', f[13] or '?')
else
  job = redis.call('XADD', KEYS[8], '*', 'k', 'resume', 'sid', ARGV[1], 'a', asked)
  redis.call('SPUBLISH', ARGV[7], ARGV[1])
end
for _, v in ipairs({'phase', 'running', 'ready_token', ARGV[8], 'ready_asked', asked,
                    'm:rounds', tonumber(f[9] or '0') + 1, 'job', job}) do
  set[#set + 1] = v
end
redis.call('HSET', KEYS[1], unpack(set))
redis.call('SPUBLISH', ARGV[15], ARGV[1] .. ' running')
return {'READY', tonumber(asked)}
