-- token_bucket.lua: one rate-limit decision over several token buckets, atomically.
--
-- This is the Redis twin of Sluice's bucket model (src/bucket.rs) and of its in-memory store
-- (src/store/memory.rs): it must give the same answers, and a property test compares them.
-- The only caller is src/store/redis.rs.
--
-- KEYS[i]       the key of bucket i (the same key may appear more than once)
-- ARGV[1]       the time in microseconds; 0: read it with TIME (what Sluice sends, except
--               in tests that run the store on a clock of their own)
-- ARGV[2]       0: decide, taking tokens if the request passes
--               1: refund, giving `hits` tokens back to each bucket (a Cluster decision
--                  that another slot group denied), clamped to the capacity
-- ARGV[3..]     six numbers per bucket i, at ARGV[2+6*(i-1)+1 .. 2+6*(i-1)+6]:
--   tick_us           length of a tick in microseconds
--   refill_per_tick   units added per tick
--   units_per_token   units one token costs
--   capacity          capacity in whole tokens; 0: the limit denies everything, no state
--   hits              tokens to take if the request passes; 0: check only (needs 1, takes 0)
--   mode              0 enforce, 1 shadow (never denies), 2+g quota-mode descriptor g
--
-- Reply: { passed, then five numbers per bucket i:
--   held              1 if the bucket held the tokens asked of it, else 0
--   remaining         whole tokens left after the decision
--   until_full_us     microseconds until the bucket is full again
--   until_hits_us     microseconds until the asked tokens are there; -1: never (or no state)
--   stateful          1 if the bucket has state (capacity > 0), else 0 }
--
-- State of a bucket: the string "level at_us units_per_token", where level is in units at the
-- tick boundary at_us. A missing key is a full bucket; a key expires when it would be full.
-- Every number stays below 2^53, so Lua's doubles hold them exactly.

local now = tonumber(ARGV[1])
if now == 0 then
  local time = redis.call('TIME')
  now = tonumber(time[1]) * 1000000 + tonumber(time[2])
end
local refund = tonumber(ARGV[2]) == 1

-- floor(a / b) for non-negative integers below 2^53. The division is correctly rounded, so
-- the quotient can only come out one too high, never too low.
local function idiv(a, b)
  local q = math.floor(a / b)
  if q * b > a then
    q = q - 1
  end
  return q
end

local function ceil_div(a, b)
  return idiv(a + b - 1, b)
end

local n = #KEYS
local buckets = {}  -- per distinct key: the bucket brought up to now
local held, probed, after = {}, {}, {}

for i = 1, n do
  local base = 2 + 6 * (i - 1)
  local tick = tonumber(ARGV[base + 1])
  local refill = tonumber(ARGV[base + 2])
  local units = tonumber(ARGV[base + 3])
  local capacity = tonumber(ARGV[base + 4])
  local hits = tonumber(ARGV[base + 5])
  if capacity == 0 then
    held[i] = false
  else
    local key = KEYS[i]
    local bucket = buckets[key]
    if not bucket then
      local cap_units = capacity * units
      local now_tick = idiv(now, tick)
      local level = cap_units
      local stored = redis.call('GET', key)
      if stored then
        local l, at, u = string.match(stored, '^(%d+) (%d+) (%d+)$')
        l, at, u = tonumber(l), tonumber(at), tonumber(u)
        if l then
          if u ~= units and u ~= 0 then
            -- The limit's numbers changed: keep whole tokens, clamped to the new capacity.
            l = math.min(idiv(l, u), capacity) * units
          else
            l = math.min(l, cap_units)
          end
          local gap = now_tick - idiv(at, tick)
          if gap < 0 then
            gap = 0
          end
          if gap >= ceil_div(cap_units - l, refill) then
            level = cap_units
          else
            level = l + gap * refill
          end
        end
      end
      bucket = {
        probe = level, level = level, now_tick = now_tick, tick = tick,
        refill = refill, units = units, cap_units = cap_units,
      }
      buckets[key] = bucket
    end
    local need = hits
    if need == 0 then
      need = 1
    end
    local holds = need <= capacity and bucket.level >= need * units
    if refund then
      holds = true
      bucket.level = math.min(bucket.cap_units, bucket.level + hits * units)
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
local groups, any_group, any_group_held = {}, false, false
for i = 1, n do
  local mode = tonumber(ARGV[2 + 6 * (i - 1) + 6])
  if mode == 0 and not held[i] then
    passed = false
  elseif mode >= 2 then
    any_group = true
    if groups[mode] == nil then
      groups[mode] = held[i]
    else
      groups[mode] = groups[mode] and held[i]
    end
  end
end
if refund then
  passed = true
elseif passed and any_group then
  for _, all_held in pairs(groups) do
    if all_held then
      any_group_held = true
    end
  end
  passed = any_group_held
end

if passed then
  for key, bucket in pairs(buckets) do
    if bucket.level ~= bucket.probe then
      local at = bucket.now_tick * bucket.tick
      if bucket.level >= bucket.cap_units then
        redis.call('DEL', key)
      else
        local ticks = ceil_div(bucket.cap_units - bucket.level, bucket.refill)
        local full_at = at + ticks * bucket.tick
        local ttl_ms = math.max(1000, ceil_div(full_at - now, 1000))
        local state = string.format('%d %d %d', bucket.level, at, bucket.units)
        redis.call('SET', key, state, 'PX', ttl_ms)
      end
    end
  end
end

local reply = { passed and 1 or 0 }
for i = 1, n do
  local base = 2 + 6 * (i - 1)
  local capacity = tonumber(ARGV[base + 4])
  if capacity == 0 then
    table.insert(reply, 0)
    table.insert(reply, 0)
    table.insert(reply, 0)
    table.insert(reply, -1)
    table.insert(reply, 0)
  else
    local bucket = buckets[KEYS[i]]
    local level = probed[i]
    if passed then
      level = after[i]
    end
    local hits = tonumber(ARGV[base + 5])
    if hits == 0 then
      hits = 1
    end
    local tick_start = bucket.now_tick * bucket.tick
    local function until_units(units_needed)
      if level >= units_needed then
        return 0
      end
      local ticks = ceil_div(units_needed - level, bucket.refill)
      return math.max(0, tick_start + ticks * bucket.tick - now)
    end
    table.insert(reply, held[i] and 1 or 0)
    table.insert(reply, idiv(level, bucket.units))
    table.insert(reply, until_units(bucket.cap_units))
    if hits <= capacity then
      table.insert(reply, until_units(hits * bucket.units))
    else
      table.insert(reply, -1)
    end
    table.insert(reply, 1)
  end
end
return reply
