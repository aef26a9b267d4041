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
-- then, for each decision in turn:
--   n             its number of buckets, whose keys are the next n KEYS (a key may repeat)
--   six numbers per bucket:
--     tick_us           length of a tick in microseconds
--     refill_per_tick   units added per tick
--     units_per_token   units one token costs
--     capacity          capacity in whole tokens; 0: the limit denies everything, no state
--     hits              tokens to take if the request passes; 0: check only (needs 1, takes 0)
--     mode              0 enforce, 1 shadow (never denies), 2+g quota-mode descriptor g
--
-- Reply: for each decision in turn, { passed (1 or 0), then four numbers per bucket:
--   held              1 if the bucket held the tokens asked of it, else 0
--   remaining         whole tokens left after the decision
--   until_full_us     microseconds until the bucket is full again
--   until_hits_us     microseconds until the asked tokens are there; -1: never }
-- all in one flat list.
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
local call, tonumber = redis.call, tonumber
local pack, unpack = struct.pack, struct.unpack

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

-- The level, in units, of the bucket at `key` at tick `now_tick`.
local function probe(key, tick, refill, units, capacity, cap_units, now_tick)
  local stored = call('GET', key)
  if not stored or #stored ~= 24 then
    return cap_units
  end
  local l, at, u = unpack('<ddd', stored)
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

-- Microseconds from now until a bucket at `level` holds `units_needed`.
local function until_units(level, units_needed, refill, now_tick, tick)
  if level >= units_needed then
    return 0
  end
  local ticks = ceil_div(units_needed - level, refill)
  return max(0, (now_tick + ticks) * tick - now)
end

local reply = {}
local r = 0

-- Appends the report of one bucket: held, remaining, until full, until the hits are there.
local function report(held, level, units, cap_units, need, capacity, refill, now_tick, tick)
  reply[r + 1] = held and 1 or 0
  reply[r + 2] = idiv(level, units)
  reply[r + 3] = until_units(level, cap_units, refill, now_tick, tick)
  if need <= capacity then
    reply[r + 4] = until_units(level, need * units, refill, now_tick, tick)
  else
    reply[r + 4] = -1
  end
  r = r + 4
end

local function report_deny_all()
  reply[r + 1], reply[r + 2], reply[r + 3], reply[r + 4] = 0, 0, 0, -1
  r = r + 4
end

-- A decision over the one bucket KEYS[k] and its numbers from ARGV[a + 1]: the common case,
-- without the tables the general case needs.
local function decide_one(k, a)
  local capacity = tonumber(ARGV[a + 4])
  local mode = tonumber(ARGV[a + 6])
  if capacity == 0 then
    r = r + 1
    reply[r] = (refund or mode == 1) and 1 or 0
    report_deny_all()
    return
  end
  local key = KEYS[k]
  local tick, refill = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local units, hits = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 5])
  local cap_units = capacity * units
  local now_tick = idiv(now, tick)
  local level = probe(key, tick, refill, units, capacity, cap_units, now_tick)
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
  report(holds, after, units, cap_units, need, capacity, refill, now_tick, tick)
end

-- One decision over KEYS[k + 1 .. k + n] and its numbers from ARGV[a + 1].
local function decide(k, a, n)
  local buckets = {}  -- per distinct key
  local held, probed, after = {}, {}, {}
  for i = 1, n do
    local at = a + 6 * (i - 1)
    local capacity = tonumber(ARGV[at + 4])
    held[i] = false
    if capacity > 0 then
      local key = KEYS[k + i]
      local units = tonumber(ARGV[at + 3])
      local bucket = buckets[key]
      if not bucket then
        local tick, refill = tonumber(ARGV[at + 1]), tonumber(ARGV[at + 2])
        local cap_units = capacity * units
        local now_tick = idiv(now, tick)
        local level = probe(key, tick, refill, units, capacity, cap_units, now_tick)
        bucket = {
          probe = level, level = level, now_tick = now_tick, tick = tick, refill = refill,
          units = units, cap_units = cap_units,
        }
        buckets[key] = bucket
      end
      local hits = tonumber(ARGV[at + 5])
      local need = max(hits, 1)
      local holds = need <= capacity and bucket.level >= need * units
      if refund then
        holds = true
        bucket.level = min(bucket.cap_units, bucket.level + hits * units)
      elseif holds then
        bucket.level = bucket.level - hits * units
      end
      held[i] = holds
      probed[i] = bucket.probe
      after[i] = bucket.level
    end
  end

  -- The verdict: every enforcing bucket holds; quota-mode descriptors deny only when none of
  -- them holds all of its buckets.
  local passed = true
  local groups, any_group = {}, false
  for i = 1, n do
    local mode = tonumber(ARGV[a + 6 * (i - 1) + 6])
    if mode == 0 and not held[i] then
      passed = false
    elseif mode >= 2 then
      any_group = true
      groups[mode] = (groups[mode] ~= false) and held[i]
    end
  end
  if refund then
    passed = true
  elseif passed and any_group then
    passed = false
    for _, all_held in pairs(groups) do
      passed = passed or all_held
    end
  end

  if passed then
    for key, b in pairs(buckets) do
      if b.level ~= b.probe then
        store(key, b.level, b.cap_units, b.units, b.now_tick, b.tick, b.refill)
      end
    end
  end

  r = r + 1
  reply[r] = passed and 1 or 0
  for i = 1, n do
    local at = a + 6 * (i - 1)
    local capacity = tonumber(ARGV[at + 4])
    if capacity == 0 then
      report_deny_all()
    else
      local b = buckets[KEYS[k + i]]
      local level = passed and after[i] or probed[i]
      local need = max(tonumber(ARGV[at + 5]), 1)
      report(held[i], level, b.units, b.cap_units, need, capacity, b.refill, b.now_tick, b.tick)
    end
  end
end

local k, a = 0, 3
for _ = 1, tonumber(ARGV[3]) do
  local n = tonumber(ARGV[a + 1])
  if n == 1 then
    decide_one(k + 1, a + 1)
  else
    decide(k, a + 1, n)
  end
  k = k + n
  a = a + 1 + 6 * n
end
return reply
