--[[ claim_grant: a worker claims the current placement of an allocation right before it starts
the job, so one placement starts at most one run.
KEYS: the ledger's fixed keys (see includes/ledger.lua; passed so the call routes to the
namespace's slot). ARGV[1] key prefix, ARGV[2] clock override ms ("" = server TIME),
ARGV[3] allocation id, ARGV[4] the claiming worker's name, ARGV[5] the worker's host id,
ARGV[6] the machine the worker runs on (hostname), ARGV[7] the worker's pid.
The checks of grant_check.lua (active, host present and not lost, the host's generation equal to
the one the grant was made under), plus: the allocation is on the worker's host, and no worker
has claimed this placement yet. A placement is named by its token "<host>|<host_gen>|<activated
ms>|<requeues>": a task that was requeued (host lost, preemption) and placed again has a new
token (its requeue count grows, even under an injected clock), so its
new placement can be claimed once more, while a second copy of the same queue entry (a worker
that popped the job before its host was declared lost, and resumed after the task was placed
there again) is refused with reason "already_claimed". The claim is written to the record
(fields claim = token, claimed_by, claimed_node, claimed_pid, claimed_at ms): the host's agent
reads them to find runs whose worker died (allocator/agent/orphans.py). It changes no capacity,
so no outbox event.
Returns JSON {current, reason, token, state, host, host_state, gen, host_gen, claimed_by};
reason is "ok", "not_found", "not_active", "wrong_host", "host_missing", "host_lost",
"stale_generation" or "already_claimed".
]]
--- @include "ledger"
--- @include "fencing"

local id, worker, my_host, node, pid = ARGV[3], ARGV[4], ARGV[5], ARGV[6] or '', ARGV[7] or ''
local out, a = grant_status(id, my_host, {'activated', 'claim', 'claimed_by', 'requeues'})
if out.reason ~= nil then return cjson.encode(out) end
local token = a[2] .. '|' .. (a[3] or '1') .. '|' .. (a[4] or '') .. '|' .. (a[7] or '0')
out.token = token
if a[5] == token then
  out.reason, out.claimed_by = 'already_claimed', a[6]
  return cjson.encode(out)
end
rcall('HSET', alloc_key(id), 'claim', token, 'claimed_by', worker, 'claimed_node', node, 'claimed_pid', pid,
  'claimed_at', now_ms())
out.current, out.reason, out.claimed_by = true, 'ok', worker
return cjson.encode(out)
