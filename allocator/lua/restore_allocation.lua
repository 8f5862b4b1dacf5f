--[[ restore_allocation: put active allocations read from the durable history back into the ledger
after Redis lost its data (allocator recover). Only while the recovery gate is open.
KEYS: the ledger's fixed keys (see includes/ledger.lua); the ends and byprio indexes are filled
with includes/placement.lua's expected_end and prio_score, exactly as a placement fills them.
ARGV[1] key prefix, ARGV[2] clock override ms ("" = server TIME),
ARGV[3] JSON list of records {id, task_id, task_type, owner, priority (0..3), strategy, host,
        host_gen, gpus[{pos, index, uuid, model, memory_mb}], cores[], shared_millis, ram_mb,
        created, activated (ms), ttl_ms, expires (ms, 0 = none), metadata (JSON text),
        request (JSON text), kind, requeues, slots (worker slots held, 0 = none),
        ended (absent, or the release reason of a function task not to restore: see recover.py)}.
For each record:
- an allocation id the ledger already holds is left alone ("existing"), so a rerun is harmless;
- one with "ended" is written as released with that reason, with a released event ("ended");
- on a registered host the grant is checked against what is free (GPU by uuid, since a
  re-registration may reorder GPUs; exclusive cores; shared pool; RAM; worker slots) and applied
  exactly as a placement would ("restored"); a grant that no longer fits is written as ended with reason
  "recovery_conflict" and a released event, so history closes it ("conflicts");
- on a host not registered yet the record and the host's allocation set are written and nothing
  else ("deferred"): register_host recomputes a host's usage from its active allocations, so the
  grant is counted when the agent registers the host.
- on a host declared lost meanwhile (its agent re-registered it, then stopped reporting) the grant
  is a conflict too: the reaper has freed what the host held, and the host comes back under a
  new generation that fences it;
- a restored grant whose host_gen is above the host's generation raises the host's gen to it
  (and its scan summary): the grant was made after the host came back from "lost", and a host
  restored at gen 1 would fence it as stale (workers refuse to start it, the reaper frees it).
Named-service references (the allocation's services) are not restored: see docs/history.md.
An expired lease is restored as it was; the next placement or expire() reaps it with a released
event. Each restored record appends a "restored" event.
Returns JSON {ok=true, restored[], deferred[], existing[], conflicts[{id, reason}], ended[]}
        | {ok=false, code="NOT_RECOVERING", message}.
]]
--- @include "ledger"
--- @include "placement"

local now = now_ms()
if rcall('HGET', K_SEQ, 'recovering') ~= '1' then
  return cjson.encode({ok = false, code = 'NOT_RECOVERING',
    message = 'allocations can be restored only while the recovery gate is open (allocator recover)'})
end

local restored, deferred, existing, conflicts, ended = {}, {}, {}, {}, {}

-- Where each grant of r lies on host h now, or nil and the reason it does not fit.
local function check_grant(r, h, s)
  local hk = host_key(h)
  local pos_by_uuid = {}
  for p = 0, s.ngpu - 1 do
    local u = rcall('HGET', hk, 'g' .. p .. ':uuid')
    if u then pos_by_uuid[u] = p end
  end
  local gpus = {}
  for i, g in ipairs(r.gpus) do
    local p = pos_by_uuid[g.uuid]
    if p == nil then return nil, 'GPU ' .. tostring(g.uuid) .. ' is not on host ' .. h end
    local st = gpu_state(h, p)
    if st.free < tonumber(g.memory_mb) then
      return nil, 'GPU ' .. g.uuid .. ' has ' .. st.free .. ' MiB free, the grant holds ' .. g.memory_mb
    end
    local mem = tonumber(g.memory_mb)
    -- A whole GPU holds all the memory other processes leave it (register_host may have grown
    -- the grant after the history recorded it): restored at less, the rest would be shareable.
    if g.whole == true and st.free > mem then mem = st.free end
    gpus[i] = {pos = p, index = st.idx, uuid = g.uuid, model = st.model, memory_mb = mem, whole = g.whole == true or nil}
  end
  local newmap = nil
  if #r.cores > 0 then
    local f = rcall('HMGET', hk, 'cores', 'cmap')
    local at = core_positions(decode_list(f[1]))
    local chars = {}
    for i = 1, #f[2] do chars[i] = string.sub(f[2], i, i) end
    for _, c in ipairs(r.cores) do
      local i = at[tostring(c)]
      if i == nil then return nil, 'core ' .. tostring(c) .. ' is not on host ' .. h end
      if chars[i] ~= '1' then return nil, 'core ' .. tostring(c) .. ' on host ' .. h .. ' is already held' end
      chars[i] = '0'
    end
    newmap = table.concat(chars)
  end
  local shared = tonumber(r.shared_millis or 0)
  if (s.cfree - #r.cores) * 1000 - s.shared - shared < 0 then
    return nil, 'host ' .. h .. ' has too little free CPU for the grant'
  end
  if s.ramf < tonumber(r.ram_mb or 0) then
    return nil, 'host ' .. h .. ' has ' .. s.ramf .. ' MiB RAM free, the grant holds ' .. r.ram_mb
  end
  local slots = tonumber(r.slots or 0) or 0
  if slots > 0 and host_slots(h, s) < slots then
    return nil, 'host ' .. h .. ' has ' .. s.slotf .. ' worker slots free, the grant holds ' .. slots
  end
  return {gpus = gpus, newmap = newmap, shared = shared}
end

local function apply_grant(r, h, g)
  local hk = host_key(h)
  local touched = {}
  for i, x in ipairs(g.gpus) do
    rcall('HINCRBY', hk, 'g' .. x.pos .. ':used', x.memory_mb)
    rcall('HINCRBY', hk, 'g' .. x.pos .. ':n', 1)
    touched[i] = x.pos
  end
  if g.newmap then
    rcall('HSET', hk, 'cmap', g.newmap)
    rcall('HINCRBY', hk, 'cfree', -#r.cores)
  end
  if g.shared > 0 then rcall('HINCRBY', hk, 'shared', g.shared) end
  local ram = tonumber(r.ram_mb or 0)
  if ram > 0 then rcall('HINCRBY', hk, 'ram_used', ram) end
  local slots = tonumber(r.slots or 0) or 0
  if slots > 0 then rcall('HINCRBY', hk, 'slots_used', slots) end
  -- A grant made under a later generation than the host has now: raise the host to it, so the
  -- grant stays current (reindex_host below rewrites the summary, which carries gen).
  if tonumber(r.host_gen or 1) > tonumber(rcall('HGET', hk, 'gen') or 1) then
    rcall('HSET', hk, 'gen', tonumber(r.host_gen))
  end
  rcall('SADD', host_allocs_key(h), r.id)
  reindex_host(h, touched)
end

local function record(r, gpus, state, reason)
  local created = tonumber(r.created)
  local activated = tonumber(r.activated or created)
  local rec = {id = r.id, task_id = r.task_id or '', task_type = r.task_type or '', owner = r.owner or '',
    priority = tostring(r.priority), strategy = r.strategy or '', state = state, host = r.host,
    host_gen = tostring(r.host_gen or 1), gpus = cjson.encode(gpus), cores = cjson.encode(r.cores),
    shared_millis = tostring(r.shared_millis or 0), ram_mb = tostring(r.ram_mb or 0),
    created = tostring(created), activated = tostring(activated), ttl_ms = tostring(r.ttl_ms or 0),
    expires = tostring(r.expires or 0), metadata = r.metadata or '{}', request = r.request or '{}',
    kind = r.kind or 'lease', requeues = tostring(r.requeues or 0)}
  local slots = tonumber(r.slots or 0) or 0
  if slots > 0 then rec.slots = tostring(slots) end
  -- As grant writes it: the estimates tell a hint from a TTL by it.
  if tonumber(r.expected_ms or 0) > 0 then rec.expected_ms = tostring(r.expected_ms) end
  if state ~= 'active' then
    rec.released = tostring(now)
    rec.reason = reason or 'recovery_conflict'
  end
  rcall('HSET', alloc_key(r.id), unpack(alloc_to_list(rec)))
  rcall('ZADD', K_ALLOCS, created, r.id)
  if state == 'active' then
    rcall('ZADD', K_ACTIVE, created, r.id)
    local expires = tonumber(r.expires or 0)
    if expires > 0 then rcall('ZADD', K_EXPIRY, expires, r.id) end
    -- Same expected end and preemption order as a placement (includes/placement.lua).
    local ends = expected_end({task_type = r.task_type, expected_ms = r.expected_ms, ttl_ms = r.ttl_ms, kind = r.kind}, activated)
    -- An end that is the TTL deadline is the deadline as its worker's claim left it (claim_grant.lua
    -- moves it, or removes it for a job without a time limit).
    local ttl = tonumber(r.ttl_ms or 0) or 0
    if ends and ttl > 0 and ends == activated + ttl then
      if expires > 0 then ends = expires else ends = nil end
    end
    if ends then rcall('ZADD', K_ENDS, ends, r.id) end
    rcall('ZADD', K_BYPRIO, prio_score(tonumber(r.priority), activated), r.id)
  else
    rcall('ZADD', K_DONE, now, r.id)
  end
  return rec
end

-- Lists arrive as JSON lists, or as JSON text of one; an empty list may come as {}.
local function as_list(v)
  if type(v) == 'table' then return v end
  return decode_list(v)
end

for _, r in ipairs(cjson.decode(ARGV[3])) do
  r.gpus = as_list(r.gpus)
  r.cores = as_list(r.cores)
  if rcall('EXISTS', alloc_key(r.id)) == 1 then
    existing[#existing + 1] = r.id
  elseif r.ended then
    -- A function task whose run ended while Redis was without its data, or that can never start:
    -- its record is closed, so that its grant is not held until its TTL.
    record(r, r.gpus, 'released', r.ended)
    ended[#ended + 1] = r.id
    emit('released', r.id, now, cjson.encode({host = r.host, task_id = r.task_id or '', state = 'released',
      reason = r.ended, created = tonumber(r.created), activated = tonumber(r.activated or r.created)}))
  else
    local s = host_state(r.host)
    if s == nil then
      record(r, r.gpus, 'active')
      rcall('SADD', host_allocs_key(r.host), r.id)
      deferred[#deferred + 1] = r.id
      emit('restored', r.id, now, cjson.encode({host = r.host, deferred = true}))
    else
      local g, why = nil, 'host ' .. r.host .. ' was declared lost'
      if s.state ~= 'lost' then g, why = check_grant(r, r.host, s) end
      if g then
        apply_grant(r, r.host, g)
        record(r, g.gpus, 'active')
        restored[#restored + 1] = r.id
        emit('restored', r.id, now, cjson.encode({host = r.host, deferred = false}))
      else
        record(r, r.gpus, 'released')
        conflicts[#conflicts + 1] = {id = r.id, reason = why}
        emit('released', r.id, now, cjson.encode({host = r.host, task_id = r.task_id or '', state = 'released',
          reason = 'recovery_conflict', detail = why, created = tonumber(r.created),
          activated = tonumber(r.activated or r.created)}))
      end
    end
  end
end
-- cjson encodes an empty table as {}; callers read {} as an empty list.
return cjson.encode({ok = true, restored = restored, deferred = deferred, existing = existing, conflicts = conflicts,
  ended = ended})
