--[[ submit: put a task (function task or queued direct request) in line, then try to start it
(submit_pass: at once when it fits and does not delay the head of the line).
KEYS: the ledger's fixed keys (see includes/ledger.lua).
ARGV[1] key prefix, ARGV[2] clock override ms, ARGV[3] task JSON {kind ("job"|"lease"),
        payload (the place request JSON, see place.lua; it carries id and priority),
        rq_prefix, rq_queue, host_queue_prefix, on_host_lost ("requeue"|"fail")}, ARGV[4] pass depth,
        ARGV[5] scan cap,
ARGV[6] the validated request as JSON text, ARGV[7] metadata as JSON text.
Idempotent by id: an id that exists is not queued again. An id whose record was purged is a
new task: what is left of the old one's task hash goes first.
Returns JSON {ok, state, position (0 = placed), placed[]}.
]]
--- @include "ledger"
--- @include "placement"
--- @include "queue"

local now = now_ms()
local t = cjson.decode(ARGV[3])
local req = cjson.decode(t.payload)
req.request, req.metadata = ARGV[6], ARGV[7]
local id = req.id
local existing = rcall('HGET', alloc_key(id), 'state')
local reaped = {}
if not existing then
  reaped = reap_expired(now, 8)
  local seq = tonumber(rcall('HINCRBY', K_SEQ, 'task_seq', 1))
  -- An id submitted again once its record was purged: the task hash of its first run may still
  -- be there (kept a day after it ended), with that run's expiry and retry time.
  rcall('DEL', task_key(id))
  rcall('HSET', task_key(id), 'kind', t.kind, 'payload', t.payload, 'rq_prefix', t.rq_prefix or '',
        'rq_queue', t.rq_queue or '', 'host_queue_prefix', t.host_queue_prefix or '', 'state', 'pending',
        'seq', seq, 'priority', req.priority, 'front', '0', 'on_host_lost', t.on_host_lost or 'requeue')
  rcall('HSET', alloc_key(id), 'id', id, 'state', 'pending', 'kind', t.kind, 'task_id', req.task_id,
        'task_type', req.task_type, 'owner', req.owner, 'priority', tostring(req.priority),
        'strategy', req.strategy_name, 'created', tostring(now), 'ttl_ms', tostring(req.ttl_ms),
        'expected_ms', tostring(req.expected_ms or 0), 'metadata', req.metadata, 'request', req.request)
  rcall('ZADD', K_ALLOCS, now, id)
  rcall('ZADD', K_PENDING, pending_score(req.priority, false, seq), id)
  emit('submitted', id, now, cjson.encode({kind = t.kind, priority = req.priority, task_id = req.task_id,
    task_type = req.task_type, owner = req.owner, expected_ms = req.expected_ms or 0}),
    {'request', req.request, 'metadata', req.metadata})
end
local placed = submit_pass(id, now, tonumber(ARGV[4]), tonumber(ARGV[5]), #reaped > 0)
local state = rcall('HGET', alloc_key(id), 'state')
local rank = rcall('ZRANK', K_PENDING, id)
local position = 0
if rank then position = rank + 1 end
return cjson.encode({ok = true, state = state, position = position, placed = placed, existing = existing ~= false and existing ~= nil})
