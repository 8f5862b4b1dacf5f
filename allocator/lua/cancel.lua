--[[ cancel: a pending task leaves the line and nothing is allocated; an active one is released
with reason "cancelled" (the caller then stops its RQ job); a preempted job its worker is still
stopping is marked cancelled, so that it does not go back in line. Then a scheduling pass.
KEYS: the ledger's fixed keys (see includes/ledger.lua).
ARGV[1] key prefix, ARGV[2] clock override ms, ARGV[3] task/allocation id, ARGV[4] pass depth,
ARGV[5] scan cap.
Returns JSON {ok, was ("pending"|"active"|state), ended (whether this call ended it: it was pending
or active, or a preempted job it kept from going back in line), job (true for a function task: the caller
stops or cancels its RQ job; a lease's id may name an RQ job that is not the namespace's),
worker (RQ worker name starting or running it, if any: see job_runner in includes/queue.lua)}
or {ok=false, code="ALLOCATION_NOT_FOUND"}.
]]
--- @include "ledger"
--- @include "placement"
--- @include "queue"

local now = now_ms()
local id = ARGV[3]
local state = rcall('HGET', alloc_key(id), 'state')
if not state then
  return cjson.encode({ok = false, code = 'ALLOCATION_NOT_FOUND', message = 'allocation ' .. id .. ' not found'})
end
local t = read_task(id)
local worker = nil
local ended = state == 'pending' or state == 'active'
if state == 'pending' then
  leave_line(id, t, now, 'cancelled')
elseif state == 'active' then
  local a = finish_alloc(id, 'cancelled', now)
  if t and t.kind == 'job' then worker = end_task_run(id, a, t) end
elseif t and t.kind == 'job' and t.state == 'preempting' then
  -- Preempted, its worker still stopping it: the worker's report must not put it back in line
  -- (finish_job and requeue requeue only a task marked "preempting").
  worker = job_runner(id, nil, t)
  end_preempting(id, 'cancelled')
  ended = true
end
local placed = schedule_pass(now, tonumber(ARGV[4]), tonumber(ARGV[5]))
return cjson.encode({ok = true, was = state, ended = ended, job = (t ~= nil and t.kind == 'job'), worker = worker,
  placed = placed})
