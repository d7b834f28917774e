-- Load or rebuild an account from the SQL ledger (the truth). The caller holds the account's
-- SQL row lock, so no ledger entry of this account can commit meanwhile, and passes what the
-- ledger already holds for each call this cache still tracks. Then
--   balance = SQL balance + sum over tracked calls of (taken here - already in the ledger)
-- which is exact whatever state those calls are in (live, settled but not yet posted).
-- Call hashes are read by name (same hash tag, so the same cluster slot as KEYS).
-- KEYS: 1 account hash, 2 live calls zset, 3 unposted set
-- ARGV: 1 mode (load | if_absent | if_present), 2 SQL balance, 3 credit limit, 4 status,
--       5 max calls (0 = unlimited), 6 plan, 7 currency, 8 now ms, 9 call key prefix,
--       then pairs: call id, sum of its ledger entries
local exists = redis.call('EXISTS', KEYS[1]) == 1
if ARGV[1] == 'if_absent' and exists then return {'kept'} end
if ARGV[1] == 'if_present' and not exists then return {'absent'} end
local in_ledger = {}
for i = 10, #ARGV, 2 do in_ledger[ARGV[i]] = n(ARGV[i + 1]) end
local balance, reserved, seen = n(ARGV[2]), 0, {}
local function visit(cid)
  if seen[cid] then return end
  seen[cid] = true
  local h = redis.call('HMGET', ARGV[9] .. cid, 'state', 'applied', 'reserved')
  if not h[1] then
    redis.call('ZREM', KEYS[2], cid)
    redis.call('SREM', KEYS[3], cid)
    return
  end
  balance = balance + n(h[2]) - (in_ledger[cid] or 0)
  if h[1] == 'open' then reserved = reserved + n(h[3]) end
end
for _, cid in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do visit(cid) end
for _, cid in ipairs(redis.call('SMEMBERS', KEYS[3])) do visit(cid) end
redis.call('HSET', KEYS[1], 'balance', s(balance), 'credit', ARGV[3], 'reserved', s(reserved),
  'status', ARGV[4], 'max_calls', ARGV[5], 'plan', ARGV[6], 'currency', ARGV[7], 'loaded', ARGV[8])
redis.call('HSETNX', KEYS[1], 'overrun', '0')
return {'loaded', s(balance), s(reserved)}
