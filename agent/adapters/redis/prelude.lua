-- Shared by every script (prepended when the scripts are loaded).
-- Money is integer micro-units. Lua numbers are doubles, exact below 2^53; the store refuses
-- larger amounts, and every number written back is formatted with %d (never 1e+15).
local function n(v) return tonumber(v) or 0 end
local function s(x) return string.format('%d', x) end

-- Bundle periods (DESIGN §9). A slot is the string 'grant,start,seconds,expires,carry_from' (an
-- empty carry_from: nothing rolls over). Grant, start, expires and carry_from stay strings (they
-- are only compared and joined into keys; expires may be 2^62); seconds is below 2^53. A period's
-- hash is the account's period prefix (an ARGV: the account's hash tag, so the same cluster slot
-- as the KEYS) .. 'grant:start', with granted, used, reserved (seconds: left = granted - used -
-- reserved), allowance, carry and end. Opening one adds its id to the account's periods set and
-- to the set of openings SQL does not have yet (ledger.py writes them).
local function slot_fields(v)
  local g, st, sec, ex, ca = string.match(v, '^(%d+),(%-?%d+),(%d+),(%-?%d+),(%-?%d*)$')
  if not g then error('bad bundle slot ' .. tostring(v)) end
  return g, st, n(sec), ex, ca
end
local function slot_id(v)
  local g, st = slot_fields(v)
  return g .. ':' .. st
end
-- The slot's period: its hash key, its left seconds, 1 if this opened it (else 0). Opened on first
-- use with its allowance plus the rollover of the period before (at most one allowance): what that
-- one has left now, or its whole allowance if no call ever drew on it.
local function open_period(prefix, v, kperiods, kunposted)
  local g, st, allowance, ex, ca = slot_fields(v)
  local id = g .. ':' .. st
  local key = prefix .. id
  local p = redis.call('HMGET', key, 'granted', 'used', 'reserved')
  if p[1] then return key, n(p[1]) - n(p[2]) - n(p[3]), 0 end
  local carry = 0
  if ca ~= '' then
    local q = redis.call('HMGET', prefix .. g .. ':' .. ca, 'granted', 'used', 'reserved')
    local left = allowance
    if q[1] then left = n(q[1]) - n(q[2]) - n(q[3]) end
    carry = math.max(0, math.min(left, allowance))
  end
  redis.call('HSET', key, 'granted', s(allowance + carry), 'used', '0', 'reserved', '0',
    'allowance', s(allowance), 'carry', s(carry), 'end', ex)
  redis.call('SADD', kperiods, id)
  redis.call('SADD', kunposted, id)
  return key, allowance + carry, 1
end
-- Take up to `want` from `amounts` in order (core/bundles.py draw); with `absorb`, what none
-- had goes to the first (core/bundles.py commit: the call did use those seconds).
local function take(amounts, want, absorb)
  local out, need = {}, math.max(want, 0)
  for i, amount in ipairs(amounts) do
    local t = math.min(need, math.max(amount, 0))
    out[i] = t
    need = need - t
  end
  if absorb and need > 0 and #out > 0 then out[1] = out[1] + need end
  return out
end
-- A call's bundle holds (call hash: bs<i> slot, bh<i> held, bu<i> used when it closed, bl<i> used
-- by a settle after it closed), in draw order.
local function holds_of(kcall, count)
  local slots, held, used, late = {}, {}, {}, {}
  if count == 0 then return slots, held, used, late end
  local fields = {}
  for i = 1, count do
    fields[#fields + 1] = 'bs' .. i
    fields[#fields + 1] = 'bh' .. i
    fields[#fields + 1] = 'bu' .. i
    fields[#fields + 1] = 'bl' .. i
  end
  local v = redis.call('HMGET', kcall, unpack(fields))
  for i = 1, count do
    slots[i], held[i], used[i], late[i] = v[4 * i - 3], n(v[4 * i - 2]), n(v[4 * i - 1]), n(v[4 * i])
  end
  return slots, held, used, late
end
-- A live call's holds end: `covered` seconds are used over them in draw order, the rest goes
-- back to the periods. Returns the seconds used (0 for a call that held no slot).
local function close_holds(kcall, covered, prefix, kperiods, kunposted)
  local count = n(redis.call('HGET', kcall, 'b_n'))
  if count == 0 then return 0 end
  local slots, held = holds_of(kcall, count)
  local used = take(held, covered, true)
  local fields, total = {}, 0
  for i = 1, count do
    local key = open_period(prefix, slots[i], kperiods, kunposted)
    local reserved = n(redis.call('HGET', key, 'reserved'))
    redis.call('HSET', key, 'reserved', s(reserved - math.min(held[i], reserved)))
    if used[i] > 0 then redis.call('HINCRBY', key, 'used', s(used[i])) end
    fields[#fields + 1] = 'bu' .. i
    fields[#fields + 1] = s(used[i])
    total = total + used[i]
  end
  fields[#fields + 1] = 'b_used'
  fields[#fields + 1] = s(total)
  redis.call('HSET', kcall, unpack(fields))
  return total
end
-- Spend caps (DESIGN §8, core/budgets.py). The account hash holds cap_call, cap_day, cap_month
-- (micro-units; '' or absent: no cap) and tz (its plan's timezone: the store computes a call's day
-- and month in Python and says which timezone it used). A call authorized while its account had a
-- cap counts on the local day and month it started (call hash sd, sm: their start ms); each has a
-- counter hash on the account's slot (the account's spend prefix, an ARGV, .. 'd:'/'m:' .. start)
-- with spent (the charges of its calls: settle cost, close debits, late settle cost - close
-- charge) and held (exactly what its open calls add to reserved + debited). The grant of every
-- step is the least room: balance available, cap_call - (call debited + reserved), cap_day -
-- (day spent + held), cap_month - (...). A counter expires a few days (day) / ~40 days (month)
-- after its period, counted on the caller's clock.
local SPEND_KEEP = {d = 4 * 86400000, m = 72 * 86400000}  -- ms after the period's start
local SPEND_MIN_TTL = 3600000
local function cap_of(v)
  if v == false or v == nil or v == '' then return nil end
  return n(v)
end
-- The call's counters {day key, month key, day start, month start}, or nil (no cap at its authorize).
local function spend_of(prefix, sd, sm)
  if sd == false or sd == nil or sd == '' then return nil end
  return {prefix .. 'd:' .. sd, prefix .. 'm:' .. sm, sd, sm}
end
-- spent + held of a counter, and whether it exists.
local function spend_used(key)
  local v = redis.call('HMGET', key, 'spent', 'held')
  return n(v[1]) + n(v[2]), v[1] ~= false or v[2] ~= false
end
-- Move one counter by `held` and `spent`; a counter created here gets its TTL (at least an hour),
-- a counter of a period long gone (past its TTL) is not created again (SQL's spend_periods has
-- its spent). `exists`: nil when the caller did not read it.
local function spend_move(key, kind, start, now, held, spent, exists)
  if held == 0 and spent == 0 then return end
  if exists == nil then exists = redis.call('EXISTS', key) == 1 end
  local ttl = n(start) + SPEND_KEEP[kind] - now
  if not exists and ttl <= 0 then return end
  if held ~= 0 then redis.call('HINCRBY', key, 'held', s(held)) end
  if spent ~= 0 then redis.call('HINCRBY', key, 'spent', s(spent)) end
  if not exists then redis.call('PEXPIRE', key, s(math.max(ttl, SPEND_MIN_TTL))) end
end
-- Both counters of a call (sp from spend_of; ex: their existence when read, else nil).
local function spend_move_call(sp, now, held, spent, ex)
  if not sp then return end
  ex = ex or {}
  spend_move(sp[1], 'd', sp[3], now, held, spent, ex[1])
  spend_move(sp[2], 'm', sp[4], now, held, spent, ex[2])
end
