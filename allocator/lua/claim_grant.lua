--[[ claim_grant: a worker claims the current placement of an allocation right before it starts
the job, so one placement starts at most one run.
KEYS: the ledger's fixed keys (see includes/ledger.lua; passed so the call routes to the
namespace's slot). ARGV[1] key prefix, ARGV[2] clock override ms ("" = server TIME),
ARGV[3] allocation id, ARGV[4] the claiming worker's name, ARGV[5] the worker's host id,
ARGV[6] the machine the worker runs on (hostname), ARGV[7] the worker's pid,
ARGV[8] optional "start": when "1", a successful claim also returns the grant the work horse
confines itself to and appends the job's "started" event (so a worker needs one round trip
before it forks), ARGV[9] optional run lease ms ("" = leave the deadline as placed): the job's
time limit plus the time its worker may take to kill an overrunning horse, "0" for a job without
a time limit. For an allocation with a deadline (a TTL), a successful claim moves the deadline to
claim time + the run lease when that is later (a job that waited in its host queue still gets its
whole time limit; the TTL, which enqueue makes at least the run lease, bounds the wait and the run
together), and removes it for a job without a time limit (the TTL bounded its wait; the run ends
with the worker's release, or the agent's check for a dead worker). An allocation without a TTL
keeps none. An expected end (the ends index) that was the old deadline follows it.
The checks of grant_check.lua (active, host present and not lost, the host's generation equal to
the one the grant was made under), plus: the allocation is on the worker's host, no worker
has claimed this placement yet, and its deadline has not passed: such an allocation (not reaped
yet) is released here as "expired" (reason "expired"; the refused worker runs a scheduling pass
next, which places what waits for its resources) and must not start a run. A placement is named by its token
"<host>|<host_gen>|<activated ms>|<requeues>": a task that was requeued (host lost, preemption)
and placed again has a new token (its requeue count grows, even under an injected clock), so its
new placement can be claimed once more, while a second copy of the same queue entry (a worker
that popped the job before its host was declared lost, and resumed after the task was placed
there again) is refused with reason "already_claimed"; the same worker (name, machine and pid)
claiming the same placement again, as a client does that retries a call whose reply was lost,
gets the same answer as the first time (without a second "started" event). The claim is written to the record
(fields claim = token, claimed_by, claimed_node, claimed_pid, claimed_at ms): the host's agent
reads them to find runs whose worker died (allocator/agent/orphans.py). It changes no capacity;
with "start" it appends the outbox event "started" {host, worker, started = ms, server clock,
and expires = the deadline ms when ARGV[9] was given, 0 = none}, which the history records as the
allocation's start time (and its new deadline). An ARGV[9] that is not a whole number of ms is an
error; nothing is written then.
Returns JSON {current, reason, token, state, host, host_state, gen, host_gen, claimed_by, expires?,
grant?} (expires: the deadline after the claim when ARGV[9] was given, 0 = none);
reason is "ok", "not_found", "not_active", "wrong_host", "host_missing", "host_lost",
"stale_generation", "already_claimed" or "expired". grant (with "start", on a successful claim only) =
{gpus = the record's "gpus" JSON text (pos, index, uuid, model, memory_mb per GPU), cores = the
record's "cores" JSON text (exclusive core ids), shared_millis, pool = for a grant of shared CPU
only, the host's cores nobody holds exclusively right now (where fractional grants run)}.
]]
--- @include "ledger"
--- @include "fencing"
--- @lazy finish_alloc

-- Core ids of host h that no allocation holds exclusively now (core map flag "1").
local function shared_pool(h)
  local f = rcall('HMGET', host_key(h), 'cores', 'cmap')
  local map = f[2] or ''
  local pool = {}
  for i, c in ipairs(decode_list(f[1])) do
    if string.sub(map, i, i) == '1' then pool[#pool + 1] = c end
  end
  return pool
end

local id, worker, my_host, node, pid = ARGV[3], ARGV[4], ARGV[5], ARGV[6] or '', ARGV[7] or ''
local start = ARGV[8] == '1'
local run_lease = nil
if ARGV[9] ~= nil and ARGV[9] ~= '' then
  if not string.match(ARGV[9], '^%d+$') or #ARGV[9] > 12 then
    return redis.error_reply('ERR run lease: expected a whole number of ms below 10^12 (0 = no time limit), got ' ..
      ARGV[9])
  end
  run_lease = tonumber(ARGV[9])
end
local out, a = grant_status(id, my_host, {'activated', 'claim', 'claimed_by', 'requeues', 'gpus', 'cores',
                                          'shared_millis', 'expires', 'claimed_node', 'claimed_pid'})
if out.reason ~= nil then return cjson.encode(out) end
local token = placement_token(a[2], a[3], a[4], a[7])
out.token = token

-- The grant the work horse confines itself to (with "start").
local function grant_of()
  local shared = tonumber(a[10] or 0) or 0
  local pool = {}
  -- No exclusive cores (a share, or no CPU at all): the run keeps to the cores nobody holds
  -- exclusively, as Kubernetes' static CPU manager runs such work in its shared pool.
  if #decode_list(a[9]) == 0 then pool = shared_pool(my_host) end
  return {gpus = a[8] or '[]', cores = a[9] or '[]', shared_millis = shared, pool = pool}
end

if a[5] == token then
  if a[6] == worker and (a[12] or '') == node and (a[13] or '') == pid then
    -- This worker's own claim, sent again (the reply to the first was lost and the client
    -- retried): the same answer, without a second "started" event or another deadline move.
    out.current, out.reason, out.claimed_by = true, 'ok', worker
    if run_lease ~= nil then out.expires = tonumber(a[11] or 0) or 0 end
    if start then out.grant = grant_of() end
    return cjson.encode(out)
  end
  out.reason, out.claimed_by = 'already_claimed', a[6]
  return cjson.encode(out)
end
local now = now_ms()
local old = tonumber(a[11] or 0) or 0
if old > 0 and old <= now then
  finish_alloc(id, 'expired', now)
  rcall('HSET', K_SEQ, 'line_unsettled', '1')  -- freed without a pass (see schedule_pass in includes/queue.lua)
  out.reason, out.state = 'expired', 'released'
  return cjson.encode(out)
end
rcall('HSET', alloc_key(id), 'claim', token, 'claimed_by', worker, 'claimed_node', node, 'claimed_pid', pid,
  'claimed_at', now)
out.current, out.reason, out.claimed_by = true, 'ok', worker
if run_lease ~= nil then
  local expires = old
  if old > 0 then
    if run_lease == 0 then expires = 0 else expires = math.max(old, now + run_lease) end
  end
  if expires ~= old then
    rcall('HSET', alloc_key(id), 'expires', tostring(expires))
    if expires > 0 then rcall('ZADD', K_EXPIRY, expires, id) else rcall('ZREM', K_EXPIRY, id) end
    -- An expected end that was the TTL deadline (no history, no hint) follows the deadline.
    if tonumber(rcall('ZSCORE', K_ENDS, id) or -1) == old then
      if expires > 0 then rcall('ZADD', K_ENDS, expires, id) else rcall('ZREM', K_ENDS, id) end
    end
  end
  out.expires = expires
end
if start then
  out.grant = grant_of()
  emit('started', id, now, cjson.encode({host = my_host, worker = worker, started = now, expires = out.expires}))
end
return cjson.encode(out)
