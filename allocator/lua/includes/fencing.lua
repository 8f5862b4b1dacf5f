--[[ Fencing: is an allocation's grant still good to start work under? Needs include "ledger".

grant_status(id, my_host, extra_fields) -> out, fields
  Reads the allocation (state, host, host_gen, then extra_fields) and its host in two HMGETs.
  out = {current = false, reason, state, host, host_gen, host_state, gen}; reason is nil while
  every check passes: the allocation exists and is active, is on my_host (when given), its host
  exists and is not lost, and the host's generation equals the one the grant was made under
  (records without host_gen count as generation 1). fields = the raw HMGET of the allocation.
]]

local function grant_status(id, my_host, extra_fields)
  local a = rcall('HMGET', alloc_key(id), 'state', 'host', 'host_gen', unpack(extra_fields or {}))
  if not a[1] then return {current = false, reason = 'not_found'}, a end
  local out = {current = false, state = a[1], host = a[2], host_gen = tonumber(a[3] or 1)}
  if a[1] ~= 'active' then
    out.reason = 'not_active'
  elseif my_host ~= nil and my_host ~= '' and a[2] ~= my_host then
    out.reason = 'wrong_host'
  else
    local hf = rcall('HMGET', host_key(a[2]), 'state', 'gen')
    if not hf[1] then
      out.reason = 'host_missing'
    else
      out.host_state, out.gen = hf[1], tonumber(hf[2] or 1)
      if hf[1] == 'lost' then
        out.reason = 'host_lost'
      elseif out.gen ~= out.host_gen then
        out.reason = 'stale_generation'
      end
    end
  end
  return out, a
end
