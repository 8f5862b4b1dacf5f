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

local id = ARGV[3]
local a = rcall('HMGET', alloc_key(id), 'state', 'host', 'host_gen')
if not a[1] then
  return cjson.encode({current = false, reason = 'not_found'})
end
local out = {current = false, state = a[1], host = a[2], host_gen = tonumber(a[3] or 1)}
if a[1] ~= 'active' then
  out.reason = 'not_active'
  return cjson.encode(out)
end
local hf = rcall('HMGET', host_key(a[2]), 'state', 'gen')
if not hf[1] then
  out.reason = 'host_missing'
  return cjson.encode(out)
end
out.host_state, out.gen = hf[1], tonumber(hf[2] or 1)
if hf[1] == 'lost' then
  out.reason = 'host_lost'
elseif out.gen ~= out.host_gen then
  out.reason = 'stale_generation'
else
  out.current, out.reason = true, 'ok'
end
return cjson.encode(out)
