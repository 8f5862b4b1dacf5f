--[[ place_many: place.lua for several requests in one call, each placed on its own, in order.
KEYS: the ledger's fixed keys (see includes/ledger.lua).
ARGV[1] key prefix, ARGV[2] clock override ms ("" = server TIME),
ARGV[3] time budget in ms: the call stops after the request during which that much server time
passed, and returns what it did (at least one request is always placed),
then three arguments per request, as place.lua's ARGV[3..5]: the request JSON read by the
scripts (place.lua's header lists its fields; dry_run is never set here), the validated request
as JSON text, metadata as JSON text.
Each request gets the reply place.lua would give it, had it been sent alone right after the
requests before it: an allocation, its existing record (idempotent by id, a repeat within the
call included), or a refusal (RECOVERING included) that places nothing for that request and does
not stop the others. There is no all-or-nothing: a request refused leaves the others placed.
As in place.lua, each request that is not a repeat first reaps up to 8 expired allocations (a
scheduling pass when it reaps any). The placement time is read once: the requests of a call are
placed at one instant. Entering the script and the round trip are paid once per call instead of
once per request (docs/benchmarks.md, "Run S").
The budget bounds how long the call holds Redis: a refused request still pays its whole scan
(several ms on a large fleet, more while tasks wait in line), and no other client's command
runs while a script does.
Returns JSON {ok=true, results=[reply, ...]} in the order of the requests it got to; the caller
sends the rest again.
]]
--- @include "ledger"
--- @include "placement"
--- @include "queue"
--- @include "budget"
--- @lazy finish_alloc refusal take_services services_fit reindex_host schedule_pass place_beside_line

local now = now_ms()
local deadline = deadline_after(ARGV[3])
local results = {}
for i = 4, #ARGV - 2, 3 do
  results[#results + 1] = place_request(ARGV[i], ARGV[i + 1], ARGV[i + 2], now)
  if server_us() >= deadline then break end
end
return cjson.encode({ok = true, results = results})
