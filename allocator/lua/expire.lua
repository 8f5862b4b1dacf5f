--[[ expire: release allocations whose TTL has passed, and purge old finished records.
KEYS: the ledger's fixed keys (see includes/ledger.lua).
ARGV[1] key prefix, ARGV[2] clock override ms, ARGV[3] max allocations to expire in this call,
ARGV[4] retention ms for finished records (records that ended before now - retention are deleted),
ARGV[5] scheduling pass depth after expiring (0 = none), ARGV[6] scan cap.
Work per call is bounded by ARGV[3]; callers loop while the returned count equals the limit.
Returns JSON {expired[], purged}.
]]
--- @include "ledger"
--- @include "placement"
--- @include "queue"

local now = now_ms()
local limit = tonumber(ARGV[3])
local ids = reap_expired(now, limit)
local old = rcall('ZRANGEBYSCORE', K_DONE, '-inf', now - tonumber(ARGV[4]), 'LIMIT', 0, limit)
for _, id in ipairs(old) do
  rcall('DEL', alloc_key(id))
  rcall('ZREM', K_DONE, id)
  rcall('ZREM', K_ALLOCS, id)
end
if #ids > 0 then schedule_pass(now, tonumber(ARGV[5] or 0), tonumber(ARGV[6] or 2048)) end
if #ids == 0 then return cjson.encode({expired = {}, n = 0, purged = #old}) end
return cjson.encode({expired = ids, n = #ids, purged = #old})
