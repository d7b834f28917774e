-- One nibble (seq >= 1): debit the slice just used, hold up to `reserve` for the next one.
-- KEYS: 1 account hash, 2 live calls zset, 3 call hash
-- ARGV: 1 call id, 2 seq, 3 debit, 4 reserve, 5 now ms, 6 ttl ms
-- Reply: {status, granted, debit applied, total debited, total overrun}
if redis.call('EXISTS', KEYS[1]) == 0 then return {'noacct'} end
if redis.call('EXISTS', KEYS[3]) == 0 then return {'unknown_call', '0', '0', '0', '0'} end
local c = redis.call('HMGET', KEYS[3], 'state', 'seq', 'reserved', 'debited', 'overrun', 'granted',
  'last_debit', 'expires')
local seq = n(ARGV[2])
if c[1] ~= 'open' then return {'closed', '0', '0', c[4], c[5]} end
if seq == n(c[2]) then return {'replayed', c[6], c[7], c[4], c[5]} end
if seq < n(c[2]) then return {'stale', '0', '0', c[4], c[5]} end
local now = n(ARGV[5])
if n(c[8]) <= now then return {'expired', '0', '0', c[4], c[5]} end
local debit, reserve, held = n(ARGV[3]), n(ARGV[4]), n(c[3])
local a = redis.call('HMGET', KEYS[1], 'balance', 'credit', 'reserved')
local taken = math.min(debit, held)
local over = debit - taken
local remaining = held - taken
-- Available once the debit is applied, this call's remaining reservation still counted.
local available = n(a[1]) - debit + n(a[2]) - (n(a[3]) - taken)
local grant = reserve
if remaining < reserve then
  grant = remaining + math.min(reserve - remaining, math.max(available, 0))
end
redis.call('HINCRBY', KEYS[1], 'balance', s(-debit))
redis.call('HINCRBY', KEYS[1], 'reserved', s(grant - held))
if over > 0 then redis.call('HINCRBY', KEYS[1], 'overrun', s(over)) end
local debited, overrun, expires = n(c[4]) + debit, n(c[5]) + over, now + n(ARGV[6])
redis.call('HSET', KEYS[3], 'seq', ARGV[2], 'reserved', s(grant), 'granted', s(grant),
  'last_debit', s(debit), 'debited', s(debited), 'overrun', s(overrun), 'expires', s(expires))
redis.call('HINCRBY', KEYS[3], 'applied', s(-debit))
redis.call('ZADD', KEYS[2], s(expires), ARGV[1])
return {'granted', s(grant), s(debit), s(debited), s(overrun)}
