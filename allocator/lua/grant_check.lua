--[[ grant_check: is an allocation's grant still good to start work under? Read-only.
KEYS: the ledger's fixed keys (see includes/ledger.lua; unused, passed so the call routes to the
namespace's slot). ARGV[1] key prefix, ARGV[2] unused, ARGV[3] allocation id.
One atomic read of the allocation and its host. current = true only when the allocation is
active, its host exists and is not lost, and the host's generation equals the generation the
grant was made under (field host_gen of the record; records without it count as generation 1).
A worker calls this right before it starts a job: a host that was declared lost and came back
has a new generation, so grants made before the loss are refused (fencing token).
Returns JSON {current, reason, state, host, host_state, gen, host_gen}; reason is "ok",
"not_found", "not_active", "host_missing", "host_lost" or "stale_generation".
]]
--- @include "ledger"
--- @include "fencing"

local out = grant_status(ARGV[3], nil)
if out.reason == nil then out.current, out.reason = true, 'ok' end
return cjson.encode(out)
