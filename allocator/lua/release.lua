--[[ release: end an active allocation and give its resources back. Idempotent.
KEYS: the ledger's fixed keys (see includes/ledger.lua).
ARGV[1] key prefix, ARGV[2] clock override ms, ARGV[3] allocation id,
ARGV[4] reason ("released" | "failed" | "preempted" | ...), ARGV[5] scheduling pass depth
(0 = none), ARGV[6] scan cap. Freed capacity goes to waiting tasks in the same call.
A second release of the same id changes nothing and reports changed = false.
Returns JSON {ok=true, changed, alloc{...}} or {ok=false, code="ALLOCATION_NOT_FOUND", message}.
]]
--- @include "ledger"
--- @include "placement"
--- @include "queue"

local now = now_ms()
local id = ARGV[3]
local a, changed = finish_alloc(id, ARGV[4], now)
if not a then
  return cjson.encode({ok = false, code = 'ALLOCATION_NOT_FOUND', message = 'allocation ' .. id .. ' not found'})
end
local placed = {}
if changed then placed = schedule_pass(now, tonumber(ARGV[5] or 0), tonumber(ARGV[6] or 2048)) end
return cjson.encode({ok = true, changed = changed, alloc = a, placed = placed})
