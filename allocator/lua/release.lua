--[[ release: end an active allocation and give its resources back. Idempotent.
KEYS: the ledger's fixed keys (see includes/ledger.lua).
ARGV[1] key prefix, ARGV[2] clock override ms, ARGV[3] allocation id,
ARGV[4] reason ("released" | "failed" | "preempted" | ...), ARGV[5] scheduling pass depth
(0 = none), ARGV[6] scan cap, ARGV[7] optional placement token "<host>|<host_gen>|<activated>|<requeues>"
(see claim_grant.lua): when given, only that placement is released; if the allocation is active
under another placement (its task was requeued and placed again while an old run went on), the
call changes nothing and reports stale = true (likewise while it waits in line again).
Freed capacity goes to waiting tasks in the same call.
Without a placement token (by a user, not by a worker), an allocation waiting in line leaves it
(cancelled, as cancel.lua does; the reply's job is true for a function task, whose RQ job the
caller cancels), and a running function task is stopped too: its task is marked cancelled, and
the reply names the worker running it (the caller sends it stop-job), as cancel.lua does.
A function task preempted and still being stopped by its worker is marked cancelled instead
(changed = true), so that it does not go back in line.
A second release of the same id changes nothing and reports changed = false.
Returns JSON {ok=true, changed, stale?, job?, worker?, alloc{...}}
        or {ok=false, code="ALLOCATION_NOT_FOUND", message}.
]]
--- @include "ledger"
--- @include "placement"
--- @include "queue"
--- @lazy run_pass drop_services

local now = now_ms()
local r = release_one(ARGV[3], ARGV[4], now, ARGV[7])
if r.ok then
  r.placed = {}
  if r.changed then r.placed = schedule_pass(now, tonumber(ARGV[5] or 0), tonumber(ARGV[6] or 2048)) end
end
return cjson.encode(r)
