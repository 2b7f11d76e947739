-- Write a state computed from the sequence at `rev` (a rebuild, e.g. for a new model version), only if
-- no event was applied since: compare-and-set on the user's rev.
-- KEYS: 1 meta, 2 state of ARGV[2].  ARGV: 1 expected rev, 2 model version, 3 state bytes.
-- Returns {'ok', rev} | {'conflict', rev}.
local rev = tonumber(redis.call('HGET', KEYS[1], 'rev') or '0')
if rev ~= tonumber(ARGV[1]) then
  return {'conflict', rev}
end
redis.call('SET', KEYS[2], ARGV[3])
redis.call('HSET', KEYS[1], 'srev:' .. ARGV[2], rev)
return {'ok', rev}
