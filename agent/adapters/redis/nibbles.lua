-- Many nibbles in one script run (the daemon's batches): nibble.lua's body, unchanged, is made
-- the function nibble_one(KEYS, ARGV) by scripts.py (see NIBBLE_BODY below), and run once per
-- nibble. One EVALSHA instead of one per nibble halves the client's CPU per nibble (the packing
-- and parsing of a command each, bench/bench_cluster.py). The keys are arguments, not KEYS: a
-- command's declared keys must share one slot, and the flag lets a script reach undeclared keys
-- of other slots on the master it runs on (Redis 7.0 and later; the store falls back to a
-- pipeline of nibble.lua elsewhere). Each nibble is its own step, idempotent per (call, seq),
-- as in a pipeline: a run that fails half-way is sent again whole (the done ones answer
-- 'replayed').
-- ARGV: groups of 15: the 5 KEYS of nibble.lua, then its 10 ARGV. Reply: one reply each.
--NIBBLE_BODY--
local out, at = {}, 1
while at <= #ARGV do
  out[#out + 1] = nibble_one({ARGV[at], ARGV[at + 1], ARGV[at + 2], ARGV[at + 3], ARGV[at + 4]},
    {ARGV[at + 5], ARGV[at + 6], ARGV[at + 7], ARGV[at + 8], ARGV[at + 9], ARGV[at + 10], ARGV[at + 11],
     ARGV[at + 12], ARGV[at + 13], ARGV[at + 14]})
  at = at + 15
end
return out
