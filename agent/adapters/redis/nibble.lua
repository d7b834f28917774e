-- One nibble (seq >= 1): debit the slice just used, hold up to `reserve` for the next one.
-- KEYS: 1 account hash, 2 live calls zset, 3 call hash
-- ARGV: 1 call id, 2 seq, 3 debit, 4 reserve, 5 now ms, 6 ttl ms
-- Reply: {status, granted, debit applied, total debited, total overrun}
-- The hot path of the daemon: five commands, no more (one read and one write per hash).
local c = redis.call('HMGET', KEYS[3], 'state', 'seq', 'reserved', 'debited', 'overrun', 'granted',
  'last_debit', 'expires', 'applied')
local a = redis.call('HMGET', KEYS[1], 'balance', 'credit', 'reserved', 'overrun')
if not a[1] then return {'noacct'} end
if not c[1] then return {'unknown_call', '0', '0', '0', '0'} end
local seq = n(ARGV[2])
if c[1] ~= 'open' then return {'closed', '0', '0', c[4], c[5]} end
if seq == n(c[2]) then return {'replayed', c[6], c[7], c[4], c[5]} end
if seq < n(c[2]) then return {'stale', '0', '0', c[4], c[5]} end
local now = n(ARGV[5])
if n(c[8]) <= now then return {'expired', '0', '0', c[4], c[5]} end
local debit, reserve, held = n(ARGV[3]), n(ARGV[4]), n(c[3])
local taken = math.min(debit, held)
local over = debit - taken
local remaining = held - taken
local balance = n(a[1]) - debit
-- Available once the debit is applied, this call's remaining reservation still counted.
local available = balance + n(a[2]) - (n(a[3]) - taken)
local grant = reserve
if remaining < reserve then
  grant = remaining + math.min(reserve - remaining, math.max(available, 0))
end
redis.call('HSET', KEYS[1], 'balance', s(balance), 'reserved', s(n(a[3]) + grant - held),
  'overrun', s(n(a[4]) + over))
local debited, overrun, expires = n(c[4]) + debit, n(c[5]) + over, now + n(ARGV[6])
redis.call('HSET', KEYS[3], 'seq', ARGV[2], 'reserved', s(grant), 'granted', s(grant),
  'last_debit', s(debit), 'debited', s(debited), 'overrun', s(overrun), 'expires', s(expires),
  'applied', s(n(c[9]) - debit))
redis.call('ZADD', KEYS[2], s(expires), ARGV[1])
return {'granted', s(grant), s(debit), s(debited), s(overrun)}
