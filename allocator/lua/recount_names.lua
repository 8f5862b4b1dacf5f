--[[ recount_names: rebuild the count of the registered hosts' GPU models and labels
(PREFIX..'names', see count_names in includes/ledger.lua), and the sets of the hosts with each
model (PREFIX..'mhosts:'..model), from the host hashes.
KEYS: the ledger's fixed keys (see includes/ledger.lua).
ARGV[1] key prefix, ARGV[2] clock override ms (unused).
For a ledger whose count went out of step with its hosts: one an earlier release (without the
count) wrote to after this one had counted, which the checker reports. Reads every host in one
script: its cost grows with the fleet. allocator recover runs it before its check.
Returns JSON {hosts} (the hosts counted).
]]
--- @include "ledger"

for _, field in ipairs(rcall('HKEYS', PREFIX .. 'names')) do
  if string.sub(field, 1, 2) == 'm:' then rcall('DEL', PREFIX .. 'mhosts:' .. string.sub(field, 3)) end
end
rcall('DEL', PREFIX .. 'names')
local n = 0
for _, h in ipairs(rcall('ZRANGE', K_HOSTS, 0, -1)) do
  local hk = host_key(h)
  if rcall('EXISTS', hk) == 1 then
    rcall('HDEL', hk, 'named', 'mhosts')
    count_names(hk, 1)
    n = n + 1
  end
end
return cjson.encode({hosts = n})
