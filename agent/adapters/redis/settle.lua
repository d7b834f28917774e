-- Settle a call at its final cost. `applied` is what this call already took from the balance
-- (its nibble debits), so the adjustment -(cost + applied) leaves exactly -cost applied, also
-- for a call the cache lost (a restart, a rebuild): then nothing was applied and all is charged.
-- KEYS: 1 account hash, 2 live calls zset, 3 call hash, 4 unposted set
-- ARGV: 1 call id, 2 account id, 3 seq, 4 cost, 5 now ms
-- Reply: {status, released, call hash fields...}
if redis.call('EXISTS', KEYS[1]) == 0 then return {'noacct'} end
local cost = n(ARGV[4])
local function reply(status, released)
  local out = {status, s(released)}
  for _, v in ipairs(redis.call('HGETALL', KEYS[3])) do out[#out + 1] = v end
  return out
end
if redis.call('EXISTS', KEYS[3]) == 0 then
  redis.call('HINCRBY', KEYS[1], 'balance', s(-cost))
  redis.call('HINCRBY', KEYS[1], 'overrun', s(cost))
  redis.call('HSET', KEYS[3], 'acct', ARGV[2], 'node', '', 'state', 'settled', 'seq', ARGV[3],
    'granted', '0', 'last_debit', '0', 'auth_granted', '0', 'auth_available', '0', 'reserved', '0',
    'debited', '0', 'overrun', s(cost), 'applied', s(-cost), 'cost', s(cost), 'created', ARGV[5],
    'expires', ARGV[5], 'closed', ARGV[5], 'ver', '1', 'posted', '0')
  redis.call('SADD', KEYS[4], ARGV[1])
  return reply('without_reservation', 0)
end
local c = redis.call('HMGET', KEYS[3], 'state', 'reserved', 'debited', 'applied', 'closed_charge',
  'cost', 'seq')
if c[1] == 'settled' then
  if n(c[6]) == cost then return reply('replayed', 0) end
  return reply('conflict', 0)
end
local status, released, over = 'after_expiry', 0, 0
if c[1] == 'open' then
  released = n(c[2])
  over = math.max(0, cost - n(c[2]) - n(c[3]))
  redis.call('HINCRBY', KEYS[1], 'reserved', s(-released))
  redis.call('ZREM', KEYS[2], ARGV[1])
  status = 'settled'
else
  -- expired or released: its debits were charged when it closed; the rest was never held.
  over = math.max(0, cost - n(c[5]))
end
redis.call('HINCRBY', KEYS[1], 'balance', s(-cost - n(c[4])))
if over > 0 then
  redis.call('HINCRBY', KEYS[1], 'overrun', s(over))
  redis.call('HINCRBY', KEYS[3], 'overrun', s(over))
end
redis.call('HSET', KEYS[3], 'state', 'settled', 'cost', s(cost), 'reserved', '0', 'applied', s(-cost),
  'closed', ARGV[5], 'posted', '0', 'seq', s(math.max(n(c[7]), n(ARGV[3]))))
redis.call('HINCRBY', KEYS[3], 'ver', 1)
redis.call('SADD', KEYS[4], ARGV[1])
return reply(status, released)
