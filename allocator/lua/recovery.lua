--[[ recovery: open or close the recovery gate around `allocator recover`.
KEYS: the ledger's fixed keys (see includes/ledger.lua).
ARGV[1] key prefix, ARGV[2] clock override ms ("" = server TIME),
ARGV[3] "begin" | "end" | "lost", ARGV[4] JSON object recorded in the event (counts, who, why).
"lost" (the history recorder found the outbox without its consumer group: Redis lost its data)
closes the gate unless "recovered_at" shows that allocator recover rebuilt the ledger since (the
loss wiped that stamp with the rest), decided here so that a recovery finishing meanwhile is
seen; it appends no event.
While the field "recovering" of KEYS[12] (seq) is "1", place refuses with RECOVERING, so nothing
new is placed while the active allocations are rebuilt from the durable history. "begin" sets
the field, "end" clears it and stamps "recovered_at". Each change appends recovery_started /
recovery_finished to the outbox; a repeat changes nothing.
Returns JSON {ok=true, recovering, changed}.
]]
--- @include "ledger"

local now = now_ms()
local action = ARGV[3]
local details = ARGV[4]
if details == nil or details == '' then details = '{}' end
local was = rcall('HGET', K_SEQ, 'recovering') == '1'
if action == 'begin' then
  if was then return cjson.encode({ok = true, recovering = true, changed = false}) end
  rcall('HSET', K_SEQ, 'recovering', '1', 'recovery_started', now)
  emit('recovery_started', 'ledger', now, details)
  return cjson.encode({ok = true, recovering = true, changed = true})
elseif action == 'lost' then
  if was or rcall('HEXISTS', K_SEQ, 'recovered_at') == 1 then
    return cjson.encode({ok = true, recovering = was, changed = false})
  end
  rcall('HSET', K_SEQ, 'recovering', '1')
  return cjson.encode({ok = true, recovering = true, changed = true})
elseif action == 'end' then
  if not was then return cjson.encode({ok = true, recovering = false, changed = false}) end
  rcall('HDEL', K_SEQ, 'recovering')
  -- Passes ran none while the ledger was rebuilt: the next submit runs a whole one (see
  -- schedule_pass in includes/queue.lua).
  rcall('HSET', K_SEQ, 'recovered_at', now, 'line_unsettled', '1')
  emit('recovery_finished', 'ledger', now, details)
  return cjson.encode({ok = true, recovering = false, changed = true})
end
return cjson.encode({ok = false, code = 'INVALID_REQUEST', message = 'action must be begin, end or lost, got ' .. tostring(action)})
