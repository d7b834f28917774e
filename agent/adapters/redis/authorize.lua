-- Authorize a call (seq 0): status, concurrent calls, available >= min, reserve the first slice.
-- With bundle slots (DESIGN §9) the first slice's seconds are taken from their periods first, in
-- the order given (core/balance.py authorize_with_bundles): all of them, no money is needed; some,
-- the call is allowed and holds up to `want` money; none, money alone decides. The periods of an
-- active account are opened (with their rollover) even when the call is then denied, as in SQL.
-- Spend caps (DESIGN §8; prelude.lua): with a cap, what is available is the least room the
-- balance and the caps leave, the call counts on the day and month the store computed in the
-- timezone it believes the plan has (ARGV 10); the script answers {'tz', timezone} when that is
-- not the account's, and the store computes again. A refusal where a cap binds is spend_limit.
-- KEYS: 1 account hash, 2 live calls zset (call id -> expires ms), 3 call hash,
--       4 the account's periods set, 5 its period openings not in SQL yet, 6 the sweeper's index
--       that holds the account's calls (keys.py index_of: the account's slot on a cluster),
--       7 (optional, one server only) the call -> account hint
-- ARGV: 1 account id, 2 call id, 3 node, 4 want, 5 min, 6 now ms, 7 ttl ms, 8 period key prefix,
--       9 bundle seconds wanted, 10 the timezone of days 11 and 12, 11 the call's day start ms,
--       12 its month start ms, 13 spend counter key prefix, 14 the call's member of the index,
--       15 the account's periods member of the index, 16 the hint's TTL in seconds,
--       17... the slots in draw order
-- The index entries and the hint are written here, with what they index: a call hash or an
-- opened period never exists without its entry (the sweeper finds them all), and a refused call
-- leaves nothing to clean up (that was a second round trip for every refusal).
-- Reply: {'ok', granted, available, plan, currency, bundle granted s, bundle available s}
--        {'replay', granted, available, plan, currency, account, bundle granted s, bundle available s}
--        {'deny', reason, available, plan, currency, bundle available s}, {'tz', timezone} or {'noacct'}
local a = redis.call('HMGET', KEYS[1], 'balance', 'credit', 'reserved', 'status', 'max_calls', 'plan', 'currency',
  'cap_call', 'cap_day', 'cap_month', 'tz')
if not a[1] then return {'noacct'} end
local plan, currency = a[6] or '', a[7] or ''
local c = redis.call('HMGET', KEYS[3], 'auth_granted', 'auth_available', 'acct', 'b_auth', 'b_avail')
if c[3] then
  if KEYS[7] and c[3] == ARGV[1] then redis.call('SET', KEYS[7], ARGV[1], 'EX', ARGV[16]) end
  return {'replay', c[1], c[2], plan, currency, c[3], c[4] or '0', c[5] or '0'}
end
local available = n(a[1]) + n(a[2]) - n(a[3])
local cap_call, cap_day, cap_month = cap_of(a[8]), cap_of(a[9]), cap_of(a[10])
local sp, sexist, binding = nil, {}, false
if cap_call or cap_day or cap_month then
  local tz = a[11] or ''
  if tz == '' then tz = 'UTC' end
  if tz ~= ARGV[10] then return {'tz', tz} end
  sp = spend_of(ARGV[13], ARGV[11], ARGV[12])
  local room = cap_call
  local function bound(cap, key, i)
    if not cap then return end
    local used
    used, sexist[i] = spend_used(key)
    if room == nil or cap - used < room then room = cap - used end
  end
  bound(cap_day, sp[1], 1)
  bound(cap_month, sp[2], 2)
  if room < available then available, binding = room, true end
end
local count = #ARGV - 16
local pkeys, lefts, bavail = {}, {}, 0
if a[4] == 'active' then
  for i = 1, count do
    pkeys[i], lefts[i] = open_period(ARGV[8], ARGV[16 + i], KEYS[4], KEYS[5])
    bavail = bavail + math.max(lefts[i], 0)
  end
  if count > 0 then redis.call('ZADD', KEYS[6], 'NX', ARGV[6], ARGV[15]) end
end
if a[4] ~= 'active' then
  local reason = 'closed'
  if a[4] == 'suspended' then reason = 'suspended' end
  return {'deny', reason, s(available), plan, currency, '0'}
end
local max_calls = n(a[5])
-- Live = not yet past its TTL, on any node; an expired reservation no longer holds a slot.
if max_calls > 0 and redis.call('ZCOUNT', KEYS[2], '(' .. ARGV[6], '+inf') >= max_calls then
  return {'deny', 'max_calls', s(available), plan, currency, s(bavail)}
end
local want, min, want_s = n(ARGV[4]), n(ARGV[5]), n(ARGV[9])
local taken, got = {}, 0
for i = 1, count do taken[i] = 0 end
if want_s > 0 then taken = take(lefts, want_s, false) end
for i = 1, count do got = got + taken[i] end
local grant
if got > 0 then
  grant = 0
  if got < want_s then grant = math.min(want, math.max(available, 0)) end
else
  if available < min or available < 0 then
    local reason = 'insufficient_funds'
    if binding then reason = 'spend_limit' end  -- the money is there; a cap is reached
    return {'deny', reason, s(available), plan, currency, s(bavail)}
  end
  grant = math.min(want, available)
end
local expires = n(ARGV[6]) + n(ARGV[7])
redis.call('ZADD', KEYS[6], 'NX', s(expires), ARGV[14])
if KEYS[7] then redis.call('SET', KEYS[7], ARGV[1], 'EX', ARGV[16]) end
redis.call('HSET', KEYS[3], 'acct', ARGV[1], 'node', ARGV[3], 'state', 'open', 'seq', '0',
  'granted', s(grant), 'last_debit', '0', 'auth_granted', s(grant), 'auth_available', s(available),
  'reserved', s(grant), 'debited', '0', 'overrun', '0', 'applied', '0', 'created', ARGV[6],
  'expires', s(expires), 'ver', '1', 'posted', '1')
if count > 0 then
  local fields = {'b_n', s(count), 'b_held', s(got), 'b_used', '0', 'b_last', s(got), 'b_auth', s(got),
    'b_avail', s(bavail)}
  for i = 1, count do
    if taken[i] > 0 then redis.call('HINCRBY', pkeys[i], 'reserved', s(taken[i])) end
    fields[#fields + 1] = 'bs' .. i
    fields[#fields + 1] = ARGV[16 + i]
    fields[#fields + 1] = 'bh' .. i
    fields[#fields + 1] = s(taken[i])
  end
  redis.call('HSET', KEYS[3], unpack(fields))
end
if sp then
  redis.call('HSET', KEYS[3], 'sd', ARGV[11], 'sm', ARGV[12])
  spend_move_call(sp, n(ARGV[6]), grant, 0, sexist)
end
redis.call('HSET', KEYS[1], 'reserved', s(n(a[3]) + grant))
redis.call('ZADD', KEYS[2], s(expires), ARGV[2])
return {'ok', s(grant), s(available), plan, currency, s(got), s(bavail)}
