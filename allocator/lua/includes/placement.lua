--[[ Placement: find a host and GPUs/cores for a request, and grant them.
Used by place.lua (direct allocation) and by the scheduling pass (queued tasks).

try_place(req, now) -> {host, gpus = grants, cores = core ids, newmap, shared} or nil, refusal
  req: the place payload (see place.lua); optional req.exclude (a host id to skip) and
  req.only (the only host allowed), used by backfill around a reservation. Optional req.slots
  (worker slots) and req.services (names): only requests that carry them pay for their checks.
grant(req, p, now) -> the allocation record written for placement p (writes everything).
]]

local FIRST_PAGE, PAGE = 4, 64
-- How many hosts that fit best fit compares before it chooses (see scan).
local BEST_WINDOW = 8

local function fmt_cores(millis)
  return string.format('%g', millis / 1000)
end

local function largest(idx)
  local top = rcall('ZREVRANGE', idx, 0, 0, 'WITHSCORES')
  if #top == 0 then return 0 end
  return tonumber(top[2])
end

local function labels_match(selector, labels_json)
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

-- Whether a GPU with free MiB, holders and model can take one GPU of req (memory, whole, model).
local function fits_gpu(req, free, holders, model)
  if req.gpu_mem == 0 then
    if holders ~= 0 or free <= 0 then return false end
  elseif free < req.gpu_mem then
    return false
  end
  if req.models then return req.models[model] == true end
  return true
end

-- The grant of GPU g (position, index, uuid, model, free MiB) to req: req.gpu_mem MiB, or for a
-- whole GPU all its free memory, marked whole, which register_host keeps equal to all the memory
-- other processes leave it (a whole GPU must not become shareable when they free some).
local function gpu_grant(req, g)
  if req.gpu_mem == 0 then
    return {pos = g.pos, index = g.idx, uuid = g.uuid, model = g.model, memory_mb = g.free, whole = true}
  end
  return {pos = g.pos, index = g.idx, uuid = g.uuid, model = g.model, memory_mb = req.gpu_mem}
end

-- Whether GPU g (nil: none) can take one GPU of req.
local function gpu_fits(req, g)
  if not g then return false end
  return fits_gpu(req, g.free, g.n, g.model)
end

-- Static checks of a host for req: state, selector, exclusions (not free capacity).
local function host_eligible(req, h, s)
  if s == nil or s.state ~= 'ready' then return false end
  if req.exclude and h == req.exclude then return false end
  if req.gone and req.gone[h] then return false end
  if req.only and h ~= req.only then return false end
  -- (s.matched: the walk checked the selector on this state already, see foreign in scan.)
  if req.selector and not s.matched and not labels_match(req.selector, host_labels(h, s)) then return false end
  return true
end

-- How many idle GPUs of host h a request may take: all of them for critical requests, else all
-- but the host's critical reserve (reserve_gpus whole GPUs kept idle for critical work). Idle as
-- gpu_totals counts it: no holder and some memory free (a GPU filled by processes the allocator
-- does not manage keeps nothing for critical work).
local function idle_allowance(req, h, s)
  if s.reserve <= 0 or req.priority >= 3 then return nil end
  if s.idle == nil then
    local idle = 0
    for _, g in ipairs(host_gpus(h, s)) do
      if g.n == 0 and g.free > 0 then idle = idle + 1 end
    end
    s.idle = idle
  end
  return s.idle - s.reserve
end

-- The req.gpus GPUs of a host (state s read from its summary) that fit req, in the order of mode
-- (best: least free memory first; worst: most; first: by position), ties by position: what
-- pick_on_host's sort chooses, found by insertion into a list of req.gpus without a table per GPU
-- or a sort (a best-fit scan does this for each of its candidates). nil when fewer fit.
local function pick_in_summary(req, s, mode)
  local k, raw, ngpu = req.gpus, s.sum, s.ngpu
  local models = req.models and s.models  -- read by gpu_models when req names models
  local fp, ff, n = {}, {}, 0  -- positions and free MiB of the chosen so far, in order
  for p = 0, ngpu - 1 do
    local total, ext, used, holders = struct.unpack(SUM_GPU_FMT, raw, SUM_HEAD_BYTES + p * SUM_GPU * 8 + 1)
    local free = total - ext - used
    if free < 0 then free = 0 end
    if total >= 0 and fits_gpu(req, free, holders, models and models[p + 1]) then
      local i = n + 1
      if mode == 'best' then
        while i > 1 and ff[i - 1] > free do i = i - 1 end
      elseif mode == 'worst' then
        while i > 1 and ff[i - 1] < free do i = i - 1 end
      end
      if i <= k then
        if n < k then n = n + 1 end
        for j = n, i + 1, -1 do fp[j], ff[j] = fp[j - 1], ff[j - 1] end
        fp[i], ff[i] = p, free
      elseif mode == 'first' then
        break
      end
    end
  end
  if n < k then return nil end
  local out = {}
  for i = 1, k do
    local g = summary_gpu(raw, fp[i], ngpu)
    if models then g.model = models[fp[i] + 1] end
    out[i] = g
  end
  return out
end

local function pick_on_host(req, h, s, pos, mode)
  local k = req.gpus
  if req.models then gpu_models(h, s) end
  local allowance = idle_allowance(req, h, s)
  if k == 1 and pos ~= nil then
    local g
    if s.at == pos then
      g = s.at_gpu or nil
    elseif s.sum then
      -- Another GPU of a host the scan read already: from the same summary, not another read.
      g = summary_gpu(s.sum, pos, s.ngpu)
      if g and s.models then g.model = s.models[pos + 1] end
    else
      g = gpu_state(h, pos)
    end
    if not gpu_fits(req, g) then return nil end
    if allowance ~= nil and g.n == 0 and allowance < 1 then return nil end
    return {g}
  end
  if allowance == nil and s.sum and not s.gpus then return pick_in_summary(req, s, mode) end
  local cands = {}
  for _, g in ipairs(host_gpus(h, s)) do
    if gpu_fits(req, g) then cands[#cands + 1] = g end
  end
  if #cands < k then return nil end
  if mode == 'best' then
    table.sort(cands, function(a, b) if a.free ~= b.free then return a.free < b.free end return a.pos < b.pos end)
  elseif mode == 'worst' then
    table.sort(cands, function(a, b) if a.free ~= b.free then return a.free > b.free end return a.pos < b.pos end)
  end
  local out, idle_used = {}, 0
  for _, g in ipairs(cands) do
    if allowance == nil or g.n > 0 or idle_used < allowance then
      if g.n == 0 then idle_used = idle_used + 1 end
      out[#out + 1] = g
      if #out == k then return out end
    end
  end
  return nil
end

-- Whether host h can serve req.services: every name in its catalog, and a free port of its pool
-- for each one not running there yet. Returns nil when it can, else 'catalog' or 'ports'; then
-- the number of free ports, and of the services it names that do not run there yet.
local function services_fit(req, h)
  local names = req.services
  local cat = rcall('HMGET', svc_catalog_key(h), unpack(names))
  for i = 1, #names do if not cat[i] then return 'catalog', 0 end end
  local cur = rcall('HMGET', svc_key(h), unpack(names))
  local new = 0
  for i = 1, #names do if not cur[i] then new = new + 1 end end
  if new == 0 then return nil, 0, 0 end
  local f = rcall('HMGET', host_key(h), 'port_lo', 'port_hi')
  local lo, hi = tonumber(f[1] or 9000), tonumber(f[2] or 9099)
  local free = hi - lo + 1
  for _, port in ipairs(rcall('HKEYS', svc_ports_key(h))) do
    local n = tonumber(port)
    if n and n >= lo and n <= hi then free = free - 1 end
  end
  if free < new then return 'ports', free, new end
  return nil, free, new
end

-- The GPU totals of host h (state s): the host hash's gfree and gidle, computed from its GPUs on a
-- host registered before those fields existed.
local function gpu_totals_of(h, s)
  if s.gfree == nil or s.gidle == nil then s.gfree, s.gidle = gpu_totals(host_gpus(h, s)) end
  return s.gfree, s.gidle
end

-- What a best-fit placement of req on host h (state s, GPUs gs) costs, as three values stranded,
-- broken, cpu, compared in that order (less is better), the walk's order breaking ties:
--   stranded: thousandths of a GPU the placement leaves stranded on top of what the host strands
--     already (see stranded in ledger.lua); negative when it puts GPU capacity to use that lacked
--     the CPU or RAM to be used;
--   broken: how much it breaks up the host's idle GPUs: taking j of its i idle GPUs costs
--     i^2 - (i-j)^2, so one GPU comes from the host with the fewest idle ones;
--   cpu: millicores left free on the host (the tighter host first, keeping larger ones whole).
-- cost_of computes them from the host's numbers: cores, GPUs and RAM; free millicores and MiB
-- of RAM; GPU totals (gm, idle: see gpu_totals) before the placement and gm after it; j.
local function cost_of(req, ncores, ngpu, ram_total, cpu, ramf, gm, idle, after, j)
  local cpu_after = cpu - req.cpu_millis
  return stranded(ncores, ngpu, ram_total, after, cpu_after, ramf - req.ram)
    - stranded(ncores, ngpu, ram_total, gm, cpu, ramf), j * (2 * idle - j), cpu_after
end

local function placement_cost(req, h, s, gs)
  local gm, idle = gpu_totals_of(h, s)
  local after, j = gm, 0
  for _, g in ipairs(gs) do
    local mem = req.gpu_mem
    if mem == 0 then mem = g.free end
    after = after - milli_free(g.total, g.ext, g.free) + milli_free(g.total, g.ext, g.free - mem)
    if g.n == 0 then j = j + 1 end
  end
  return cost_of(req, s.ncores, s.ngpu, s.ram, s.cpu, s.ramf, gm, idle, after, j)
end

-- placement_cost of one shared GPU, the one at position pos, for req on the host whose summary is
-- raw, computed from the summary alone: best fit compares 8 hosts, and building each one's state
-- and GPU tables (host_from_summary, summary_gpu, pick_on_host) costs more than the comparison.
-- Only the chosen host's state is built (see scan). Returns the cost, or nil and whether the host
-- as a whole cannot take req (CPU, RAM) rather than that GPU; or false when the summary does not
-- settle it (a host that is not ready or keeps a critical reserve): the host is then read as usual.
-- For requests without models, selector, exclusions, worker slots or services (see scan).
local function summary_cost(req, raw, pos)
  local ready, cfree, shared, ram, ram_used, ngpu, _, _, reserve, gm, idle, ncores = struct.unpack(SUM_HEAD_FMT, raw)
  if ready ~= 1 or reserve > 0 then return false end
  local cpu, ramf = cpu_free(cfree, shared), ram_free(ram, ram_used)
  if cpu < req.cpu_millis or ramf < req.ram then return nil, true end
  if pos >= ngpu then return nil, false end
  local total, ext, used, n = struct.unpack(SUM_GPU_FMT, raw, SUM_HEAD_BYTES + pos * SUM_GPU * 8 + 1)
  local free = total - ext - used
  if free < 0 then free = 0 end
  if total < 0 or not fits_gpu(req, free, n, nil) then return nil, false end
  local after = gm - milli_free(total, ext, free) + milli_free(total, ext, free - req.gpu_mem)
  local j = 0
  if n == 0 then j = 1 end
  return cost_of(req, ncores, ngpu, ram, cpu, ramf, gm, idle, after, j)
end

-- First fit's walk over gpu_ffc for m MiB per GPU (m >= 1 GiB): a cursor per class from
-- ff_class(m) up (see ff_class in ledger.lua), each over its score range, read in pieces that
-- start at one member (each piece costs a search of the index and every member its score as text,
-- and the first member merged usually fits) and double up to PAGE. A cursor is {score range
-- start, members and scores read, next unread at, members read before, piece size, range ended,
-- rank of the range's start (read once the cursor is deep into its class)}.
local function ff_walk(m)
  local w = {}
  for c = ff_class(m), FF_CLASSES - 1 do w[#w + 1] = {c * FF_SHIFT, {}, 1, 0, 1, false, nil} end
  return w
end

-- The next n members of walk w in ordinal order (score less the class part), merged from its
-- classes; fewer when the walk runs out.
local function ff_page(w, n)
  local out = {}
  while #out < n do
    local pick, key = nil, nil
    for _, r in ipairs(w) do
      local buf, i = r[2], r[3]
      if i > #buf and not r[6] then
        local size = r[5]
        if r[4] < 256 then
          buf = rcall('ZRANGEBYSCORE', K_GPU_FFC, r[1], '(' .. (r[1] + FF_SHIFT), 'WITHSCORES', 'LIMIT', r[4], size)
        else
          -- Deep into the class: by rank from the class's start (see in_range in scan).
          if r[7] == nil then r[7] = rcall('ZCOUNT', K_GPU_FFC, '-inf', '(' .. r[1]) end
          buf = rcall('ZRANGE', K_GPU_FFC, r[7] + r[4], r[7] + r[4] + size - 1, 'WITHSCORES')
          -- Members past the class's end belong to the next class: not this cursor's.
          local j = #buf - 1
          while j > 0 and tonumber(buf[j + 1]) >= r[1] + FF_SHIFT do buf[j], buf[j + 1] = nil, nil; j = j - 2 end
        end
        r[2], r[3], r[4], r[6], i = buf, 1, r[4] + #buf / 2, (#buf < 2 * size), 1
        -- Pieces double up to a page, or to what is asked (pages of hosts passed over grow large).
        if size < PAGE or size < n then r[5] = size * 2 end
      end
      if i <= #buf then
        local k = tonumber(buf[i + 1]) - r[1]
        if key == nil or k < key then pick, key = r, k end
      end
    end
    if pick == nil then break end
    out[#out + 1] = pick[2][pick[3]]
    pick[3] = pick[3] + 2
  end
  return out
end

-- Walks one index in the order of mode; returns host, state, gpus, or nil plus whether the walk
-- stopped at the cap (as opposed to running out of candidates). Hosts that had the CPU and RAM
-- but not the worker slots or services are noted in req.short (for the refusal's reason).
-- first and worst take the first candidate that fits. best walks the hosts by idle GPU count for
-- whole GPUs (the GPU memory index for shared GPUs, the CPU index for CPU-only requests), looks
-- at up to BEST_WINDOW hosts that fit and takes the cheapest by placement_cost.
local function scan(req, mode)
  local k = req.gpus
  local whole = (req.gpu_mem == 0)
  local cap = req.scan_cap
  local seen, offset = 0, 0
  local tried, host_cache = {}, {}
  local window = 1
  if mode == 'best' and not req.only then window = BEST_WINDOW end
  -- Most requests fit on an early candidate: fetch a few first (enough for best fit's window).
  local page = FIRST_PAGE * window
  local by_host = (k > 0 and whole and mode == 'best' and not req.only)
  local best_h, best_s, best_gs, fits = nil, nil, nil, 0
  local b1, b2, b3  -- the best placement's cost (see placement_cost)
  -- Best fit of one shared GPU (most requests) costs each candidate from its summary alone
  -- (summary_cost); raws keeps each host's summary read so far (false: it has none), best_raw and
  -- best_pos the chosen one's, whose state is built once at the end (chosen).
  local lean = (k == 1 and not whole and window > 1 and not req.models and not req.selector and not req.exclude
    and not req.gone and not req.only and not req.slots and not req.services)
  local raws, best_raw, best_pos = {}, nil, nil
  local ff = nil  -- first fit's walk over gpu_ffc (ff_walk)
  -- A request with GPU models or a selector passes over the hosts they rule out without counting
  -- them toward the cap: a walk that met a whole fleet's hosts of other models or labels first
  -- (an idle fleet orders equal GPUs by host name) refused at the cap what the hosts it names could
  -- take.
  local screen = (req.selector ~= nil or (req.models ~= nil and k > 0)) and not req.only
  local pre, foreign, go_listed, allowed_hosts = nil, nil, nil, nil  -- (below: for models or a selector)
  local allowed = false  -- the hosts they allow (allowed_hosts), once read
  local rest, rest_done = nil, false  -- the rest of the walk, listed from those hosts (see below)
  local npassed, nruled = 0, 0  -- members of hosts ruled out passed over, hosts ruled out read
  local function cheaper(c1, c2, c3)
    return best_h == nil or c1 < b1 or (c1 == b1 and (c2 < b2 or (c2 == b2 and c3 < b3)))
  end
  local function chosen()
    if best_raw then
      best_s = host_from_summary(best_h, best_raw)
      best_s.at, best_s.at_gpu = best_pos, summary_gpu(best_raw, best_pos, best_s.ngpu)
      best_gs = {best_s.at_gpu}
    end
    return best_h, best_s, best_gs
  end
  -- Whether req's models or selector rule host h out, with a cache per host (ruled). Read from the
  -- host, whose state then serves host_ok (pre; false: none); once 32 hosts were ruled out, from
  -- the host sets kept with the count of models and labels (count_names in ledger.lua), read once,
  -- a lookup per host (allowed; unused while some registered host is not in those sets yet).
  if screen then
    local ruled = {}
    pre = {}
    -- The hosts req's GPU models and selector allow, as a set, when the sets are in step and
    -- hold at most limit of them; false otherwise. The count is bounded from the sets' sizes
    -- first (each constraint's: a label's values, the models; the smallest), so that a large set
    -- is never read: its members would cost more than the walk saves.
    allowed_hosts = function(limit)
      local f = rcall('HMGET', PREFIX .. 'names', 'hosts', 'mhosts', 'lhosts', 'stamp')
      local nhosts = rcall('ZCARD', K_HOSTS)
      local by_model = req.models ~= nil and k > 0
      -- (The stamp: the registration counter when the sets last changed. A release without the
      -- label sets registers hosts without it, so a rollback's registrations turn the sets off.)
      if tonumber(f[1] or -1) ~= nhosts or (by_model and tonumber(f[2] or -1) ~= nhosts)
         or (req.selector and tonumber(f[3] or -1) ~= nhosts) or f[4] ~= (rcall('HGET', K_SEQ, 'cver') or '0') then
        return false
      end
      local groups, bound = {}, nil
      if by_model then
        local names = {}
        for m in pairs(req.models) do names[#names + 1] = 'mhosts:' .. m end
        groups[#groups + 1] = names
      end
      for key, values in pairs(req.selector or {}) do
        local names = {}
        for i, v in ipairs(values) do names[i] = 'lhosts:' .. key .. '=' .. tostring(v) end
        groups[#groups + 1] = names
      end
      for _, names in ipairs(groups) do
        local n = 0
        for _, name in ipairs(names) do n = n + rcall('SCARD', PREFIX .. name) end
        if bound == nil or n < bound then bound = n end
      end
      if bound == nil or bound > limit then return false end
      local out = nil
      for _, names in ipairs(groups) do
        local u = {}
        for _, name in ipairs(names) do
          for _, h in ipairs(rcall('SMEMBERS', PREFIX .. name)) do u[h] = true end
        end
        if out == nil then out = u else
          for h in pairs(out) do if not u[h] then out[h] = nil end end
        end
      end
      return out
    end
    -- Host ids in byte order, the order Redis gives members of equal score (Lua's own string
    -- order follows the server's locale): by a number made of the 6 bytes after the prefix they
    -- share, then byte by byte among the few that share those too.
    local function bytes_less(a, b)
      for i = 1, math.min(#a, #b) do
        local x, y = string.byte(a, i), string.byte(b, i)
        if x ~= y then return x < y end
      end
      return #a < #b
    end
    local function in_byte_order(hosts)
      local l = #(hosts[1] or '')
      for i = 2, #hosts do
        local h = hosts[i]
        if #h < l then l = #h end
        while l > 0 and string.sub(h, 1, l) ~= string.sub(hosts[1], 1, l) do l = l - 1 end
      end
      local nums, by = {}, {}
      for _, h in ipairs(hosts) do
        local v = 0
        for i = l + 1, l + 6 do v = v * 256 + (string.byte(h, i) or 0) end
        if by[v] then by[v][#by[v] + 1] = h else by[v] = {h}; nums[#nums + 1] = v end
      end
      table.sort(nums)
      local out = {}
      for _, v in ipairs(nums) do
        local g = by[v]
        if #g > 1 then table.sort(g, bytes_less) end
        for _, h in ipairs(g) do out[#out + 1] = h end
      end
      return out
    end
    -- The members of the index this walk goes over that are the allowed hosts', in the walk's
    -- order, the same list the walk would meet after passing over every other host (nil beyond
    -- 4,096 of them: it costs about 2 us a member):
    -- their scores read in one ZMSCORE per 1,000 members and sorted as numbers; equal scores by
    -- member name, that is host id in byte order, then position as text ("10" before "2").
    local function listed()
      local hosts = {}
      for h in pairs(allowed) do hosts[#hosts + 1] = h end
      hosts = in_byte_order(hosts)
      local idx, lo, ties, ffc = nil, nil, true, false
      if by_host then idx, lo = K_IDLE_HOSTS, k
      elseif k > 0 and mode ~= 'first' then
        idx, lo = K_GPU_IDX, req.gpu_mem
        if whole then idx, lo = K_GPU_IDLE, 1 end
      elseif k > 0 and whole then idx, ties = K_GPU_IDLE_ORD, false
      elseif k > 0 and req.gpu_mem < 1024 then idx, ties = K_GPU_ORD, false
      elseif k > 0 then idx, ties, ffc = K_GPU_FFC, false, true
      elseif mode == 'first' then idx, ties = K_CPU_ORD, false
      else idx, lo = K_CPU_IDX, req.cpu_millis end
      local names, tie, text = {}, {}, {}
      for r, h in ipairs(hosts) do
        if k > 0 and not by_host then
          for p = 0, tonumber(rcall('HGET', host_key(h), 'ngpu') or 0) - 1 do
            local t = text[p]
            if t == nil then
              -- Position p's text in byte order: each digit + 1 in base 11, a missing digit 0.
              local d = tostring(p)
              t = 0
              for i = 1, 4 do t = t * 11 + (string.byte(d, i) or 47) - 47 end
              text[p] = t
            end
            names[#names + 1] = h .. '#' .. p
            tie[#names] = r * 16384 + t
          end
        else
          names[#names + 1] = h
          tie[#names] = r * 16384
        end
      end
      if #names > 4096 then return nil end
      local sc, tb, mem, c, big = {}, {}, {}, FF_SHIFT * ff_class(req.gpu_mem), false
      for i = 1, #names, 1000 do
        local scores = rcall('ZMSCORE', idx, unpack(names, i, math.min(i + 999, #names)))
        for j, v in ipairs(scores) do
          v = v and tonumber(v)
          if ffc then
            -- First fit's classes from the request's up, merged by what follows the class.
            if v and v >= c then v = v % FF_SHIFT else v = nil end
          elseif lo and v and v < lo then v = nil end
          if v then
            local n = #sc + 1
            sc[n], tb[n], mem[n] = v, ties and tie[i + j - 1] or 0, names[i + j - 1]
            if ties and v >= 268435456 then big = true end
          end
        end
      end
      -- Sorted as one number per member: the score, unique where the index orders by ordinal, else
      -- score x 2^24 + tie while that is exact (scores below 2^28: GPU MiB, millicores, counts),
      -- and in pairs beyond.
      local order = {}
      if big then
        for n = 1, #sc do order[n] = n end
        table.sort(order, function(x, y) if sc[x] ~= sc[y] then return sc[x] < sc[y] end return tb[x] < tb[y] end)
        for n, at in ipairs(order) do order[n] = mem[at] end
      else
        local keys, member = {}, {}
        for n = 1, #sc do
          local v = sc[n]
          if ties then v = v * 16777216 + tb[n] end
          keys[n], member[v] = v, mem[n]
        end
        table.sort(keys)
        for n, v in ipairs(keys) do order[n] = member[v] end
      end
      local out = {}
      if ffc then
        -- The walk's first page: gpu_ord's first members, however few fit.
        for _, m in ipairs(rcall('ZRANGE', K_GPU_ORD, 0, FIRST_PAGE - 1)) do
          if allowed[string.match(m, '^(.*)#%d+$')] then out[#out + 1] = m end
        end
      end
      if mode == 'worst' then
        for n = #order, 1, -1 do out[#out + 1] = order[n] end
      else
        for _, m in ipairs(order) do out[#out + 1] = m end
      end
      return out
    end
    -- Sets rest to the list of the allowed hosts' members, less the ones the walk counted already
    -- (the list's order is the walk's, so those are its first seen).
    go_listed = function()
      local all = listed()
      if all then
        rest = {}
        for i = seen + 1, #all do rest[#rest + 1] = all[i] end
      end
    end
    foreign = function(h, pos)
      local v = ruled[h]
      if v ~= nil then return v end
      if allowed then
        v = not allowed[h]
      else
        if k ~= 1 then pos = nil end
        local s = host_state_at(h, pos)
        pre[h] = s or false
        v = false
        if s and req.selector and not labels_match(req.selector, host_labels(h, s)) then
          v = true
        elseif s and k > 0 and req.models then
          v = true
          gpu_models(h, s)
          if s.models then
            for p = 1, s.ngpu do if req.models[s.models[p]] then v = false; break end end
          else
            for _, g in ipairs(host_gpus(h, s)) do if req.models[g.model] then v = false; break end end
          end
        end
        if s and not v then s.matched = true end
        if v then
          nruled = nruled + 1
          if nruled == 32 then
            -- The walk meets many hosts it passes over: when at most 64 are allowed, go on from
            -- their list (see go_listed), and look each host up in their set from now on.
            allowed = allowed_hosts(64)
            if allowed then go_listed() end
          end
        end
      end
      ruled[h] = v
      return v
    end
  end
  -- The next page of idx's members with scores from lo up, in order (rev: from the top down):
  -- by score and offset while the offset is small, then by rank from where the range starts (one
  -- ZCOUNT), since a read by score and offset walks the index from the range's start again, which
  -- for a walk deep into the index (past many hosts it rules out) cost more than the rest.
  local base = nil
  local function in_range(idx, lo, rev)
    if offset < 256 then
      if rev then return rcall('ZREVRANGEBYSCORE', idx, '+inf', lo, 'LIMIT', offset, page) end
      return rcall('ZRANGEBYSCORE', idx, lo, '+inf', 'LIMIT', offset, page)
    end
    if rev then
      -- The members from lo up are the first ZCOUNT from the top.
      if base == nil then base = rcall('ZCOUNT', idx, lo, '+inf') end
      if offset >= base then return {} end
      return rcall('ZREVRANGE', idx, offset, math.min(offset + page, base) - 1)
    end
    if base == nil then base = rcall('ZCOUNT', idx, '-inf', '(' .. lo) end
    return rcall('ZRANGE', idx, base + offset, base + offset + page - 1)
  end
  local function host_ok(h, pos)
    local c = host_cache[h]
    if c ~= nil then return c end
    if k ~= 1 then pos = nil end
    local s = pre and pre[h]
    if s == nil then s = host_state_at(h, pos) elseif s == false then s = nil end
    -- No free CPU or RAM: parked, no new work, not even a request for none (a walk over the
    -- indexes never meets such a host; a single-host try, req.only, reads it directly).
    local ok = host_eligible(req, h, s) and s.cpu >= req.cpu_millis and s.ramf >= req.ram and s.cpu > 0 and s.ramf > 0
    if ok and req.slots and host_slots(h, s) < req.slots then
      ok = false
      local short = req.short
      if short.slots == nil or s.slotf > short.slots then short.slots = s.slotf end
    end
    if ok and req.services then
      local why, free = services_fit(req, h)
      if why then
        ok = false
        local short = req.short
        short[why] = true
        if why == 'ports' and (short.free_ports == nil or free > short.free_ports) then short.free_ports = free end
      end
    end
    if ok then host_cache[h] = s else host_cache[h] = false end
    return host_cache[h]
  end
  while seen < cap do
    local members
    if rest then
      if rest_done then break end
      members, rest_done = rest, true
    elseif req.only then
      -- Only one host allowed: look at it directly.
      if offset > 0 then return nil, false end
      if k == 0 then members = {req.only} else
        local s = host_state(req.only)
        members = {}
        if s then for p = 0, s.ngpu - 1 do members[#members + 1] = gpu_member(req.only, p) end end
      end
    elseif by_host then
      members = in_range(K_IDLE_HOSTS, k, false)
    elseif k > 0 then
      local idx, lo = K_GPU_IDX, req.gpu_mem
      if whole then idx, lo = K_GPU_IDLE, 1 end
      if mode == 'best' or mode == 'worst' then
        members = in_range(idx, lo, mode == 'worst')
      elseif whole then
        -- Whole GPUs: the GPUs with no holder, in order.
        members = rcall('ZRANGE', K_GPU_IDLE_ORD, offset, offset + page - 1)
      elseif lo < 1024 or offset == 0 then
        -- Every GPU with free memory, in order: requests under 1 GiB walk it; the others read its
        -- first page only. When one of those GPUs fits, it is the first in order that does, found
        -- for one read where merging gpu_ffc's classes costs a search of each.
        members = rcall('ZRANGE', K_GPU_ORD, offset, offset + page - 1)
      else
        -- GPU memory, past the first page: gpu_ffc from the request's class up, one member first
        -- (it usually fits, and each member read costs a merge step).
        if ff == nil then ff = ff_walk(lo); members = ff_page(ff, 1) else members = ff_page(ff, page) end
      end
    else
      if mode == 'best' or mode == 'worst' then
        members = in_range(K_CPU_IDX, req.cpu_millis, mode == 'worst')
      else
        members = rcall('ZRANGE', K_CPU_ORD, offset, offset + page - 1)
      end
    end
    if #members == 0 then break end
    local passed = 0
    for _, m in ipairs(members) do
      local h, pos = m, nil
      if k > 0 and not by_host then
        -- "<host>#<pos>": positions 0-9 without a pattern match, since a walk over tied GPUs reads
        -- every GPU of a host it has compared already (members with equal scores come by name).
        if string.byte(m, -2) == 35 then
          h, pos = string.sub(m, 1, -3), string.byte(m, -1) - 48
        else
          h, pos = string.match(m, '^(.*)#(%d+)$')
          pos = tonumber(pos)
        end
      end
      if screen and foreign(h, pos) then
        passed, npassed = passed + 1, npassed + 1
        -- Once 32 hosts were passed over without a list to go on from, at most 2 x the cap members
        -- in all: then it goes on from the list after all when at most 512 hosts are allowed, else
        -- it stops as at the cap, so that its cost stays bounded ('passed': the refusal says so).
        if npassed > 2 * cap and nruled >= 32 and not rest then
          -- (A set read at the 32nd host already had its list tried, and refused for its size.)
          if not allowed then
            allowed = allowed_hosts(512)
            if allowed then go_listed() end
          end
          if not rest then
            if best_h then return chosen() end
            return nil, 'passed'
          end
        end
        if rest and not rest_done then break end  -- the walk goes on from the list
      else
        seen = seen + 1
        if not tried[h] then
          local raw, c1, c2, c3 = false, false, nil, nil
          if lean then
            raw = raws[h]
            if raw == nil then
              raw = rcall('GET', host_sum_key(h)) or false
              raws[h] = raw
            end
            if raw then c1, c2, c3 = summary_cost(req, raw, pos) end
          end
          if c1 then
            if cheaper(c1, c2, c3) then
              best_h, best_s, best_gs, b1, b2, b3 = h, nil, nil, c1, c2, c3
              best_raw, best_pos = raw, pos
            end
            fits = fits + 1
            if fits >= window then return chosen() end
            tried[h] = true
          elseif c1 == nil then
            -- The summary settled it: no fit on that GPU, or (c2) none on the host.
            if c2 then tried[h] = true end
          else
            local s = host_ok(h, pos)
            local gs = nil
            if s then
              if k == 0 then gs = {} else gs = pick_on_host(req, h, s, pos, mode) end
              if gs and window == 1 then return h, s, gs end
            end
            if gs then
              c1, c2, c3 = placement_cost(req, h, s, gs)
              if cheaper(c1, c2, c3) then
                best_h, best_s, best_gs, b1, b2, b3 = h, s, gs, c1, c2, c3
                best_raw = nil
              end
              fits = fits + 1
              if fits >= window then return chosen() end
              tried[h] = true
            elseif k ~= 1 or not s then
              tried[h] = true
            end
          end
        end
        if seen >= cap then
          if best_h then return chosen() end
          return nil, true
        end
      end
    end
    offset = offset + #members
    -- Later pages grow: a page read skips the offset from the start of the range again. Pages
    -- mostly of hosts passed over grow to 1024 members, since such a member costs a lookup.
    page = page * 2
    if page > PAGE and passed * 2 <= #members then page = PAGE elseif page > 1024 then page = 1024 end
  end
  if best_h then return chosen() end
  return nil, seen >= cap
end

local function refusal(req, capped)
  local k = req.gpus
  local whole = (req.gpu_mem == 0)
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
  elseif req.short and req.short.slots then
    details.largest_free_worker_slots = req.short.slots
    code = 'INSUFFICIENT_WORKERS'
    msg = 'insufficient worker slots: requested ' .. req.slots .. ', largest free ' .. req.short.slots ..
      ' on a host with the CPU and RAM'
  elseif req.short and req.short.ports then
    details.largest_free_service_ports = req.short.free_ports
    code = 'INSUFFICIENT_SERVICE_PORTS'
    msg = 'no free service port: the request needs a port for each service not yet running on the host, ' ..
      'largest free ' .. req.short.free_ports .. ' port(s) in a host pool'
  elseif req.short and req.short.catalog then
    code = 'NO_FIT'
    msg = 'no host with the free capacity offers all of the services ' .. table.concat(req.services, ', ')
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
    if req.models then msg = msg .. ' on the requested GPU models' end
    if req.selector then msg = msg .. ' among hosts matching the selector' end
  end
  -- Hosts that take no new work are in none of the indexes the figures above come from: say how
  -- many there are, or "largest free 0 MiB" contradicts the free memory capacity shows on a host
  -- whose cores are all taken.
  local nhosts = rcall('ZCARD', K_HOSTS)
  local off = nhosts - rcall('ZCARD', K_CPU_IDX)
  if off > 0 then
    details.hosts_taking_no_work = off
    msg = msg .. '; ' .. off .. ' of ' .. nhosts .. ' host(s) take no new work now (draining, lost, or no free core or RAM)'
  end
  if capped == 'passed' then
    details.scan_cap_reached = true
    msg = msg .. ' (stopped after passing over ' .. (2 * req.scan_cap) .. ' GPUs or hosts the request rules out)'
  elseif capped then
    details.scan_cap_reached = true
    msg = msg .. ' (stopped after ' .. req.scan_cap .. ' candidates)'
  end
  return {ok = false, code = code, message = msg, details = details}
end

-- What a placement reads of the host it chose, in one call: its state (nil for a host hash that
-- is gone, whose summary the scan read), the core map when req takes exclusive cores, and idx,
-- uuid and model of the GPUs gs that the scan read without them. Returns the values and where the
-- GPU names start.
local function read_chosen(req, h, gs)
  local names = {'state'}
  if req.exclusive and req.cpu_millis > 0 then
    names[2], names[3], names[4] = 'cseq', 'cmap', 'cver'
  end
  local at = #names + 1
  for _, g in ipairs(gs) do
    if g.uuid == nil or g.model == nil then
      local n = gpu_names(g.pos)
      names[#names + 1] = n[1]
      names[#names + 1] = n[2]
      names[#names + 1] = n[3]
    end
  end
  return rcall('HMGET', host_key(h), unpack(names)), at
end

-- Fills in idx, uuid and model of the GPUs gs that lack them from f (read_chosen), from f[at] on.
local function fill_gpu_ids(gs, f, at)
  for _, g in ipairs(gs) do
    if g.uuid == nil or g.model == nil then
      g.idx, g.uuid, g.model = tonumber(f[at]), f[at + 1], f[at + 2]
      at = at + 3
    end
  end
end

-- Exclusive core ids for req on host h (the lowest free ones), their positions in the host's
-- core list, the new core map and the core list version; ids = nil when the map disagrees with
-- the free count; ids = {} when req takes no exclusive cores. f: read_chosen's values (cseq, cmap
-- and cver from f[2]). The core list is decoded only when it is not 0..n-1 (host field cseq,
-- written at registration).
local function pick_cores(req, h, f)
  if not req.exclusive or req.cpu_millis <= 0 then return {}, {}, nil, nil end
  local need = req.cpu_millis / 1000
  local cores = nil
  if f[2] ~= '1' then cores = decode_list(rcall('HGET', host_key(h), 'cores')) end
  local map = f[3]
  local ids, pos, parts = {}, {}, {}
  local at = 1
  while #ids < need do
    local i = string.find(map, '1', at, true)
    if not i then return nil end
    if cores then ids[#ids + 1] = cores[i] else ids[#ids + 1] = i - 1 end
    pos[#pos + 1] = i
    parts[#parts + 1] = string.sub(map, at, i - 1)
    parts[#parts + 1] = '0'
    at = i + 1
  end
  parts[#parts + 1] = string.sub(map, at)
  return ids, pos, table.concat(parts), f[4] or '0'
end

-- A refusal when req names GPU models (for GPUs) no registered host has, or a selector label
-- whose values no registered host has; nil otherwise, and while some registered host is not in
-- the count (PREFIX..'names', count_names in ledger.lua). The walk would read every candidate up to the
-- scan cap before it refused (30-45 ms of Redis time on 5,000 hosts for a model).
local function absent_name(req)
  local by_model = req.models and req.gpus > 0
  if not by_model and not req.selector then return nil end
  local k = PREFIX .. 'names'
  local counted, nhosts = rcall('HMGET', k, 'hosts', 'mhosts'), rcall('ZCARD', K_HOSTS)
  if tonumber(counted[1] or 0) ~= nhosts then return nil end
  -- In HMGETs of at most 1,000 fields: Lua's unpack fails at about 8,000 values, and a refusal
  -- here must not become a script error (a request in line would make every pass fail).
  local function none(fields)
    for i = 1, #fields, 1000 do
      for _, v in ipairs(rcall('HMGET', k, unpack(fields, i, math.min(i + 999, #fields)))) do
        if v and tonumber(v) > 0 then return false end
      end
    end
    return true
  end
  local models = {}
  if by_model then
    local fields = {}
    for m in pairs(req.models) do models[#models + 1] = m end
    table.sort(models)
    for i, m in ipairs(models) do fields[i] = 'm:' .. m end
    if none(fields) then
      return {ok = false, code = 'NO_FIT', details = {unknown_gpu_models = models},
              message = 'no registered host has a GPU of model ' .. table.concat(models, ' or ')}
    end
  end
  if req.selector then
    local labels = {}
    for key in pairs(req.selector) do labels[#labels + 1] = key end
    table.sort(labels)
    for _, key in ipairs(labels) do
      local values, fields = req.selector[key], {}
      for i, v in ipairs(values) do fields[i] = 'l:' .. key .. '=' .. tostring(v) end
      if #fields > 0 and none(fields) then
        return {ok = false, code = 'NO_FIT', details = {unknown_label = key},
                message = 'no registered host has the label ' .. key .. '=' .. table.concat(values, '|')}
      end
    end
  end
  -- Models a few hosts have (64 at most, every host in the model sets): when none of those hosts
  -- can take the request now (drained, lost, short of CPU or RAM, its GPUs of the model taken),
  -- it is refused without the walk, which meets their GPUs only among the whole fleet's and reads
  -- up to the scan cap first (28 ms on 5,000 hosts, paid again by every scheduling pass while
  -- such a task heads the line). The test is no stricter than the walk's (worker slots and
  -- services are left to it), so it refuses only what the walk would refuse. Only when the walk
  -- could be long (more than 64 candidates in the index it would walk): on a small fleet the walk
  -- is shorter than reading the hosts.
  if by_model and tonumber(counted[2] or -1) == nhosts then
    local idx, lo = K_GPU_IDX, req.gpu_mem
    if req.gpu_mem == 0 then idx, lo = K_GPU_IDLE, 1 end
    local n = 0
    for _, m in ipairs(models) do n = n + rcall('SCARD', PREFIX .. 'mhosts:' .. m) end
    if n <= 64 and rcall('ZCOUNT', idx, lo, '+inf') > 64 then
      for _, m in ipairs(models) do
        for _, h in ipairs(rcall('SMEMBERS', PREFIX .. 'mhosts:' .. m)) do
          local st = host_state(h)
          if host_eligible(req, h, st) and st.cpu >= req.cpu_millis and st.ramf >= req.ram
             and pick_on_host(req, h, st, nil, 'first') then
            return nil
          end
        end
      end
      return refusal(req, false)
    end
  end
  return nil
end

local function try_place(req, now)
  if req.slots == 0 then req.slots = nil end
  if req.services then
    if #req.services == 0 then req.services = nil else
      for _, name in ipairs(req.services) do
        local n = rcall('ZSCORE', K_SVC_NAMES, name)
        if not n or tonumber(n) <= 0 then
          return nil, {ok = false, code = 'UNKNOWN_SERVICE', details = {service = name},
                       message = "unknown service '" .. name .. "': no host's catalog offers it"}
        end
      end
    end
  end
  if req.slots or req.services then req.short = {} end
  -- More CPU or RAM than any schedulable host has free: refused at once. The walk would read
  -- every candidate up to the scan cap first, since the GPU and CPU indexes it walks are not
  -- ordered by free RAM (a request for more RAM than any host had free held Redis for 12 ms on
  -- 5,000 hosts, and a pass met it again for every such task in line).
  if largest(K_CPU_IDX) < req.cpu_millis or largest(K_RAM_IDX) < req.ram then return nil, refusal(req, false) end
  local absent = absent_name(req)
  if absent then return nil, absent end
  local mode = req.strategy
  local h, s, gs, f, at
  while true do
    h, s, gs = scan(req, mode)
    local capped = false
    if not h then
      capped = s
      -- First fit that stopped at the cap: best fit reaches a host through the free-capacity
      -- indexes. A first fit that found nothing does too: a ledger written before cpu_ord or
      -- gpu_ffc existed lacks hosts or GPUs there until they are registered again, park or come
      -- back from parking or draining.
      if mode == 'first' then
        h, s, gs = scan(req, 'best')
        if not h then capped = s end
      end
    end
    if not h then return nil, refusal(req, capped) end
    f, at = read_chosen(req, h, gs)
    if f[1] then break end
    -- A summary whose host hash is gone: no host; scan again without it (see host_eligible).
    if req.gone == nil then req.gone = {} end
    req.gone[h] = true
  end
  local core_ids, core_pos, newmap, cver = pick_cores(req, h, f)
  if core_ids == nil then
    return nil, {ok = false, code = 'LEDGER_CORRUPT', details = {},
                 message = 'free core count disagrees with core map on host ' .. h}
  end
  fill_gpu_ids(gs, f, at)
  local grants = {}
  for i, g in ipairs(gs) do grants[i] = gpu_grant(req, g) end
  local shared = 0
  if not req.exclusive then shared = req.cpu_millis end
  return {host = h, gen = s.gen, state = s, gpus = grants, cores = core_ids, cpos = core_pos, cver = cver,
          newmap = newmap, shared = shared, free = gs}
end

-- Expected run time of a task: the history's p80 for its task type (written by the recorder to
-- the durations hash), else the task's own hint, else its TTL; nil when none is known. p80
-- rather than p50: a reservation computed from an underestimate lets backfill delay the head.
-- A lease never outlives its TTL (it is reaped then): its expected run is at most that. (A job's
-- claim may move its deadline later, so its TTL is no bound on its run.)
local function expected_run_ms(req)
  local ms = 0
  if req.task_type and req.task_type ~= '' then
    local est = rcall('HGET', PREFIX .. 'durations', req.task_type)
    if est then
      local ok, e = pcall(cjson.decode, est)
      if ok and type(e) == 'table' and tonumber(e.p80_ms or 0) > 0 then ms = tonumber(e.p80_ms) end
    end
  end
  if ms <= 0 then ms = tonumber(req.expected_ms or 0) end
  local ttl = tonumber(req.ttl_ms or 0)
  -- The TTL of a job without a time limit (req.unbounded) bounds only its wait for a worker.
  if ms <= 0 and not req.unbounded then ms = ttl end
  if ms > ttl and ttl > 0 and req.kind ~= 'job' then ms = ttl end
  if ms <= 0 then return nil end
  return ms
end

local function expected_end(req, now)
  local ms = expected_run_ms(req)
  if not ms then return nil end
  return now + ms
end

local function prio_score(priority, created)
  return priority * 1e13 + (1e13 - 1 - created)
end

-- Takes one reference to each of req.services on host h: a running (or stopping) instance is
-- shared; a new one gets the lowest free port of the host's pool and state "starting", and the
-- host's supervisor is woken to start it. services_fit checked the ports in the same script.
local function take_services(req, h, now)
  local k = svc_key(h)
  local used, lo, hi = nil, 9000, 9099
  local wake = false
  for _, name in ipairs(req.services) do
    local raw = rcall('HGET', k, name)
    local e
    if raw then
      e = cjson.decode(raw)
      e.refs = (tonumber(e.refs) or 0) + 1
      e.idle_since = 0
    else
      if used == nil then
        used = {}
        for _, port in ipairs(rcall('HKEYS', svc_ports_key(h))) do used[port] = true end
        local f = rcall('HMGET', host_key(h), 'port_lo', 'port_hi')
        lo, hi = tonumber(f[1] or 9000), tonumber(f[2] or 9099)
      end
      local port = nil
      for n = lo, hi do
        if not used[tostring(n)] then port = n; break end
      end
      if not port then error('LEDGER_CORRUPT: no free service port on host ' .. h .. ' after the check') end
      used[tostring(port)] = true
      rcall('HSET', svc_ports_key(h), port, name)
      e = {port = port, refs = 1, state = 'starting', since = now, idle_since = 0, pid = 0, endpoint = '', error = ''}
      wake = true
    end
    rcall('HSET', k, name, cjson.encode(e))
  end
  if wake then wake_services(h) end
end

-- Index update after a grant on a host that stays schedulable: computed from what the scan
-- read, without reading the host back (p.gidle: the host's idle GPU count when the grant changed
-- it). A host that becomes parked is reindexed in full.
-- A host read from the hash rather than its summary (see host_state_at) is reindexed in full too,
-- which rewrites its summary from the hash.
local function index_after_grant(req, p)
  local h, s = p.host, p.state
  local cpu, ram = s.cpu - req.cpu_millis, s.ramf - req.ram
  if s.parked or s.state ~= 'ready' or cpu <= 0 or ram <= 0 or not s.sum then
    reindex_host(h, nil)
    return
  end
  for i, g in ipairs(p.gpus) do
    local m = gpu_member(h, g.pos)
    local was = p.free[i].free
    local free = was - g.memory_mb
    if free > 0 then
      rcall('ZADD', K_GPU_IDX, free, m)
      local c = ff_class(free)
      if c ~= ff_class(was) then
        -- The GPU moves down a class of gpu_ffc; its ordinal part stays (the summary holds no ord).
        local sc = rcall('ZSCORE', K_GPU_FFC, m)
        if sc then rcall('ZADD', K_GPU_FFC, c * FF_SHIFT + tonumber(sc) % FF_SHIFT, m) end
      end
    else
      rcall('ZREM', K_GPU_IDX, m)
      rcall('ZREM', K_GPU_ORD, m)
      rcall('ZREM', K_GPU_FFC, m)
    end
    if p.free[i].n == 0 then  -- only GPUs with no holder are there
      rcall('ZREM', K_GPU_IDLE, m)
      rcall('ZREM', K_GPU_IDLE_ORD, m)
    end
  end
  if p.gidle ~= nil then
    if p.gidle > 0 then rcall('ZADD', K_IDLE_HOSTS, p.gidle, h) else rcall('ZREM', K_IDLE_HOSTS, h) end
  end
  rcall('ZADD', K_CPU_IDX, cpu, h)
  rcall('ZADD', K_RAM_IDX, ram, h)
  local gs = {}
  for i, g in ipairs(p.gpus) do
    local cur = p.free[i]
    gs[i] = {pos = g.pos, total = cur.total, ext = cur.ext, used = cur.used + g.memory_mb, n = cur.n + 1}
  end
  local cfree = s.cfree
  if p.newmap then cfree = cfree - #p.cores end
  local after = {state = 'ready', cfree = cfree, shared = s.shared + p.shared, ram = s.ram,
    ram_used = s.ram_used + req.ram, ngpu = s.ngpu, parked = false, gen = s.gen, reserve = s.reserve,
    gfree = p.gfree_after, gidle = p.gidle_after, ncores = s.ncores}
  if not patch_summary(h, after, gs, s.sum) then reindex_host(h, nil) end
end

local function grant(req, p, now)
  local h = p.host
  local hk = host_key(h)
  -- One write of the host's counters, from the values try_place read in this same script (one
  -- redis.call costs about as much as entering a trivial script).
  local s = p.state
  local out = {}
  local gm, idle = gpu_totals_of(h, s)
  local idle_was = idle
  for i, g in ipairs(p.gpus) do
    local cur = p.free[i]
    -- A slice records its GPU's memory, so that the history can charge it its share of a GPU.
    if not g.whole then g.total = cur.total end
    out[#out + 1] = 'g' .. g.pos .. ':used'
    out[#out + 1] = cur.used + g.memory_mb
    out[#out + 1] = 'g' .. g.pos .. ':n'
    out[#out + 1] = cur.n + 1
    local left = cur.free - g.memory_mb
    if left < 0 then left = 0 end
    gm = gm - milli_free(cur.total, cur.ext, cur.free) + milli_free(cur.total, cur.ext, left)
    if cur.n == 0 and cur.free > 0 then idle = idle - 1 end
  end
  if #p.gpus > 0 then
    out[#out + 1] = 'gfree'; out[#out + 1] = gm
    out[#out + 1] = 'gidle'; out[#out + 1] = idle
    if idle ~= idle_was then p.gidle = idle end
  end
  p.gfree_after, p.gidle_after = gm, idle
  if p.newmap then
    out[#out + 1] = 'cmap'
    out[#out + 1] = p.newmap
    out[#out + 1] = 'cfree'
    out[#out + 1] = s.cfree - #p.cores
  end
  if p.shared > 0 then out[#out + 1] = 'shared'; out[#out + 1] = s.shared + p.shared end
  if req.ram > 0 then out[#out + 1] = 'ram_used'; out[#out + 1] = s.ram_used + req.ram end
  if #out > 0 then rcall('HSET', hk, unpack(out)) end
  if req.slots then rcall('HINCRBY', hk, 'slots_used', req.slots) end
  if req.services then take_services(req, h, now) end
  rcall('SADD', host_allocs_key(h), req.id)
  index_after_grant(req, p)

  local created = tonumber(req.created or now)
  local expires = 0
  if req.ttl_ms > 0 then expires = now + req.ttl_ms end
  local gpus_json, cores_json = cjson.encode(p.gpus), cjson.encode(p.cores)
  local rec = {id = req.id, task_id = req.task_id, task_type = req.task_type, owner = req.owner,
    priority = tostring(req.priority), strategy = req.strategy_name, state = 'active', host = h,
    host_gen = tostring(p.gen), gpus = gpus_json, cores = cores_json, cpos = cjson.encode(p.cpos),
    cver = p.cver or '', shared_millis = tostring(p.shared), ram_mb = tostring(req.ram),
    created = tostring(created), activated = tostring(now), ttl_ms = tostring(req.ttl_ms),
    expires = tostring(expires), kind = req.kind or 'lease'}
  -- What the estimates need to tell a hint from a TTL in the ends index, and a job's wait for a
  -- worker (its TTL while unclaimed, when it has no time limit) from its run.
  if tonumber(req.expected_ms or 0) > 0 then rec.expected_ms = tostring(req.expected_ms) end
  if req.unbounded then rec.unbounded = '1' end
  local held = ''
  if req.slots then rec.slots = tostring(req.slots); held = ',"slots":' .. req.slots end
  if req.services then
    rec.services = cjson.encode(req.services)
    held = held .. ',"services":' .. rec.services
  end
  local fields = alloc_to_list(rec)
  -- request and metadata arrive as raw JSON text (place) or are already on the record (queued
  -- tasks): stored and streamed as they are, never re-encoded.
  local extra = {}
  if req.request then
    fields[#fields + 1] = 'request'; fields[#fields + 1] = req.request
    fields[#fields + 1] = 'metadata'; fields[#fields + 1] = req.metadata
    extra = {'request', req.request, 'metadata', req.metadata}
  end
  rcall('HSET', alloc_key(req.id), unpack(fields))
  rcall('ZADD', K_ALLOCS, created, req.id)
  rcall('ZADD', K_ACTIVE, created, req.id)
  if expires > 0 then rcall('ZADD', K_EXPIRY, expires, req.id) end
  local ends = expected_end(req, now)
  if ends then rcall('ZADD', K_ENDS, ends, req.id) end
  rcall('ZADD', K_BYPRIO, prio_score(req.priority, now), req.id)
  emit('allocated', req.id, now, '{"host":' .. cjson.encode(h) .. ',"host_gen":' .. p.gen ..
    ',"task_id":' .. cjson.encode(req.task_id) .. ',"task_type":' .. cjson.encode(req.task_type) ..
    ',"owner":' .. cjson.encode(req.owner) .. ',"priority":' .. req.priority ..
    ',"strategy":' .. cjson.encode(req.strategy_name or '') .. ',"gpus":' .. gpus_json ..
    ',"cores":' .. cores_json .. ',"shared_millis":' .. p.shared .. ',"ram_mb":' .. req.ram ..
    ',"ttl_ms":' .. req.ttl_ms .. ',"expires":' .. expires .. ',"created":' .. created ..
    ',"kind":"' .. rec.kind .. '"' .. held .. '}', extra)
  return rec
end
