--[[ service_state: the host's service supervisor reports what it did with a named service.
KEYS: the ledger's fixed keys (see includes/ledger.lua).
ARGV[1] key prefix, ARGV[2] clock override ms ("" = server TIME), ARGV[3] host id,
ARGV[4] service name, ARGV[5] action, ARGV[6] JSON {port, pid, endpoint, error, idle_ms},
ARGV[7] scheduling pass depth (after "failed", "stopped" and "drop", which free a port; 0 = none),
ARGV[8] scan cap.
Every action names the port the supervisor acted on; an entry on another port (it was dropped
and handed out again meanwhile) is left alone and the reply says ok=false, reason "gone".
Actions:
  launched while starting: the process the supervisor just started (pid, created = its start time
           as psutil reports it), so that a supervisor restarted meanwhile can stop it rather than
           find its port taken by it.
  running  starting -> running, with pid (and created) and endpoint; event service_running.
  failed   the service did not start (or died and could not be restarted): every active
           allocation of the host holding it fails (state failed, field error, all it held freed,
           its other services dereferenced), the entry is dropped and its port freed; event
           service_failed; then a scheduling pass.
  restart  running -> starting (the process died while held; the supervisor starts it again).
  stop     claims an idle instance for stopping: only with no references and idle for at least
           idle_ms; running|starting -> stopping.
  stopped  after the process is gone: dropped with its port when still unreferenced, else
           (a grant took it while it was stopping) back to starting on the same port.
  drop     forgets an unreferenced instance (never started, or found dead).
Returns JSON {ok, reason?, state?, failed[]?, restart?}.
]]
--- @include "ledger"
--- @include "placement"
--- @include "queue"

local now = now_ms()
local h, name, action = ARGV[3], ARGV[4], ARGV[5]
local args = cjson.decode(ARGV[6])
local k = svc_key(h)
local raw = rcall('HGET', k, name)
if not raw then return cjson.encode({ok = false, reason = 'gone'}) end
local e = cjson.decode(raw)
if args.port ~= nil and tonumber(args.port) ~= tonumber(e.port) then
  return cjson.encode({ok = false, reason = 'gone'})
end
local refs = tonumber(e.refs) or 0

local function save(state)
  e.state, e.since = state, now
  rcall('HSET', k, name, cjson.encode(e))
end

-- A port (and, after a failure, what the failed allocations held) came free: the tasks in line
-- get it now, as after any release.
local function pass_after_freeing()
  schedule_pass(now, tonumber(ARGV[7] or 0), tonumber(ARGV[8] or 2048))
end

local function svc_event(kind, extra)
  local d = {name = name, port = tonumber(e.port), refs = refs}
  for key, v in pairs(extra or {}) do d[key] = v end
  emit(kind, h, now, cjson.encode(d))
end

if action == 'launched' then
  if e.state ~= 'starting' then return cjson.encode({ok = false, reason = 'state', state = e.state}) end
  e.pid, e.created = tonumber(args.pid) or 0, tonumber(args.created) or 0
  rcall('HSET', k, name, cjson.encode(e))
  return cjson.encode({ok = true, state = 'starting'})
elseif action == 'running' then
  if e.state ~= 'starting' then return cjson.encode({ok = false, reason = 'state', state = e.state}) end
  e.pid, e.endpoint, e.error = tonumber(args.pid) or 0, args.endpoint or '', ''
  if args.created then e.created = tonumber(args.created) end
  save('running')
  svc_event('service_running', {endpoint = e.endpoint, pid = e.pid})
  return cjson.encode({ok = true, state = 'running'})
elseif action == 'failed' then
  local msg = 'service ' .. name .. ' failed on host ' .. h .. ': ' .. tostring(args.error or 'unknown error')
  remove_service(h, name, e)
  local failed = {}
  for _, id in ipairs(rcall('SMEMBERS', host_allocs_key(h))) do
    local f = rcall('HMGET', alloc_key(id), 'state', 'services')
    if f[1] == 'active' and f[2] then
      for _, n in ipairs(decode_list(f[2])) do
        if n == name then failed[#failed + 1] = id; break end
      end
    end
  end
  table.sort(failed)
  for _, id in ipairs(failed) do
    rcall('HSET', alloc_key(id), 'error', msg)
    finish_alloc(id, 'failed', now)
  end
  svc_event('service_failed', {error = tostring(args.error or ''), failed = failed})
  pass_after_freeing()
  return cjson.encode({ok = true, failed = failed})
elseif action == 'restart' then
  if e.state ~= 'running' then return cjson.encode({ok = false, reason = 'state', state = e.state}) end
  e.pid, e.endpoint, e.error = 0, '', tostring(args.error or '')
  save('starting')
  svc_event('service_restarting', {error = e.error})
  return cjson.encode({ok = true, state = 'starting'})
elseif action == 'stop' then
  local idle = tonumber(e.idle_since) or 0
  if refs > 0 or (e.state ~= 'running' and e.state ~= 'starting') or now - idle < tonumber(args.idle_ms or 0) then
    return cjson.encode({ok = false, reason = 'busy', state = e.state})
  end
  save('stopping')
  return cjson.encode({ok = true, state = 'stopping'})
elseif action == 'stopped' then
  if refs > 0 then
    e.pid, e.endpoint = 0, ''
    save('starting')
    return cjson.encode({ok = true, restart = true, state = 'starting'})
  end
  remove_service(h, name, e)
  svc_event('service_stopped', {})
  pass_after_freeing()
  return cjson.encode({ok = true, state = 'stopped'})
elseif action == 'drop' then
  if refs > 0 then return cjson.encode({ok = false, reason = 'busy', state = e.state}) end
  remove_service(h, name, e)
  svc_event('service_stopped', {dropped = true})
  pass_after_freeing()
  return cjson.encode({ok = true, state = 'stopped'})
end
return cjson.encode({ok = false, reason = 'unknown action ' .. tostring(action)})
