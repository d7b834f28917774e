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
-- One string.match with 15 captures splits a nibble's argument (a gmatch loop took 1.5x longer).
local FIELDS = '^' .. string.rep('([^\n]*)\n', 15) .. '$'
local match = string.match
local out = {}
for i = 1, #ARGV do
  local k1, k2, k3, k4, k5, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10 = match(ARGV[i], FIELDS)
  if not a10 then return redis.error_reply('nibbles.lua: nibble ' .. i .. ' is not 15 fields each ended by a newline') end
  out[i] = nibble_one({k1, k2, k3, k4, k5}, {a1, a2, a3, a4, a5, a6, a7, a8, a9, a10})
end
return out
