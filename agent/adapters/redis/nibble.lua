-- One nibble (seq >= 1): debit the slice just used, hold up to `reserve` for the next one.
-- Bundles (DESIGN §9, core/balance.py nibble_bundle_draw): a call that holds bundle slots records
-- the seconds it used so far (at most what it holds); asked for `want_s` more, it takes them from
-- its periods in draw order, and holds no money for the next slice when it got them all.
-- Spend caps (DESIGN §8; prelude.lua): with a cap on the account, the next slice is held only up
-- to the least room the caps leave (an overrun counts as used); the call's day and month counters
-- (if it has them) hold what its reserved + debited add.
-- KEYS: 1 account hash, 2 live calls zset, 3 call hash, 4 the account's periods set,
--       5 its period openings not in SQL yet
-- ARGV: 1 call id, 2 seq, 3 debit, 4 reserve, 5 now ms, 6 ttl ms, 7 bundle seconds used,
--       8 bundle seconds wanted, 9 period key prefix, 10 spend counter key prefix
-- Reply: {status, granted, debit applied, total debited, total overrun, bundle granted s,
--         bundle held s}
-- The hot path of the daemon: five commands, no more, for a call without bundles or caps (one
-- read and one write per hash); a call under a daily or monthly cap adds a read and a write of
-- each of its two counters.
local c = redis.call('HMGET', KEYS[3], 'state', 'seq', 'reserved', 'debited', 'overrun', 'granted',
  'last_debit', 'expires', 'applied', 'b_n', 'b_held', 'b_used', 'b_last', 'sd', 'sm')
local a = redis.call('HMGET', KEYS[1], 'balance', 'credit', 'reserved', 'overrun', 'cap_call', 'cap_day',
  'cap_month')
if not a[1] then return {'noacct'} end
if not c[1] then return {'unknown_call', '0', '0', '0', '0', '0', '0'} end
local seq = n(ARGV[2])
if c[1] ~= 'open' then return {'closed', '0', '0', c[4], c[5], '0', '0'} end
if seq == n(c[2]) then return {'replayed', c[6], c[7], c[4], c[5], c[13] or '0', c[11] or '0'} end
if seq < n(c[2]) then return {'stale', '0', '0', c[4], c[5], '0', '0'} end
local now = n(ARGV[5])
if n(c[8]) <= now then return {'expired', '0', '0', c[4], c[5], '0', '0'} end
local debit, reserve, held = n(ARGV[3]), n(ARGV[4]), n(c[3])
local count, held_s, bundle_granted = n(c[10]), n(c[11]), 0
local bfields = {}
if count > 0 then
  local want_s = n(ARGV[8])
  bfields = {'b_used', s(math.max(n(c[12]), math.min(n(ARGV[7]), held_s)))}
  if want_s > 0 then
    local slots, holds = holds_of(KEYS[3], count)
    local pkeys, lefts = {}, {}
    for i = 1, count do pkeys[i], lefts[i] = open_period(ARGV[9], slots[i], KEYS[4], KEYS[5]) end
    local taken = take(lefts, want_s, false)
    for i = 1, count do
      if taken[i] > 0 then
        redis.call('HINCRBY', pkeys[i], 'reserved', s(taken[i]))
        bfields[#bfields + 1] = 'bh' .. i
        bfields[#bfields + 1] = s(holds[i] + taken[i])
        bundle_granted = bundle_granted + taken[i]
      end
    end
    if bundle_granted >= want_s then reserve = 0 end
  end
  held_s = held_s + bundle_granted
  bfields[#bfields + 1] = 'b_held'
  bfields[#bfields + 1] = s(held_s)
  bfields[#bfields + 1] = 'b_last'
  bfields[#bfields + 1] = s(bundle_granted)
end
local taken = math.min(debit, held)
local over = debit - taken
local remaining = held - taken
local balance = n(a[1]) - debit
-- Available once the debit is applied, this call's remaining reservation still counted.
local available = balance + n(a[2]) - (n(a[3]) - taken)
-- The caps, as the balance: what the call and its day and month hold counts as used.
local sp, sexist = spend_of(ARGV[10], c[14], c[15]), {}
local cap_call, cap_day, cap_month = cap_of(a[5]), cap_of(a[6]), cap_of(a[7])
if cap_call or cap_day or cap_month then
  local function bound(cap, used)
    if cap and cap - used < available then available = cap - used end
  end
  bound(cap_call, n(c[4]) + held + over)
  local day, month = 0, 0
  if sp and (cap_day or cap_month) then
    day, sexist[1] = spend_used(sp[1])
    month, sexist[2] = spend_used(sp[2])
  end
  bound(cap_day, day + over)
  bound(cap_month, month + over)
end
local grant = reserve
if remaining < reserve then
  grant = remaining + math.min(reserve - remaining, math.max(available, 0))
end
redis.call('HSET', KEYS[1], 'balance', s(balance), 'reserved', s(n(a[3]) + grant - held),
  'overrun', s(n(a[4]) + over))
-- Each number is formatted once (the hash and the reply share the strings): string.format is a
-- good part of the script's time.
local debited, overrun, expires = n(c[4]) + debit, n(c[5]) + over, now + n(ARGV[6])
local grant_s, debit_s, debited_s, overrun_s, expires_s = s(grant), s(debit), s(debited), s(overrun), s(expires)
redis.call('HSET', KEYS[3], 'seq', ARGV[2], 'reserved', grant_s, 'granted', grant_s,
  'last_debit', debit_s, 'debited', debited_s, 'overrun', overrun_s, 'expires', expires_s,
  'applied', s(n(c[9]) - debit), unpack(bfields))
redis.call('ZADD', KEYS[2], expires_s, ARGV[1])
spend_move_call(sp, now, grant + debit - held, 0, sexist)
return {'granted', grant_s, debit_s, debited_s, overrun_s, s(bundle_granted), s(held_s)}
