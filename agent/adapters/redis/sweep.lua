#!lua flags=allow-cross-slot-keys,no-writes
-- The sweeper's read of a Redis Cluster's per-slot indexes (keys.py), one master at a time: the
-- members due by ARGV[1] of every index named in ARGV[3...] (keys of several slots, all on this
-- master), at most ARGV[2] of them. Reads only. The keys are arguments, not KEYS: a command's
-- declared keys must share one slot, and the flag lets a script reach undeclared keys of other
-- slots on its own master (Redis 7.0 and later).
local out, limit = {}, tonumber(ARGV[2])
for i = 3, #ARGV do
  local left = limit - #out
  if left <= 0 then break end
  local due = redis.call('ZRANGEBYSCORE', ARGV[i], '-inf', ARGV[1], 'LIMIT', 0, left)
  for j = 1, #due do out[#out + 1] = due[j] end
end
return out
