-- token_bucket.lua: rate-limit decisions over token buckets, each decision atomic and all or
-- nothing.
--
-- This is the Redis twin of Sluice's bucket model (src/bucket.rs) and of its in-memory store
-- (src/store/memory.rs): it must give the same answers, and a property test compares them.
-- The only caller is src/store/redis.rs, which may send several decisions that arrived
-- together in one call; they are decided one after another, as if sent one by one.
--
-- ARGV[1]       the time in microseconds; 0: read it with TIME (what Sluice sends, except
--               in tests that run the store on a clock of their own)
-- ARGV[2]       0: decide, taking tokens if the request passes
--               1: refund, giving `hits` tokens back to each bucket (a Cluster decision
--                  that another slot group denied), clamped to the capacity
-- ARGV[3]       the number of decisions D
-- ARGV[4]       the numbers of the D decisions, each a little-endian IEEE double (8 bytes;
--               unpacked in one step per bucket, far cheaper than an argument per number).
--               For each decision in turn:
--   n             its number of buckets, whose keys are the next n KEYS (a key may repeat)
--   six numbers per bucket:
--     tick_us           length of a tick in microseconds
--     refill_per_tick   units added per tick
--     units_per_token   units one token costs
--     capacity          capacity in whole tokens; 0: the limit denies everything, no state
--     hits              tokens to take if the request passes; 0: check only (needs 1, takes 0)
--     mode              0 enforce, 1 shadow (never denies), 2+g quota-mode descriptor g
--
-- Reply: one flat list of numbers: first the time decided at, in microseconds; then for each
-- decision in turn, { passed (1 or 0), then two numbers per bucket:
--   held              1 if the bucket held the tokens asked of it, else 0
--   level             its level in units after the decision (as probed, when denied) }
-- The caller turns a level into the report (tokens left, time until full, time until the hits
-- are there) with the same arithmetic as the model's; doing it here would double the script's
-- cost.
--
-- State of a bucket: 24 bytes, struct.pack('<ddd', level, at_us, units_per_token), where level
-- is in units at the tick boundary at_us. A missing key (or one holding anything else) is a
-- full bucket; a key expires when it would be full. Every number stays below 2^53, so Lua's
-- doubles hold them exactly, in the state as in the arithmetic.

local now = tonumber(ARGV[1])
if now == 0 then
  local time = redis.call('TIME')
  now = tonumber(time[1]) * 1000000 + tonumber(time[2])
end
local refund = ARGV[2] == '1'
local floor, min, max = math.floor, math.min, math.max
local call, pcall_redis = redis.call, redis.pcall
local pack, unpack_struct = struct.pack, struct.unpack

-- floor(a / b) for non-negative integers below 2^53. The division is correctly rounded, so
-- the quotient can only come out one too high, never too low.
local function idiv(a, b)
  local q = floor(a / b)
  if q * b > a then
    q = q - 1
  end
  return q
end

local function ceil_div(a, b)
  return idiv(a + b - 1, b)
end

-- The level, in units, at tick `now_tick` of a bucket whose stored state is `stored` (false
-- when the key is missing, an error table when it holds another type).
local function level_of(stored, tick, refill, units, capacity, cap_units, now_tick)
  if type(stored) ~= 'string' or #stored ~= 24 then
    return cap_units
  end
  local l, at, u = unpack_struct('<ddd', stored)
  if u ~= units and u ~= 0 then
    -- The limit's numbers changed: keep whole tokens, clamped to the new capacity.
    l = min(idiv(l, u), capacity) * units
  else
    l = min(l, cap_units)
  end
  local gap = max(0, now_tick - idiv(at, tick))
  if gap >= ceil_div(cap_units - l, refill) then
    return cap_units
  end
  return l + gap * refill
end

-- Stores `level` for `key`, or forgets a full bucket.
local function store(key, level, cap_units, units, now_tick, tick, refill)
  if level >= cap_units then
    call('DEL', key)
    return
  end
  local at = now_tick * tick
  local full_at = at + ceil_div(cap_units - level, refill) * tick
  call('SET', key, pack('<ddd', level, at, units), 'PX', max(1000, ceil_div(full_at - now, 1000)))
end

local reply = { now }
local r = 1

-- Appends the answer of one bucket: whether it held, and its level.
local function report(held, level)
  reply[r + 1] = held and 1 or 0
  reply[r + 2] = level
  r = r + 2
end

local function report_deny_all()
  reply[r + 1], reply[r + 2] = 0, 0
  r = r + 2
end

-- The numbers of the decisions, and where the next one starts.
local numbers, cursor = ARGV[4], 1

-- The next number: a decision's count of buckets.
local function next_number()
  local value
  value, cursor = unpack_struct('<d', numbers, cursor)
  return value
end

-- The six numbers of the next bucket.
local function next_bucket()
  local tick, refill, units, capacity, hits, mode
  tick, refill, units, capacity, hits, mode, cursor = unpack_struct('<dddddd', numbers, cursor)
  return tick, refill, units, capacity, hits, mode
end

-- A decision over the one bucket KEYS[k]: the common case, without the tables the general
-- case needs.
local function decide_one(k)
  local tick, refill, units, capacity, hits, mode = next_bucket()
  if capacity == 0 then
    r = r + 1
    reply[r] = (refund or mode == 1) and 1 or 0
    report_deny_all()
    return
  end
  local key = KEYS[k]
  local cap_units = capacity * units
  local now_tick = idiv(now, tick)
  -- pcall: GET fails on a key of another type, which counts as a full bucket, as MGET's nil
  -- does on the general path; an error would fail every decision of the call.
  local level = level_of(pcall_redis('GET', key), tick, refill, units, capacity, cap_units, now_tick)
  local need = max(hits, 1)
  local holds = need <= capacity and level >= need * units
  local after = level
  if refund then
    holds = true
    after = min(cap_units, level + hits * units)
  elseif holds then
    after = level - hits * units
  end
  -- Alone, a quota-mode descriptor denies exactly when its bucket does.
  local passed = refund or holds or mode == 1
  if passed and after ~= level then
    store(key, after, cap_units, units, now_tick, tick, refill)
  else
    after = level
  end
  r = r + 1
  reply[r] = passed and 1 or 0
  report(holds, after)
end

-- One decision over KEYS[k + 1 .. k + n]. Charges on the
-- same key share one bucket, which takes their tokens in turn; the buckets are read with one
-- MGET.
--
-- The tables are scratch space shared by the decisions of one call, so that each decision
-- does not build (and grow) tables of its own; only the entries 1..n and 1..buckets of the
-- decision at hand are meaningful.
local capacity, hits, mode, units, bucket_of, held, after = {}, {}, {}, {}, {}, {}, {}
local keys, index, level, probed = {}, {}, {}, {}
local b_tick, b_refill, b_units, b_cap, b_cap_units, b_now = {}, {}, {}, {}, {}, {}

local function decide(k, n)
  -- The distinct buckets, numbered 1..buckets in the order their keys first appear.
  local buckets = 0
  for i = 1, n do
    bucket_of[i] = false
    local tick, refill
    tick, refill, units[i], capacity[i], hits[i], mode[i] = next_bucket()
    if capacity[i] > 0 then
      local key = KEYS[k + i]
      local j = index[key]
      if not j then
        buckets = buckets + 1
        j = buckets
        index[key], keys[j] = j, key
        b_tick[j], b_refill[j], b_units[j] = tick, refill, units[i]
        b_cap[j], b_cap_units[j], b_now[j] = capacity[i], capacity[i] * units[i], idiv(now, tick)
      end
      bucket_of[i] = j
    end
  end

  if buckets > 0 then
    local stored = call('MGET', unpack(keys, 1, buckets))
    for j = 1, buckets do
      level[j] = level_of(
        stored[j], b_tick[j], b_refill[j], b_units[j], b_cap[j], b_cap_units[j], b_now[j])
      probed[j] = level[j]
    end
  end

  for i = 1, n do
    local j = bucket_of[i]
    held[i] = false
    if j then
      local need = max(hits[i], 1)
      local holds = need <= capacity[i] and level[j] >= need * units[i]
      if refund then
        holds = true
        level[j] = min(b_cap_units[j], level[j] + hits[i] * units[i])
      elseif holds then
        level[j] = level[j] - hits[i] * units[i]
      end
      held[i] = holds
      after[i] = level[j]
    end
  end

  -- The verdict: every enforcing bucket holds; quota-mode descriptors deny only when none of
  -- them holds all of its buckets.
  local passed = true
  local groups
  for i = 1, n do
    if mode[i] == 0 and not held[i] then
      passed = false
    elseif mode[i] >= 2 then
      groups = groups or {}
      groups[mode[i]] = (groups[mode[i]] ~= false) and held[i]
    end
  end
  if refund then
    passed = true
  elseif passed and groups then
    passed = false
    for _, all_held in pairs(groups) do
      passed = passed or all_held
    end
  end

  if passed then
    for j = 1, buckets do
      if level[j] ~= probed[j] then
        store(keys[j], level[j], b_cap_units[j], b_units[j], b_now[j], b_tick[j], b_refill[j])
      end
    end
  end

  for j = 1, buckets do
    index[keys[j]] = nil
  end

  r = r + 1
  reply[r] = passed and 1 or 0
  for i = 1, n do
    local j = bucket_of[i]
    if not j then
      report_deny_all()
    else
      local shown = passed and after[i] or probed[j]
      report(held[i], shown)
    end
  end
end

local k = 0
for _ = 1, tonumber(ARGV[3]) do
  local n = next_number()
  if n == 1 then
    decide_one(k + 1)
  else
    decide(k, n)
  end
  k = k + n
end
return reply
