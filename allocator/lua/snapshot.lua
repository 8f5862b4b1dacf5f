--[[ snapshot: read-only, atomic copy of hosts, indexes and active allocations, for invariant checks
and tests. Its cost grows with the fleet: do not call it on a hot path.
KEYS: the ledger's fixed keys (see includes/ledger.lua).
ARGV[1] key prefix, ARGV[2] unused.
Returns JSON {hosts{id={field=value}}, summaries{id=[numbers of its scan summary] or absent},
allocs{id={field=value}}, gpu_idx{}, gpu_idle{}, gpu_ord{},
cpu_idx{}, ram_idx{}, expiry{}, ends{}, byprio{}, idle_hosts{}, cpu_ord{}, gpu_ffc{}, gpu_idle_ord{},
pending{id=allocation state}, names{field=count} (the count of GPU models and labels),
model_hosts{model=[host ids]} (the set of the hosts with each model the count has),
label_hosts{label=value: [host ids]} (likewise per label),
services{host={name=entry JSON}}, service_ports{host={port=name}}}.
]]
--- @include "ledger"

local function zmap(key)
  local flat = rcall('ZRANGE', key, 0, -1, 'WITHSCORES')
  local m = {}
  for i = 1, #flat, 2 do m[flat[i]] = tonumber(flat[i + 1]) end
  return m
end
local function hmap(key)
  local flat = rcall('HGETALL', key)
  local m = {}
  for i = 1, #flat, 2 do m[flat[i]] = flat[i + 1] end
  return m
end

local out = {hosts = {}, summaries = {}, allocs = {}, host_allocs = {}, services = {}, service_ports = {}}
for _, h in ipairs(rcall('ZRANGE', K_HOSTS, 0, -1)) do
  out.hosts[h] = hmap(host_key(h))
  local raw = rcall('GET', host_sum_key(h))
  if raw then
    local v = {struct.unpack(sum_fmt(string.len(raw) / 8), raw)}
    v[#v] = nil
    out.summaries[h] = v
  end
  out.host_allocs[h] = rcall('SMEMBERS', host_allocs_key(h))
  out.services[h] = hmap(svc_key(h))
  out.service_ports[h] = hmap(svc_ports_key(h))
end
for _, id in ipairs(rcall('ZRANGE', K_ACTIVE, 0, -1)) do out.allocs[id] = hmap(alloc_key(id)) end
out.gpu_idx, out.gpu_idle, out.gpu_ord = zmap(K_GPU_IDX), zmap(K_GPU_IDLE), zmap(K_GPU_ORD)
out.cpu_idx, out.ram_idx, out.expiry = zmap(K_CPU_IDX), zmap(K_RAM_IDX), zmap(K_EXPIRY)
out.ends, out.byprio, out.idle_hosts = zmap(K_ENDS), zmap(K_BYPRIO), zmap(K_IDLE_HOSTS)
out.cpu_ord, out.gpu_ffc, out.gpu_idle_ord = zmap(K_CPU_ORD), zmap(K_GPU_FFC), zmap(K_GPU_IDLE_ORD)
out.names = hmap(PREFIX .. 'names')
out.model_hosts, out.label_hosts = {}, {}
for field in pairs(out.names) do
  local kind, name = string.sub(field, 1, 2), string.sub(field, 3)
  if kind == 'm:' or kind == 'l:' then
    local members = rcall('SMEMBERS', PREFIX .. (kind == 'm:' and 'mhosts:' or 'lhosts:') .. name)
    table.sort(members)  -- a set's order is not its contents: two snapshots of one ledger compare equal
    if kind == 'm:' then out.model_hosts[name] = members else out.label_hosts[name] = members end
  end
end
out.pending = {}
for _, id in ipairs(rcall('ZRANGE', K_PENDING, 0, -1)) do
  out.pending[id] = rcall('HGET', alloc_key(id), 'state') or 'missing'
end
return cjson.encode(out)
