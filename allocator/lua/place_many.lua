--[[ place_many: place.lua for several requests in one call, each placed on its own, in order.
KEYS: the ledger's fixed keys (see includes/ledger.lua).
ARGV[1] key prefix, ARGV[2] clock override ms ("" = server TIME),
then three arguments per request, as place.lua's ARGV[3..5]: the request JSON read by the
scripts (place.lua's header lists its fields; dry_run is never set here), the validated request
as JSON text, metadata as JSON text.
Each request gets the reply place.lua would give it, had it been sent alone right after the
requests before it: an allocation, its existing record (idempotent by id, a repeat within the
call included), or a refusal that places nothing for that request and does not stop the others.
There is no all-or-nothing: a request refused leaves the others placed.
What place.lua does before its placement happens once, before the first request that is not a
repeat: the RECOVERING refusal (then the whole call is refused and nothing is placed) and the
reaping of up to 8 expired allocations, with a scheduling pass when it reaps any.
Entering a script, reading the clock and that reaping are paid once per call instead of once per
request (docs/benchmarks.md, "Batches").
Returns JSON {ok=true, results=[reply, ...]} in the order of the requests
              | {ok=false, code='RECOVERING', message, details{}}.
]]
--- @include "ledger"
--- @include "placement"
--- @include "queue"
--- @lazy finish_alloc refusal take_services services_fit reindex_host schedule_pass place_beside_line

local now = now_ms()
local results, ready = {}, false
for i = 3, #ARGV - 2, 3 do
  local req = cjson.decode(ARGV[i])
  req.request, req.metadata = ARGV[i + 1], ARGV[i + 2]
  if rcall('EXISTS', alloc_key(req.id)) == 1 then
    results[#results + 1] = {ok = true, existing = true, alloc = read_alloc(req.id)}
  else
    if not ready then
      local refused = before_placing(req, now)
      if refused then return cjson.encode(refused) end
      ready = true
    end
    results[#results + 1] = place_now(req, now)
  end
end
return cjson.encode({ok = true, results = results})
