-- The call's ledger entries are in SQL: forget it unless it changed since (another version).
-- So are the bundle period openings written with them (they never change once opened).
-- KEYS: 1 call hash, 2 unposted set, 3 the account's period openings not in SQL yet
-- ARGV: 1 call id, 2 version posted, 3 retention ms, 4... ids ('grant:start') of the openings written
for i = 4, #ARGV do redis.call('SREM', KEYS[3], ARGV[i]) end
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('SREM', KEYS[2], ARGV[1])
  return 1
end
if redis.call('HGET', KEYS[1], 'ver') ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'posted', '1')
redis.call('SREM', KEYS[2], ARGV[1])
if redis.call('HGET', KEYS[1], 'state') ~= 'open' then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
return 1
