--[[ noop: the trivial script benchmarks compare against (same KEYS/ARGV shape, no work).
KEYS: the ledger's fixed keys (unused). ARGV: unused.
]]
return 1
