--[[ heartbeat: record that an agent's hosts are alive, and publish their inventory.
KEYS: the ledger's fixed keys (see includes/ledger.lua), then the heartbeats ZSET as the LAST key
(host id -> last heartbeat ms); it is found as KEYS[#KEYS] so the fixed list can grow.
ARGV[1] key prefix, ARGV[2] clock override ms ("" = server TIME), ARGV[3] inventory TTL ms,
ARGV[4], ARGV[5], ... pairs of host id and inventory JSON ("" = leave the published one alone).
A host that is registered and not lost gets ZADD heartbeats now, and its inventory is stored at
<prefix>inventory:<host> with the TTL. A host that is not registered ("missing") or that the
reaper declared "lost" gets neither: its agent must register it again first (which, for a lost
host, starts a new generation), so a returning host never resumes under its old grants.
Changes no capacity, so it emits no outbox event. Work is one ZADD and one SET per host.
Returns JSON {now, missing[], lost[]}.
]]
--- @include "ledger"

local K_HEARTBEATS = KEYS[#KEYS]
local now = now_ms()
local ttl = tonumber(ARGV[3])
local missing, lost = {}, {}
for i = 4, #ARGV, 2 do
  local h = ARGV[i]
  local state = rcall('HGET', host_key(h), 'state')
  if not state then
    missing[#missing + 1] = h
  elseif state == 'lost' then
    lost[#lost + 1] = h
  else
    rcall('ZADD', K_HEARTBEATS, now, h)
    local inv = ARGV[i + 1]
    if inv ~= nil and inv ~= '' then
      rcall('SET', PREFIX .. 'inventory:' .. h, inv, 'PX', ttl)
    end
  end
end
return cjson.encode({now = now, missing = missing, lost = lost})
