--[[ tally_outbox: count the outbox events not yet counted into the API's statistics hash, for
/metrics. It only reads the stream (XRANGE from a cursor kept in the hash): it never consumes,
acknowledges or trims, so the history recorder's consumer group is unaffected. Being one script,
several API replicas can run it at once and every event is still counted once.
KEYS: the ledger's fixed keys (see includes/ledger.lua), then two more as the LAST keys (found
from #KEYS so the fixed list can grow): KEYS[#KEYS-1] the statistics HASH, KEYS[#KEYS] the ETA
predictions HASH (task id -> predicted start ms, written when an ETA is first reported).
ARGV[1] key prefix, ARGV[2] clock override ms ("" = server TIME; written as cursor_at), ARGV[3] most entries to count in this
call, ARGV[4] JSON list of placement-latency bucket bounds in ms (ascending), ARGV[5] JSON list
of ETA-error bucket bounds in ms (ascending).
Statistics fields: cursor (last counted stream id), cursor_at (when a tally last ran, ms: while
recent, trim_outbox keeps what the cursor has not reached), events|<type>, placements|<kind>|<strategy>,
releases|<reason>, lat|le|<bound> / lat|sum_ms / lat|count (submit -> grant, from the
"allocated" event's ts and created), eta|le|<bound> / eta|sum_ms / eta|count (|actual start -
predicted start| of tasks with a recorded prediction), resets (times the stream restarted
below the cursor: Redis lost its data or the namespace was wiped; counting restarts at its head).
Returns JSON {counted, cursor}.
]]
--- @include "ledger"

local K_STATS, K_ETA = KEYS[#KEYS - 1], KEYS[#KEYS]
local limit = tonumber(ARGV[3])
local lat_bounds = cjson.decode(ARGV[4])
local eta_bounds = cjson.decode(ARGV[5])

local function split_id(id)
  local dash = string.find(id, '-', 1, true)
  return tonumber(string.sub(id, 1, dash - 1)), tonumber(string.sub(id, dash + 1))
end

local function id_less(a, b)
  local am, as = split_id(a)
  local bm, bs = split_id(b)
  return am < bm or (am == bm and as < bs)
end

local function observe(prefix, bounds, value)
  local field = prefix .. '|le|+Inf'
  for _, b in ipairs(bounds) do
    if value <= b then field = prefix .. '|le|' .. b; break end
  end
  rcall('HINCRBY', K_STATS, field, 1)
  rcall('HINCRBY', K_STATS, prefix .. '|sum_ms', math.floor(value))
  rcall('HINCRBY', K_STATS, prefix .. '|count', 1)
end

local cursor = rcall('HGET', K_STATS, 'cursor') or '0-0'
if cursor ~= '0-0' then
  local last = rcall('XREVRANGE', K_EVENTS, '+', '-', 'COUNT', 1)
  if #last > 0 and id_less(last[1][1], cursor) then
    cursor = '0-0'
    rcall('HINCRBY', K_STATS, 'resets', 1)
  end
end
local entries
if cursor == '0-0' then
  entries = rcall('XRANGE', K_EVENTS, '-', '+', 'COUNT', limit)
else
  entries = rcall('XRANGE', K_EVENTS, '(' .. cursor, '+', 'COUNT', limit)
end

for _, e in ipairs(entries) do
  local f = {}
  for i = 1, #e[2], 2 do f[e[2][i]] = e[2][i + 1] end
  local kind, subject = f['type'] or 'unknown', f['id'] or ''
  rcall('HINCRBY', K_STATS, 'events|' .. kind, 1)
  local ok, data = pcall(cjson.decode, f['data'] or '{}')
  if not ok or type(data) ~= 'table' then data = {} end
  if kind == 'allocated' then
    local strategy = data.strategy
    if type(strategy) ~= 'string' or strategy == '' then strategy = 'unknown' end
    local k = data.kind
    if type(k) ~= 'string' or k == '' then k = 'lease' end
    rcall('HINCRBY', K_STATS, 'placements|' .. k .. '|' .. strategy, 1)
    local ts, created = tonumber(f['ts']), tonumber(data.created)
    if ts and created then
      local wait = ts - created
      if wait < 0 then wait = 0 end
      observe('lat', lat_bounds, wait)
    end
    local predicted = tonumber(rcall('HGET', K_ETA, subject))
    if predicted and ts then
      observe('eta', eta_bounds, math.abs(ts - predicted))
      rcall('HDEL', K_ETA, subject)
    end
  elseif kind == 'released' then
    local reason = data.reason
    if type(reason) ~= 'string' or reason == '' then reason = 'unknown' end
    rcall('HINCRBY', K_STATS, 'releases|' .. reason, 1)
    rcall('HDEL', K_ETA, subject)
  elseif kind == 'cancelled' then
    rcall('HDEL', K_ETA, subject)
  end
  cursor = e[1]
end
rcall('HSET', K_STATS, 'cursor', cursor, 'cursor_at', now_ms())
return cjson.encode({counted = #entries, cursor = cursor})
