--[[ requeue: after a worker stopped a preempted job, put the task back at the front of its
priority (original sequence kept). A task not marked "preempting" is left alone.
KEYS: the ledger's fixed keys (see includes/ledger.lua).
ARGV[1] key prefix, ARGV[2] clock override ms, ARGV[3] task id, ARGV[4] pass depth, ARGV[5] scan cap.
Returns JSON {requeued (bool), placed[]}.
]]
--- @include "ledger"
--- @include "placement"
--- @include "queue"

local now = now_ms()
local id = ARGV[3]
local t = read_task(id)
local requeued = false
if t and t.state == 'preempting' then
  requeue_task(id, t, now, true)
  requeued = true
end
local placed = schedule_pass(now, tonumber(ARGV[4]), tonumber(ARGV[5]))
return cjson.encode({requeued = requeued, placed = placed})
