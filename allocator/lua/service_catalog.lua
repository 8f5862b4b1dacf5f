--[[ service_catalog: publish (or withdraw) the named services a host's agent can run.
KEYS: the ledger's fixed keys (see includes/ledger.lua).
ARGV[1] key prefix, ARGV[2] clock override ms ("" = server TIME), ARGV[3] host id,
ARGV[4] catalog JSON {name: {idle_timeout_s, start_timeout_s}} ({} = withdraw every name).
Only names and timeouts reach the ledger: commands stay in the operator's file on the host, so
nothing a request sends can choose what runs. svc_names counts, per name, the hosts offering it
(placement refuses names no host offers). A host that is not registered gets no catalog
(HOST_NOT_FOUND) unless the catalog is empty.
Returns JSON {ok, added[], removed[]} or {ok=false, code, message}.
]]
--- @include "ledger"

local now = now_ms()
local h = ARGV[3]
local cat = cjson.decode(ARGV[4])
local ck = svc_catalog_key(h)
local has_names = next(cat) ~= nil
if has_names and rcall('EXISTS', host_key(h)) == 0 then
  return cjson.encode({ok = false, code = 'HOST_NOT_FOUND', message = 'host ' .. h .. ' is not registered'})
end

-- Every entry encoded before the first write: a value JSON cannot hold must change nothing.
local fields = {}
for name, info in pairs(cat) do
  fields[#fields + 1] = name
  fields[#fields + 1] = cjson.encode(info)
end

local old = {}
for _, name in ipairs(rcall('HKEYS', ck)) do old[name] = true end
local added, removed = {}, {}
for name, _ in pairs(cat) do
  if not old[name] then
    added[#added + 1] = name
    rcall('ZINCRBY', K_SVC_NAMES, 1, name)
  end
end
for name, _ in pairs(old) do
  if cat[name] == nil then
    removed[#removed + 1] = name
    if tonumber(rcall('ZINCRBY', K_SVC_NAMES, -1, name)) <= 0 then rcall('ZREM', K_SVC_NAMES, name) end
  end
end
rcall('DEL', ck)
if #fields > 0 then rcall('HSET', ck, unpack(fields)) end
if #added > 0 then
  -- Tasks in line for a service this host now offers may start: this script runs no pass, so
  -- the next submit runs a whole one (see schedule_pass in includes/queue.lua).
  rcall('HSET', K_SEQ, 'line_unsettled', '1')
end
if #added > 0 or #removed > 0 then
  table.sort(added)
  table.sort(removed)
  emit('service_catalog', h, now, cjson.encode({added = added, removed = removed}))
end
return cjson.encode({ok = true, added = added, removed = removed})
