-- Settle a call at its final cost. `applied` is what this call already took from the balance
-- (its nibble debits), so the adjustment -(cost + applied) leaves exactly -cost applied, also
-- for a call the cache lost (a restart, a rebuild): then nothing was applied and all is charged.
-- Bundles (DESIGN §9): `covered` seconds (or, when not given, what the nibbles recorded) are used
-- over the call's holds in draw order and the rest given back; a call settled after its holds
-- closed (expiry, release) uses what it covered beyond what the close committed (bl<i>); a call
-- the store lost (no reservation, or one reserved again without slots) takes them from what the
-- given slots have left, in order.
-- Spend caps (DESIGN §8): a call with day and month counters moves them as its money: a live
-- call's reserved + debited leave held and its cost is spent; a call settled after it closed
-- adds its cost beyond the close's charge. A call settled without a reservation has none.
-- KEYS: 1 account hash, 2 live calls zset, 3 call hash, 4 unposted set, 5 the account's periods
--       set, 6 its period openings not in SQL yet
-- ARGV: 1 call id, 2 account id, 3 seq, 4 cost, 5 now ms, 6 period key prefix,
--       7 covered bundle seconds ('' = what the nibbles recorded), 8 spend counter key prefix,
--       9... the slots (draw order)
-- Reply: {status, released, call hash fields...}
if redis.call('EXISTS', KEYS[1]) == 0 then return {'noacct'} end
local cost = n(ARGV[4])
local function reply(status, released)
  local out = {status, s(released)}
  for _, v in ipairs(redis.call('HGETALL', KEYS[3])) do out[#out + 1] = v end
  return out
end
-- A call without holds (the store lost them) uses `covered` from what the slots given have left,
-- in order; what none has left goes to the first (it did use them: they must not be given again).
local function use_slots(covered)
  local count = #ARGV - 8
  if count == 0 or covered <= 0 then return end
  local pkeys, lefts = {}, {}
  for i = 1, count do
    local key, left = open_period(ARGV[6], ARGV[8 + i], KEYS[5], KEYS[6])
    pkeys[i], lefts[i] = key, math.max(left, 0)
  end
  local used = take(lefts, covered, true)
  local fields = {'b_n', s(count), 'b_held', s(covered), 'b_used', s(covered)}
  for i = 1, count do
    if used[i] > 0 then redis.call('HINCRBY', pkeys[i], 'used', s(used[i])) end
    fields[#fields + 1] = 'bs' .. i
    fields[#fields + 1] = ARGV[8 + i]
    fields[#fields + 1] = 'bh' .. i
    fields[#fields + 1] = s(used[i])
    fields[#fields + 1] = 'bu' .. i
    fields[#fields + 1] = s(used[i])
  end
  redis.call('HSET', KEYS[3], unpack(fields))
end
if redis.call('EXISTS', KEYS[3]) == 0 then
  redis.call('HINCRBY', KEYS[1], 'balance', s(-cost))
  redis.call('HINCRBY', KEYS[1], 'overrun', s(cost))
  redis.call('HSET', KEYS[3], 'acct', ARGV[2], 'node', '', 'state', 'settled', 'seq', ARGV[3],
    'granted', '0', 'last_debit', '0', 'auth_granted', '0', 'auth_available', '0', 'reserved', '0',
    'debited', '0', 'overrun', s(cost), 'applied', s(-cost), 'cost', s(cost), 'created', ARGV[5],
    'expires', ARGV[5], 'closed', ARGV[5], 'ver', '1', 'posted', '0')
  use_slots(n(ARGV[7]))
  redis.call('SADD', KEYS[4], ARGV[1])
  return reply('without_reservation', 0)
end
local c = redis.call('HMGET', KEYS[3], 'state', 'reserved', 'debited', 'applied', 'closed_charge',
  'cost', 'seq', 'b_n', 'b_used', 'sd', 'sm')
if c[1] == 'settled' then
  if n(c[6]) == cost then return reply('replayed', 0) end
  return reply('conflict', 0)
end
local covered = n(c[9])
if ARGV[7] ~= '' then covered = n(ARGV[7]) end
local status, released, over = 'after_expiry', 0, 0
if c[1] == 'open' then
  released = n(c[2])
  over = math.max(0, cost - n(c[2]) - n(c[3]))
  redis.call('HINCRBY', KEYS[1], 'reserved', s(-released))
  redis.call('ZREM', KEYS[2], ARGV[1])
  spend_move_call(spend_of(ARGV[8], c[10], c[11]), n(ARGV[5]), -(n(c[2]) + n(c[3])), cost)
  if n(c[8]) == 0 and ARGV[7] ~= '' then
    use_slots(covered)  -- reserved again after the store lost the call: its holds went with it
  else
    close_holds(KEYS[3], covered, ARGV[6], KEYS[5], KEYS[6])
  end
  status = 'settled'
else
  -- expired or released: its debits were charged when it closed; the rest was never held.
  over = math.max(0, cost - n(c[5]))
  spend_move_call(spend_of(ARGV[8], c[10], c[11]), n(ARGV[5]), 0, cost - n(c[5]))
  local count, extra = n(c[8]), covered - n(c[9])
  if count > 0 and extra > 0 then
    local slots, held, used = holds_of(KEYS[3], count)
    local room = {}
    for i = 1, count do room[i] = math.max(held[i] - used[i], 0) end
    local late = take(room, extra, true)
    local fields = {'b_used', s(covered)}
    for i = 1, count do
      if late[i] > 0 then
        local key = open_period(ARGV[6], slots[i], KEYS[5], KEYS[6])
        redis.call('HINCRBY', key, 'used', s(late[i]))
        fields[#fields + 1] = 'bl' .. i
        fields[#fields + 1] = s(late[i])
      end
    end
    redis.call('HSET', KEYS[3], unpack(fields))
  end
end
redis.call('HINCRBY', KEYS[1], 'balance', s(-cost - n(c[4])))
if over > 0 then
  redis.call('HINCRBY', KEYS[1], 'overrun', s(over))
  redis.call('HINCRBY', KEYS[3], 'overrun', s(over))
end
redis.call('HSET', KEYS[3], 'state', 'settled', 'cost', s(cost), 'reserved', '0', 'applied', s(-cost),
  'closed', ARGV[5], 'posted', '0', 'seq', s(math.max(n(c[7]), n(ARGV[3]))))
redis.call('HINCRBY', KEYS[3], 'ver', 1)
redis.call('SADD', KEYS[4], ARGV[1])
return reply(status, released)
