--[[ place: grant GPUs, CPU and RAM on one host to a new allocation, or refuse with the reason.
KEYS: the ledger's fixed keys (see includes/ledger.lua).
ARGV[1] key prefix, ARGV[2] clock override ms ("" = server TIME),
ARGV[3] request JSON {id, task_id, task_type, owner, priority, strategy ("best"|"worst"|"first"),
        gpus, gpu_mem (MiB per GPU, 0 = whole GPUs), models{name=true} or absent,
        cpu_millis, exclusive (bool), ram, ttl_ms (0 = none), selector{label=[values]} or absent,
        metadata (JSON text), request (JSON text), scan_cap, dry_run (bool)}.
Idempotent by id: a second call with an id that exists returns that record (existing = true).
While the field "recovering" of KEYS[12] is "1" (allocator recover) it refuses with RECOVERING.
Before placing it reaps up to 8 expired allocations. All checks happen before the first write;
a refusal writes nothing.
Returns JSON {ok=true, alloc{...}} | {ok=true, dry_run=true, host, gpus, cores}
              | {ok=false, code, message, details{}}.
]]
--- @include "ledger"

local req = cjson.decode(ARGV[3])
local now = now_ms()

local existing = read_alloc(req.id)
if existing then return cjson.encode({ok = true, existing = true, alloc = existing}) end
if rcall('HGET', K_SEQ, 'recovering') == '1' then
  return cjson.encode({ok = false, code = 'RECOVERING', details = {},
    message = 'the ledger is being rebuilt after a loss of Redis data; no placements until it is consistent'})
end
if not req.dry_run then reap_expired(now, 8) end

local k = req.gpus
local whole = (req.gpu_mem == 0)
local models = req.models
local selector = req.selector

local function labels_match(labels_json)
  local labels = cjson.decode(labels_json or '{}')
  for key, allowed in pairs(selector) do
    local v = labels[key]
    if v == nil then return false end
    local hit = false
    for _, a in ipairs(allowed) do if tostring(v) == a then hit = true; break end end
    if not hit then return false end
  end
  return true
end

local host_cache = {}
local function host_ok(h)
  local c = host_cache[h]
  if c ~= nil then return c end
  local s = host_state(h)
  local ok = s ~= nil and s.state == 'ready' and s.cpu >= req.cpu_millis and s.ramf >= req.ram
  if ok and selector then ok = labels_match(s.labels) end
  if ok then host_cache[h] = s else host_cache[h] = false end
  return host_cache[h]
end

local function gpu_fits(g)
  if not g then return false end
  if whole then
    if g.n ~= 0 or g.free <= 0 then return false end
  elseif g.free < req.gpu_mem then
    return false
  end
  if models then return models[g.model] == true end
  return true
end

local function pick_on_host(h, s, pos, mode)
  if k == 1 and pos ~= nil then
    local g = gpu_state(h, pos)
    if gpu_fits(g) then return {g} end
    return nil
  end
  local cands = {}
  for p = 0, s.ngpu - 1 do
    local g = gpu_state(h, p)
    if gpu_fits(g) then cands[#cands + 1] = g end
  end
  if #cands < k then return nil end
  if mode == 'best' then
    table.sort(cands, function(a, b) if a.free ~= b.free then return a.free < b.free end return a.pos < b.pos end)
  elseif mode == 'worst' then
    table.sort(cands, function(a, b) if a.free ~= b.free then return a.free > b.free end return a.pos < b.pos end)
  end
  local out = {}
  for i = 1, k do out[i] = cands[i] end
  return out
end

local PAGE = 64
-- Walks one index in the order of mode; returns host, state, gpus or nil plus whether the scan
-- stopped at the cap (as opposed to running out of candidates).
local function scan(mode)
  local cap = req.scan_cap
  local seen, offset = 0, 0
  local tried = {}
  while seen < cap do
    local members
    if k > 0 then
      local idx, lo = K_GPU_IDX, req.gpu_mem
      if whole then idx, lo = K_GPU_IDLE, 1 end
      if mode == 'best' then
        members = rcall('ZRANGEBYSCORE', idx, lo, '+inf', 'LIMIT', offset, PAGE)
      elseif mode == 'worst' then
        members = rcall('ZREVRANGEBYSCORE', idx, '+inf', lo, 'LIMIT', offset, PAGE)
      else
        members = rcall('ZRANGE', K_GPU_ORD, offset, offset + PAGE - 1)
      end
    else
      if mode == 'best' then
        members = rcall('ZRANGEBYSCORE', K_CPU_IDX, req.cpu_millis, '+inf', 'LIMIT', offset, PAGE)
      elseif mode == 'worst' then
        members = rcall('ZREVRANGEBYSCORE', K_CPU_IDX, '+inf', req.cpu_millis, 'LIMIT', offset, PAGE)
      else
        members = rcall('ZRANGE', K_HOSTS, offset, offset + PAGE - 1)
      end
    end
    if #members == 0 then return nil, false end
    for _, m in ipairs(members) do
      seen = seen + 1
      local h, pos = m, nil
      if k > 0 then
        local cut = string.find(m, '#[^#]*$')
        h, pos = string.sub(m, 1, cut - 1), tonumber(string.sub(m, cut + 1))
      end
      if not tried[h] then
        local s = host_ok(h)
        if s then
          if k == 0 then return h, s, {} end
          local gs = pick_on_host(h, s, pos, mode)
          if gs then return h, s, gs end
        end
        if k ~= 1 or not s then tried[h] = true end
      end
      if seen >= cap then return nil, true end
    end
    offset = offset + #members
  end
  return nil, true
end

local function fmt_cores(millis)
  return string.format('%g', millis / 1000)
end

local function largest(idx)
  local top = rcall('ZREVRANGE', idx, 0, 0, 'WITHSCORES')
  if #top == 0 then return 0 end
  return tonumber(top[2])
end

local function refuse(capped)
  local code, msg
  local details = {}
  if k > 0 and whole and largest(K_GPU_IDLE) == 0 then
    code = 'INSUFFICIENT_GPUS'
    msg = 'insufficient GPUs: requested ' .. k .. ' whole GPU(s), no idle GPU on a schedulable host'
  elseif k > 0 and not whole and largest(K_GPU_IDX) < req.gpu_mem then
    local top = largest(K_GPU_IDX)
    details.largest_free_gpu_memory_mb = top
    code = 'INSUFFICIENT_GPU_MEMORY'
    msg = 'insufficient GPU memory: requested ' .. req.gpu_mem .. ' MiB per GPU, largest free ' .. top .. ' MiB'
  elseif largest(K_CPU_IDX) < req.cpu_millis then
    local top = largest(K_CPU_IDX)
    details.largest_free_cpu_cores = top / 1000
    code = 'INSUFFICIENT_CPU'
    msg = 'insufficient CPU: requested ' .. fmt_cores(req.cpu_millis) .. ' cores, largest free ' .. fmt_cores(top) .. ' cores'
  elseif largest(K_RAM_IDX) < req.ram then
    local top = largest(K_RAM_IDX)
    details.largest_free_ram_mb = top
    code = 'INSUFFICIENT_RAM'
    msg = 'insufficient RAM: requested ' .. req.ram .. ' MiB, largest free ' .. top .. ' MiB'
  else
    code = 'NO_FIT'
    local what = {}
    if k > 0 then
      local per = whole and 'whole' or (req.gpu_mem .. ' MiB free')
      what[#what + 1] = k .. ' GPU(s) (' .. per .. ')'
    end
    what[#what + 1] = fmt_cores(req.cpu_millis) .. ' cores'
    what[#what + 1] = req.ram .. ' MiB RAM'
    msg = 'no host has ' .. table.concat(what, ', ') .. ' free at once'
    if models then msg = msg .. ' on the requested GPU models' end
    if selector then msg = msg .. ' among hosts matching the selector' end
  end
  if capped then
    details.scan_cap_reached = true
    msg = msg .. ' (stopped after ' .. req.scan_cap .. ' candidates)'
  end
  return cjson.encode({ok = false, code = code, message = msg, details = details})
end

local mode = req.strategy
local h, s, gs = scan(mode)
local capped = false
if not h then
  capped = s
  if mode == 'first' and capped then
    h, s, gs = scan('best')
    if not h then capped = s end
  end
end
if not h then return refuse(capped) end

-- Choose core ids (exclusive) before any write.
local hk = host_key(h)
local core_ids, newmap = {}, nil
local shared = 0
if req.exclusive then
  local need = req.cpu_millis / 1000
  if need > 0 then
    local f = rcall('HMGET', hk, 'cores', 'cmap')
    local cores = decode_list(f[1])
    local map = f[2]
    local chars = {}
    for i = 1, #map do
      local ch = string.sub(map, i, i)
      if ch == '1' and #core_ids < need then
        core_ids[#core_ids + 1] = cores[i]
        ch = '0'
      end
      chars[i] = ch
    end
    if #core_ids < need then
      return cjson.encode({ok = false, code = 'LEDGER_CORRUPT', message = 'free core count disagrees with core map on host ' .. h, details = {}})
    end
    newmap = table.concat(chars)
  end
else
  shared = req.cpu_millis
end

local grants, touched = {}, {}
for i, g in ipairs(gs) do
  local mem = req.gpu_mem
  if whole then mem = g.free end
  grants[i] = {pos = g.pos, index = g.idx, uuid = g.uuid, model = g.model, memory_mb = mem}
  touched[i] = g.pos
end

if req.dry_run then
  return cjson.encode({ok = true, dry_run = true, host = h, gpus = grants, cores = core_ids})
end

for _, g in ipairs(grants) do
  rcall('HINCRBY', hk, 'g' .. g.pos .. ':used', g.memory_mb)
  rcall('HINCRBY', hk, 'g' .. g.pos .. ':n', 1)
end
if newmap then
  rcall('HSET', hk, 'cmap', newmap)
  rcall('HINCRBY', hk, 'cfree', -#core_ids)
end
if shared > 0 then rcall('HINCRBY', hk, 'shared', shared) end
if req.ram > 0 then rcall('HINCRBY', hk, 'ram_used', req.ram) end
rcall('SADD', host_allocs_key(h), req.id)
reindex_host(h, touched)

local expires = 0
if req.ttl_ms > 0 then expires = now + req.ttl_ms end
local rec = {id = req.id, task_id = req.task_id, task_type = req.task_type, owner = req.owner,
  priority = tostring(req.priority), strategy = req.strategy_name, state = 'active', host = h,
  host_gen = tostring(s.gen),
  gpus = cjson.encode(grants), cores = cjson.encode(core_ids), shared_millis = tostring(shared),
  ram_mb = tostring(req.ram), created = tostring(now), activated = tostring(now),
  ttl_ms = tostring(req.ttl_ms), expires = tostring(expires), metadata = req.metadata,
  request = req.request}
rcall('HSET', alloc_key(req.id), unpack(alloc_to_list(rec)))
rcall('ZADD', K_ALLOCS, now, req.id)
rcall('ZADD', K_ACTIVE, now, req.id)
if expires > 0 then rcall('ZADD', K_EXPIRY, expires, req.id) end
emit('allocated', req.id, now, cjson.encode({host = h, host_gen = s.gen, task_id = req.task_id,
  task_type = req.task_type, owner = req.owner, priority = req.priority, strategy = req.strategy_name,
  gpus = grants, cores = core_ids, shared_millis = shared, ram_mb = req.ram, ttl_ms = req.ttl_ms,
  expires = expires, created = now, metadata = req.metadata, request = req.request}))
return cjson.encode({ok = true, alloc = rec})
