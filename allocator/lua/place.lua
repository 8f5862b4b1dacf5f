--[[ place: grant GPUs, CPU and RAM on one host to a new allocation, or refuse with the reason.
KEYS: the ledger's fixed keys (see includes/ledger.lua).
ARGV[1] key prefix, ARGV[2] clock override ms ("" = server TIME),
ARGV[3] request JSON {id, task_id, task_type, owner, priority, strategy ("best"|"worst"|"first"),
        strategy_name, gpus, gpu_mem (MiB per GPU, 0 = whole GPUs), models{name=true} or absent,
        cpu_millis, exclusive (bool), ram, ttl_ms (0 = none), expected_ms (0 = unknown),
        preempt (bool), selector{label=[values]} or absent, scan_cap, dry_run (bool),
        unbounded (true for a job without a time limit: its TTL is no estimate of its run) or absent,
        pass_depth (the scheduling pass run when the reaper frees something; absent = none),
        slots (worker slots) and services (names of named services) when asked for},
ARGV[4] the validated request as JSON text, ARGV[5] metadata as JSON text (both stored as given).
Idempotent by id: a second call with an id that exists returns that record (existing = true).
While tasks wait in line, the request is placed as a backfill would be (place_beside_line in
includes/queue.lua): it takes no room the first task's reservation counts on, when that task has
the same or a higher priority, unless it ends before that task's start; QUEUE_AHEAD when only
that room would hold it.
While the field "recovering" of KEYS[12] is "1" (allocator recover) it refuses with RECOVERING.
Before placing it reaps up to 8 expired allocations, and when it reaps any, runs a scheduling
pass (waiting tasks get what was freed first). A dry run does the same, so that it answers as
the placement made next would (a lease past its TTL holds nothing then, and a waiting task may
take what it freed); it grants nothing itself. All checks happen before the first write; a
refusal writes nothing (apart from that reaping and pass).
Returns JSON {ok=true, alloc{...}} | {ok=true, dry_run=true, host, gpus, cores}
              | {ok=false, code, message, details{}}.
]]
--- @include "ledger"
--- @include "placement"
--- @include "queue"
--- @lazy finish_alloc refusal take_services services_fit reindex_host schedule_pass place_beside_line

return cjson.encode(place_request(ARGV[3], ARGV[4], ARGV[5], now_ms()))
