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
-- One absolute time for both keys: two relative PEXPIREs can land a clock tick apart (Redis < 7.2 reads the
-- clock per command, not per script). PEXPIRETIME would give the meta's exact time but needs Redis 7
-- (the embedded server is 6.2); TIME + PTTL is within a millisecond of it.
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then
  local t = redis.call('TIME')
  local at = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + ttl
  redis.call('PEXPIREAT', KEYS[2], at)
  redis.call('PEXPIREAT', KEYS[3], at)
end
return {'ok', rev}
