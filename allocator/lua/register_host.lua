--[[ register_host: add a host, or update its capacity without breaking what it already grants.
KEYS: the ledger's fixed keys (see includes/ledger.lua).
ARGV[1] key prefix, ARGV[2] clock override ms ("" = server TIME),
ARGV[3] host JSON {id, labels{}, cores[], ram_mb, reserve_gpus, gpus[{index, uuid, model, memory_mb, used_mb}],
        worker_slots (absent/null = one per core), service_ports [first, last] (absent = 9000-9099)},
ARGV[4] scheduling pass depth afterwards (0 = none), ARGV[5] scan cap, ARGV[6] "1" = only a new
host: one registered already is left as it is (allocator recover restoring the history's
inventory must not overwrite an agent's newer registration; checked here, not before the call),
ARGV[7] "1" = the host's agent registers it: the registration is also its first heartbeat (ZADD
into the heartbeats ZSET, KEYS[#KEYS]), so a host whose agent dies before its first
heartbeat is still declared lost once the grace passes (no entry: nothing ever watched it). A
host that was lost gets that entry whoever registers it.
Usage (GPU memory, cores, RAM, worker slots, service references held) is recomputed from the host's active allocations, so an update
can change totals, reorder or drop GPUs and cores: grants stay valid and free never goes below 0.
A grant whose GPU moved to another position is rewritten with the new position; a whole GPU's
grant grows to all the memory other processes leave it (used_mb down or memory_mb up). Where the new
totals are below what the host's grants hold (fewer cores or less RAM or GPU memory, a GPU a grant
holds no longer listed, or more GPU memory used by other processes, used_mb), the field
"overcommitted" is "1" until a registration
finds them within it again: a legal state, which the invariants checker then accepts.
A draining host stays draining, and so does a lost one an operator had drained (drained_by =
"operator"), and a new host that allocator recover listed in drain_on_register (an operator's
drain the history has for a host no agent had registered yet); any other state becomes "ready". A host that was "lost" gets
the next generation (field gen), which fences grants made before it was lost. A new host takes the
highest generation of the grants restored on it before it registered (allocator recover).
The host's GPU models and labels are counted in PREFIX..'names' (its old ones taken out first;
count_names in includes/ledger.lua), for the quick refusal of a model or label no host has.
Returns JSON {created, ord, state, gen, was_lost} (was_lost: the host was "lost" until this call).
]]
--- @include "ledger"
--- @include "placement"
--- @include "queue"

local now = now_ms()
local spec = cjson.decode(ARGV[3])
local h = spec.id
local hk = host_key(h)
local created = rcall('EXISTS', hk) == 0
if not created and ARGV[6] == '1' then
  return cjson.encode({created = false, skipped = true, state = rcall('HGET', hk, 'state')})
end
local ord
local state = 'ready'
local old_ngpu = 0
local gen = 1
local lost_before = false
local drain_kept = false
local agent_drain_ended = false
if created then
  ord = tonumber(rcall('HINCRBY', K_SEQ, 'host_ord', 1))
  rcall('ZADD', K_HOSTS, ord, h)
  -- An operator's drain allocator recover found in the history for a host not registered yet.
  if rcall('HDEL', K_DRAIN_ON_REGISTER, h) == 1 then state = 'draining'; drain_kept = true end
else
  local f = rcall('HMGET', hk, 'ord', 'state', 'ngpu', 'gen', 'drained_by')
  ord = tonumber(f[1])
  -- A draining host stays draining, and so does a lost one an operator had drained.
  if f[2] == 'draining' or (f[2] == 'lost' and f[5] == 'operator') then state = 'draining' end
  old_ngpu = tonumber(f[3])
  gen = tonumber(f[4] or 1)
  -- A host declared lost comes back under a new generation: grants made under the old one are
  -- stale (workers compare the generation before starting a job).
  if f[2] == 'lost' then gen = gen + 1; lost_before = true end
  -- An agent's drain ends with the loss of its host (the agent that registers it now is a new start).
  agent_drain_ended = lost_before and state == 'ready' and f[5] == 'agent'
end

-- The new position of each GPU, by uuid.
local pos_of, index_of = {}, {}
for pos0, g in ipairs(spec.gpus or {}) do pos_of[g.uuid], index_of[g.uuid] = pos0 - 1, g.index end

-- Usage held by active allocations, keyed by GPU uuid and core id. A grant names its GPU by
-- position (g<pos>:*) and uuid: where the update moved that GPU, the grant's position follows it,
-- so that its release gives the memory back where the GPU now is.
local gpu_used, gpu_n, core_held = {}, {}, {}
local whole = {}  -- GPU uuid -> {id, grants, i}: the whole grant held on it
local shared, ram_used, slots_used, svc_refs = 0, 0, 0, {}
for _, id in ipairs(rcall('SMEMBERS', host_allocs_key(h))) do
  local f = rcall('HMGET', alloc_key(id), 'gpus', 'cores', 'shared_millis', 'ram_mb', 'state', 'slots', 'services', 'host_gen')
  if f[5] == 'active' then
    -- A new host that already holds grants got them from allocator recover (deferred): one made
    -- under a later generation raises the host to it, or the grant would be fenced as stale.
    if created and tonumber(f[8] or 1) > gen then gen = tonumber(f[8]) end
    slots_used = slots_used + tonumber(f[6] or 0)
    for _, name in ipairs(decode_list(f[7])) do svc_refs[name] = (svc_refs[name] or 0) + 1 end
    local grants, moved = decode_list(f[1]), false
    for i, g in ipairs(grants) do
      gpu_used[g.uuid] = (gpu_used[g.uuid] or 0) + tonumber(g.memory_mb)
      gpu_n[g.uuid] = (gpu_n[g.uuid] or 0) + 1
      if g.whole then whole[g.uuid] = {id = id, grants = grants, i = i} end
      local pos = pos_of[g.uuid]
      if pos ~= nil and pos ~= tonumber(g.pos) then g.pos = pos; moved = true end
      -- The device index follows the GPU too (what the grant shows; workers pin real GPUs by uuid).
      if pos ~= nil and tonumber(index_of[g.uuid]) ~= tonumber(g.index) then g.index = index_of[g.uuid]; moved = true end
    end
    if moved then rcall('HSET', alloc_key(id), 'gpus', cjson.encode(grants)) end
    for _, c in ipairs(decode_list(f[2])) do core_held[tostring(c)] = true end
    shared = shared + tonumber(f[3] or 0)
    ram_used = ram_used + tonumber(f[4] or 0)
  end
end

-- A GPU held whole keeps all the memory other processes leave it: where they now use less, or
-- the GPU reports more, its grant grows (never shrinks: less is an overcommitment, as for shares).
for _, g in ipairs(spec.gpus or {}) do
  local w = whole[g.uuid]
  if w then
    local wg = w.grants[w.i]
    local room = tonumber(g.memory_mb) - tonumber(g.used_mb or 0) - (gpu_used[g.uuid] - tonumber(wg.memory_mb))
    if room > tonumber(wg.memory_mb) then
      gpu_used[g.uuid] = gpu_used[g.uuid] + room - tonumber(wg.memory_mb)
      wg.memory_mb = room
      rcall('HSET', alloc_key(w.id), 'gpus', cjson.encode(w.grants))
    end
  end
end

local cores = spec.cores or {}
local cmap, cfree, cseq = {}, 0, '1'
local kept = 0  -- held cores the host still has
for i, c in ipairs(cores) do
  if core_held[tostring(c)] then cmap[i] = '0'; kept = kept + 1 else cmap[i] = '1'; cfree = cfree + 1 end
  if c ~= i - 1 then cseq = '0' end
end
local held_cores = 0
for _ in pairs(core_held) do held_cores = held_cores + 1 end
local over = held_cores > kept or shared > cfree * 1000 or ram_used > tonumber(spec.ram_mb)
  or slots_used > (tonumber(spec.worker_slots) or #cores)
for _, g in ipairs(spec.gpus or {}) do
  if (gpu_used[g.uuid] or 0) + tonumber(g.used_mb or 0) > tonumber(g.memory_mb) then over = true end
end
-- A grant on a GPU the host no longer lists (it fell off the bus, MIG was reconfigured) holds
-- memory the host's totals do not have: an overcommitment as much as fewer cores are.
for uuid in pairs(gpu_used) do
  if pos_of[uuid] == nil then over = true end
end

local fields = {'state', state, 'ord', ord, 'labels', cjson.encode(spec.labels or {}),
  'cores', cjson.encode(cores), 'cseq', cseq, 'cmap', table.concat(cmap), 'ncores', #cores, 'cfree', cfree, 'shared', shared,
  'ram', spec.ram_mb, 'ram_used', ram_used, 'ngpu', #(spec.gpus or {}), 'updated', now, 'gen', gen,
  'reserve_gpus', spec.reserve_gpus or 0, 'cver', tostring(now) .. '-' .. rcall('HINCRBY', K_SEQ, 'cver', 1),
  'slots', tonumber(spec.worker_slots) or #cores, 'slots_used', slots_used}
local ports = spec.service_ports
if type(ports) == 'table' and tonumber(ports[1]) and tonumber(ports[2]) then
  fields[#fields + 1] = 'port_lo'; fields[#fields + 1] = tonumber(ports[1])
  fields[#fields + 1] = 'port_hi'; fields[#fields + 1] = tonumber(ports[2])
end
if created then
  fields[#fields + 1] = 'registered'; fields[#fields + 1] = now
end
for pos0, g in ipairs(spec.gpus or {}) do
  local p = 'g' .. (pos0 - 1) .. ':'
  local vals = {'idx', g.index, 'uuid', g.uuid, 'model', g.model, 'total', g.memory_mb,
                'ext', g.used_mb or 0, 'used', gpu_used[g.uuid] or 0, 'n', gpu_n[g.uuid] or 0}
  for i = 1, #vals, 2 do
    fields[#fields + 1] = p .. vals[i]; fields[#fields + 1] = vals[i + 1]
  end
end
-- The host's old models and labels leave the count before its fields change (counted again below).
if not created then count_names(h, -1, true) end
-- Drop the fields and index members of GPUs beyond the new count.
for pos = #(spec.gpus or {}), old_ngpu - 1 do
  local p = 'g' .. pos .. ':'
  rcall('HDEL', hk, p .. 'idx', p .. 'uuid', p .. 'model', p .. 'total', p .. 'ext', p .. 'used', p .. 'n')
  local m = gpu_member(h, pos)
  rcall('ZREM', K_GPU_IDX, m); rcall('ZREM', K_GPU_ORD, m); rcall('ZREM', K_GPU_FFC, m)
  rcall('ZREM', K_GPU_IDLE, m); rcall('ZREM', K_GPU_IDLE_ORD, m)
end
-- In calls of at most 1,000 values: a host of many GPUs has 14 per GPU, and Lua's unpack fails at
-- about 8,000 (after the writes above: a script's writes are not rolled back).
for i = 1, #fields, 1000 do rcall('HSET', hk, unpack(fields, i, math.min(i + 999, #fields))) end
count_names(h, 1, true)
if over then rcall('HSET', hk, 'overcommitted', '1') else rcall('HDEL', hk, 'overcommitted') end
-- Service references follow the active allocations too.
local svc = rcall('HGETALL', svc_key(h))
for i = 1, #svc, 2 do
  local e = cjson.decode(svc[i + 1])
  local refs = svc_refs[svc[i]] or 0
  if tonumber(e.refs) ~= refs then
    if refs == 0 then e.idle_since = now else e.idle_since = 0 end
    e.refs = refs
    rcall('HSET', svc_key(h), svc[i], cjson.encode(e))
  end
end
if drain_kept then rcall('HSET', hk, 'drained_by', 'operator') end
if agent_drain_ended then rcall('HDEL', hk, 'drained_by') end
reindex_host(h, nil)
if created then
  emit('host_registered', h, now, ARGV[3])
  if drain_kept then emit('host_draining', h, now, '{"by":"operator"}') end
else
  emit('host_updated', h, now, ARGV[3])
  -- A lost host an operator had drained comes back draining: the history must say so too (it
  -- reads a registration as the end of a loss), or allocator recover would resume it.
  if state == 'draining' and lost_before then emit('host_draining', h, now, '{"by":"operator"}') end
  -- Likewise the end of an agent's drain (the history keeps a drain through a loss, as the
  -- ledger keeps an operator's).
  if agent_drain_ended then emit('host_resumed', h, now, '{}') end
end
-- A host that was lost comes back watched too, whoever registers it: only a host the reaper
-- watched is declared lost, and one an operator's update brought back with no agent beating for
-- it must be declared lost again, not take work no one watches.
if ARGV[7] == '1' or lost_before then rcall('ZADD', KEYS[#KEYS], now, h) end
schedule_pass(now, tonumber(ARGV[4] or 0), tonumber(ARGV[5] or 2048))
return cjson.encode({created = created, ord = ord, state = state, gen = gen, was_lost = lost_before})
