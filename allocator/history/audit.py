"""Does the history say what the ledger says? A check for tests, the soak run and operators.

``compare_allocations`` reads every allocation record the ledger still keeps (active ones and
finished ones within the retention period) and the history's row for each, and lists where they
disagree: a row missing, or a different state, host, release reason or requeue count. It is
meant for a quiet moment (the recorder's backlog at zero): a change the recorder has not written
yet shows up as a difference.

``compare_events`` checks that every outbox entry in ``stream_ids`` is in the ``events`` table
(the primary key already forbids twice).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import Engine, select

from ..client import Allocator
from .models import allocations as A
from .models import events as E

FIELDS = ("state", "host", "reason", "requeues")


def ledger_records(a: Allocator) -> dict[str, dict[str, str]]:
    """Every allocation record the ledger keeps: id -> {state, host, reason, requeues}."""
    ids = a.redis.zrange(a.keys.allocs, 0, -1)
    pipe = a.redis.pipeline(transaction=False)
    for i in ids:
        pipe.hmget(a.keys.alloc(i), *FIELDS)
    out: dict[str, dict[str, str]] = {}
    for i, vals in zip(ids, pipe.execute() if ids else []):
        if vals[0] is not None:
            out[i] = dict(zip(FIELDS, vals))
    return out


def history_rows(engine: Engine, namespace: str, ids: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
    q = select(A.c.allocation_id, A.c.state, A.c.host_id, A.c.release_reason, A.c.requeues).where(A.c.namespace == namespace)
    with engine.connect() as conn:
        rows = {r.allocation_id: r._asdict() for r in conn.execute(q)}
    if ids is not None:
        wanted = set(ids)
        rows = {k: v for k, v in rows.items() if k in wanted}
    return rows


def compare_allocations(engine: Engine, a: Allocator) -> list[str]:
    """Where the history's allocations disagree with the ledger's records (empty: they agree)."""
    ledger = ledger_records(a)
    rows = history_rows(engine, a.keys.namespace)
    diffs: list[str] = []
    for aid, rec in sorted(ledger.items()):
        row = rows.get(aid)
        if row is None:
            diffs.append(f"{aid}: in the ledger ({rec['state']}) but not in the history")
            continue
        want = {"state": rec["state"], "host": rec["host"] or None,
                "reason": (rec["reason"] or None) if rec["state"] not in ("active", "pending") else None,
                "requeues": int(rec["requeues"] or 0)}
        got = {"state": row["state"], "host": row["host_id"] or None,
               "reason": row["release_reason"] if rec["state"] not in ("active", "pending") else None,
               "requeues": int(row["requeues"] or 0)}
        if not rec["host"]:  # requeued (pending, or cancelled while pending again): the history keeps the last host
            want["host"] = got["host"] = None
        if want != got:
            diffs.append(f"{aid}: ledger {want} != history {got}")
    return diffs


def compare_events(engine: Engine, a: Allocator, stream_ids: Iterable[str]) -> tuple[list[str], list[str]]:
    """(missing, extra): stream ids not in the ``events`` table, and rows of the namespace that are
    not among ``stream_ids``."""
    produced = set(stream_ids)
    with engine.connect() as conn:
        recorded = set(conn.execute(select(E.c.stream_id).where(E.c.namespace == a.keys.namespace)).scalars())
    return sorted(produced - recorded), sorted(recorded - produced)
