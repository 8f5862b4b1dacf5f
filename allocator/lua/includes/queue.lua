--[[ The queue: pending tasks in one global order, the scheduling pass (EASY backfill), dispatch
of function tasks to their host's RQ queue, and preemption. Needs includes "ledger" and
"placement".

A task is either a function task (kind "job": an RQ job whose id is the allocation id) or a
queued direct request (kind "lease"). Its scheduling fields live in the hash task:<id>
(kind, priority, seq, front, payload = the place request JSON, rq_prefix, rq_queue = the RQ
queue it waits in, host_queue_prefix, state = pending | placed | preempting | done | cancelled).
Order: K_PENDING score = (3 - priority) * 2^42 + (front and 0 or 2^41) + seq.
RQ keys (rq:queue:<name>, rq:job:<id>, rq:queues) are not in the namespace's hash tag: the
queue scripts need a single Redis server (RQ itself does not support Cluster).
]]

local function task_key(id) return PREFIX .. 'task:' .. id end
-- ZSET task id -> not-before ms: the tasks in line that may not start yet (a retry's interval, as
-- RQ's Retry(interval=...) asks). They keep their place in K_PENDING; a pass skips them until
-- then, and they hold nothing up meanwhile. The first pass that meets one that is due takes it
-- out of here: from then on it is an ordinary task in line. The scheduler's ETA reads it
-- (allocator/eta/).
local K_DELAYED = PREFIX .. 'delayed'
-- HASH task id -> host id: preempted function tasks whose worker on that host is stopping the
-- run (task state "preempting"). The worker's report puts them back in line (its call of
-- finish_job.lua); when the host is lost instead, no report comes, and mark_lost.lua applies
-- their on_host_lost policy from here.
local K_PREEMPTING = PREFIX .. 'preempting'

local function pending_score(priority, front, seq)
  local s = (3 - priority) * 4398046511104 + seq
  if not front then s = s + 2199023255552 end
  return s
end

local function read_task(id)
  local f = rcall('HMGET', task_key(id), 'kind', 'payload', 'rq_prefix', 'rq_queue', 'host_queue_prefix', 'state', 'seq',
    'priority', 'not_before')
  if not f[1] then return nil end
  return {kind = f[1], payload = f[2], rq_prefix = f[3], rq_queue = f[4], hq_prefix = f[5], state = f[6],
          seq = tonumber(f[7]), priority = tonumber(f[8]), not_before = tonumber(f[9])}
end

-- A pending task leaves the line with nothing allocated: cancelled (reason "cancelled", by
-- cancel.lua) or dropped by the pass (reason "job_gone", or "host_removed" for a task pinned to a
-- host that no longer exists: see consider). Emits "cancelled".
local function leave_line(id, t, now, reason)
  rcall('ZREM', K_PENDING, id)
  rcall('HSET', alloc_key(id), 'state', 'cancelled', 'released', now, 'reason', reason)
  rcall('ZADD', K_DONE, now, id)
  if t then
    if t.not_before then rcall('ZREM', K_DELAYED, id) end
    rcall('HSET', task_key(id), 'state', 'cancelled')
    rcall('PEXPIRE', task_key(id), 86400000)
    if t.kind == 'job' then
      rcall('LREM', t.rq_prefix .. 'queue:' .. t.rq_queue, 0, id)
    end
  end
  emit('cancelled', id, now, reason == 'cancelled' and '{}' or cjson.encode({reason = reason}))
end

-- Whether task t is a function task whose RQ job no longer exists: its RQ ttl ran out while it
-- waited in line (or someone deleted it). No worker would ever run it, so a grant would be held
-- until its lease TTL (forever without one), and dispatch would recreate the hash as a stub
-- without expiry; the pass drops such a task instead (see consider).
local function job_gone(id, t)
  if t.kind ~= 'job' then return false end
  local job = t.rq_prefix .. 'job:' .. id
  -- Or cancelled with RQ's own job.cancel() while it waited: nobody will run it either.
  if rcall('HGET', job, 'status') == 'canceled' then return true end
  return rcall('EXISTS', job) == 0
end

-- Moves a function task's RQ job from its waiting queue to the host's queue, with origin, so
-- rq-dashboard and RQ's registries see it where it is.
local function dispatch(id, t, h)
  if t.kind ~= 'job' then return end
  local hq = t.hq_prefix .. h
  rcall('LREM', t.rq_prefix .. 'queue:' .. t.rq_queue, 0, id)
  rcall('RPUSH', t.rq_prefix .. 'queue:' .. hq, id)
  rcall('HSET', t.rq_prefix .. 'job:' .. id, 'origin', hq)
  rcall('SADD', t.rq_prefix .. 'queues', t.rq_prefix .. 'queue:' .. hq)
end

-- Puts a task back in line. Preempted tasks go to the front of their priority, keeping their
-- original sequence (so they stay in arrival order among themselves). not_before (ms, or nil): the
-- earliest the task may start again (a retry's interval); kept on the task and its record.
local function requeue_task(id, t, now, front, not_before)
  rcall('HSET', task_key(id), 'state', 'pending', 'front', front and '1' or '0')
  rcall('HDEL', K_PREEMPTING, id)
  if not_before then
    rcall('HSET', task_key(id), 'not_before', not_before)
    rcall('HSET', alloc_key(id), 'not_before', not_before)
    rcall('ZADD', K_DELAYED, not_before, id)
  elseif t.not_before then
    rcall('HDEL', task_key(id), 'not_before')
    rcall('HDEL', alloc_key(id), 'not_before')
    rcall('ZREM', K_DELAYED, id)
  end
  rcall('PERSIST', task_key(id))
  rcall('ZADD', K_PENDING, pending_score(t.priority, front, t.seq), id)
  rcall('HSET', alloc_key(id), 'state', 'pending', 'host', '', 'gpus', '[]', 'cores', '[]',
        'shared_millis', '0', 'activated', '', 'released', '', 'reason', '')
  -- What the placement granted and a task never placed has none of: no deadline while it waits
  -- (its TTL starts at its next placement), no RAM, worker slots or services held.
  rcall('HDEL', alloc_key(id), 'expires', 'ram_mb', 'slots', 'services')
  rcall('HINCRBY', alloc_key(id), 'requeues', 1)
  rcall('ZREM', K_DONE, id)
  if t.kind == 'job' then
    local job = t.rq_prefix .. 'job:' .. id
    local origin = rcall('HGET', job, 'origin')
    if origin and origin ~= t.rq_queue then
      rcall('LREM', t.rq_prefix .. 'queue:' .. origin, 0, id)
      for _, reg in ipairs({'failed', 'wip', 'canceled', 'finished', 'scheduled'}) do
        rcall('ZREM', t.rq_prefix .. reg .. ':' .. origin, id)
      end
      -- RQ's started registry lists runs as <id>:<execution id>. A run whose worker died is
      -- still there, and RQ's maintenance would take the job's next run for it, abandoned.
      for _, e in ipairs(rcall('ZRANGE', t.rq_prefix .. 'executions:' .. id, 0, -1)) do
        rcall('ZREM', t.rq_prefix .. 'wip:' .. origin, id .. ':' .. e)
      end
    end
    rcall('LREM', t.rq_prefix .. 'queue:' .. t.rq_queue, 0, id)
    if front then
      rcall('LPUSH', t.rq_prefix .. 'queue:' .. t.rq_queue, id)
    else
      rcall('RPUSH', t.rq_prefix .. 'queue:' .. t.rq_queue, id)
    end
    -- A job hash that is gone stays gone (the pass drops the task as job_gone): written here, it
    -- would come back as a stub of two fields that passes that check, and no worker runs a stub.
    if rcall('EXISTS', job) == 1 then rcall('HSET', job, 'origin', t.rq_queue, 'status', 'queued') end
  end
  emit('requeued', id, now, cjson.encode({front = front, not_before = not_before}))
end

-- A preempted task leaves "preempting" for good (state "done" or "cancelled"): out of the index,
-- and kept a day, as every ended task (the preemption made its hash persistent).
local function end_preempting(id, state)
  rcall('HSET', task_key(id), 'state', state)
  rcall('PEXPIRE', task_key(id), 86400000)
  rcall('HDEL', K_PREEMPTING, id)
end

-- A task whose host was declared lost: a function task goes back to the front of its priority
-- (policy "requeue", the default, as Slurm requeues on node failure) or fails (policy "fail":
-- its RQ job is marked failed); a queued direct request just ends (reason host_lost). True when
-- the task went back in line (the caller then runs a pass: a submit's pass tries only the new
-- task, and would let it jump the requeued one).
local function after_host_lost(id, now)
  local t = read_task(id)
  if not t or t.kind ~= 'job' then return false end
  if (rcall('HGET', task_key(id), 'on_host_lost') or 'requeue') == 'requeue' then
    requeue_task(id, t, now, true)
    return true
  end
  local job = t.rq_prefix .. 'job:' .. id
  local origin = rcall('HGET', job, 'origin')
  if origin then
    rcall('LREM', t.rq_prefix .. 'queue:' .. origin, 0, id)
    rcall('ZADD', t.rq_prefix .. 'failed:' .. origin, math.floor(now / 1000) + 31536000, id)
  end
  rcall('HSET', job, 'status', 'failed', 'exc_info', 'host lost')
  rcall('HSET', alloc_key(id), 'state', 'failed')
  return false
end

-- after_host_lost for allocation id, ended on host h (gone: reason host_lost or host_removed),
-- with the outbox told when its policy failed it. True when the task went back in line.
local function follow_host_policy(id, h, now, reason)
  local requeued = after_host_lost(id, now)
  if rcall('HGET', alloc_key(id), 'state') == 'failed' then
    -- Policy "fail" turned the record to failed after its released event: say so in the outbox
    -- too, or the history would keep it as released.
    emit('finished', id, now, cjson.encode({host = h, outcome = 'failed', state = 'failed', reason = reason}))
  end
  return requeued
end

-- Preempted function tasks whose run on host h was being stopped when h was lost or removed
-- (reason): no worker may report their end, so each follows its on_host_lost policy now, as the
-- host's running jobs do. Returns their ids, and whether any went back in line.
local function orphaned_preemptions(h, now, reason)
  local ids, requeued = {}, false
  local flat = rcall('HGETALL', K_PREEMPTING)
  for i = 1, #flat, 2 do
    local id = flat[i]
    if flat[i + 1] == h then
      rcall('HDEL', K_PREEMPTING, id)
      if rcall('HGET', task_key(id), 'state') == 'preempting' then
        -- Out of "preempting" first: a late report of that run must not requeue it again. Done
        -- unless its policy puts it back in line.
        end_preempting(id, 'done')
        if follow_host_policy(id, h, now, reason) then requeued = true end
        ids[#ids + 1] = id
      end
    end
  end
  return ids, requeued
end

-- Per-host what-if state for reservation and preemption: free CPU, RAM and per-GPU free memory
-- and holders, starting from now and adding back what given allocations would free.
-- A host whose catalog lacks a service the request names is no candidate. On a host short of
-- free service ports for the services the request would start (short > 0), the ports that ending
-- allocations would give back are counted: a service whose every holder ends stops once idle
-- (the ETA does not model ports).
-- The free amounts are not floored at 0: on a host an update left overcommitted (less RAM or GPU
-- memory than its grants hold), ending a grant frees only what it holds beyond the excess, and
-- preemption must not end work that frees nothing usable.
local function sim_host(req, h)
  local s = host_state(h)
  if not host_eligible(req, h, s) then return nil end
  local short, svc = 0, nil
  if req.services then
    local why, free, new = services_fit(req, h)
    if why == 'catalog' then return nil end
    if why == 'ports' then
      -- Short of ports: each service of the host whose last holder ends stops once idle and
      -- gives its port back (sim_give counts them), unless the request needs it itself.
      short, svc = new - free, {}
      local want = {}
      for _, name in ipairs(req.services) do want[name] = true end
      local flat = rcall('HGETALL', svc_key(h))
      for i = 1, #flat, 2 do
        if not want[flat[i]] then
          local ok, e = pcall(cjson.decode, flat[i + 1])
          svc[flat[i]] = ok and type(e) == 'table' and tonumber(e.refs) or 0
        end
      end
    end
  end
  local gpus = {}
  for p = 0, s.ngpu - 1 do
    local g = gpu_state(h, p)
    gpus[g.uuid] = {free = g.total - g.ext - g.used, n = g.n, model = g.model}
  end
  local slots = rcall('HMGET', host_key(h), 'slots', 'slots_used')
  return {cpu = s.cfree * 1000 - s.shared, ram = s.ram - s.ram_used, gpus = gpus,
          slots = tonumber(slots[1] or 0) - tonumber(slots[2] or 0), reserve = s.reserve,
          short = short, svc = svc}
end

-- What allocation id, held on host h, would give back: {gpus = [{uuid, memory_mb}], cpu
-- (millicores), ram, slots}. Its exclusive cores count only where return_grant gives them back:
-- cores the host still lists (an update may have removed some) and marks taken.
local function held_by(id, h)
  local f = rcall('HMGET', alloc_key(id), 'gpus', 'cores', 'shared_millis', 'ram_mb', 'slots', 'cver', 'cpos',
    'services')
  local cores, back = decode_list(f[2]), 0
  if #cores > 0 then
    local hk = host_key(h)
    local hf = rcall('HMGET', hk, 'cmap', 'cver')
    local map = hf[1] or ''
    for _, i in ipairs(grant_core_positions(hk, cores, f[6], f[7], hf[2])) do
      if i > 0 and string.sub(map, i, i) == '0' then back = back + 1 end
    end
  end
  return {gpus = decode_list(f[1]), cpu = back * 1000 + tonumber(f[3] or 0),
          ram = tonumber(f[4] or 0), slots = tonumber(f[5] or 0), services = decode_list(f[8])}
end

local function sim_give(sim, held)
  if sim.svc then
    for _, name in ipairs(held.services) do
      local refs = sim.svc[name]
      if refs and refs > 0 then
        sim.svc[name] = refs - 1
        if refs == 1 then sim.short = sim.short - 1 end
      end
    end
  end
  for _, g in ipairs(held.gpus) do
    local sg = sim.gpus[g.uuid]
    if sg then sg.free = sg.free + tonumber(g.memory_mb); sg.n = sg.n - 1 end
  end
  sim.cpu = sim.cpu + held.cpu
  sim.ram = sim.ram + held.ram
  sim.slots = sim.slots + held.slots
end

local function sim_copy(sim)
  local gpus = {}
  for u, g in pairs(sim.gpus) do gpus[u] = {free = g.free, n = g.n, model = g.model} end
  local svc = nil
  if sim.svc then
    svc = {}
    for name, refs in pairs(sim.svc) do svc[name] = refs end
  end
  return {cpu = sim.cpu, ram = sim.ram, gpus = gpus, slots = sim.slots, reserve = sim.reserve,
          short = sim.short, svc = svc}
end

-- Whether req would be placed on the simulated host: what try_place checks of a host, CPU, RAM
-- and worker slots, a host with no free CPU or RAM left taking nothing (parked, see reindex_host),
-- and GPUs that fit, of which only those in use plus the idle ones beyond the critical reserve
-- for work below critical (idle_allowance). Reservation and preemption must not count on a
-- host the placement would refuse: preemption would end work for a task that still cannot start.
local function sim_fits(req, sim)
  if sim.cpu < req.cpu_millis or sim.ram < req.ram or sim.cpu <= 0 or sim.ram <= 0 then return false end
  if sim.short > 0 then return false end
  if req.slots and sim.slots < req.slots then return false end
  local busy, idle_fit, idle = 0, 0, 0
  for _, g in pairs(sim.gpus) do
    if g.n <= 0 and g.free > 0 then idle = idle + 1 end
    if gpu_fits(req, {free = g.free, n = g.n, model = g.model}) then
      if g.n <= 0 then idle_fit = idle_fit + 1 else busy = busy + 1 end
    end
  end
  if sim.reserve > 0 and req.priority < 3 then
    local allowance = idle - sim.reserve
    if allowance < 0 then allowance = 0 end
    if idle_fit > allowance then idle_fit = allowance end
  end
  return busy + idle_fit >= req.gpus
end

-- Walks allocations in the order given by walk(offset) (a page of ids), adding each back to a
-- simulation of its host; returns the host where req first fits, the ids that must go there,
-- and the last id's score. Bounded by limit allocations.
-- With refused (the placement has just refused req: preemption, and the reservation of a pass's
-- blocked task), a host on which req fits in the simulation before anything is added back is
-- passed over: the placement refused req there for what the simulation does not see (a walk that
-- stopped at the scan cap before it), so ending work there, or reserving it, would not let req
-- start. Without it (the head's reservation that a request placed outside
-- the line must respect, the head untried), such a host is where the head fits now: it is reserved.
local function first_fit_after(req, ids_scores, limit, refused)
  local sims, freed = {}, {}
  for i = 1, math.min(#ids_scores, 2 * limit), 2 do
    local id, score = ids_scores[i], tonumber(ids_scores[i + 1])
    local h = rcall('HGET', alloc_key(id), 'host')
    if h and h ~= '' then
      if sims[h] == nil then
        local sim = sim_host(req, h) or false
        if sim and refused and sim_fits(req, sim) then sim = false end
        sims[h] = sim
        freed[h] = {}
      end
      local sim = sims[h]
      if sim then
        sim_give(sim, held_by(id, h))
        freed[h][#freed[h] + 1] = id
        if sim_fits(req, sim) then return h, freed[h], score end
      end
    end
  end
  return nil
end

-- The victims on host h that req needs ended, of those the walk gathered (in its order: lowest
-- priority, newest first): each, from the last gathered (the costliest to end) to the first, is
-- spared when the others still make room. A walk adds allocations until req fits, so it can
-- gather one that frees nothing req lacks (a CPU-only task, when req needs a GPU). One victim
-- alone is needed: first_fit_after passes over a host where req fits without any.
local function fewest_victims(req, h, victims)
  if #victims <= 1 then return victims end
  local base = sim_host(req, h)
  local held, keep = {}, {}
  for i, id in ipairs(victims) do held[i], keep[i] = held_by(id, h), true end
  for i = #victims, 1, -1 do
    keep[i] = false
    local sim = sim_copy(base)
    for j = 1, #victims do if keep[j] then sim_give(sim, held[j]) end end
    if not sim_fits(req, sim) then keep[i] = true end
  end
  local out = {}
  for i, id in ipairs(victims) do if keep[i] then out[#out + 1] = id end end
  return out
end

-- EASY reservation for the first blocked task: the host and the time (shadow) at which it will
-- fit, from the expected ends of running allocations. (Not named reserve: host states carry a
-- field of that name, and the script loader goes by names, see allocator/scripts.py.) refused: see
-- first_fit_after.
local function reservation(req, now, limit, refused)
  local ids = rcall('ZRANGE', K_ENDS, 0, limit - 1, 'WITHSCORES')
  local h, _, shadow = first_fit_after(req, ids, limit, refused)
  if not h then return nil end
  if shadow < now then shadow = now end
  return {host = h, shadow = shadow}
end

-- The RQ worker starting or running the job of task t (allocation record a, as finish_alloc
-- returns it), or nil: the worker that claimed the allocation's current placement (it claims
-- before RQ marks the job started, and takes a stop-job command from then on), else the one RQ
-- records on a started job.
local function job_runner(id, a, t)
  if a and a.claimed_by and a.claimed_by ~= '' and
     a.claim == placement_token(a.host, a.host_gen, a.activated, a.requeues) then
    return a.claimed_by
  end
  local f = rcall('HMGET', t.rq_prefix .. 'job:' .. id, 'status', 'worker_name')
  if f[1] == 'started' and f[2] then return f[2] end
  return nil
end

-- A function task ended from outside its worker (cancel, or a user's release of a running one):
-- marked cancelled, which its worker also checks at each tick to stop the run; a job no worker
-- has claimed leaves its host queue. Returns the RQ worker starting or running it, if any, for
-- the caller's stop-job command.
local function end_task_run(id, a, t)
  local worker = job_runner(id, a, t)
  if not worker then
    rcall('LREM', t.rq_prefix .. 'queue:' .. (rcall('HGET', t.rq_prefix .. 'job:' .. id, 'origin') or ''), 0, id)
  end
  rcall('HSET', task_key(id), 'state', 'cancelled')
  return worker
end

-- One allocation ended by release.lua or release_many.lua (their reply for it, the scheduling
-- pass left to the caller): given a placement token (want, see claim_grant.lua), only that
-- placement is released, and an allocation placed again since, or back in line, is left as it
-- is (stale). Without a token, by a user: an allocation waiting in line leaves it (cancelled,
-- as cancel.lua does), before any pass of this call could place it; a running function task is
-- stopped too: its task is marked cancelled and the reply names its worker; one preempted and
-- still being stopped is marked cancelled instead, so that it does not go back in line. (job:
-- the caller stops or cancels the RQ job.)
local function release_one(id, reason, now, want)
  local by_user = (want == nil or want == '')
  if not by_user then
    local f = rcall('HMGET', alloc_key(id), 'state', 'host', 'host_gen', 'activated', 'requeues')
    if f[1] == 'pending' or (f[1] == 'active' and placement_token(f[2], f[3], f[4], f[5]) ~= want) then
      return {ok = true, changed = false, stale = true, alloc = read_alloc(id)}
    end
  elseif rcall('HGET', alloc_key(id), 'state') == 'pending' then
    local t = read_task(id)
    leave_line(id, t, now, 'cancelled')
    return {ok = true, changed = true, job = (t ~= nil and t.kind == 'job'), alloc = read_alloc(id)}
  end
  local a, changed = finish_alloc(id, reason, now)
  if not a then
    return {ok = false, code = 'ALLOCATION_NOT_FOUND', message = 'allocation ' .. id .. ' not found'}
  end
  local job, worker = false, nil
  if by_user and a.kind == 'job' then
    local t = read_task(id)
    if t and t.kind == 'job' then
      if changed then
        job, worker = true, end_task_run(id, a, t)
      elseif t.state == 'preempting' then
        job, worker = true, job_runner(id, nil, t)
        end_preempting(id, 'cancelled')
        changed = true
      end
    end
  end
  return {ok = true, changed = changed, job = job, worker = worker, alloc = a}
end

-- Priority preemption: lower-priority allocations, newest first, until req fits on one host.
-- Returns the host, and whether a victim went back in line at once (an unclaimed job).
local function preempt_for(req, now, limit)
  local ids = rcall('ZRANGEBYSCORE', K_BYPRIO, '-inf', '(' .. (req.priority * 1e13), 'WITHSCORES', 'LIMIT', 0, limit)
  local h, victims = first_fit_after(req, ids, limit, true)
  if not h then return nil end
  victims = fewest_victims(req, h, victims)
  local back = false
  for _, v in ipairs(victims) do
    local a = finish_alloc(v, 'preempted', now)
    local t = read_task(v)
    if t and t.kind == 'job' then
      local worker = job_runner(v, a, t)
      if worker then
        -- The worker stops the horse, then requeues the task (finish_job.lua).
        rcall('HSET', task_key(v), 'state', 'preempting')
        rcall('HSET', K_PREEMPTING, v, a.host)
        rcall('PERSIST', task_key(v))
        rcall('PUBLISH', t.rq_prefix .. 'pubsub:' .. worker, cjson.encode({command = 'stop-job', job_id = v}))
      else
        requeue_task(v, t, now, true)
        back = true
      end
    elseif t then
      rcall('HSET', task_key(v), 'state', 'done')
    end
  end
  emit('preempted', req.id, now, cjson.encode({host = h, victims = victims}))
  return h, back
end

-- State of one scheduling pass. Within a pass free capacity only shrinks (placements take,
-- nothing gives back except a preemption, which clears the memo), so a request shape that did
-- not fit will not fit later in the same pass: a line of many alike tasks costs one failed walk.
local function new_pass()
  return {blocked = false, resv = nil, refused = {}}
end

local function attempt(st, req, now)
  local shape = table.concat({req.gpus, req.gpu_mem, req.cpu_millis, tostring(req.exclusive), req.ram,
    req.strategy, req.priority, req.slots or 0, cjson.encode(req.models or false),
    cjson.encode(req.selector or false), cjson.encode(req.services or false), req.exclude or '',
    req.only or ''}, '|')
  if st.refused[shape] then return nil end
  local p = try_place(req, now)
  if not p then st.refused[shape] = true end
  return p
end

-- Whether req, placed on host h outside the line, would take room the reservation resv counts
-- on: h is the reserved host and req is not expected to end before the head's start.
local function delays_head(req, h, resv, now)
  if h ~= resv.host then return false end
  local ends = expected_end(req, now)
  return not (ends and ends <= resv.shadow)
end

-- A placement of req behind the reservation resv (EASY backfill): anywhere but the reserved host,
-- or on it when req is expected to end before the reserved start; a request pinned to one node
-- (req.only) may backfill only onto that node. Through the pass's memo when st is given (a
-- pass), else directly (a request placed outside the line). Returns try_place's two values.
local function place_behind(st, req, resv, now)
  local only = req.only
  req.exclude = resv.host
  local p, refused
  if st then p = attempt(st, req, now) else p, refused = try_place(req, now) end
  req.exclude = nil
  if not p and (only == nil or only == resv.host) and not delays_head(req, resv.host, resv, now) then
    req.only = resv.host
    if st then p = attempt(st, req, now) else p = try_place(req, now) end
    req.only = only
  end
  return p, refused
end

-- Tries one pending task under the pass's state; places and dispatches it when allowed. The
-- first task that does not fit blocks: it gets the reservation, and later tasks may start only
-- where they do not delay it (EASY backfill).
local function consider(st, id, t, now, scan_cap)
  if t.not_before then
    -- Not yet (a retry's interval): neither placed nor in anyone's way, as if not in line.
    if t.not_before > now then return false end
    -- Due: an ordinary task in line from now on (submit_pass may then count on this pass).
    rcall('ZREM', K_DELAYED, id)
    rcall('HDEL', task_key(id), 'not_before')
    rcall('HDEL', alloc_key(id), 'not_before')
    t.not_before = nil
  end
  local req = cjson.decode(t.payload)
  req.id = id
  req.scan_cap = scan_cap
  req.kind = t.kind  -- before any expected_end: a job's TTL is no bound on its run
  if req.only and rcall('EXISTS', host_key(req.only)) == 0 then
    -- Pinned to a host that has been removed (a policy's choice): it could never be placed.
    leave_line(id, t, now, 'host_removed')
    return false
  end
  local p = nil
  if not st.blocked then
    p = attempt(st, req, now)
    if not p and req.preempt then
      -- Checked here too: a task nobody will run must not end others' work.
      if job_gone(id, t) then leave_line(id, t, now, 'job_gone'); return false end
      local h, back = preempt_for(req, now, 128)
      if h then
        st.refused = {}
        st.requeued = back
        p = attempt(st, req, now)
      end
    end
    if not p then
      st.blocked = true
      st.resv = reservation(req, now, 256, true)
    end
  elseif st.resv then
    p = place_behind(st, req, st.resv, now)
  else
    -- The head is blocked and no release in sight frees enough for it: others may run
    -- (there is nothing they could delay).
    p = attempt(st, req, now)
  end
  if not p then return false end
  -- Checked only once it would be placed: one read per placement, not per task the pass looks at.
  if job_gone(id, t) then leave_line(id, t, now, 'job_gone'); return false end
  req.created = rcall('HGET', alloc_key(id), 'created')
  grant(req, p, now)
  rcall('ZREM', K_PENDING, id)
  rcall('HSET', task_key(id), 'state', 'placed')
  dispatch(id, t, p.host)
  return true
end

-- The pass proper over the first depth pending tasks, in order. A preemption that puts a victim
-- back in line (at the front of its priority, maybe ahead of tasks this walk has yet to reach)
-- ends the walk once the preempting task is placed, and a new pass starts over the line as it
-- now stands: the rest of the old walk would pass over the victim, and a task behind it could
-- take the room it fits in.
local function run_pass(ids, now, depth, scan_cap)
  local placed = {}
  for _ = 1, depth do
    local st, again = new_pass(), false
    for _, id in ipairs(ids) do
      local t = read_task(id)
      if not t then
        rcall('ZREM', K_PENDING, id)
      elseif consider(st, id, t, now, scan_cap) then
        placed[#placed + 1] = id
        if st.requeued then again = true; break end
      end
      st.requeued = nil
    end
    if not again then break end
    ids = rcall('ZRANGE', K_PENDING, 0, depth - 1)
  end
  return placed
end

-- One scheduling pass over the first depth pending tasks, in order. The checks that end it
-- before any task is looked at come first, apart from the pass proper: a script that names
-- run_pass lazy (see allocator/scripts.py) then builds the placement code only when something
-- waits.
-- A pass that placed tasks and reached its depth leaves the line unsettled (K_SEQ field
-- line_unsettled): tasks that moved up into its reach were never tried, and may fit now, so the
-- next submit runs a whole pass rather than trying only the new task (submit_pass). A pass that
-- placed nothing, or saw the whole line, leaves it settled.
local function schedule_pass(now, depth, scan_cap)
  if depth <= 0 then return {} end
  if rcall('HGET', K_SEQ, 'recovering') == '1' then return {} end
  local ids = rcall('ZRANGE', K_PENDING, 0, depth - 1)
  -- (An empty line leaves the field as it is: a submit into it runs the whole pass anyway, and a
  -- release with nobody waiting pays no write for it.)
  if #ids == 0 then return {} end
  local placed = run_pass(ids, now, depth, scan_cap)
  if #placed > 0 and #ids >= depth then
    rcall('HSET', K_SEQ, 'line_unsettled', '1')
  else
    rcall('HDEL', K_SEQ, 'line_unsettled')
  end
  return placed
end

-- The EASY reservation a request placed outside the line (place.lua, place_on.lua) must respect:
-- that of the line's head, the first task that may start now (one waiting out a retry interval
-- is skipped, as the pass skips it), when it has the same or a higher priority than req. nil
-- when no such task waits or nothing in sight frees room for it. Also its id, and true as a
-- third value when req outranks that task (whose reservation is then not computed).
-- While the line is settled (no line_unsettled, no task whose retry interval has ended unmet by
-- a pass), the last pass refused the head as things stand: its reservation is the one that pass
-- made (first_fit_after with refused). Otherwise the head may fit now, where it is reserved.
local function line_reservation(req, now)
  for _, id in ipairs(rcall('ZRANGE', K_PENDING, 0, 63)) do
    local t = read_task(id)
    if t and not (t.not_before and t.not_before > now) then
      if (t.priority or 0) < req.priority then return nil, id, true end
      local hreq = cjson.decode(t.payload)
      hreq.id, hreq.scan_cap, hreq.kind = id, req.scan_cap, t.kind
      local settled = rcall('HGET', K_SEQ, 'line_unsettled') ~= '1'
        and rcall('ZCOUNT', K_DELAYED, '-inf', now) == 0
      return reservation(hreq, now, 256, settled), id
    end
  end
  return nil
end

local function queue_ahead(head, resv)
  return {ok = false, code = 'QUEUE_AHEAD', details = {waiting_task = head, reserved_host = resv.host},
    message = 'the room this request needs is reserved for a task of the same or a higher priority ' ..
      'waiting in line (' .. head .. ', on host ' .. resv.host .. '): queue it to wait its turn'}
end

-- A direct request (place.lua) while tasks wait in line: placed as a backfill would be. It takes
-- no room the head's reservation counts on (line_reservation) unless it is expected to end
-- before the head's start; with no reservation to respect it is placed as if nobody waited.
-- Refused with QUEUE_AHEAD when only the reserved room would hold it. Returns try_place's values.
-- A placement on the reserved host (one that ends before the head's start), or by a request
-- that outranks the head, may move the head's reservation, and tasks behind it that it held back
-- could then start: the line is unsettled (see schedule_pass; place_on.lua does the same). Where
-- the head has no reservation, nothing was held back.
local function place_beside_line(req, now)
  local resv, head, outranks = line_reservation(req, now)
  if not resv then
    local p, refused = try_place(req, now)
    if p and outranks and not req.dry_run then rcall('HSET', K_SEQ, 'line_unsettled', '1') end
    return p, refused
  end
  local p, refused = place_behind(nil, req, resv, now)
  if p then
    if p.host == resv.host and not req.dry_run then rcall('HSET', K_SEQ, 'line_unsettled', '1') end
    return p
  end
  if try_place(req, now) then return nil, queue_ahead(head, resv) end
  return nil, refused
end

-- One direct request placed now, from place.lua's three arguments (payload, request JSON,
-- metadata JSON): the reply of place.lua for it, and of place_many.lua for each of its requests.
-- An id that exists gets its record; while the ledger is being rebuilt (allocator recover) the
-- request is refused; up to 8 leases past their TTL are ended first, their capacity going to the
-- tasks in line (a scheduling pass), as after any release. While tasks wait, the first of them
-- keeps the room its reservation counts on (EASY backfill rules, as for the tasks behind it): a
-- stream of direct requests must not starve it. Returns an allocation, a dry run's answer or a
-- refusal.
local function place_request(payload, request, metadata, now)
  local req = cjson.decode(payload)
  req.request, req.metadata = request, metadata
  if rcall('EXISTS', alloc_key(req.id)) == 1 then
    return {ok = true, existing = true, alloc = read_alloc(req.id)}
  end
  if rcall('HGET', K_SEQ, 'recovering') == '1' then
    return {ok = false, code = 'RECOVERING', details = {},
      message = 'the ledger is being rebuilt after a loss of Redis data; no placements until it is consistent'}
  end
  if #reap_expired(now, 8) > 0 then schedule_pass(now, tonumber(req.pass_depth or 0), req.scan_cap) end
  local p, refused
  if rcall('ZCARD', K_PENDING) > 0 then p, refused = place_beside_line(req, now) else p, refused = try_place(req, now) end
  if not p then return refused end
  if req.dry_run then return {ok = true, dry_run = true, host = p.host, gpus = p.gpus, cores = p.cores} end
  return {ok = true, alloc = grant(req, p, now)}
end

-- The pass a submit needs. Nothing was freed since the last pass (unless the submit reaped
-- expired leases), so the tasks ahead of the new one still do not fit: only the new task can
-- start, and only where it does not delay the head of the line. One task instead of depth.
-- Unless the line is unsettled (see schedule_pass: the last pass stopped at its depth after
-- placing tasks, or something outside a pass may have let a task start): the whole pass runs.
-- Unless a task's retry interval ended since (K_DELAYED holds it until a pass meets it due):
-- it comes first, so the whole pass runs.
local function submit_pass(id, now, depth, scan_cap, reaped)
  if depth <= 0 then return {} end
  local f = rcall('HMGET', K_SEQ, 'recovering', 'line_unsettled')
  if f[1] == '1' then return {} end
  local head = rcall('ZRANGE', K_PENDING, 0, 0)[1]
  if reaped or f[2] == '1' or head == nil or head == id or rcall('ZCOUNT', K_DELAYED, '-inf', now) > 0 then
    return schedule_pass(now, depth, scan_cap)
  end
  local rank = rcall('ZRANK', K_PENDING, id)
  -- (A reply of nil is false in a script: an id no longer in line, a repeat of a placed one.)
  if not rank or rank >= depth then return {} end  -- a pass of this depth would not reach it
  local ht, t = read_task(head), read_task(id)
  -- A head that may not start yet blocks nothing: the whole pass finds the first one that does.
  if not ht or not t or (ht.not_before and ht.not_before > now) then return schedule_pass(now, depth, scan_cap) end
  local st = new_pass()
  local hreq = cjson.decode(ht.payload)
  hreq.id, hreq.scan_cap = head, scan_cap
  -- (The line is settled here: the last pass refused the head, and made this reservation.)
  st.blocked, st.resv = true, reservation(hreq, now, 256, true)
  if consider(st, id, t, now, scan_cap) then return {id} end
  return {}
end
