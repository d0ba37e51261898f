-- state_op.lua: apply one ctx.state operation to one key exactly once, by its op id.
-- Every op of an execution has an id (session id and the op's number in the execution),
-- so a replay of the session, on any worker, or a stale worker racing it, names the same op
-- again. The op's marker (its result) says it was applied: then the result recorded there
-- is returned and nothing is applied again. Marker and value share the key's hash tag, so
-- this is one slot on every topology (workers/kv.py has the schema).
-- KEYS: value marker
-- ARGV: op arg retention_ms
-- KEYS[1] the value: integers as decimal text, anything else msgpack (never starts with
--         a digit or '-')          KEYS[2] the op's marker, PX retention
-- ARGV[1] op: 'get' | 'set' | 'set_nx' | 'incr' | 'delete'
-- ARGV[2] set, set_nx: the encoded value; incr: the amount (decimal); else ''
-- ARGV[3] retention ms (how long the marker is kept)
-- Returns {'APPLIED', marker} (applied now) | {'RECORDED', marker} (applied before)
--       | {'OTHER_OP', marker} (this op id was another op: a non-deterministic replay)
--       | {'BAD_ARG', name}
-- A marker is '<op>:<status>:<result>': status 'ok' (result: get: the value; set: '';
-- set_nx, delete: '1' or '0'; incr: the new value), 'none' (get of a missing key),
-- 'not_int' (incr of a value that is no integer) or 'overflow' (incr past 64 bits); a
-- refused incr writes no value but is recorded, so its replay is refused the same way.
-- Arguments are checked before the first write: Redis does not undo a script's writes.
-- whole(i, lo, hi), ARGV[i] as a bounded whole number, comes from _prelude.lua.
if #KEYS ~= 2 or #ARGV ~= 3 then
  return {'BAD_ARG', 'arity'}
end
local op = ARGV[1]
if op ~= 'get' and op ~= 'set' and op ~= 'set_nx' and op ~= 'incr' and op ~= 'delete' then
  return {'BAD_ARG', 'op'}
end
if not whole(3, 1, 2^48) then return {'BAD_ARG', 'retention_ms'} end
if (op == 'set' or op == 'set_nx') and ARGV[2] == '' then return {'BAD_ARG', 'arg'} end
if op == 'incr' and (#ARGV[2] > 20 or not string.match(ARGV[2], '^%-?%d+$')) then
  return {'BAD_ARG', 'arg'}
end
local seen = redis.call('GET', KEYS[2])
if seen then
  if string.sub(seen, 1, #op + 1) ~= op .. ':' then
    return {'OTHER_OP', seen}
  end
  return {'RECORDED', seen}
end
local out
if op == 'get' then
  local v = redis.call('GET', KEYS[1])
  if v then out = 'ok:' .. v else out = 'none:' end
elseif op == 'set' then
  redis.call('SET', KEYS[1], ARGV[2])
  out = 'ok:'
elseif op == 'set_nx' then
  if redis.call('SET', KEYS[1], ARGV[2], 'NX') then out = 'ok:1' else out = 'ok:0' end
elseif op == 'incr' then
  local current = redis.call('GET', KEYS[1])
  if current and not string.match(current, '^%-?%d+$') then
    out = 'not_int:'
  else
    -- INCRBY refuses (writing nothing) a sum past 64 bits, or a number it cannot read;
    -- any other error (a refused permission) is the caller's, unrecorded. Its reply would
    -- pass through a Lua double, so the exact new value is read back as text.
    local r = redis.pcall('INCRBY', KEYS[1], ARGV[2])
    if type(r) ~= 'table' or not r.err then
      out = 'ok:' .. redis.call('GET', KEYS[1])
    elseif string.find(tostring(r.err), 'overflow', 1, true) then
      out = 'overflow:'
    elseif string.find(tostring(r.err), 'not an integer', 1, true) then
      out = 'not_int:'
    else
      return r
    end
  end
else
  out = 'ok:' .. redis.call('DEL', KEYS[1])
end
redis.call('SET', KEYS[2], op .. ':' .. out, 'PX', ARGV[3])
return {'APPLIED', op .. ':' .. out}
