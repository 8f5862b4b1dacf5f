--[[ remove_host: take a host out of the ledger.
KEYS: the ledger's fixed keys (see includes/ledger.lua).
ARGV[1] key prefix, ARGV[2] clock override ms, ARGV[3] host id, ARGV[4] "1" = force.
Without force a host that still holds active allocations is refused (HOST_BUSY); with force its
allocations end with reason "host_removed" first. Its service catalog and instances are dropped.
Preempted function tasks whose run there was being stopped follow their on_host_lost policy (no
worker there may report them now), as on a lost host (see mark_lost.lua).
Returns JSON {ok, released[], preempted[]?} or {ok=false, code, message}.
]]
--- @include "ledger"
--- @include "placement"
--- @include "queue"

local now = now_ms()
local h = ARGV[3]
local hk = host_key(h)
if rcall('EXISTS', hk) == 0 then
  return cjson.encode({ok = false, code = 'HOST_NOT_FOUND', message = 'host ' .. h .. ' is not registered'})
end
local ids = rcall('SMEMBERS', host_allocs_key(h))
if #ids > 0 and ARGV[4] ~= '1' then
  return cjson.encode({ok = false, code = 'HOST_BUSY',
    message = 'host ' .. h .. ' still holds ' .. #ids .. ' active allocation(s); drain it or remove with force'})
end
for _, id in ipairs(ids) do finish_alloc(id, 'host_removed', now) end
local ngpu = tonumber(rcall('HGET', hk, 'ngpu'))
for pos = 0, ngpu - 1 do
  local m = gpu_member(h, pos)
  rcall('ZREM', K_GPU_IDX, m); rcall('ZREM', K_GPU_ORD, m); rcall('ZREM', K_GPU_FFC, m)
  rcall('ZREM', K_GPU_IDLE, m); rcall('ZREM', K_GPU_IDLE_ORD, m)
end
rcall('ZREM', K_CPU_IDX, h); rcall('ZREM', K_RAM_IDX, h); rcall('ZREM', K_IDLE_HOSTS, h); rcall('ZREM', K_HOSTS, h)
rcall('ZREM', K_CPU_ORD, h)
rcall('DEL', hk, host_allocs_key(h), host_sum_key(h))
drop_host_services(h)
emit('host_removed', h, now, '{}')
local preempted, failed = orphaned_preemptions(h, now)
for _, id in ipairs(failed) do
  emit('finished', id, now, cjson.encode({host = h, outcome = 'failed', state = 'failed', reason = 'host_removed'}))
end
local out = {ok = true, released = ids, n = #ids}
if #preempted > 0 then out.preempted = preempted end
return cjson.encode(out)
