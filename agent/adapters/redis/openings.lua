-- The bundle period openings SQL must have: those not written yet, and the periods of `ids`.
-- KEYS: 1 the account's period openings not in SQL yet ; ARGV: 1 period key prefix, 2... ids
-- Reply: {id, allowance, carry, end, ...} (periods that exist)
local out, seen = {}, {}
local function add(id)
  if seen[id] then return end
  seen[id] = true
  local p = redis.call('HMGET', ARGV[1] .. id, 'allowance', 'carry', 'end')
  if p[1] then
    out[#out + 1] = id
    out[#out + 1] = p[1]
    out[#out + 1] = p[2]
    out[#out + 1] = p[3]
  end
end
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do add(id) end
for i = 2, #ARGV do add(ARGV[i]) end
return out
