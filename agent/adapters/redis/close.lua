-- Release a call (mode 'released') or sweep it once past its TTL (mode 'expired'). What its
-- nibbles debited stays taken and becomes its ledger charge; the reservation goes back. Its
-- bundle holds end the same way: the seconds its nibbles recorded are used, the rest goes back.
-- Spend caps (DESIGN §8): its reserved + debited leave its day's and month's held, its debits are
-- spent there.
-- KEYS: 1 account hash, 2 live calls zset, 3 call hash, 4 unposted set, 5 the account's periods
--       set, 6 its period openings not in SQL yet
-- ARGV: 1 call id, 2 mode, 3 seq, 4 now ms, 5 retention ms of a closed call's record,
--       6 period key prefix, 7 spend counter key prefix
-- Reply: {status, released, call hash fields...} or {'alive', expires}
if redis.call('EXISTS', KEYS[1]) == 0 then return {'noacct'} end
local function reply(status, released)
  local out = {status, s(released)}
  for _, v in ipairs(redis.call('HGETALL', KEYS[3])) do out[#out + 1] = v end
  return out
end
if redis.call('EXISTS', KEYS[3]) == 0 then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return {'unknown_call', '0'}
end
local c = redis.call('HMGET', KEYS[3], 'state', 'reserved', 'debited', 'expires', 'seq', 'b_used', 'sd', 'sm')
if c[1] ~= 'open' then
  if c[1] == ARGV[2] and c[1] == 'released' then return reply('replayed', 0) end
  return reply('closed', 0)
end
if ARGV[2] == 'expired' and n(c[4]) > n(ARGV[4]) then return {'alive', c[4]} end
local released, debited = n(c[2]), n(c[3])
redis.call('HINCRBY', KEYS[1], 'reserved', s(-released))
redis.call('ZREM', KEYS[2], ARGV[1])
spend_move_call(spend_of(ARGV[7], c[7], c[8]), n(ARGV[4]), -(released + debited), debited)
local used_s = close_holds(KEYS[3], n(c[6]), ARGV[6], KEYS[5], KEYS[6])
redis.call('HSET', KEYS[3], 'state', ARGV[2], 'reserved', '0', 'closed_charge', s(debited),
  'closed', ARGV[4], 'seq', s(math.max(n(c[5]), n(ARGV[3]))))
redis.call('HINCRBY', KEYS[3], 'ver', 1)
if debited > 0 or used_s > 0 then
  redis.call('HSET', KEYS[3], 'posted', '0')
  redis.call('SADD', KEYS[4], ARGV[1])
else
  redis.call('PEXPIRE', KEYS[3], ARGV[5])
end
return reply('released', released)
