--[[ drain_host: stop (or resume) new placements on a host; running allocations are untouched.
KEYS: the ledger's fixed keys (see includes/ledger.lua).
ARGV[1] key prefix, ARGV[2] clock override ms, ARGV[3] host id, ARGV[4] "drain" | "resume" |
"agent_drain" (the host's agent draining it as it stops: field drained_by = "agent", so that its
next start knows the drain was its own and resumes the host; "drain" sets drained_by =
"operator", "resume" clears it) |
"agent_resume" (that next start: resumes only a drain that is still the agent's, checked here,
so that an operator's drain made meanwhile stays) |
"restore" (allocator recover: an operator's drain the history has, applied to the rebuilt
ledger: a ready host drains; a draining or lost one becomes the operator's, so that the
operator must resume it and a lost one comes back draining; a host not registered gets it at
its registration, through drain_on_register) |
"end_agent_drain" (allocator recover: an agent's drain the history has; the ledger that held it
is gone and the agent's next registration starts the host ready, so a host not registered, or
ready, is announced resumed; any other state is left to the events it already had),
ARGV[5] scheduling pass depth after a resume (0 = none), ARGV[6] scan cap.
A "resume" of a host not registered withdraws a drain waiting for it in drain_on_register.
Emits host_draining (data {by = drained_by}) when the host starts draining or an operator takes
over its drain, host_resumed when it resumes or a waiting or ended drain is withdrawn.
Returns JSON {ok, state} (state "unregistered" for a host not registered that the call
concerned) or {ok=false, code="HOST_NOT_FOUND" | "HOST_LOST"}.
]]
--- @include "ledger"
--- @include "placement"
--- @include "queue"

local now = now_ms()
local h = ARGV[3]
local mode = ARGV[4]
local hk = host_key(h)
local state = rcall('HGET', hk, 'state')
if not state then
  if mode == 'restore' then
    rcall('HSET', K_DRAIN_ON_REGISTER, h, 'operator')
    return cjson.encode({ok = true, state = 'unregistered'})
  end
  if mode == 'end_agent_drain' or (mode == 'resume' and rcall('HDEL', K_DRAIN_ON_REGISTER, h) == 1) then
    emit('host_resumed', h, now, '{}')
    return cjson.encode({ok = true, state = 'unregistered'})
  end
  return cjson.encode({ok = false, code = 'HOST_NOT_FOUND', message = 'host ' .. h .. ' is not registered'})
end
if mode == 'end_agent_drain' then
  if state == 'ready' then emit('host_resumed', h, now, '{}') end
  return cjson.encode({ok = true, state = state})
end
if mode == 'restore' and state ~= 'ready' then
  -- Draining or lost: the drain becomes the operator's (a lost host's registration then keeps it).
  if rcall('HGET', hk, 'drained_by') ~= 'operator' then
    rcall('HSET', hk, 'drained_by', 'operator')
    emit('host_draining', h, now, '{"by":"operator"}')
  end
  return cjson.encode({ok = true, state = state})
end
if mode == 'restore' then mode = 'drain' end
if state == 'lost' then
  -- A lost host comes back only by registering again (which starts a new generation and so
  -- fences its old grants); drain/resume must not revive it under the old one.
  return cjson.encode({ok = false, code = 'HOST_LOST', message = 'host ' .. h .. ' is lost; its agent must register it again'})
end
if mode == 'agent_resume' and (state ~= 'draining' or rcall('HGET', hk, 'drained_by') ~= 'agent') then
  return cjson.encode({ok = true, state = state})
end
local target = 'draining'
if mode == 'resume' or mode == 'agent_resume' then target = 'ready' end
local was_by = rcall('HGET', hk, 'drained_by')
if mode == 'drain' then
  -- An operator's: kept through a loss of the host (register_host restores it) and the agent's
  -- stop (the agent leaves such a host registered), until the operator resumes it.
  rcall('HSET', hk, 'drained_by', 'operator')
elseif mode == 'agent_drain' then
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
