-- Shared by every script (prepended when the scripts are loaded).
-- Money is integer micro-units. Lua numbers are doubles, exact below 2^53; the store refuses
-- larger amounts, and every number written back is formatted with %d (never 1e+15).
local function n(v) return tonumber(v) or 0 end
local function s(x) return string.format('%d', x) end
