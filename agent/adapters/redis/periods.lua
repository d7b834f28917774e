-- An account's bundle periods as Redis holds them now (one consistent read).
-- KEYS: 1 account hash, 2 the account's periods set ; ARGV: 1 period key prefix
-- Reply: {'noacct'} or {'ok', id, granted, used, reserved, ...}
if redis.call('EXISTS', KEYS[1]) == 0 then return {'noacct'} end
local out = {'ok'}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local p = redis.call('HMGET', ARGV[1] .. id, 'granted', 'used', 'reserved')
  if p[1] then
    out[#out + 1] = id
    out[#out + 1] = p[1]
    out[#out + 1] = p[2] or '0'
    out[#out + 1] = p[3] or '0'
  end
end
return out
