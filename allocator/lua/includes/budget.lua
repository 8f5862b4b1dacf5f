--[[ The time budget of the batch scripts (place_many, release_many). Needs include "ledger".

Redis serves no other client while a script runs, so a call of many placements or releases stops
after the one during which its budget of server time ran out, and the client sends the rest in
the next call.
]]

-- Server time in microseconds: read from TIME even under a clock override, which changes the
-- ledger's clock but not how long the call holds Redis.
local function server_us()
  local t = rcall('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- The server time (server_us) at which a budget of ms milliseconds from now is spent.
local function deadline_after(ms)
  return server_us() + tonumber(ms) * 1000
end
