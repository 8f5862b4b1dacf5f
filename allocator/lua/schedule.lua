--[[ schedule: one scheduling pass (the scheduler's periodic tick; also run by submit, release,
cancel and host changes). Expires due leases first (bounded).
KEYS: the ledger's fixed keys (see includes/ledger.lua).
ARGV[1] key prefix, ARGV[2] clock override ms, ARGV[3] pass depth, ARGV[4] scan cap.
Returns JSON {placed[], expired[]}.
]]
--- @include "ledger"
--- @include "placement"
--- @include "queue"

local now = now_ms()
local expired = reap_expired(now, 64)
local placed = schedule_pass(now, tonumber(ARGV[3]), tonumber(ARGV[4]))
return cjson.encode({placed = placed, expired = expired, n_placed = #placed})
