--[[ Shared helpers for the ledger scripts (inlined by the loader, see allocator/scripts.py).

Every script receives the same fixed KEYS (built by allocator/keys.py):
  KEYS[1]  hosts     ZSET host id -> registration ordinal (all hosts)
  KEYS[2]  gpu_idx   ZSET "<host>#<pos>" -> free MiB   (schedulable GPUs with free > 0)
  KEYS[3]  gpu_idle  ZSET "<host>#<pos>" -> free MiB   (schedulable GPUs with no holder)
  KEYS[4]  gpu_ord   ZSET "<host>#<pos>" -> ord*1024+pos (schedulable GPUs with free > 0)
  KEYS[5]  cpu_idx   ZSET host -> free CPU millicores  (schedulable hosts)
  KEYS[6]  ram_idx   ZSET host -> free RAM MiB         (schedulable hosts)
  KEYS[7]  allocs    ZSET allocation id -> created ms  (every record still kept)
  KEYS[8]  active    ZSET allocation id -> created ms  (active allocations)
  KEYS[9]  expiry    ZSET allocation id -> deadline ms (active allocations with a TTL)
  KEYS[10] done      ZSET allocation id -> ended ms    (finished records awaiting purge)
  KEYS[11] events    STREAM outbox, one entry per ledger change
  KEYS[12] seq       HASH counters (host ordinals, task sequence) and flags (recovering)
  KEYS[13] ends      ZSET allocation id -> expected end ms (history p80, else hint, else TTL)
  KEYS[14] byprio    ZSET allocation id -> priority*1e13 + (1e13-1-start ms): preemption order
  KEYS[15] pending   ZSET task id -> queue order (priority band, then front flag, then sequence)
  KEYS[16] idle_hosts ZSET host -> number of its GPUs with no holder (schedulable hosts with one or more)
and ARGV[1] = key prefix (e.g. "{alloc}:"), ARGV[2] = clock override in ms ("" = server TIME).
Three more indexes are built from the prefix:
  K_CPU_ORD (PREFIX .. 'cpu_ord'): ZSET host -> its registration ordinal, schedulable hosts only,
    the order first fit walks for CPU-only requests (as gpu_ord is for whole GPUs), so hosts whose
    CPU or RAM is exhausted are not walked one by one;
  K_GPU_FFC (PREFIX .. 'gpu_ffc'): ZSET "<host>#<pos>" -> class*2^40 + ord*1024+pos, the members
    of gpu_ord scored by free-memory class first (see ff_class): first fit for GPU memory walks it
    from the request's class up, so GPUs with too little free memory are not walked one by one;
  K_GPU_IDLE_ORD (PREFIX .. 'gpu_idle_ord'): ZSET "<host>#<pos>" -> ord*1024+pos, the members of
    gpu_idle (GPUs with no holder) in registration order: first fit for whole GPUs walks it, so
    GPUs that hold shares are not walked one by one.
and one hash: K_DRAIN_ON_REGISTER (PREFIX .. 'drain_on_register'): host -> "operator", drains
allocator recover found in the history for hosts not registered yet (register_host applies one).
Per-host and per-allocation keys are built from the prefix, which carries the hash tag, so every
key a script touches lives in the same cluster slot.

A host is schedulable when its state is "ready" and it is not parked. A host is parked while its
free CPU or free RAM is zero: its GPUs then leave the GPU indexes so they cannot crowd out
candidates on other hosts during a bounded scan. Worker slots (host fields slots, slots_used) are
checked only for requests that ask for slots and never park a host.

Shared named services of host h (see docs/services.md): svc:<h> HASH name -> JSON {port, refs,
state (starting|running|stopping), since, idle_since, pid, endpoint, error}; svc_ports:<h> HASH
port -> name (the pool is the host fields port_lo..port_hi); svc_catalog:<h> HASH name -> JSON
(what the host's agent can run); svc_names ZSET name -> number of hosts offering it; svc_wake:<h>
LIST with at most one token, pushed when the host's service supervisor has something to do.
]]
local rcall = redis.call
local K_HOSTS, K_GPU_IDX, K_GPU_IDLE, K_GPU_ORD = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local K_CPU_IDX, K_RAM_IDX, K_ALLOCS, K_ACTIVE = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local K_EXPIRY, K_DONE, K_EVENTS, K_SEQ = KEYS[9], KEYS[10], KEYS[11], KEYS[12]
local K_ENDS, K_BYPRIO, K_PENDING, K_IDLE_HOSTS = KEYS[13], KEYS[14], KEYS[15], KEYS[16]
local PREFIX = ARGV[1]

local function now_ms()
  local o = ARGV[2]
  if o ~= nil and o ~= '' then return tonumber(o) end
  local t = rcall('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function host_key(h) return PREFIX .. 'host:' .. h end
local function host_allocs_key(h) return PREFIX .. 'host_allocs:' .. h end
local function host_sum_key(h) return PREFIX .. 'hsum:' .. h end
local function alloc_key(id) return PREFIX .. 'alloc:' .. id end
local function gpu_member(h, pos) return h .. '#' .. pos end
local function svc_key(h) return PREFIX .. 'svc:' .. h end
local function svc_ports_key(h) return PREFIX .. 'svc_ports:' .. h end
local function svc_catalog_key(h) return PREFIX .. 'svc_catalog:' .. h end
local function svc_wake_key(h) return PREFIX .. 'svc_wake:' .. h end
local SVC_WAKE_TTL_MS = 300000  -- keys.SVC_WAKE_TTL_MS
local K_SVC_NAMES = PREFIX .. 'svc_names'
local K_CPU_ORD = PREFIX .. 'cpu_ord'
local K_GPU_FFC = PREFIX .. 'gpu_ffc'
local K_GPU_IDLE_ORD = PREFIX .. 'gpu_idle_ord'
local K_DRAIN_ON_REGISTER = PREFIX .. 'drain_on_register'  -- keys.drain_on_register

-- Counts host h's GPU models and labels into PREFIX..'names' (keys.names): 'm:<model>' once per
-- GPU, 'l:<label>=<value>' once per label, and 'hosts' once (by = 1); or takes out what was
-- counted for it (by = -1). The host's field 'named' lists what was counted, so what is taken
-- out is exactly that, whatever its fields say by then (a release without the count may have
-- changed them), and a registration heals the host's part of the count. A request for a model or
-- label no registered host has is then refused without a walk (absent_name in placement.lua),
-- while 'hosts' equals the number of registered hosts (a host registered before the count
-- existed is not counted until it registers again; recount_names.lua rebuilds the count).
-- It also keeps, per GPU model, the SET PREFIX..'mhosts:'..model of the hosts with that model
-- (keys.model_hosts), and in the count 'mhosts' the hosts in those sets (each marked by its field
-- 'mhosts' = '1'); and per label, the SET PREFIX..'lhosts:'..label..'='..value of the hosts with
-- that label (keys.label_hosts), with the count 'lhosts' and the mark 'lhosts' likewise. A request
-- for a model only a few hosts have is refused without a walk when none of them can take it now
-- (absent_name in placement.lua), and a walk passes over the hosts a request's models or
-- selector rule out by these sets (allowed_hosts in placement.lua). The count's 'stamp' is the
-- registration counter (PREFIX..'seq' field 'cver') as of the sets' last change: a registration
-- (moved: it moved the counter, by one, before counting) finds it at the counter or one less, a
-- removal at the counter. Anything else means a registration by a release that does not keep the
-- label sets (a rollback): the stamp becomes 'stale', and the sets are not trusted until
-- recount_names.lua rebuilds them.
local function count_names(h, by, moved)
  local k, hk = PREFIX .. 'names', host_key(h)
  local mark = rcall('HMGET', hk, 'named', 'mhosts', 'lhosts')
  local counted = mark[1]
  if (counted ~= false) == (by > 0) then return end
  local names = {}
  if by > 0 then
    local f = rcall('HMGET', hk, 'labels', 'ngpu')
    local ok, labels = pcall(cjson.decode, f[1] or '{}')
    if ok and type(labels) == 'table' then
      for key, v in pairs(labels) do names[#names + 1] = 'l:' .. key .. '=' .. tostring(v) end
    end
    local fields = {}
    for pos = 0, (tonumber(f[2] or 0) or 0) - 1 do fields[#fields + 1] = 'g' .. pos .. ':model' end
    if #fields > 0 then
      for _, m in ipairs(rcall('HMGET', hk, unpack(fields))) do
        if m then names[#names + 1] = 'm:' .. m end
      end
    end
  else
    local ok, list = pcall(cjson.decode, counted)
    if ok and type(list) == 'table' then names = list end
  end
  local n = {}
  for _, name in ipairs(names) do n[name] = (n[name] or 0) + 1 end
  -- A host counted before the model (label) sets existed is in none of them: nothing to take out.
  local msets, lsets = by > 0 or mark[2] == '1', by > 0 or mark[3] == '1'
  for name, c in pairs(n) do
    if tonumber(rcall('HINCRBY', k, name, by * c)) <= 0 then rcall('HDEL', k, name) end
    local kind = string.sub(name, 1, 2)
    if (msets and kind == 'm:') or (lsets and kind == 'l:') then
      rcall(by > 0 and 'SADD' or 'SREM', PREFIX .. (kind == 'm:' and 'mhosts:' or 'lhosts:') .. string.sub(name, 3), h)
    end
  end
  rcall('HINCRBY', k, 'hosts', by)
  if msets then rcall('HINCRBY', k, 'mhosts', by) end
  if lsets then rcall('HINCRBY', k, 'lhosts', by) end
  local stamp, cver = rcall('HGET', k, 'stamp'), tonumber(rcall('HGET', K_SEQ, 'cver') or 0)
  if stamp ~= 'stale' then
    local v = tonumber(stamp)
    if stamp and not (v == cver or (moved and v == cver - 1)) then stamp = 'stale' else stamp = cver end
    rcall('HSET', k, 'stamp', stamp)
  end
  if by > 0 then
    rcall('HSET', hk, 'named', #names > 0 and cjson.encode(names) or '[]', 'mhosts', '1', 'lhosts', '1')
  else
    rcall('HDEL', hk, 'named', 'mhosts', 'lhosts')
  end
end

-- Appends one outbox event; extra is an optional flat list of more fields (raw JSON texts).
local function emit(kind, subject, now, data, extra)
  if extra and #extra > 0 then
    rcall('XADD', K_EVENTS, '*', 'type', kind, 'id', subject, 'ts', tostring(now), 'data', data, unpack(extra))
  else
    rcall('XADD', K_EVENTS, '*', 'type', kind, 'id', subject, 'ts', tostring(now), 'data', data)
  end
end

-- Free CPU in millicores: exclusive cores still free, minus what the shared pool has lent out.
local function cpu_free(cfree, shared)
  local v = tonumber(cfree) * 1000 - tonumber(shared)
  if v < 0 then return 0 end
  return v
end

local function ram_free(ram, used)
  local v = tonumber(ram) - tonumber(used)
  if v < 0 then return 0 end
  return v
end

-- A host's fields that scheduling reads. A scan reads only the first SCAN_FIELDS of them for each
-- candidate (labels and worker slots are read when a request asks for them): every value a
-- script reads costs it a conversion, and a scan reads a dozen hosts.
local HOST_FIELDS = {'state', 'cfree', 'shared', 'ram', 'ram_used', 'ngpu', 'parked', 'gen', 'reserve_gpus',
                     'gfree', 'gidle', 'ncores', 'ord', 'labels', 'slots', 'slots_used', 'cmap'}
local SCAN_FIELDS = 12

-- A host's state from the values of HOST_FIELDS (or, partial, its first SCAN_FIELDS), in order; nil
-- when the host does not exist. labels and slotf are nil after a partial read (see host_labels,
-- host_slots). (Not named scan: the script loader tells which definitions a script uses by name.)
local function host_from(h, f, partial)
  if not f[1] then return nil end
  local ncores = f[12]
  if not ncores then
    -- Registered before the field existed: the length of its core map.
    if partial then ncores = rcall('HSTRLEN', host_key(h), 'cmap') else ncores = string.len(f[17] or '') end
  end
  local s = {state = f[1], cfree = tonumber(f[2]), shared = tonumber(f[3]), ram = tonumber(f[4]),
          ram_used = tonumber(f[5]), ngpu = tonumber(f[6]), parked = f[7] == '1',
          cpu = cpu_free(f[2], f[3]), ramf = ram_free(f[4], f[5]), gen = tonumber(f[8] or 1),
          reserve = tonumber(f[9] or 0), gfree = f[10] and tonumber(f[10]) or nil,
          gidle = f[11] and tonumber(f[11]) or nil, ncores = tonumber(ncores)}
  if not partial then
    s.ord, s.labels, s.slotf = tonumber(f[13]), f[14], ram_free(f[15] or 0, f[16] or 0)
  end
  return s
end

-- Reads the scheduling-relevant fields of a host; nil when the host does not exist.
local function host_state(h)
  return host_from(h, rcall('HMGET', host_key(h), unpack(HOST_FIELDS)))
end

-- The labels (JSON text) and free worker slots of host h (state s), read on first use.
local function host_labels(h, s)
  if s.labels == nil then s.labels = rcall('HGET', host_key(h), 'labels') or '{}' end
  return s.labels
end

local function host_slots(h, s)
  if s.slotf == nil then
    local f = rcall('HMGET', host_key(h), 'slots', 'slots_used')
    s.slotf = ram_free(f[1] or 0, f[2] or 0)
  end
  return s.slotf
end

local GPU_FIELDS = {'idx', 'uuid', 'model', 'total', 'ext', 'used', 'n'}

-- One GPU from the 7 fields of GPU_FIELDS starting at f[at] or, when lean, from its last 5 (model
-- to n: idx and uuid are read only for the GPUs a placement grants, see read_chosen in
-- placement.lua); nil when the GPU does not exist.
local function gpu_from(pos, f, at, lean)
  local m = at  -- where the model is: first when lean, after idx and uuid otherwise
  if not lean then m = at + 2 end
  local total = f[m + 1]
  if not total then return nil end
  total = tonumber(total)
  local ext, used = tonumber(f[m + 2]), tonumber(f[m + 3])
  local free = total - ext - used
  if free < 0 then free = 0 end
  local g = {pos = pos, model = f[m], total = total, ext = ext, used = used, n = tonumber(f[m + 4]), free = free}
  if not lean then g.idx, g.uuid = tonumber(f[at]), f[at + 1] end
  return g
end

-- Field names, built once per script run and reused: in Lua, building the names costs more than
-- the HMGET that reads them.
local names_of_gpu, names_of_gpus, names_host_gpu = {}, {}, {}

-- The GPU_FIELDS names of the GPU at position pos ("g<pos>:idx", ...).
local function gpu_names(pos)
  local n = names_of_gpu[pos]
  if n == nil then
    local p = 'g' .. pos .. ':'
    n = {}
    for i, k in ipairs(GPU_FIELDS) do n[i] = p .. k end
    names_of_gpu[pos] = n
  end
  return n
end

local function gpu_state(h, pos)
  return gpu_from(pos, rcall('HMGET', host_key(h), unpack(gpu_names(pos))), 1)
end

-- The scan summary of a host (key hsum:<h>, a string of little-endian doubles packed with
-- struct): SUM_HEAD numbers (ready 1/0, cfree, shared, ram, ram_used, ngpu, parked 1/0, gen,
-- reserve_gpus, gfree, gidle, ncores), then total, ext, used, n of each GPU by position (total -1:
-- no such GPU). A copy of the host hash's fields, written by reindex_host and grant, the two
-- places every change of those fields goes through: a scan reads a candidate with one GET and one
-- unpack instead of an HMGET of 17 fields and as many conversions (a third of the cost).
local SUM_HEAD, SUM_GPU = 12, 4
local SUM_HEAD_FMT = '<' .. string.rep('d', SUM_HEAD)
local SUM_GPU_FMT = '<' .. string.rep('d', SUM_GPU)
local SUM_HEAD_BYTES = SUM_HEAD * 8
local sum_fmts = {}

local function sum_fmt(n)
  local f = sum_fmts[n]
  if f == nil then f = '<' .. string.rep('d', n); sum_fmts[n] = f end
  return f
end

local function summary_head(s)
  return s.state == 'ready' and 1 or 0, s.cfree, s.shared, s.ram, s.ram_used, s.ngpu, s.parked and 1 or 0,
    s.gen, s.reserve, s.gfree, s.gidle, s.ncores
end

-- Packs host state s (the fields of host_from plus gfree and gidle) and its GPU vector gv (flat
-- list: total, ext, used, n per position) into hsum:<h>.
local function write_summary(h, s, gv)
  rcall('SET', host_sum_key(h), struct.pack(SUM_HEAD_FMT, summary_head(s)) .. struct.pack(sum_fmt(#gv), unpack(gv)))
end

-- Rewrites the header of h's summary from s and the GPUs listed in gs ({pos, total, ext, used, n}
-- each) in place, leaving the other GPUs as stored. False (nothing written) when h has no summary
-- of s.ngpu GPUs. stored: the summary as read earlier in the same script, if it was.
local function patch_summary(h, s, gs, stored)
  local k = host_sum_key(h)
  local size = SUM_HEAD_BYTES + s.ngpu * SUM_GPU * 8
  if stored then
    if string.len(stored) ~= size then return false end
    -- The whole summary in one write (a call costs more than splicing 100-odd bytes here).
    local parts, at = {struct.pack(SUM_HEAD_FMT, summary_head(s))}, SUM_HEAD_BYTES + 1
    table.sort(gs, function(a, b) return a.pos < b.pos end)
    for _, g in ipairs(gs) do
      local off = SUM_HEAD_BYTES + g.pos * SUM_GPU * 8 + 1
      parts[#parts + 1] = string.sub(stored, at, off - 1)
      parts[#parts + 1] = struct.pack(SUM_GPU_FMT, g.total, g.ext, g.used, g.n)
      at = off + SUM_GPU * 8
    end
    parts[#parts + 1] = string.sub(stored, at)
    rcall('SET', k, table.concat(parts))
    return true
  elseif rcall('STRLEN', k) ~= size then
    return false
  end
  rcall('SETRANGE', k, 0, struct.pack(SUM_HEAD_FMT, summary_head(s)))
  for _, g in ipairs(gs) do
    rcall('SETRANGE', k, SUM_HEAD_BYTES + g.pos * SUM_GPU * 8, struct.pack(SUM_GPU_FMT, g.total, g.ext, g.used, g.n))
  end
  return true
end

-- The GPU vector (see write_summary) of a list of GPU states indexed by position + 1.
local function gpu_vector(gpus, ngpu)
  local gv = {}
  for p = 1, ngpu do
    local g = gpus[p]
    if g then
      gv[#gv + 1] = g.total; gv[#gv + 1] = g.ext; gv[#gv + 1] = g.used; gv[#gv + 1] = g.n
    else
      gv[#gv + 1] = -1; gv[#gv + 1] = 0; gv[#gv + 1] = 0; gv[#gv + 1] = 0
    end
  end
  return gv
end

-- GPU pos of a summary (its model, idx and uuid are read when needed: see gpu_models, and
-- read_chosen in placement.lua).
local function summary_gpu(raw, pos, ngpu)
  if pos >= ngpu then return nil end
  local total, ext, used, n = struct.unpack(SUM_GPU_FMT, raw, SUM_HEAD_BYTES + pos * SUM_GPU * 8 + 1)
  if total < 0 then return nil end
  local free = total - ext - used
  if free < 0 then free = 0 end
  return {pos = pos, total = total, ext = ext, used = used, n = n, free = free}
end

-- Host state from summary raw (as host_from with scan = true); s.sum keeps raw for host_gpus.
local function host_from_summary(h, raw)
  local ready, cfree, shared, ram, ram_used, ngpu, parked, gen, reserve, gfree, gidle, ncores =
    struct.unpack(SUM_HEAD_FMT, raw)
  local state = 'ready'
  if ready ~= 1 then state = rcall('HGET', host_key(h), 'state') end
  return {state = state, cfree = cfree, shared = shared, ram = ram, ram_used = ram_used, ngpu = ngpu,
          parked = parked == 1, cpu = cpu_free(cfree, shared), ramf = ram_free(ram, ram_used), gen = gen,
          reserve = reserve, gfree = gfree, gidle = gidle, ncores = ncores, sum = raw}
end

-- What a scan reads of host h (the first SCAN_FIELDS) and, when pos is given, the state of its GPU
-- at position pos without idx and uuid (see read_chosen in placement.lua), in one call (a scan
-- that walks a GPU index needs both). The GPU is kept in s.at_gpu (false when it does not exist), its position in s.at.
-- Read from the host's summary; from the host hash for a host registered before summaries existed.
local function host_state_at(h, pos)
  local raw = rcall('GET', host_sum_key(h))
  if raw then
    -- A summary left behind by a host hash that is gone (lost key, bad restore) names no host:
    -- try_place checks the host it chose, in the read it makes of that host anyway, rather than
    -- every candidate here (one call each).
    local s = host_from_summary(h, raw)
    if pos ~= nil then s.at, s.at_gpu = pos, summary_gpu(raw, pos, s.ngpu) or false end
    return s
  end
  local names = names_host_gpu[pos or -1]
  if names == nil then
    names = {unpack(HOST_FIELDS, 1, SCAN_FIELDS)}
    if pos ~= nil then
      local n = gpu_names(pos)
      for i = 3, #n do names[#names + 1] = n[i] end
    end
    names_host_gpu[pos or -1] = names
  end
  local f = rcall('HMGET', host_key(h), unpack(names))
  local s = host_from(h, f, true)
  if s and pos ~= nil then s.at, s.at_gpu = pos, gpu_from(pos, f, SCAN_FIELDS + 1, true) or false end
  return s
end

-- Every GPU of host h (s = host_state(h)), read in one call, without idx and uuid (see
-- read_chosen in placement.lua): list indexed by position + 1.
local function host_gpus(h, s)
  if s.gpus then return s.gpus end
  local out = {}
  local ngpu = s.ngpu
  if s.sum then
    for p = 0, ngpu - 1 do
      local g = summary_gpu(s.sum, p, ngpu)
      if g and s.models then g.model = s.models[p + 1] end
      out[p + 1] = g
    end
  elseif ngpu > 0 then
    local names = names_of_gpus[ngpu]
    if names == nil then
      names = {}
      for p = 0, ngpu - 1 do
        local n = gpu_names(p)
        for i = 3, #n do names[#names + 1] = n[i] end
      end
      names_of_gpus[ngpu] = names
    end
    local f = rcall('HMGET', host_key(h), unpack(names))
    for p = 0, ngpu - 1 do out[p + 1] = gpu_from(p, f, p * 5 + 1, true) end
  end
  s.gpus = out
  return out
end

-- Fills in the model of the GPUs of host h (state s) read from its summary, which holds no model
-- (only requests that name models need them before the grant): the GPU at s.at and, when s.gpus
-- was built, every GPU.
local function gpu_models(h, s)
  if not s.sum or s.models then return end
  local names = {}
  for p = 0, s.ngpu - 1 do names[p + 1] = gpu_names(p)[3] end
  local models = {}
  if #names > 0 then models = rcall('HMGET', host_key(h), unpack(names)) end
  s.models = models
  if s.at_gpu then s.at_gpu.model = models[s.at + 1] end
  if s.gpus then
    for p, g in pairs(s.gpus) do if g then g.model = models[p] end end
  end
end

-- Thousandths of GPU g that are free (its free share of the memory the allocator may grant).
local function milli_free(total, ext, free)
  local cap = total - ext
  if cap <= 0 or free <= 0 then return 0 end
  return math.floor(free * 1000 / cap)
end

-- A host's GPU totals from its GPUs (host_gpus): thousandths of a GPU free, summed (gfree), and
-- GPUs with no holder and free memory (gidle). Kept on the host hash (fields gfree, gidle) by
-- reindex_host and grant, so best fit compares hosts without reading all their GPUs.
local function gpu_totals(gpus)
  local gm, idle = 0, 0
  for _, g in ipairs(gpus) do
    gm = gm + milli_free(g.total, g.ext, g.free)
    if g.n == 0 and g.free > 0 then idle = idle + 1 end
  end
  return gm, idle
end

-- Free GPU capacity that a host could not feed: thousandths of a GPU free beyond what its free CPU
-- and free RAM cover at the host's own CPU per GPU and RAM per GPU (cores / GPUs, RAM / GPUs).
-- ncores, ngpu, ram_total: the host's cores, GPUs and RAM (MiB); gm: thousandths of a GPU free on
-- the host; cpu (millicores) and ram (MiB) free.
local function stranded(ncores, ngpu, ram_total, gm, cpu, ram)
  if gm <= 0 then return 0 end
  local by_cpu, by_ram = 0, 0
  if ncores > 0 then by_cpu = math.floor(cpu * ngpu / ncores) end
  if ram_total > 0 then by_ram = math.floor(ram * ngpu * 1000 / ram_total) end
  local short = gm - by_cpu
  if gm - by_ram > short then short = gm - by_ram end
  if short < 0 then return 0 end
  return short
end

-- First fit's order for GPU memory: gpu_ffc scores a GPU by its free-memory class, then its host's
-- ordinal and its position. Class c >= 1 holds the GPUs with 2^(c-1) GiB <= free < 2^c GiB (class 8:
-- 128 GiB and more), class 0 those with less than 1 GiB. First fit for m MiB per GPU (m >= 1 GiB)
-- walks the classes from ff_class(m) up, merged in ordinal order (ff_page in placement.lua): every
-- GPU with m MiB free is there, and at most those with m/2 to m MiB free are walked in vain, where
-- gpu_ord's one order would walk every GPU with less free memory ahead of the first that fits.
local FF_SHIFT, FF_CLASSES = 2 ^ 40, 9

local function ff_class(free)
  local c, at = 0, 1024
  while c < FF_CLASSES - 1 and free >= at do
    c = c + 1
    at = at * 2
  end
  return c
end

-- g: the GPU at position pos of host h (nil when there is none). When g also carries was_free and
-- was_n, its free MiB and holders before this change (a caller that knows them, on a host that
-- was and stays schedulable), only the index entries that change are written: a release that
-- leaves other holders on a GPU writes one, where writing every entry costs five calls.
local function reindex_gpu(h, pos, g, schedulable, ord)
  local m = gpu_member(h, pos)
  if not (schedulable and g) or (g.was_free == nil and g.free <= 0) then  -- in no index
    rcall('ZREM', K_GPU_IDX, m)
    rcall('ZREM', K_GPU_ORD, m)
    rcall('ZREM', K_GPU_FFC, m)
    rcall('ZREM', K_GPU_IDLE, m)
    rcall('ZREM', K_GPU_IDLE_ORD, m)
    return
  end
  local at = ord * 1024 + pos  -- the GPU's place in registration order (gpu_ord, gpu_idle_ord)
  if g.was_free ~= nil then
    local f0, f1 = g.was_free, g.free
    local idle0, idle1 = (g.was_n == 0 and f0 > 0), (g.n == 0 and f1 > 0)
    if f1 > 0 then
      if f1 ~= f0 then rcall('ZADD', K_GPU_IDX, f1, m) end
      if f0 <= 0 then rcall('ZADD', K_GPU_ORD, at, m) end
      local c = ff_class(f1)
      if f0 <= 0 or ff_class(f0) ~= c then rcall('ZADD', K_GPU_FFC, c * FF_SHIFT + at, m) end
    elseif f0 > 0 then
      rcall('ZREM', K_GPU_IDX, m)
      rcall('ZREM', K_GPU_ORD, m)
      rcall('ZREM', K_GPU_FFC, m)
    end
    if idle1 then
      if not idle0 or f1 ~= f0 then rcall('ZADD', K_GPU_IDLE, f1, m) end
      if not idle0 then rcall('ZADD', K_GPU_IDLE_ORD, at, m) end
    elseif idle0 then
      rcall('ZREM', K_GPU_IDLE, m)
      rcall('ZREM', K_GPU_IDLE_ORD, m)
    end
    return
  end
  rcall('ZADD', K_GPU_IDX, g.free, m)
  rcall('ZADD', K_GPU_ORD, at, m)
  rcall('ZADD', K_GPU_FFC, ff_class(g.free) * FF_SHIFT + at, m)
  if g.n == 0 then
    rcall('ZADD', K_GPU_IDLE, g.free, m)
    rcall('ZADD', K_GPU_IDLE_ORD, at, m)
  else
    rcall('ZREM', K_GPU_IDLE, m)
    rcall('ZREM', K_GPU_IDLE_ORD, m)
  end
end

-- Brings the indexes, the parked flag and the GPU totals (gfree, gidle) of host h in line with
-- its fields. touched lists the GPU positions that changed; nil means all of them (used when
-- schedulability itself changed).
-- known (optional, with touched): {gpus = {[pos + 1] = the touched GPUs' new states}, dgm, didle =
-- the change of the host's GPU totals}, from a caller that just changed them: then no GPU is read.
local function reindex_host(h, touched, known)
  local s = host_state(h)
  if not s then
    rcall('DEL', host_sum_key(h))
    return
  end
  local parked = (s.cpu <= 0) or (s.ramf <= 0)
  local schedulable = (s.state == 'ready') and not parked
  local was = (s.state == 'ready') and not s.parked
  local gpus, gm, idle
  local from_known = known and touched ~= nil and schedulable == was and s.gfree and s.gidle
  if from_known then
    gpus, gm, idle = known.gpus, s.gfree + known.dgm, s.gidle + known.didle
  else
    gpus = host_gpus(h, s)
    gm, idle = gpu_totals(gpus)
  end
  local fix = {}
  if parked ~= s.parked then fix[#fix + 1] = 'parked'; fix[#fix + 1] = parked and '1' or '0' end
  if gm ~= s.gfree then fix[#fix + 1] = 'gfree'; fix[#fix + 1] = gm end
  if idle ~= s.gidle then fix[#fix + 1] = 'gidle'; fix[#fix + 1] = idle end
  if #fix > 0 then rcall('HSET', host_key(h), unpack(fix)) end
  -- The summary: the known GPUs patched into the stored one, else every GPU as read above.
  s.parked, s.gfree, s.gidle = parked, gm, idle
  local patched = false
  if from_known then
    local gs = {}
    for _, pos in ipairs(touched) do gs[#gs + 1] = gpus[pos + 1] end
    patched = patch_summary(h, s, gs)
    if not patched then gpus = host_gpus(h, s) end
  end
  if not patched then write_summary(h, s, gpu_vector(gpus, s.ngpu)) end
  if schedulable ~= was then touched = nil end
  if touched == nil then
    for pos = 0, s.ngpu - 1 do reindex_gpu(h, pos, gpus[pos + 1], schedulable, s.ord) end
  else
    for _, pos in ipairs(touched) do reindex_gpu(h, pos, gpus[pos + 1], schedulable, s.ord) end
  end
  if schedulable and idle > 0 then rcall('ZADD', K_IDLE_HOSTS, idle, h) else rcall('ZREM', K_IDLE_HOSTS, h) end
  if schedulable then
    rcall('ZADD', K_CPU_IDX, s.cpu, h)
    rcall('ZADD', K_RAM_IDX, s.ramf, h)
  else
    rcall('ZREM', K_CPU_IDX, h)
    rcall('ZREM', K_RAM_IDX, h)
  end
  -- cpu_ord holds the host's fixed ordinal: only a full reindex or a change of schedulability
  -- can change it (touched is nil then), not every release.
  if touched == nil then
    if schedulable then rcall('ZADD', K_CPU_ORD, s.ord or 0, h) else rcall('ZREM', K_CPU_ORD, h) end
  end
end

local function decode_list(s)
  if s == nil or s == false or s == '' then return {} end
  local v = cjson.decode(s)
  if type(v) ~= 'table' then return {} end
  return v
end

-- Position of each core id in the host's core list ("cores" field), so grants survive a
-- capacity update that reorders or removes cores.
local function core_positions(cores)
  local p = {}
  for i, c in ipairs(cores) do p[tostring(c)] = i end
  return p
end

-- Where in host key hk's core map the exclusive cores of a grant are (0: the host no longer
-- lists that core). cver, cpos: the grant's record of the core list it was made against and the
-- positions there; host_cver: the host's current list version.
local function grant_core_positions(hk, cores, cver, cpos, host_cver)
  if cver and cver ~= '' and cver == host_cver then return decode_list(cpos) end
  local pos = core_positions(decode_list(rcall('HGET', hk, 'cores')))
  local out = {}
  for _, c in ipairs(cores) do out[#out + 1] = pos[tostring(c)] or 0 end
  return out
end

-- The token only shortens a supervisor's wait (it polls anyway), so it expires: a host whose
-- supervisor is gone (removed by its agent, which stopped it first) keeps no list behind.
local function wake_services(h)
  local k = svc_wake_key(h)
  rcall('LPUSH', k, '1')
  rcall('LTRIM', k, 0, 0)
  rcall('PEXPIRE', k, SVC_WAKE_TTL_MS)
end

-- Drops one reference to each named service instance of host h (an allocation ended); an
-- instance left with none records since when it is idle (its agent stops it after its timeout).
local function drop_services(h, names)
  local k = svc_key(h)
  local wake = false
  for _, name in ipairs(names) do
    local raw = rcall('HGET', k, name)
    if raw then
      local e = cjson.decode(raw)
      e.refs = (tonumber(e.refs) or 0) - 1
      if e.refs <= 0 then
        e.refs, e.idle_since, wake = 0, now_ms(), true
      end
      rcall('HSET', k, name, cjson.encode(e))
    end
  end
  if wake then wake_services(h) end
end

-- Forgets a service instance of host h and frees its port.
local function remove_service(h, name, e)
  rcall('HDEL', svc_key(h), name)
  if e and e.port then
    local pk, port = svc_ports_key(h), tostring(e.port)
    if rcall('HGET', pk, port) == name then rcall('HDEL', pk, port) end
  end
end

-- A host leaves the ledger: its catalog is withdrawn and its service instances forgotten (the
-- supervisor, woken, stops what it still runs).
local function drop_host_services(h)
  local ck = svc_catalog_key(h)
  for _, name in ipairs(rcall('HKEYS', ck)) do
    if tonumber(rcall('ZINCRBY', K_SVC_NAMES, -1, name)) <= 0 then rcall('ZREM', K_SVC_NAMES, name) end
  end
  if rcall('EXISTS', svc_key(h)) == 1 then wake_services(h) end
  rcall('DEL', ck, svc_key(h), svc_ports_key(h))
end

-- Returns what allocation id holds on its host. Counters are clamped at zero: a capacity update
-- may have removed a GPU or core that the grant still names. The host hash is read once and
-- written once (release is on every task's path; each redis.call costs about as much as a
-- trivial script).
local function return_grant(id, a)
  local h = a.host
  local hk = host_key(h)
  local gl = decode_list(a.gpus)
  local cores = decode_list(a.cores)
  local shared = tonumber(a.shared_millis or 0)
  local ram = tonumber(a.ram_mb or 0)
  local slots = tonumber(a.slots or 0)
  local names = {'ngpu', 'cmap', 'cver', 'cfree', 'shared', 'ram_used', 'slots_used'}
  for _, g in ipairs(gl) do
    local p = 'g' .. tonumber(g.pos) .. ':'
    names[#names + 1] = p .. 'uuid'
    names[#names + 1] = p .. 'used'
    names[#names + 1] = p .. 'n'
    names[#names + 1] = p .. 'total'
    names[#names + 1] = p .. 'ext'
  end
  local f = rcall('HMGET', hk, unpack(names))
  if not f[1] then
    -- The host is gone, or not registered yet (an allocation allocator recover deferred): no
    -- counters to give back, but the host's set must not keep an allocation that ended.
    rcall('SREM', host_allocs_key(h), id)
    return
  end
  -- A grant recorded at a position its GPU no longer has (an update moved the GPU before
  -- register_host rewrote grants' positions): found by uuid, its fields read there.
  local pos_of = nil  -- uuid -> position on the host, read once when some grant needs it
  for i, g in ipairs(gl) do
    local j = 7 + (i - 1) * 5
    if f[j + 1] ~= g.uuid then
      if pos_of == nil then
        pos_of = {}
        local un = {}
        for p = 0, tonumber(f[1]) - 1 do un[p + 1] = 'g' .. p .. ':uuid' end
        if #un > 0 then
          for p, u in ipairs(rcall('HMGET', hk, unpack(un))) do if u then pos_of[u] = p - 1 end end
        end
      end
      local p = pos_of[g.uuid]
      if p ~= nil then
        local q = 'g' .. p .. ':'
        local v = rcall('HMGET', hk, q .. 'used', q .. 'n', q .. 'total', q .. 'ext')
        g.pos, f[j + 1], f[j + 2], f[j + 3], f[j + 4], f[j + 5] = p, g.uuid, v[1], v[2], v[3], v[4]
      end
    end
  end
  local out = {}
  local function put(field, v)
    if v < 0 then v = 0 end
    out[#out + 1] = field
    out[#out + 1] = v
  end
  local touched = {}
  -- The touched GPUs' new states and the change of the host's GPU totals, for reindex_host.
  local known = {gpus = {}, dgm = 0, didle = 0}
  local ngpu = tonumber(f[1])
  for i, g in ipairs(gl) do
    local pos = tonumber(g.pos)
    local j = 7 + (i - 1) * 5
    if pos < ngpu and f[j + 1] == g.uuid then
      local p = 'g' .. pos .. ':'
      local used, n = tonumber(f[j + 2] or 0), tonumber(f[j + 3] or 0)
      local total, ext = tonumber(f[j + 4] or 0), tonumber(f[j + 5] or 0)
      local new_used, new_n = math.max(0, used - tonumber(g.memory_mb)), math.max(0, n - 1)
      put(p .. 'used', new_used)
      put(p .. 'n', new_n)
      touched[#touched + 1] = pos
      local free, new_free = math.max(0, total - ext - used), math.max(0, total - ext - new_used)
      known.gpus[pos + 1] = {pos = pos, free = new_free, n = new_n, used = new_used, total = total, ext = ext,
                             was_free = free, was_n = n}
      known.dgm = known.dgm + milli_free(total, ext, new_free) - milli_free(total, ext, free)
      if new_n == 0 and new_free > 0 then known.didle = known.didle + 1 end
      if n == 0 and free > 0 then known.didle = known.didle - 1 end
    end
  end
  if #cores > 0 then
    local map = f[2] or ''
    local back = 0
    for _, i in ipairs(grant_core_positions(hk, cores, a.cver, a.cpos, f[3])) do
      if i > 0 and string.sub(map, i, i) == '0' then
        map = string.sub(map, 1, i - 1) .. '1' .. string.sub(map, i + 1)
        back = back + 1
      end
    end
    out[#out + 1] = 'cmap'
    out[#out + 1] = map
    put('cfree', tonumber(f[4] or 0) + back)
  end
  if shared > 0 then put('shared', tonumber(f[5] or 0) - shared) end
  if ram > 0 then put('ram_used', tonumber(f[6] or 0) - ram) end
  if slots > 0 then put('slots_used', tonumber(f[7] or 0) - slots) end
  if #out > 0 then rcall('HSET', hk, unpack(out)) end
  if a.services and a.services ~= '' then drop_services(h, decode_list(a.services)) end
  rcall('SREM', host_allocs_key(h), id)
  reindex_host(h, touched, known)
end

-- The name of a placement, as a worker claims it (claim_grant.lua): a task requeued and placed
-- again gets a new one (its requeue count grows). Arguments are the record's fields (or nil).
local function placement_token(host, host_gen, activated, requeues)
  return (host or '') .. '|' .. (host_gen or '1') .. '|' .. (activated or '') .. '|' .. (requeues or '0')
end

local function read_alloc(id)
  local flat = rcall('HGETALL', alloc_key(id))
  if #flat == 0 then return nil end
  local a = {}
  for i = 1, #flat, 2 do a[flat[i]] = flat[i + 1] end
  return a
end

-- Ends an active allocation: gives its resources back and records why. Idempotent: an allocation
-- that is no longer active is returned unchanged with changed = false.
local function finish_alloc(id, reason, now)
  local a = read_alloc(id)
  if not a then return nil, false end
  if a.state ~= 'active' then return a, false end
  return_grant(id, a)
  local state = 'released'
  if reason == 'failed' then state = 'failed' end
  rcall('HSET', alloc_key(id), 'state', state, 'released', now, 'reason', reason)
  rcall('ZREM', K_ACTIVE, id)
  rcall('ZREM', K_EXPIRY, id)
  rcall('ZREM', K_ENDS, id)
  rcall('ZREM', K_BYPRIO, id)
  rcall('ZADD', K_DONE, now, id)
  local tk = PREFIX .. 'task:' .. id
  if rcall('EXISTS', tk) == 1 then
    rcall('HSET', tk, 'state', 'done')
    rcall('PEXPIRE', tk, 86400000)
  end
  a.state, a.released, a.reason = state, tostring(now), reason
  emit('released', id, now, cjson.encode({host = a.host, task_id = a.task_id, state = state, reason = reason,
    created = tonumber(a.created), activated = tonumber(a.activated or a.created)}))
  return a, true
end

-- Releases at most limit allocations whose TTL has passed; returns their ids.
local function reap_expired(now, limit)
  local ids = rcall('ZRANGEBYSCORE', K_EXPIRY, '-inf', now, 'LIMIT', 0, limit)
  for _, id in ipairs(ids) do finish_alloc(id, 'expired', now) end
  return ids
end

local function alloc_to_list(a)
  local out = {}
  for k, v in pairs(a) do out[#out + 1] = k; out[#out + 1] = v end
  return out
end
