-- _prelude.lua: helpers every script gets, spliced in after its header (a Redis script
-- cannot load another, so coordinator/scripts/__init__.py puts them together once).
-- ARGV[i] as a whole number in [lo, hi], else nil. Digits only: tonumber would also take
-- 'inf', 'nan', '1e20', ' 5' and '0x10'; 15 digits stay exact in Lua's doubles.
local function whole(i, lo, hi)
  local s = ARGV[i]
  if type(s) ~= 'string' or #s > 15 or not string.match(s, '^%d+$') then return nil end
  local n = tonumber(s)
  if n < lo or n > hi then return nil end
  return n
end
