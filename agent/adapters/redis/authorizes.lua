-- A reseller's customer and the levels above it in one script run (issue 18): authorize.lua's
-- body, unchanged, is made the function authorize_one(KEYS, ARGV) by scripts.py (see
-- AUTHORIZE_BODY below) and run once per level, as nibbles.lua runs nibble.lua. Each level is
-- still its own step, idempotent per (call id of the level, seq 0), with its own keys, exactly
-- as the pipeline of one authorize.lua per level (store.py authorize_many) runs them: the engine
-- releases the levels that granted when one refuses, whichever way they ran. One EVALSHA instead
-- of one per level saves the server a command dispatch and the client the packing and parsing of
-- a command per level (a customer three levels deep: four scripts). One server only: on a
-- Cluster each level's account is in a slot of its own (possibly on another master), so the
-- store sends the pipeline there.
-- ARGV: one per level: the number of KEYS, then authorize.lua's KEYS and ARGV, each followed by
-- a newline (ids, keys and slots are printable, so never hold one). Reply: one reply each.
--AUTHORIZE_BODY--
local gmatch = string.gmatch
local out = {}
for i = 1, #ARGV do
  local fields = {}
  for field in gmatch(ARGV[i], '([^\n]*)\n') do fields[#fields + 1] = field end
  local nkeys = tonumber(fields[1])
  if not nkeys or nkeys + 1 > #fields then
    return redis.error_reply('authorizes.lua: level ' .. i .. ' is not a key count and its fields each ended by a newline')
  end
  local keys, args = {}, {}
  for j = 2, nkeys + 1 do keys[#keys + 1] = fields[j] end
  for j = nkeys + 2, #fields do args[#args + 1] = fields[j] end
  out[i] = authorize_one(keys, args)
end
return out
