--[[ place_on: commit a placement chosen outside the ledger (an allocation policy) on one host,
optionally on GPUs it named, after re-checking that they still fit.
KEYS: the ledger's fixed keys (see includes/ledger.lua).
ARGV[1] key prefix, ARGV[2] clock override ms ("" = server TIME),
ARGV[3] request JSON: the place payload of place.lua (id, priority, strategy, gpus, gpu_mem, ...),
ARGV[4] the validated request as JSON text, ARGV[5] metadata as JSON text (both stored as given),
ARGV[6] host id the policy chose,
ARGV[7] JSON list of the GPUs it chose on that host: GPU indexes (numbers) or uuids (strings);
        [] = the request's strategy picks the GPUs on that host,
ARGV[8] "1" = yield to the line: refuse with QUEUE_AHEAD while a task of the same or a higher
        priority is waiting (the caller then puts the request in line), "0" = place beside the
        line as place.lua does: QUEUE_AHEAD only when the chosen host is the one the first
        waiting task of the same or a higher priority has its reservation on, and the request
        is not expected to end before that task's start.
Idempotent by id: an id that exists returns that record (existing = true).
Expired leases are reaped first (and a scheduling pass gives the line what they freed); then
all checks happen before the next write, and a refusal writes nothing more. Refusal codes:
HOST_NOT_FOUND, HOST_NOT_READY, INVALID_GPU_CHOICE (the choice can never be right: unknown GPU,
duplicate, wrong count), QUEUE_AHEAD, RECOVERING, and for capacity that is not free now
INSUFFICIENT_CPU, INSUFFICIENT_RAM, INSUFFICIENT_GPU_MEMORY, INSUFFICIENT_GPUS, NO_FIT.
Returns JSON {ok=true, alloc{...}} | {ok=false, code, message, details{}}.
]]
--- @include "ledger"
--- @include "placement"
--- @include "queue"
--- @lazy schedule_pass line_reservation delays_head queue_ahead

local req = cjson.decode(ARGV[3])
req.request, req.metadata = ARGV[4], ARGV[5]
local h = ARGV[6]
local want = cjson.decode(ARGV[7])
local yield_to_line = ARGV[8] == '1'
local now = now_ms()

local function refuse(code, message, details)
  return cjson.encode({ok = false, code = code, message = message, details = details or {}})
end

if rcall('EXISTS', alloc_key(req.id)) == 1 then
  return cjson.encode({ok = true, existing = true, alloc = read_alloc(req.id)})
end
if rcall('HGET', K_SEQ, 'recovering') == '1' then
  return refuse('RECOVERING', 'the ledger is being rebuilt after a loss of Redis data; no placements until it is consistent')
end
-- Expired leases go first, and what they free goes to the tasks in line, as after any release:
-- before anything of the host is read, so that what the checks below see is what grant writes
-- over (a pass can take the very GPUs the policy chose).
if #reap_expired(now, 8) > 0 then
  schedule_pass(now, tonumber(req.pass_depth or 0), req.scan_cap)
end
if yield_to_line then
  -- Pending scores below (4 - p) * 2^42 belong to tasks of priority p or higher.
  local top = string.format('%.0f', (4 - req.priority) * 4398046511104)
  local ahead = tonumber(rcall('ZCOUNT', K_PENDING, '-inf', '(' .. top))
  -- A task that waits out its retry interval holds nothing up (see K_DELAYED in includes/queue.lua).
  for _, d in ipairs(rcall('ZRANGEBYSCORE', K_DELAYED, '(' .. now, '+inf')) do
    local sc = rcall('ZSCORE', K_PENDING, d)
    if sc and tonumber(sc) < tonumber(top) then ahead = ahead - 1 end
  end
  if ahead > 0 then
    return refuse('QUEUE_AHEAD', ahead .. ' task(s) of the same or a higher priority are waiting', {waiting = ahead})
  end
end

local resv, outranks
if not yield_to_line and rcall('ZCARD', K_PENDING) > 0 then
  local head
  resv, head, outranks = line_reservation(req, now)
  if resv and delays_head(req, h, resv, now) then return cjson.encode(queue_ahead(head, resv)) end
end

local s = host_state(h)
if not s then return refuse('HOST_NOT_FOUND', 'host ' .. h .. ' is not registered') end
if s.state ~= 'ready' then
  return refuse('HOST_NOT_READY', 'host ' .. h .. ' is ' .. s.state .. ' and takes no new work')
end
if req.selector and not labels_match(req.selector, s.labels) then
  return refuse('NO_FIT', 'host ' .. h .. ' does not match the selector')
end
if s.parked then
  return refuse('NO_FIT', 'host ' .. h .. ' has no free CPU or RAM and takes no new work')
end
if s.cpu < req.cpu_millis then
  return refuse('INSUFFICIENT_CPU', 'insufficient CPU on host ' .. h .. ': requested ' .. fmt_cores(req.cpu_millis) ..
    ' cores, free ' .. fmt_cores(s.cpu), {free_cpu_cores = s.cpu / 1000})
end
if s.ramf < req.ram then
  return refuse('INSUFFICIENT_RAM', 'insufficient RAM on host ' .. h .. ': requested ' .. req.ram .. ' MiB, free ' .. s.ramf .. ' MiB',
    {free_ram_mb = s.ramf})
end

-- Explicit GPU choice: every GPU must exist on the host, be named once, and fit now.
local chosen = nil
if type(want) == 'table' and #want > 0 and req.gpus == 0 then
  return refuse('INVALID_GPU_CHOICE', 'the policy chose GPUs but the request needs none')
elseif type(want) == 'table' and #want > 0 then
  if #want ~= req.gpus then
    return refuse('INVALID_GPU_CHOICE', 'the policy chose ' .. #want .. ' GPU(s) but the request needs ' .. req.gpus)
  end
  chosen = {}
  local seen = {}
  local idle_taken = 0
  for _, w in ipairs(want) do
    local g = nil
    for p = 0, s.ngpu - 1 do
      local c = gpu_state(h, p)
      if c and ((type(w) == 'number' and c.idx == w) or (type(w) == 'string' and c.uuid == w)) then g = c; break end
    end
    if not g then return refuse('INVALID_GPU_CHOICE', 'host ' .. h .. ' has no GPU ' .. tostring(w)) end
    if seen[g.pos] then return refuse('INVALID_GPU_CHOICE', 'GPU ' .. tostring(w) .. ' was chosen twice') end
    seen[g.pos] = true
    if req.models and req.models[g.model] ~= true then
      return refuse('INVALID_GPU_CHOICE', 'GPU ' .. g.idx .. ' on host ' .. h .. ' is a ' .. g.model .. ', not a requested model')
    end
    if not gpu_fits(req, g) then
      if req.gpu_mem == 0 then
        return refuse('INSUFFICIENT_GPUS', 'GPU ' .. g.idx .. ' on host ' .. h .. ' is not idle (' .. g.n .. ' holder(s))',
          {gpu = g.idx, holders = g.n})
      end
      return refuse('INSUFFICIENT_GPU_MEMORY', 'insufficient GPU memory on GPU ' .. g.idx .. ' of host ' .. h ..
        ': requested ' .. req.gpu_mem .. ' MiB, free ' .. g.free .. ' MiB', {gpu = g.idx, free_mb = g.free})
    end
    if g.n == 0 then idle_taken = idle_taken + 1 end
    chosen[#chosen + 1] = g
  end
  local allowance = idle_allowance(req, h, s)
  if allowance ~= nil and idle_taken > allowance then
    return refuse('INSUFFICIENT_GPUS', 'host ' .. h .. ' keeps its idle GPUs for critical-priority work')
  end
end

req.only, req.exclude = h, nil
local p = try_place(req, now)
if not p then
  local what = {}
  if req.gpus > 0 then what[#what + 1] = req.gpus .. ' GPU(s) (' .. (req.gpu_mem == 0 and 'whole' or (req.gpu_mem .. ' MiB free')) .. ')' end
  what[#what + 1] = fmt_cores(req.cpu_millis) .. ' cores'
  what[#what + 1] = req.ram .. ' MiB RAM'
  local code = 'NO_FIT'
  if req.gpus > 0 then code = req.gpu_mem == 0 and 'INSUFFICIENT_GPUS' or 'INSUFFICIENT_GPU_MEMORY' end
  return refuse(code, 'host ' .. h .. ' does not have ' .. table.concat(what, ', ') .. ' free at once')
end
if chosen then
  -- grant writes the counters from these values, read after the reaper and the pass above.
  local grants = {}
  for i, g in ipairs(chosen) do grants[i] = gpu_grant(req, g) end
  p.gpus, p.free = grants, chosen
end
-- As place_beside_line in includes/queue.lua: a placement that may move the head's reservation
-- unsettles the line.
if outranks or (resv and resv.host == h) then rcall('HSET', K_SEQ, 'line_unsettled', '1') end
return cjson.encode({ok = true, alloc = grant(req, p, now)})
