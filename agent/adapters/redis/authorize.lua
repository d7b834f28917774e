-- Authorize a call (seq 0): status, concurrent calls, available >= min, reserve the first slice.
-- With bundle slots (DESIGN §9) the first slice's seconds are taken from their periods first, in
-- the order given (core/balance.py authorize_with_bundles): all of them, no money is needed; some,
-- the call is allowed and holds up to `want` money; none, money alone decides. The periods of an
-- active account are opened (with their rollover) even when the call is then denied, as in SQL.
-- KEYS: 1 account hash, 2 live calls zset (call id -> expires ms), 3 call hash,
--       4 the account's periods set, 5 its period openings not in SQL yet
-- ARGV: 1 account id, 2 call id, 3 node, 4 want, 5 min, 6 now ms, 7 ttl ms, 8 period key prefix,
--       9 bundle seconds wanted, 10... the slots in draw order
-- Reply: {'ok', granted, available, plan, currency, bundle granted s, bundle available s}
--        {'replay', granted, available, plan, currency, account, bundle granted s, bundle available s}
--        {'deny', reason, available, plan, currency, bundle available s} or {'noacct'}
local a = redis.call('HMGET', KEYS[1], 'balance', 'credit', 'reserved', 'status', 'max_calls', 'plan', 'currency')
if not a[1] then return {'noacct'} end
local plan, currency = a[6] or '', a[7] or ''
local c = redis.call('HMGET', KEYS[3], 'auth_granted', 'auth_available', 'acct', 'b_auth', 'b_avail')
if c[3] then return {'replay', c[1], c[2], plan, currency, c[3], c[4] or '0', c[5] or '0'} end
local available = n(a[1]) + n(a[2]) - n(a[3])
local count = #ARGV - 9
local pkeys, lefts, bavail = {}, {}, 0
if a[4] == 'active' then
  for i = 1, count do
    pkeys[i], lefts[i] = open_period(ARGV[8], ARGV[9 + i], KEYS[4], KEYS[5])
    bavail = bavail + math.max(lefts[i], 0)
  end
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
    return {'deny', 'insufficient_funds', s(available), plan, currency, s(bavail)}
  end
  grant = math.min(want, available)
end
local expires = n(ARGV[6]) + n(ARGV[7])
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
    fields[#fields + 1] = ARGV[9 + i]
    fields[#fields + 1] = 'bh' .. i
    fields[#fields + 1] = s(taken[i])
  end
  redis.call('HSET', KEYS[3], unpack(fields))
end
redis.call('HSET', KEYS[1], 'reserved', s(n(a[3]) + grant))
redis.call('ZADD', KEYS[2], s(expires), ARGV[2])
return {'ok', s(grant), s(available), plan, currency, s(got), s(bavail)}
