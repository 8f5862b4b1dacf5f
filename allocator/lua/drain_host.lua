--[[ drain_host: stop (or resume) new placements on a host; running allocations are untouched.
KEYS: the ledger's fixed keys (see includes/ledger.lua).
ARGV[1] key prefix, ARGV[2] clock override ms, ARGV[3] host id, ARGV[4] "drain" | "resume" |
"agent_drain" (the host's agent draining it as it stops: field drained_by = "agent", so that its
next start knows the drain was its own and resumes the host; "drain" sets drained_by =
"operator", "resume" clears it) |
"agent_resume" (that next start: resumes only a drain that is still the agent's, checked here,
so that an operator's drain made meanwhile stays),
ARGV[5] scheduling pass depth after a resume (0 = none), ARGV[6] scan cap.
Emits host_draining (data {by = drained_by}) when the host starts draining or an operator takes
over its agent's drain, host_resumed when it resumes.
Returns JSON {ok, state} or {ok=false, code="HOST_NOT_FOUND"}.
]]
--- @include "ledger"
--- @include "placement"
--- @include "queue"

local now = now_ms()
local h = ARGV[3]
local hk = host_key(h)
local state = rcall('HGET', hk, 'state')
if not state then
  return cjson.encode({ok = false, code = 'HOST_NOT_FOUND', message = 'host ' .. h .. ' is not registered'})
end
if state == 'lost' then
  -- A lost host comes back only by registering again (which starts a new generation and so
  -- fences its old grants); drain/resume must not revive it under the old one.
  return cjson.encode({ok = false, code = 'HOST_LOST', message = 'host ' .. h .. ' is lost; its agent must register it again'})
end
if ARGV[4] == 'agent_resume' and (state ~= 'draining' or rcall('HGET', hk, 'drained_by') ~= 'agent') then
  return cjson.encode({ok = true, state = state})
end
local target = 'draining'
if ARGV[4] == 'resume' or ARGV[4] == 'agent_resume' then target = 'ready' end
local was_by = rcall('HGET', hk, 'drained_by')
if ARGV[4] == 'drain' then
  -- An operator's: kept through a loss of the host (register_host restores it) and the agent's
  -- stop (the agent leaves such a host registered), until the operator resumes it.
  rcall('HSET', hk, 'drained_by', 'operator')
elseif ARGV[4] == 'agent_drain' then
  if state ~= 'draining' then rcall('HSET', hk, 'drained_by', 'agent') end  -- an operator's stays theirs
else
  rcall('HDEL', hk, 'drained_by')
end
local by = rcall('HGET', hk, 'drained_by')
if state ~= target then
  rcall('HSET', hk, 'state', target)
  -- reindex_host compares against the previous schedulability, which it reads from parked/state;
  -- walk every GPU since schedulability changed.
  local touched_all = nil
  reindex_host(h, touched_all)
end
-- The history records who drained (allocator recover re-applies the drain as theirs), also when
-- an operator takes over a drain its agent began.
if target == 'draining' and (state ~= target or by ~= was_by) then
  emit('host_draining', h, now, cjson.encode({by = by}))
elseif state ~= target then
  emit('host_resumed', h, now, '{}')
  schedule_pass(now, tonumber(ARGV[5] or 0), tonumber(ARGV[6] or 2048))
end
return cjson.encode({ok = true, state = target})
