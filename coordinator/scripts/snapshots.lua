-- snapshots.lua: read what observers need of many sessions in one call, without a lock.
-- One short command instead of several per session: at thousands of sessions the client's
-- per-command and per-argument costs, not Redis, are what make a listing slow. So the
-- session ids come as one newline-separated argument and the keys are derived here from the
-- parts coordinator/keys.py passes (the only place key names are made). Callers keep batches
-- to a few hundred sessions so one call never holds the server for long.
-- KEYS: none (see above; a namespace lives on one primary)
-- ARGV[1] '1' to include pending + answered ids   ARGV[2] history entries to include (0 = none)
-- ARGV[3] key head   ARGV[4] key tail   ARGV[5] logs suffix   ARGV[6] pending suffix
-- ARGV[7] answers suffix   ARGV[8] journal suffix   ARGV[9] session ids, '\n'-separated
-- ARGV[10..] the session hash fields to return, in order
-- Returns per session false (gone) or {field values..., logs, pending, answered, journal}
local fields = {}
for i = 10, #ARGV do fields[#fields + 1] = ARGV[i] end
local with_pending = ARGV[1] == '1'
local history = tonumber(ARGV[2])
local out = {}
for sid in string.gmatch(ARGV[9], '[^\n]+') do
  local key = ARGV[3] .. sid .. ARGV[4]
  local values = redis.call('HMGET', key, unpack(fields))
  if not values[1] then
    out[#out + 1] = false
  else
    values[#values + 1] = redis.call('LRANGE', key .. ARGV[5], 0, -1)
    if with_pending then
      values[#values + 1] = redis.call('HGETALL', key .. ARGV[6])
      values[#values + 1] = redis.call('HKEYS', key .. ARGV[7])
    else
      values[#values + 1] = false
      values[#values + 1] = false
    end
    if history > 0 then
      values[#values + 1] = redis.call('LRANGE', key .. ARGV[8], -history, -1)
    else
      values[#values + 1] = false
    end
    out[#out + 1] = values
  end
end
return out
