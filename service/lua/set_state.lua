-- Write a state computed from the sequence at `rev` (a rebuild, e.g. for a new model version), only if
-- no event was applied since: compare-and-set on the user's rev. Not for an erased user (its tombstone
-- lives): a rebuild must not bring its keys back. The state and index expire with the meta hash (inactive
-- users, state.user_ttl_s).
-- KEYS: 1 meta, 2 state of ARGV[2], 3 block index of ARGV[2], 4 erase tombstone.
-- ARGV: 1 expected rev, 2 model version, 3 state bytes; with a block index (service.block_index) also
--       4 its first block id, 5 its entries, 6 its format.
-- Returns {'ok', rev} | {'conflict', rev} | {'erased', rev}.
local rev = tonumber(redis.call('HGET', KEYS[1], 'rev') or '0')
if rev ~= tonumber(ARGV[1]) then
  return {'conflict', rev}
end
if redis.call('EXISTS', KEYS[4]) == 1 then
  return {'erased', rev}
end
redis.call('SET', KEYS[2], ARGV[3])
redis.call('HSET', KEYS[1], 'srev:' .. ARGV[2], rev)
if ARGV[4] then
  redis.call('SET', KEYS[3], ARGV[5])
  redis.call('HSET', KEYS[1], 'ixrev:' .. ARGV[2], rev, 'ix0:' .. ARGV[2], ARGV[4], 'ixfmt:' .. ARGV[2], ARGV[6])
end
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[2], ttl)
  redis.call('PEXPIRE', KEYS[3], ttl)
end
return {'ok', rev}
