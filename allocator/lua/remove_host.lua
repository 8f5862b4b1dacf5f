--[[ remove_host: take a host out of the ledger.
KEYS: the ledger's fixed keys (see includes/ledger.lua), then as the LAST THREE the heartbeats
ZSET, the reclaim ZSET and the host's inventory key (KEYS[#KEYS-2], KEYS[#KEYS-1], KEYS[#KEYS]).
ARGV[1] key prefix, ARGV[2] clock override ms, ARGV[3] host id, ARGV[4] "1" = force, ARGV[5]
scheduling pass depth (default 100) and ARGV[6] scan cap (default 2048) for the pass run when a
task went back in line, ARGV[7] "1" = an agent deregistering its host as it stops: refused with
OPERATOR_DRAINED, nothing written, while an operator drains the host (draining, drained_by other
than "agent"; or lost with drained_by "operator", whose drain comes back at its registration), checked here so that a drain made after the agent read the host's state is kept.
Without force a host that still holds active allocations is refused (HOST_BUSY); with force its
allocations end with reason "host_removed" first, and its function tasks placed there and not
yet claimed by a worker follow their on_host_lost policy (back to the front of the line, or
failed), as on a lost host (see mark_lost.lua): no worker there will run them now. A run already
claimed is only released: its worker, which may still be alive, stops it (rerunning it elsewhere
at once could run it twice). Preempted function tasks
whose run there was being stopped do the same. Its service catalog and instances are dropped,
its GPU models and labels leave the count in PREFIX..'names' (count_names), and so are its
heartbeat, reclaim entry and published inventory: a host registered again under
the same id without an agent must not be declared lost for the old agent's silence. A host not
registered that allocator recover left work for is removed the same way: allocations restored on
it (deferred until it registers) count as its allocations, and a drain waiting for it
(drain_on_register) is withdrawn.
Returns JSON {ok, released[], preempted[]?} or {ok=false, code, message}.
]]
--- @include "ledger"
--- @include "placement"
--- @include "queue"

local K_HEARTBEATS, K_RECLAIM, K_INVENTORY = KEYS[#KEYS - 2], KEYS[#KEYS - 1], KEYS[#KEYS]
local now = now_ms()
local h = ARGV[3]
local hk = host_key(h)
local function forget_agent()
  rcall('ZREM', K_HEARTBEATS, h)
  rcall('ZREM', K_RECLAIM, h)
  rcall('DEL', K_INVENTORY)
end
local registered = rcall('EXISTS', hk) == 1
local ids = rcall('SMEMBERS', host_allocs_key(h))
if not registered then
  forget_agent()
  -- A host allocator recover restored allocations for (deferred until it registers) or left a
  -- drain for (drain_on_register) is known: it is removed as a registered one would be.
  if #ids == 0 and rcall('HEXISTS', K_DRAIN_ON_REGISTER, h) == 0 then
    return cjson.encode({ok = false, code = 'HOST_NOT_FOUND', message = 'host ' .. h .. ' is not registered'})
  end
end
if registered and ARGV[7] == '1' then
  local st = rcall('HMGET', hk, 'state', 'drained_by')
  if (st[1] == 'draining' and st[2] ~= 'agent') or (st[1] == 'lost' and st[2] == 'operator') then
    return cjson.encode({ok = false, code = 'OPERATOR_DRAINED',
      message = 'host ' .. h .. ' is drained by an operator; it stays registered'})
  end
end
if #ids > 0 and ARGV[4] ~= '1' then
  return cjson.encode({ok = false, code = 'HOST_BUSY',
    message = 'host ' .. h .. ' still holds ' .. #ids .. ' active allocation(s); drain it or remove with force'})
end
local requeued = false
for _, id in ipairs(ids) do
  local f = rcall('HMGET', alloc_key(id), 'host', 'host_gen', 'activated', 'requeues', 'claim')
  local started = f[5] == placement_token(f[1], f[2], f[3], f[4])  -- f[5] is false when unclaimed
  local _, changed = finish_alloc(id, 'host_removed', now)
  if changed and not started then
    -- Placed and not yet claimed by a worker: nobody will run it there now. A run already
    -- started is stopped by its worker, which may still be alive, so it is not run again
    -- elsewhere meanwhile.
    if follow_host_policy(id, h, now, 'host_removed') then requeued = true end
  end
end
if registered then
  count_names(h, -1)
  local ngpu = tonumber(rcall('HGET', hk, 'ngpu'))
  for pos = 0, ngpu - 1 do
    local m = gpu_member(h, pos)
    rcall('ZREM', K_GPU_IDX, m); rcall('ZREM', K_GPU_ORD, m); rcall('ZREM', K_GPU_FFC, m)
    rcall('ZREM', K_GPU_IDLE, m); rcall('ZREM', K_GPU_IDLE_ORD, m)
  end
  rcall('ZREM', K_CPU_IDX, h); rcall('ZREM', K_RAM_IDX, h); rcall('ZREM', K_IDLE_HOSTS, h); rcall('ZREM', K_HOSTS, h)
  rcall('ZREM', K_CPU_ORD, h)
  drop_host_services(h)
  forget_agent()
end
rcall('DEL', hk, host_allocs_key(h), host_sum_key(h))
rcall('HDEL', K_DRAIN_ON_REGISTER, h)
emit('host_removed', h, now, '{}')
local preempted, back = orphaned_preemptions(h, now, 'host_removed')
if requeued or back then schedule_pass(now, tonumber(ARGV[5] or 100), tonumber(ARGV[6] or 2048)) end
local out = {ok = true, released = ids, n = #ids}
if #preempted > 0 then out.preempted = preempted end
return cjson.encode(out)
