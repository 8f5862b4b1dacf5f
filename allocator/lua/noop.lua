--[[ noop: the trivial script benchmarks compare against (same KEYS/ARGV shape, no work).
KEYS: the ledger's fixed keys (unused). ARGV: unused.
Returns the JSON text 1, as every script returns JSON (Allocator._call decodes it).
]]
return '1'
