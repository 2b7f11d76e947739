-- Read what planning a user's batch needs in one call (instead of HMGET + GET + ZMSCORE): the client's
-- cost is per command, argument and reply element (docs/state_store.md). Read-only.
-- KEYS: 1 meta, 2 state of ARGV[1], 3 dedup, 4 block index of ARGV[1], 5 erase tombstone.
-- ARGV: 1 model version, 2 the byte lengths of the batch's event ids (<u4 each), 3 the ids concatenated,
--       4 bytes of one block-index entry (0: the caller keeps no index).
-- Returns {rev, hwm_ts, hwm_tb, floor, srev, state, seen, n, ixrev, ix0, ixfmt, last index entry, tombstone}:
-- seen has one byte per id, '1' when the id is in the dedup window.
local m = redis.call('HMGET', KEYS[1], 'rev', 'hwm_ts', 'hwm_tb', 'floor', 'srev:' .. ARGV[1], 'n',
  'ixrev:' .. ARGV[1], 'ix0:' .. ARGV[1], 'ixfmt:' .. ARGV[1])
local lens, ids = ARGV[2], ARGV[3]
local n = #lens / 4
local eids, at = {}, 1
for i = 1, n do
  local len = struct.unpack('<I4', lens, 4 * i - 3)
  eids[i] = string.sub(ids, at, at + len - 1)
  at = at + len
end
local seen = {}
-- unpack() is bounded by the Lua C stack (~8000 values): large argument lists go in slices.
for lo = 1, n, 1000 do
  local part = redis.call('ZMSCORE', KEYS[3], unpack(eids, lo, math.min(lo + 999, n)))
  for j = 1, #part do
    seen[#seen + 1] = part[j] and '1' or '0'
  end
end
local E = tonumber(ARGV[4])
local last = false
if E > 0 and m[7] then
  last = redis.call('GETRANGE', KEYS[4], -E, -1)
end
return {m[1] or false, m[2] or false, m[3] or false, m[4] or false, m[5] or false,
  redis.call('GET', KEYS[2]) or false, table.concat(seen), m[6] or false, m[7] or false, m[8] or false,
  m[9] or false, last, redis.call('GET', KEYS[5]) or false}
