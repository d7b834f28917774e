-- Many nibbles in one script run (the daemon's batches): nibble.lua's body, unchanged, is made
-- the function nibble_one(KEYS, ARGV) by scripts.py (see NIBBLE_BODY below), and run once per
-- nibble. One EVALSHA instead of one per nibble halves the client's CPU per nibble (the packing
-- and parsing of a command each, bench/bench_cluster.py). The keys are arguments, not KEYS: a
-- command's declared keys must share one slot, and the flag lets a script reach undeclared keys
-- of other slots on the master it runs on (Redis 7.0 and later; the store falls back to a
-- pipeline of nibble.lua elsewhere). Each nibble is its own step, idempotent per (call, seq),
-- as in a pipeline: a run that fails half-way is sent again whole (the done ones answer
-- 'replayed').
-- ARGV: one per nibble: the 5 KEYS of nibble.lua, then its 10 ARGV, each followed by a newline
-- (one argument, not 15: redis-py's packing of each argument was most of the client's time; ids
-- and keys are printable, so never hold a newline). Reply: one reply each.
--NIBBLE_BODY--
local out = {}
for i = 1, #ARGV do
  local f, k = {}, 0
  for field in string.gmatch(ARGV[i], '([^\n]*)\n') do
    k = k + 1
    f[k] = field
  end
  if k ~= 15 then return redis.error_reply('nibbles.lua: nibble ' .. i .. ' has ' .. k .. ' fields, not 15') end
  out[i] = nibble_one({f[1], f[2], f[3], f[4], f[5]}, {f[6], f[7], f[8], f[9], f[10], f[11], f[12], f[13], f[14], f[15]})
end
return out
