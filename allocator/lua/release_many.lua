--[[ release_many: release.lua for several allocations in one call, each released on its own, in order.
KEYS: the ledger's fixed keys (see includes/ledger.lua).
ARGV[1] key prefix, ARGV[2] clock override ms ("" = server TIME),
ARGV[3] time budget in ms: the call stops after the release during which that much server time
passed, and returns what it did (it always gets to the first id),
ARGV[4] reason ("released" | "failed" | ...), ARGV[5] scheduling pass depth (0 = none),
ARGV[6] scan cap, ARGV[7..] allocation ids.
Each id gets the reply release.lua gives without a placement token: its record as the release
left it (changed = false for one ended already, a repeat within the call included; one waiting
in line is withdrawn before any pass of the call runs, so what the others free cannot place it;
a running function task is stopped as release.lua stops it), or ALLOCATION_NOT_FOUND, which does
not stop the others. The release time is read once: the allocations of a call end at one instant.
What the call frees goes to waiting tasks after its releases, in scheduling passes: one when
it ended anything (released, or withdrawn from the line, after which release.lua runs one too), then another after each pass that placed a task or dropped one from the line
(a task whose RQ job is gone: see consider in includes/queue.lua), since the line then moved up
and the next pass reaches further, at most as many passes as allocations the call ended,
which is what releasing them one by one would run; the passes after the first stop when the
budget is spent.
Returns JSON {ok=true, results=[reply, ...], placed=[task id, ...]} in the order of the ids it
got to; the caller sends the rest again.
]]
--- @include "ledger"
--- @include "placement"
--- @include "queue"
--- @include "budget"
--- @lazy run_pass drop_services

local now = now_ms()
local deadline = deadline_after(ARGV[3])
local reason, depth, cap = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
local results, ended = {}, 0
for i = 7, #ARGV do
  local r = release_one(ARGV[i], reason, now, nil)
  results[#results + 1] = r
  if r.changed then ended = ended + 1 end
  if server_us() >= deadline then break end
end
local placed = {}
for n = 1, ended do
  if n > 1 and server_us() >= deadline then break end
  local waiting = rcall('ZCARD', K_PENDING)
  if waiting == 0 then break end
  local got = schedule_pass(now, depth, cap)
  for _, id in ipairs(got) do placed[#placed + 1] = id end
  -- A pass that placed nothing and dropped nothing (a task whose job is gone) would be repeated as it was.
  if #got == 0 and rcall('ZCARD', K_PENDING) == waiting then break end
end
return cjson.encode({ok = true, results = results, placed = placed})
