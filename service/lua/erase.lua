-- Erase one user (DELETE /v1/users/<id>): delete every key holding its data and leave a tombstone, in one
-- step. The caller names the state and index keys of the versions it found in the meta hash; if the hash
-- names others by now (a version applied or rebuilt meanwhile), nothing is deleted and the caller retries.
-- KEYS: 1 meta, 2 seq, 3 seq tail, 4 dedup, 5 erase tombstone, then the state and index key of each version.
-- ARGV: 1 the versions, space-separated, sorted; 2 the tombstone value (the stream position up to which the
--       user's events are not applied); 3 its lifetime in ms.
-- Returns {'ok', keys deleted} | {'retry'}.
local found = {}
for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
  local v = string.match(f, '^srev:(.*)$') or string.match(f, '^ixrev:(.*)$') or string.match(f, '^ix0:(.*)$')
    or string.match(f, '^ixfmt:(.*)$')
  if v then
    found[v] = true
  end
end
local expected = {}
for v in string.gmatch(ARGV[1], '%S+') do
  expected[v] = true
  if not found[v] then
    return {'retry'}
  end
end
for v in pairs(found) do
  if not expected[v] then
    return {'retry'}
  end
end
local deleted = 0
for i = 1, #KEYS do
  if i ~= 5 then
    deleted = deleted + redis.call('DEL', KEYS[i])
  end
end
redis.call('SET', KEYS[5], ARGV[2], 'PX', ARGV[3])
return {'ok', deleted}
