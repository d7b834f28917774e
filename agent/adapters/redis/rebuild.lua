-- Load or rebuild an account from the SQL ledger (the truth). The caller holds the account's
-- SQL row lock, so no ledger entry of this account can commit meanwhile, and passes what the
-- ledger already holds for each call this cache still tracks. Then
--   balance = SQL balance + sum over tracked calls of (taken here - already in the ledger)
-- which is exact whatever state those calls are in (live, settled but not yet posted).
-- Bundle periods (DESIGN §9) the same way, from the bundle_usage rows: granted = grant + rollover
-- rows, used = -(use + adjust rows) + what tracked closed calls used here beyond their use rows
-- in SQL, reserved = what open calls hold. A period this cache opened that SQL does not have
-- yet keeps its granted and stays to be written.
-- Spend caps (DESIGN §8): the caps and the plan's timezone go into the account hash. The day and
-- month counters the same way as the balance, from the spend_periods rows the ledger writer keeps
-- (ledger.py: spent, in the transaction of the call's ledger entries): spent = SQL spent + what
-- tracked closed calls charged here beyond their ledger entries, held = reserved + debited of
-- the open calls that count on it. A counter neither in the rows given (the newest of each kind)
-- nor of a tracked call is left as it is; one of a tracked call only, that exists, keeps its
-- spent (Redis counted it live). A counter created here expires as prelude.lua says (now: ARGV 8).
-- A call still open here whose settle the ledger already has (a settle, then its posting, reached
-- a master that died before its replica got the settle; or a restart from an older dump) is
-- finished: nothing more will come for it. It is closed here as the ledger has it (settled at the
-- ledger's charge, posted, its reservation and holds given back), so it counts for nothing beyond
-- SQL. Left open it would keep its reservation and, the formula adding back the ledger's charge
-- that Redis never took, hold the balance above the ledger's until a later rebuild. A call open
-- here whose ledger charge came from an expiry or a release stays open: a node that did not see
-- the close (or reserved it again after Redis lost it) may still settle it, and post_call writes
-- the late adjustment then.
-- Call and period hashes are read by name (same hash tag, so the same cluster slot as KEYS).
-- KEYS: 1 account hash, 2 live calls zset, 3 unposted set, 4 the account's periods set,
--       5 its period openings not in SQL yet
-- ARGV: 1 mode (load | if_absent | if_present), 2 SQL balance, 3 credit limit, 4 status,
--       5 max calls (0 = unlimited), 6 plan, 7 currency, 8 now ms, 9 call key prefix,
--       10 period key prefix, 11 max call cost cap, 12 daily cap, 13 monthly cap ('' = none),
--       14 the plan's timezone, 15 spend counter key prefix, 16 retention ms of a closed call's
--       record, 17 S, then S pairs: counter id ('d:start' or 'm:start'), its spent in SQL;
--       then C, then C triples: call id, sum of its ledger entries, 1 if the ledger has its settle;
--       then P, then P groups: period id ('grant:start'), allowance, rollover, end, used;
--       then triples: call id, period id, seconds of the call's use rows there (positive)
local exists = redis.call('EXISTS', KEYS[1]) == 1
if ARGV[1] == 'if_absent' and exists then return {'kept'} end
if ARGV[1] == 'if_present' and not exists then return {'absent'} end
local sql_spent, spend_ids, at = {}, {}, 18
for _ = 1, n(ARGV[17]) do
  sql_spent[ARGV[at]] = n(ARGV[at + 1])
  spend_ids[#spend_ids + 1] = ARGV[at]
  at = at + 2
end
local in_ledger, settled_in_ledger = {}, {}
at = at + 1
for _ = 1, n(ARGV[at - 1]) do
  in_ledger[ARGV[at]] = n(ARGV[at + 1])
  settled_in_ledger[ARGV[at]] = ARGV[at + 2] == '1'
  at = at + 3
end
local sql_periods = {}
local period_count = n(ARGV[at])
at = at + 1
for _ = 1, period_count do
  sql_periods[#sql_periods + 1] = {ARGV[at], n(ARGV[at + 1]), n(ARGV[at + 2]), ARGV[at + 3], n(ARGV[at + 4])}
  at = at + 5
end
local sql_use = {}
for i = at, #ARGV, 3 do sql_use[ARGV[i] .. ' ' .. ARGV[i + 1]] = n(ARGV[i + 2]) end
local balance, reserved, seen = n(ARGV[2]), 0, {}
local held_by, used_by = {}, {}  -- period id -> seconds open calls hold / closed calls used beyond SQL
local spend_held, spend_extra = {}, {}  -- counter id -> open calls' reserved + debited / unposted charges
local function count_spend(id, held, extra)
  if not spend_held[id] and not spend_extra[id] and not sql_spent[id] then spend_ids[#spend_ids + 1] = id end
  spend_held[id] = (spend_held[id] or 0) + held
  spend_extra[id] = (spend_extra[id] or 0) + extra
end
local function visit(cid)
  if seen[cid] then return end
  seen[cid] = true
  local h = redis.call('HMGET', ARGV[9] .. cid, 'state', 'applied', 'reserved', 'b_n', 'debited', 'sd', 'sm')
  if not h[1] then
    redis.call('ZREM', KEYS[2], cid)
    redis.call('SREM', KEYS[3], cid)
    return
  end
  if h[1] == 'open' and settled_in_ledger[cid] then
    local key = ARGV[9] .. cid
    redis.call('ZREM', KEYS[2], cid)
    redis.call('SREM', KEYS[3], cid)
    redis.call('HSET', key, 'state', 'settled', 'cost', s(-in_ledger[cid]), 'applied', s(in_ledger[cid]),
      'reserved', '0', 'closed', ARGV[8], 'posted', '1')
    redis.call('HINCRBY', key, 'ver', 1)
    redis.call('PEXPIRE', key, ARGV[16])
    if h[6] then  -- its day and month are written again below, without what it held
      count_spend('d:' .. h[6], 0, 0)
      count_spend('m:' .. h[7], 0, 0)
    end
    return
  end
  balance = balance + n(h[2]) - (in_ledger[cid] or 0)
  if h[1] == 'open' then reserved = reserved + n(h[3]) end
  if h[6] then
    local held, extra = 0, 0
    if h[1] == 'open' then held = n(h[3]) + n(h[5]) else extra = (in_ledger[cid] or 0) - n(h[2]) end
    count_spend('d:' .. h[6], held, extra)
    count_spend('m:' .. h[7], held, extra)
  end
  local slots, held, used, late = holds_of(ARGV[9] .. cid, n(h[4]))
  for i, slot in ipairs(slots) do
    local id = slot_id(slot)
    if h[1] == 'open' then
      held_by[id] = (held_by[id] or 0) + held[i]
    else
      used_by[id] = (used_by[id] or 0) + used[i] + late[i] - (sql_use[cid .. ' ' .. id] or 0)
    end
  end
end
for _, cid in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do visit(cid) end
for _, cid in ipairs(redis.call('SMEMBERS', KEYS[3])) do visit(cid) end
redis.call('HSET', KEYS[1], 'balance', s(balance), 'credit', ARGV[3], 'reserved', s(reserved),
  'status', ARGV[4], 'max_calls', ARGV[5], 'plan', ARGV[6], 'currency', ARGV[7], 'loaded', ARGV[8],
  'cap_call', ARGV[11], 'cap_day', ARGV[12], 'cap_month', ARGV[13], 'tz', ARGV[14])
redis.call('HSETNX', KEYS[1], 'overrun', '0')
for _, id in ipairs(spend_ids) do
  local key = ARGV[15] .. id
  local kind, start = string.match(id, '^([dm]):(%-?%d+)$')
  if not kind then error('bad spend counter id ' .. tostring(id)) end
  local had = redis.call('EXISTS', key) == 1
  if sql_spent[id] then
    redis.call('HSET', key, 'spent', s(sql_spent[id] + (spend_extra[id] or 0)), 'held', s(spend_held[id] or 0))
  elseif had then
    redis.call('HSET', key, 'held', s(spend_held[id] or 0))
  else
    redis.call('HSET', key, 'spent', s(spend_extra[id] or 0), 'held', s(spend_held[id] or 0))
  end
  if not had then
    redis.call('PEXPIRE', key, s(math.max(n(start) + SPEND_KEEP[kind] - n(ARGV[8]), SPEND_MIN_TTL)))
  end
end
local in_sql = {}
for _, p in ipairs(sql_periods) do
  local id = p[1]
  in_sql[id] = true
  redis.call('HSET', ARGV[10] .. id, 'granted', s(p[2] + p[3]), 'used', s(p[5] + (used_by[id] or 0)),
    'reserved', s(held_by[id] or 0), 'allowance', s(p[2]), 'carry', s(p[3]), 'end', p[4])
  redis.call('SADD', KEYS[4], id)
  redis.call('SREM', KEYS[5], id)
end
for _, id in ipairs(redis.call('SMEMBERS', KEYS[4])) do
  if not in_sql[id] then
    if redis.call('EXISTS', ARGV[10] .. id) == 0 then
      redis.call('SREM', KEYS[4], id)
      redis.call('SREM', KEYS[5], id)
    else
      redis.call('HSET', ARGV[10] .. id, 'used', s(used_by[id] or 0), 'reserved', s(held_by[id] or 0))
      redis.call('SADD', KEYS[5], id)
    end
  end
end
return {'loaded', s(balance), s(reserved)}
