--[[ recount_names: rebuild the count of the registered hosts' GPU models and labels
(PREFIX..'names', see count_names in includes/ledger.lua), and the sets of the hosts with each
model (PREFIX..'mhosts:'..model) and each label (PREFIX..'lhosts:'..label..'='..value), from the
host hashes.
KEYS: the ledger's fixed keys (see includes/ledger.lua).
ARGV[1] key prefix, ARGV[2] clock override ms (unused).
For a ledger whose count went out of step with its hosts: one an earlier release (without the
count) wrote to after this one had counted, which the checker reports. Reads every host in one
script: its cost grows with the fleet. allocator recover runs it before its check.
Returns JSON {hosts} (the hosts counted).
]]
--- @include "ledger"

-- The model and label sets go first, every one the count or a host's counted list names (a count
-- out of step may lack a model whose set still lists hosts).
local function drop_set(name)
  if type(name) ~= 'string' then return end
  local kind = string.sub(name, 1, 2)
  if kind == 'm:' then rcall('DEL', PREFIX .. 'mhosts:' .. string.sub(name, 3))
  elseif kind == 'l:' then rcall('DEL', PREFIX .. 'lhosts:' .. string.sub(name, 3)) end
end
for _, field in ipairs(rcall('HKEYS', PREFIX .. 'names')) do drop_set(field) end
local hosts = rcall('ZRANGE', K_HOSTS, 0, -1)
for _, h in ipairs(hosts) do
  local ok, listed = pcall(cjson.decode, rcall('HGET', host_key(h), 'named') or '[]')
  if ok and type(listed) == 'table' then
    for _, name in ipairs(listed) do drop_set(name) end
  end
end
rcall('DEL', PREFIX .. 'names')
local n = 0
for _, h in ipairs(hosts) do
  local hk = host_key(h)
  if rcall('EXISTS', hk) == 1 then
    rcall('HDEL', hk, 'named', 'mhosts', 'lhosts')
    count_names(h, 1)
    n = n + 1
  end
end
return cjson.encode({hosts = n})
