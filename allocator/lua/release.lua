--[[ release: end an active allocation and give its resources back. Idempotent.
KEYS: the ledger's fixed keys (see includes/ledger.lua).
ARGV[1] key prefix, ARGV[2] clock override ms, ARGV[3] allocation id,
ARGV[4] reason ("released" | "failed" | "preempted" | ...), ARGV[5] scheduling pass depth
(0 = none), ARGV[6] scan cap, ARGV[7] optional placement token "<host>|<host_gen>|<activated>|<requeues>"
(see claim_grant.lua): when given, only that placement is released; if the allocation is active
under another placement (its task was requeued and placed again while an old run went on), the
call changes nothing and reports stale = true (likewise while it waits in line again).
Freed capacity goes to waiting tasks in the same call.
A running function task released without a placement token (by a user, not by its worker) is
stopped too: its task is marked cancelled, and the reply names the worker running it (the caller
sends it stop-job), as cancel.lua does.
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
local id = ARGV[3]
local want = ARGV[7]
if want ~= nil and want ~= '' then
  local f = rcall('HMGET', alloc_key(id), 'state', 'host', 'host_gen', 'activated', 'requeues')
  local token = (f[2] or '') .. '|' .. (f[3] or '1') .. '|' .. (f[4] or '') .. '|' .. (f[5] or '0')
  if f[1] == 'pending' or (f[1] == 'active' and token ~= want) then
    return cjson.encode({ok = true, changed = false, stale = true, alloc = read_alloc(id), placed = {}})
  end
end
local a, changed = finish_alloc(id, ARGV[4], now)
if not a then
  return cjson.encode({ok = false, code = 'ALLOCATION_NOT_FOUND', message = 'allocation ' .. id .. ' not found'})
end
local job, worker = false, nil
if (want == nil or want == '') and a.kind == 'job' then
  local t = read_task(id)
  if t and t.kind == 'job' then
    if changed then
      job, worker = true, end_task_run(id, a, t)
    elseif t.state == 'preempting' then
      -- Preempted, its worker still stopping the run: released by a user, it must not go back
      -- in line when the worker reports (as cancel.lua).
      job, worker = true, job_runner(id, nil, t)
      end_preempting(id, 'cancelled')
      changed = true
    end
  end
end
local placed = {}
if changed then placed = schedule_pass(now, tonumber(ARGV[5] or 0), tonumber(ARGV[6] or 2048)) end
return cjson.encode({ok = true, changed = changed, job = job, worker = worker, alloc = a, placed = placed})
