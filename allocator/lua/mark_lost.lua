--[[ mark_lost: declare a host lost when its heartbeat is stale, and free what it holds.
KEYS: the ledger's fixed keys (see includes/ledger.lua), then the heartbeats ZSET and the reclaim
ZSET as the LAST TWO keys (KEYS[#KEYS-1], KEYS[#KEYS]) so the fixed list can grow.
ARGV[1] key prefix, ARGV[2] clock override ms ("" = server TIME), ARGV[3] host id,
ARGV[4] grace ms, ARGV[5] most allocations to release in this call, ARGV[6] scheduling pass
depth (default 100) and ARGV[7] scan cap (default 2048) for the pass run when a task went back
in line (placed elsewhere now, before a later submission's pass could place that one first) or
when grants of an older generation were freed on a host that came back.
Re-checks inside the script that the heartbeat is still older than the grace (the agent may have
beaten since the reaper looked), then: state "lost" (field lost_at), out of every index, one
"host_lost" outbox event, and the host leaves the heartbeats set (its agent must register again,
which starts a new generation). Then releases, with reason "host_lost", the host's stale grants
(function tasks are requeued at the front or failed by their on_host_lost policy; a failed one
gets a "finished" event with state "failed", as its released event said "released"):
all of its active allocations while it is lost, or those of an older generation when it has
already come back. Preempted function tasks whose run on the lost host was being stopped (no
worker will report it now) follow their on_host_lost policy too (field preempted of the reply). At most ARGV[5] per call; when some remain the host stays in the reclaim set
and the reaper calls again. A host that no longer exists is dropped from both sets.
Returns JSON {ok, lost, declared, released[], preempted[], remaining, gen, last_heartbeat}
            or {ok=false, code="HOST_NOT_FOUND", message}.
]]
--- @include "ledger"
--- @include "placement"
--- @include "queue"

local K_HEARTBEATS, K_RECLAIM = KEYS[#KEYS - 1], KEYS[#KEYS]
local now = now_ms()
local h = ARGV[3]
local grace = tonumber(ARGV[4])
local limit = tonumber(ARGV[5])

local s = host_state(h)
if not s then
  rcall('ZREM', K_HEARTBEATS, h)
  rcall('ZREM', K_RECLAIM, h)
  return cjson.encode({ok = false, code = 'HOST_NOT_FOUND', message = 'host ' .. h .. ' is not registered'})
end

local beat = rcall('ZSCORE', K_HEARTBEATS, h)
if beat then beat = tonumber(beat) end
local declared = false
if s.state ~= 'lost' and beat and now - beat >= grace then
  rcall('HSET', host_key(h), 'state', 'lost', 'lost_at', now)
  reindex_host(h, nil)
  declared = true
  emit('host_lost', h, now, cjson.encode({gen = s.gen, last_heartbeat = beat, grace_ms = grace,
    active = tonumber(rcall('SCARD', host_allocs_key(h)))}))
end
local lost = declared or s.state == 'lost'
if lost then rcall('ZREM', K_HEARTBEATS, h) end

-- Stale grants: everything on a lost host; on a host that came back, grants of older generations.
local released, remaining, requeued = {}, 0, false
for _, id in ipairs(rcall('SMEMBERS', host_allocs_key(h))) do
  local stale = lost
  if not stale then stale = tonumber(rcall('HGET', alloc_key(id), 'host_gen') or 1) ~= s.gen end
  if stale then
    if #released < limit then
      local _, changed = finish_alloc(id, 'host_lost', now)
      if changed then
        released[#released + 1] = id
        if follow_host_policy(id, h, now, 'host_lost') then requeued = true end
      end
    else
      remaining = remaining + 1
    end
  end
end
if remaining > 0 then rcall('ZADD', K_RECLAIM, now, h) else rcall('ZREM', K_RECLAIM, h) end
local preempted = {}
if lost then
  local back
  preempted, back = orphaned_preemptions(h, now, 'host_lost')
  requeued = requeued or back
end
-- A pass when a task went back in line, or when grants of an older generation were freed on a
-- host that came back (ready: what they held can go to the line now).
if requeued or (#released > 0 and not lost) then schedule_pass(now, tonumber(ARGV[6] or 100), tonumber(ARGV[7] or 2048)) end

local out = {ok = true, lost = lost, declared = declared, remaining = remaining, gen = s.gen,
  last_heartbeat = beat or cjson.null}
if #released > 0 then out.released = released end
if #preempted > 0 then out.preempted = preempted end
return cjson.encode(out)
