--[[ finish_job: what a worker does after a job's work horse ended, whatever the outcome (success,
exception, timeout, stop, killed horse), in one atomic call instead of one round trip per step.
KEYS: the ledger's fixed keys (see includes/ledger.lua), then two more, found as the last KEYS:
KEYS[#KEYS - 1] the worker host's work-horse map (host_pids:<host>, HASH pid -> allocation id),
KEYS[#KEYS] the job's RQ hash (rq:job:<id>; RQ's key, outside the namespace's hash tag, like the
RQ keys the queue scripts touch: this script needs a single Redis server, as RQ does).
ARGV[1] key prefix, ARGV[2] clock override ms ("" = server TIME), ARGV[3] allocation id (= the RQ
job id), ARGV[4] the worker's host id, ARGV[5] the placement token the worker claimed
("<host>|<host_gen>|<activated>|<requeues>", see claim_grant.lua; "" = any placement on this
host), ARGV[6] the work horse's pid ("" = none recorded), ARGV[7] the job's status ("" = read
field "status" of the RQ job hash), ARGV[8] scheduling pass depth, ARGV[9] scan cap, ARGV[10] the
outcome the worker saw its horse report, "finished" or "failed" ("" = unknown: the horse died
before it could say), used only when ARGV[7] is "" and the job hash is gone (RQ deletes the hash of
a successful job with result_ttl=0 before the worker gets here), ARGV[11] "1" when the host's agent
calls for a worker that died (the "finished" event then says worker_lost: true).
Steps, in the order the worker used to take them one call each:
1. the horse's entry leaves the host's work-horse map;
2. a task marked "preempting" goes back to the front of its priority (requeue_task), then a
   scheduling pass; nothing else; unless the run had ended on its own before the stop reached
   it, finished or finally failed (status "finished" or "failed"; a failure RQ retries is
   "queued" or "scheduled" and goes back in line): then the task is done (event "finished",
   outcome "ok" or "failed"), not run again;
3. otherwise, only while the allocation is active under the claimed placement (a run that
   outlived its grant, the task placed again meanwhile, frees nothing: stale = true): the outbox
   event "finished" {host, status, outcome = "ok" for a finished job, else the status}, then the
   release (reason "released" for a finished job, else "failed"; as release.lua, with its
   "released" event and a scheduling pass for the freed capacity);
4. except for a failed run RQ will retry (its Retry put the job back, status "queued" or
   "scheduled"): the "finished" event (outcome "retry"), the release with reason "retried", and
   the task back in line under its id (as a preempted one, at its original place, not the front;
   its RQ job leaves the host queue or scheduled registry for the line's queue), then a pass. A
   retry with an interval (status "scheduled") may not start before the time RQ scheduled it
   for (its score in that registry): the task keeps its place in line but passes skip it until
   then (see K_DELAYED in includes/queue.lua).
A job hash that is gone counts as the worker's outcome (ARGV[10]), or status "None" (released as
failed) when it gives none. For a worker that died with its horse (ARGV[11]) the job is still
"started": with retries left (field retries_left of the job hash) the run is retried here as RQ
retries an abandoned job (one retry fewer; the interval RQ would take from retry_intervals), by
step 4; RQ's own maintenance, later, would retry it with the grant already released as failed.
Returns JSON {requeued, released, stale, status, placed[]}; requeued and released both true for a retry.
]]
--- @include "ledger"
--- @include "placement"
--- @include "queue"
--- @lazy run_pass requeue_task drop_services

local K_HOST_PIDS, K_JOB = KEYS[#KEYS - 1], KEYS[#KEYS]
local id, my_host, want, pid, status = ARGV[3], ARGV[4], ARGV[5] or '', ARGV[6] or '', ARGV[7] or ''
local depth, scan_cap = tonumber(ARGV[8] or 0), tonumber(ARGV[9] or 2048)
local outcome_seen = ARGV[10] or ''
local worker_lost = ARGV[11] == '1'
local now = now_ms()

-- The "finished" event's data; worker_lost when the host's agent reports for a dead worker.
local function ended(data)
  if worker_lost then data.worker_lost = true end
  return cjson.encode(data)
end

-- When RQ scheduled the retry of task t's job (ms; its score, in seconds, in the scheduled
-- registry of the queue it ran from), or nil.
local function retry_at(t)
  local origin = rcall('HGET', K_JOB, 'origin')
  local at = origin and rcall('ZSCORE', t.rq_prefix .. 'scheduled:' .. origin, id)
  if at then return math.floor(tonumber(at) * 1000) end
  return nil
end

-- The retry RQ would give an abandoned run (status still "started", its worker and horse gone):
-- retries left (or nil) and its interval in ms (RQ's Job.get_retry_interval, before the decrement).
local function abandoned_retry()
  local f = rcall('HMGET', K_JOB, 'retries_left', 'retry_intervals')
  local left = tonumber(f[1] or '')
  if not left or left < 1 then return nil end
  local ok, intervals = pcall(cjson.decode, f[2] or 'null')
  local wait = 0
  if ok and type(intervals) == 'table' and #intervals > 0 then
    wait = tonumber(intervals[math.max(#intervals - left, 0) + 1]) or 0
  end
  return left, wait * 1000
end

-- Every read and decision first, then the writes (Redis has no rollback).
local t = read_task(id)
local preempting = t ~= nil and t.state == 'preempting'
local release, stale = false, false
if not preempting then
  local f = rcall('HMGET', alloc_key(id), 'state', 'host', 'host_gen', 'activated', 'requeues')
  local token = (f[2] or '') .. '|' .. (f[3] or '1') .. '|' .. (f[4] or '') .. '|' .. (f[5] or '0')
  -- Otherwise released meanwhile (cancelled, expired, host lost) or placed elsewhere: nothing to
  -- do; or placed again on this host since this run's claim: stale, the worker says so.
  release = f[1] == 'active' and f[2] == my_host and (want == '' or token == want)
  stale = not release and f[1] == 'active' and f[2] == my_host
  if release and status == '' then
    status = rcall('HGET', K_JOB, 'status')
    if not status then status = outcome_seen ~= '' and outcome_seen or 'None' end
  end
end

if pid ~= '' then rcall('HDEL', K_HOST_PIDS, pid) end

if preempting then
  local ran = status
  if ran == '' then ran = rcall('HGET', K_JOB, 'status') or outcome_seen end
  if ran == 'finished' or ran == 'failed' then
    -- The run ended on its own before the stop could end it: it is done (running it again would
    -- do its work twice, or run a job RQ has failed for good). Its grant went to the preemption.
    end_preempting(id, 'done')
    local outcome = 'ok'
    if ran == 'failed' then outcome = 'failed' end
    emit('finished', id, now, ended({host = my_host, status = ran, outcome = outcome}))
    return cjson.encode({requeued = false, released = false, stale = false, status = ran, placed = {}})
  end
  -- A run that failed on its own, retried by RQ after an interval (status "scheduled"), keeps
  -- that interval; else it goes back at the front, as a preempted task does.
  requeue_task(id, t, now, true, ran == 'scheduled' and retry_at(t) or nil)
  return cjson.encode({requeued = true, released = false, stale = false, placed = schedule_pass(now, depth, scan_cap)})
end
if not release then
  return cjson.encode({requeued = false, released = false, stale = stale, placed = {}})
end

local not_before = nil
if worker_lost and status == 'started' and t ~= nil and t.kind == 'job' then
  local left, wait = abandoned_retry()
  if left then
    rcall('HSET', K_JOB, 'retries_left', left - 1)
    status = 'queued'
    if wait > 0 then status, not_before = 'scheduled', now + wait end
  end
end
if t ~= nil and t.kind == 'job' and (status == 'queued' or status == 'scheduled') then
  -- A retry with an interval: RQ scheduled the job (score: when, in seconds) in the registry of
  -- the queue it ran from; the task waits in line until then (requeue_task takes it out of there).
  if status == 'scheduled' and not not_before then not_before = retry_at(t) end
  emit('finished', id, now, ended({host = my_host, status = status, outcome = 'retry'}))
  finish_alloc(id, 'retried', now)
  requeue_task(id, t, now, false, not_before)
  return cjson.encode({requeued = true, released = true, stale = false, status = status,
                       placed = schedule_pass(now, depth, scan_cap)})
end

local outcome, reason = status, 'failed'
if status == 'finished' then outcome, reason = 'ok', 'released' end
emit('finished', id, now, ended({host = my_host, status = status, outcome = outcome}))
local _, changed = finish_alloc(id, reason, now)
local placed = {}
if changed then placed = schedule_pass(now, depth, scan_cap) end
return cjson.encode({requeued = false, released = changed, stale = false, status = status, placed = placed})
