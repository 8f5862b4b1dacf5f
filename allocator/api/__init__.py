"""HTTP + WebSocket API (``allocator api``): REST for capacity, hosts, allocations and queued
tasks, the seed-003 WebSocket ``/ws/allocate`` with pluggable placement policies, and
Prometheus ``/metrics`` read from Redis at scrape time.

Modules: ``config`` (operator settings), ``errors`` (HTTP mapping of allocator errors),
``schemas`` (request/response models), ``tasks`` (the registry of named function tasks),
``policies`` (loading and checking policies, the built-in ones), ``placing`` (candidates, policy
evaluation and the atomic commit), ``waiters`` (one poller for every request waiting in line),
``metrics`` (the scrape-time collector), ``routes`` (REST), ``ws`` (WebSocket), ``app``
(``create_app``), ``cli`` (the ``allocator api`` command).

Nothing is imported here, so ``import allocator`` does not pull in FastAPI.
"""
