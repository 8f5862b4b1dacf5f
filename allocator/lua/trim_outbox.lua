--[[ trim_outbox: drop the outbox entries that every consumer group has acknowledged.
KEYS: the ledger's fixed keys (see includes/ledger.lua); only KEYS[11] (events) is used.
ARGV[1] key prefix, ARGV[2] clock override ms ("" = server TIME; compared with the tally's cursor_at).
For each consumer group the first entry still needed is its oldest pending (delivered, not yet
acknowledged) entry, or the one after its last-delivered id when nothing is pending. The stream is
trimmed (XTRIM MINID, exact) below the smallest of those, so an entry leaves only after every
group has acknowledged it. With no group at all nothing is trimmed. The API's tally for /metrics
(tally_outbox.lua) reads the stream from a cursor of its own, not as a group: while it has run in
the last TALLY_RECENT_MS, nothing past its cursor is trimmed either (an API that stopped for good
does not hold the stream back).
Returns JSON {trimmed, minid} (minid "" when nothing could be trimmed).
]]
--- @include "ledger"

if rcall('EXISTS', K_EVENTS) == 0 then return cjson.encode({trimmed = 0, minid = ''}) end

local function parse_id(id)
  local dash = string.find(id, '-', 1, true)
  return tonumber(string.sub(id, 1, dash - 1)), tonumber(string.sub(id, dash + 1))
end

local function less(a_ms, a_seq, b_ms, b_seq)
  return a_ms < b_ms or (a_ms == b_ms and a_seq < b_seq)
end

local groups = rcall('XINFO', 'GROUPS', K_EVENTS)
if #groups == 0 then return cjson.encode({trimmed = 0, minid = ''}) end
local best_ms, best_seq = nil, nil
for _, g in ipairs(groups) do
  local f = {}
  for i = 1, #g, 2 do f[g[i]] = g[i + 1] end
  local ms, seq
  if tonumber(f['pending']) > 0 then
    local summary = rcall('XPENDING', K_EVENTS, f['name'])
    ms, seq = parse_id(summary[2])
  else
    ms, seq = parse_id(f['last-delivered-id'])
    seq = seq + 1
  end
  if best_ms == nil or less(ms, seq, best_ms, best_seq) then best_ms, best_seq = ms, seq end
end
local TALLY_RECENT_MS = 300000
local tally = rcall('HMGET', PREFIX .. 'api_stats', 'cursor', 'cursor_at')
if tally[1] and tally[2] and now_ms() - tonumber(tally[2]) < TALLY_RECENT_MS then
  local ms, seq = parse_id(tally[1])
  seq = seq + 1
  if less(ms, seq, best_ms, best_seq) then best_ms, best_seq = ms, seq end
end
local minid = string.format('%d-%d', best_ms, best_seq)
local n = rcall('XTRIM', K_EVENTS, 'MINID', minid)
return cjson.encode({trimmed = n, minid = minid})
