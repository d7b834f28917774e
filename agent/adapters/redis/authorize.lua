-- Authorize a call (seq 0): status, concurrent calls, available >= min, reserve the first slice.
-- KEYS: 1 account hash, 2 live calls zset (call id -> expires ms), 3 call hash
-- ARGV: 1 account id, 2 call id, 3 node, 4 want, 5 min, 6 now ms, 7 ttl ms
local a = redis.call('HMGET', KEYS[1], 'balance', 'credit', 'reserved', 'status', 'max_calls', 'plan', 'currency')
if not a[1] then return {'noacct'} end
local plan, currency = a[6] or '', a[7] or ''
local c = redis.call('HMGET', KEYS[3], 'auth_granted', 'auth_available', 'acct')
if c[3] then return {'replay', c[1], c[2], plan, currency, c[3]} end
local available = n(a[1]) + n(a[2]) - n(a[3])
if a[4] ~= 'active' then
  local reason = 'closed'
  if a[4] == 'suspended' then reason = 'suspended' end
  return {'deny', reason, s(available), plan, currency}
end
local max_calls = n(a[5])
-- Live = not yet past its TTL, on any node; an expired reservation no longer holds a slot.
if max_calls > 0 and redis.call('ZCOUNT', KEYS[2], '(' .. ARGV[6], '+inf') >= max_calls then
  return {'deny', 'max_calls', s(available), plan, currency}
end
local want, min = n(ARGV[4]), n(ARGV[5])
if available < min or available < 0 then
  return {'deny', 'insufficient_funds', s(available), plan, currency}
end
local grant = math.min(want, available)
local expires = n(ARGV[6]) + n(ARGV[7])
redis.call('HSET', KEYS[3], 'acct', ARGV[1], 'node', ARGV[3], 'state', 'open', 'seq', '0',
  'granted', s(grant), 'last_debit', '0', 'auth_granted', s(grant), 'auth_available', s(available),
  'reserved', s(grant), 'debited', '0', 'overrun', '0', 'applied', '0', 'created', ARGV[6],
  'expires', s(expires), 'ver', '1', 'posted', '1')
redis.call('HSET', KEYS[1], 'reserved', s(n(a[3]) + grant))
redis.call('ZADD', KEYS[2], s(expires), ARGV[2])
return {'ok', s(grant), s(available), plan, currency}
