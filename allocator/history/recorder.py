"""The recorder: copies the outbox stream into the history database, exactly once.

A consumer group (``Keys.recorder_group``) on the outbox stream hands entries to one or more
recorders (one per scheduler replica, or ``allocator recorder`` alone). Each step:

1. read up to ``batch_size`` entries: first this consumer's own unacknowledged ones (after a
   failed write), then entries idle too long at a dead consumer (XAUTOCLAIM), then new ones;
2. in one transaction insert them into ``events`` (ON CONFLICT DO NOTHING on the stream id) and
   fold only the ones actually inserted into ``allocations``/``placements``/``hosts``;
3. after the commit, XACK them; then trim the stream below what every group has acknowledged.

A crash between commit and XACK redelivers entries that are already in ``events``: they insert
nothing and fold nothing, so a replay changes nothing. While the database is unreachable, nothing
is acknowledged: entries wait in Redis (pending or not yet delivered) and the loop retries with
backoff; none is lost and none is written twice.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import redis
from sqlalchemy import Connection, Engine, Table, bindparam, insert, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError, SQLAlchemyError

from ..client import Allocator
from .models import allocations, events, hosts, placements
from .recover import close_after_loss
from .projection import (
    ALLOCATION_EVENTS,
    HOST_EVENTS,
    OutboxEvent,
    fold_allocation,
    fold_host,
    fold_placement,
    new_allocation,
    new_host,
    placement_key,
)

log = logging.getLogger(__name__)

Entry = tuple[str, dict[str, str] | None]
CHUNK = 500


def _transient(exc: BaseException) -> bool:
    """Errors worth waiting out: the database is away, or a concurrent recorder raced us."""
    if isinstance(exc, (OperationalError, InterfaceError, IntegrityError)):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


@dataclass
class StepResult:
    read: int = 0
    written: int = 0
    duplicates: int = 0
    acked: int = 0
    trimmed: int = 0
    error: str | None = None


@dataclass
class Backlog:
    """What the recorder still has to write: pending (delivered, unacknowledged) + undelivered."""

    stream_length: int
    pending: int
    undelivered: int
    oldest_age_s: float | None
    consumers: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.pending + self.undelivered

    def as_dict(self) -> dict[str, Any]:
        return {"backlog": self.total, "pending": self.pending, "undelivered": self.undelivered,
                "stream_length": self.stream_length, "oldest_age_s": self.oldest_age_s, "consumers": self.consumers}


class Recorder:
    """Writes the outbox of one namespace into the history database (see the module docstring)."""

    def __init__(
        self,
        allocator: Allocator,
        engine: Engine,
        *,
        consumer: str | None = None,
        batch_size: int = 500,
        block_ms: int = 1000,
        claim_idle_ms: int = 60_000,
        trim: bool = True,
        backoff_s: tuple[float, float] = (0.2, 5.0),
        estimates_every_s: float = 30.0,
    ) -> None:
        self.allocator = allocator
        self.redis: redis.Redis = allocator.redis
        self.keys = allocator.keys
        self.namespace = allocator.keys.namespace
        self.engine = engine
        self.group = self.keys.recorder_group
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.batch_size = batch_size
        self.block_ms = block_ms
        self.claim_idle_ms = claim_idle_ms
        self.trim = trim
        self.backoff_s = backoff_s
        self.estimates_every_s = estimates_every_s
        self._own_pending = True  # start by re-reading what this consumer name left unacknowledged
        self._group_ready = False
        self.stream_resets = 0
        self.totals = StepResult()
        self._pg = engine.dialect.name == "postgresql"

    # -- Redis side ------------------------------------------------------------------------

    def ensure_group(self) -> None:
        """Creates the consumer group at the start of the stream (so nothing already there is
        skipped). A group that had to be created while the history already holds events of the
        namespace means Redis lost its data before this recorder started (a restart together
        with Redis): the same as a group lost while it runs (``_ledger_lost``)."""
        try:
            self.redis.xgroup_create(self.keys.events, self.group, id="0", mkstream=True)
            created = True
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
            created = False
        if created and not self._group_ready and self._history_has_events():
            self._ledger_lost()
        self._group_ready = True

    def _history_has_events(self) -> bool:
        """Whether the history recorded anything of this namespace (False when it cannot tell)."""
        try:
            with self.engine.connect() as conn:
                row = conn.execute(select(events.c.stream_id).where(events.c.namespace == self.namespace).limit(1)).first()
        except SQLAlchemyError as exc:
            log.warning("history: could not tell whether the outbox was recorded before (%s)", exc.__class__.__name__)
            return False
        return row is not None

    def _ledger_lost(self) -> None:
        """The outbox lost its consumer group: Redis lost its data or the namespace was wiped."""
        self.stream_resets += 1
        # The ledger no longer knows what runs. Stop placements (agents re-registering would
        # otherwise hand out resources still in use) until an operator runs `allocator recover`,
        # which rebuilds the active allocations and reopens; unless it has already (the loss
        # wiped the seq hash, so a recovery stamp there is newer): recovery.lua decides both in
        # one step, so a recovery finishing meanwhile is not undone.
        if close_after_loss(self.allocator):
            log.warning("outbox stream %s lost its consumer group: placements stopped until "
                        "`allocator recover` rebuilds the ledger", self.keys.events)
        else:
            log.warning("outbox stream %s lost its consumer group; the ledger was recovered since", self.keys.events)

    def _call_nogroup_safe(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
        # The stream (or the group) disappeared while this recorder ran.
        if self._group_ready:
            self._ledger_lost()
        self._group_ready = True  # ensure_group below must not count the same loss twice
        self.ensure_group()
        self._own_pending = False
        return fn(*args, **kwargs)

    def read(self, block_ms: int | None = None) -> list[Entry]:
        """The next batch: own unacknowledged entries, then claimed stale ones, then new ones."""
        if not self._group_ready:
            self.ensure_group()
        if self._own_pending:
            got = self._call_nogroup_safe(self.redis.xreadgroup, self.group, self.consumer, {self.keys.events: "0"},
                                          count=self.batch_size)
            entries = got[0][1] if got else []
            if entries:
                return entries
            self._own_pending = False
        if self.claim_idle_ms > 0:
            claimed = self._call_nogroup_safe(self.redis.xautoclaim, self.keys.events, self.group, self.consumer,
                                              self.claim_idle_ms, start_id="0-0", count=self.batch_size)
            if claimed and claimed[1]:
                return list(claimed[1])
        block = self.block_ms if block_ms is None else block_ms
        got = self._call_nogroup_safe(self.redis.xreadgroup, self.group, self.consumer, {self.keys.events: ">"},
                                      count=self.batch_size, block=block if block > 0 else None)
        return got[0][1] if got else []

    def _ack(self, ids: Sequence[str], result: StepResult) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.xack(self.keys.events, self.group, *ids)
        pipe.hincrby(self.keys.recorder, "events_total", result.written)
        pipe.hincrby(self.keys.recorder, "duplicates_total", result.duplicates)
        pipe.hset(self.keys.recorder, mapping={"last_commit_ms": int(time.time() * 1000), "consumer": self.consumer})
        result.acked = int(pipe.execute()[0])

    def trim_stream(self) -> int:
        """Drops entries every consumer group has acknowledged; returns how many."""
        res = self.allocator.scripts["trim_outbox"](keys=self.keys.ledger_keys(), args=[self.keys.prefix, ""])
        return int(json.loads(res).get("trimmed") or 0)

    def backlog(self) -> Backlog:
        """Entries not yet in the database: delivered but unacknowledged, plus never delivered."""
        stream = self.keys.events
        length = int(self.redis.xlen(stream))
        groups = {g["name"]: g for g in self.redis.xinfo_groups(stream)} if length or self.redis.exists(stream) else {}
        g = groups.get(self.group)
        if g is None:
            first = self.redis.xrange(stream, count=1)
            return Backlog(length, 0, length, _age(first[0][0]) if first else None)
        pending = int(g["pending"])
        lag = g.get("lag")
        last = g["last-delivered-id"]
        if lag is None:  # Redis < 7 has no lag field: count what follows the last delivered id
            lag = len(self.redis.xrange(stream, min="(" + last, count=1_000_000))
        oldest = None
        if pending:
            oldest = self.redis.xpending(stream, self.group)["min"]
        elif lag:
            nxt = self.redis.xrange(stream, min="(" + last, count=1)
            oldest = nxt[0][0] if nxt else None
        consumers = [c["name"] for c in self.redis.xinfo_consumers(stream, self.group)]
        return Backlog(length, pending, int(lag), _age(oldest) if oldest else None, consumers)

    # -- database side ---------------------------------------------------------------------

    def _insert(self, table: Table) -> Any:
        return pg_insert(table) if self._pg else sqlite_insert(table)

    def write(self, evs: Sequence[OutboxEvent]) -> tuple[int, int]:
        """Stores and folds a batch in one transaction; returns (written, duplicates)."""
        now = datetime.now(timezone.utc)
        with self.engine.begin() as conn:
            # executemany with RETURNING: SQLAlchemy batches it into multi-row INSERTs
            # ("insertmanyvalues") from one cached statement.
            stmt = (self._insert(events).on_conflict_do_nothing(index_elements=["namespace", "stream_id"])
                    .returning(events.c.stream_id))
            fresh_ids = set(conn.execute(stmt, [e.row(self.namespace, now) for e in evs]).scalars())
            fresh = sorted((e for e in evs if e.stream_id in fresh_ids), key=lambda e: e.position)
            self._fold(conn, fresh, now)
        return len(fresh_ids), len(evs) - len(fresh_ids)

    def _load(
        self, conn: Connection, table: Table, key_cols: list[str], keys: Iterable[tuple[Any, ...]]
    ) -> dict[tuple[Any, ...], dict[str, Any]]:
        """Existing rows by key, locked on Postgres so concurrent recorders serialise per row."""
        keys = sorted(set(keys))
        out: dict[tuple[Any, ...], dict[str, Any]] = {}
        cols = [table.c[k] for k in key_cols]
        for i in range(0, len(keys), CHUNK):
            chunk = keys[i:i + CHUNK]
            cond = cols[0].in_([k[0] for k in chunk]) if len(cols) == 1 else tuple_(*cols).in_(chunk)
            q = select(table).where(table.c.namespace == self.namespace, cond).order_by(*cols)
            if self._pg:
                q = q.with_for_update()
            for r in conn.execute(q).mappings():
                out[tuple(r[k] for k in key_cols)] = dict(r)
        return out

    def _save(self, conn: Connection, table: Table, key_cols: list[str], rows: dict[tuple[Any, ...], dict[str, Any]],
              existing: set[tuple[Any, ...]]) -> None:
        new = [r for k, r in rows.items() if k not in existing]
        old = [r for k, r in rows.items() if k in existing]
        if new:
            conn.execute(insert(table), new)
        if old:
            pk = ["namespace", *key_cols]
            stmt = update(table).where(*[table.c[c] == bindparam("pk_" + c) for c in pk])
            conn.execute(stmt, [{**{k: v for k, v in r.items() if k not in pk}, **{"pk_" + c: r[c] for c in pk}} for r in old])

    def _fold(self, conn: Connection, fresh: list[OutboxEvent], now: datetime) -> None:
        alloc_evs = [e for e in fresh if e.type in ALLOCATION_EVENTS and e.subject]
        host_evs = [e for e in fresh if e.type in HOST_EVENTS and e.subject]
        if alloc_evs:
            loaded = self._load(conn, allocations, ["allocation_id"], [(e.subject,) for e in alloc_evs])
            pkeys = [(e.subject, placement_key(e)) for e in alloc_evs if placement_key(e) is not None]
            ploaded = self._load(conn, placements, ["allocation_id", "placed_ms"], pkeys) if pkeys else {}
            rows = dict(loaded)
            prows = dict(ploaded)
            for e in alloc_evs:
                row = rows.setdefault((e.subject,), new_allocation(self.namespace, e.subject))
                fold_allocation(row, e)
                row["updated_at"] = now
                pk = placement_key(e)
                if pk is not None:
                    prows[(e.subject, pk)] = fold_placement(prows.get((e.subject, pk)), e, row, pk)
            self._save(conn, allocations, ["allocation_id"], rows, set(loaded))
            self._save(conn, placements, ["allocation_id", "placed_ms"], prows, set(ploaded))
        if host_evs:
            loaded = self._load(conn, hosts, ["host_id"], [(e.subject,) for e in host_evs])
            rows = dict(loaded)
            for e in host_evs:
                fold_host(rows.setdefault((e.subject,), new_host(self.namespace, e.subject)), e)
            self._save(conn, hosts, ["host_id"], rows, set(loaded))

    def _write_isolating(self, evs: list[OutboxEvent]) -> tuple[int, int]:
        """Writes a batch; an event the database rejects (not an outage) is isolated by halving
        and then stored as-is, unfolded, with the error, so one bad event cannot stall the rest."""
        try:
            return self.write(evs)
        except SQLAlchemyError as exc:
            if _transient(exc):
                raise
            if len(evs) > 1:
                mid = len(evs) // 2
                a, b = self._write_isolating(evs[:mid]), self._write_isolating(evs[mid:])
                return a[0] + b[0], a[1] + b[1]
            e = evs[0]
            log.error("history: event %s (%s) rejected (%s); stored unfolded", e.stream_id, e.type, exc.__class__.__name__)
            bad = OutboxEvent(e.stream_id, e.ms, e.seq, e.type, e.subject, e.ts,
                              {"unfolded": True, "error": str(getattr(exc, "orig", None) or exc)[:500], "raw": repr(e.data)[:10000]})
            now = datetime.now(timezone.utc)
            with self.engine.begin() as conn:
                stmt = (self._insert(events).values([bad.row(self.namespace, now)])
                        .on_conflict_do_nothing(index_elements=["namespace", "stream_id"]))
                n = conn.execute(stmt).rowcount
            return n, 1 - n

    # -- the loop ----------------------------------------------------------------------------

    def step(self, block_ms: int | None = None) -> StepResult:
        """One read-write-acknowledge-trim round. Never raises for an unreachable database: the
        error is returned and the entries stay pending for the next step."""
        result = StepResult()
        entries = self.read(block_ms)
        result.read = len(entries)
        if not entries:
            return result
        ids = [sid for sid, _ in entries]
        evs = [OutboxEvent.parse(sid, f) for sid, f in entries if f is not None]
        try:
            result.written, result.duplicates = self._write_isolating(evs) if evs else (0, 0)
        except SQLAlchemyError as exc:
            self._own_pending = True
            result.error = f"{exc.__class__.__name__}: {str(getattr(exc, 'orig', None) or exc).strip()[:300]}"
            self.redis.hset(self.keys.recorder, mapping={"last_error": result.error, "last_error_ms": int(time.time() * 1000)})
            log.warning("history: database write failed, %d entries wait in Redis: %s", len(ids), result.error)
            return result
        self._ack(ids, result)
        if self.trim:
            result.trimmed = self.trim_stream()
        for k in ("read", "written", "duplicates", "acked", "trimmed"):
            setattr(self.totals, k, getattr(self.totals, k) + getattr(result, k))
        return result

    def drain(self, timeout_s: float = 30.0) -> StepResult:
        """Steps until the backlog is empty (without blocking reads); for tests and ``--once``.
        Raises ``TimeoutError`` if it is not empty within ``timeout_s``."""
        total = StepResult()
        deadline = time.monotonic() + timeout_s
        self._own_pending = True
        while True:
            r = self.step(block_ms=0)
            for k in ("read", "written", "duplicates", "acked", "trimmed"):
                setattr(total, k, getattr(total, k) + getattr(r, k))
            total.error = r.error
            if r.error is None and r.read == 0 and self.backlog().total == 0:
                return total
            if time.monotonic() > deadline:
                raise TimeoutError(f"recorder backlog not drained in {timeout_s}s (last error: {r.error})")
            if r.error:
                time.sleep(self.backoff_s[0])
            elif r.read == 0:
                # What is left waits to be claimable (a dead consumer's entries, after their idle
                # time): look again shortly rather than spin on Redis.
                self._own_pending = True
                time.sleep(0.2)

    def run(self, stop: threading.Event | None = None, *, on_estimates: Any = None) -> None:
        """Records until ``stop`` is set; backs off while the database is away; refreshes the
        duration estimates every ``estimates_every_s``."""
        try:
            self._run(stop, on_estimates)
        finally:
            self.close()

    def _run(self, stop: threading.Event | None, on_estimates: Any) -> None:
        from .estimates import refresh_estimates

        stop = stop or threading.Event()
        backoff = self.backoff_s[0]
        next_estimates = 0.0
        next_own_check = time.monotonic() + 30.0
        while not stop.is_set():
            if time.monotonic() >= next_own_check:  # anything of ours left unacknowledged by a lost reply
                self._own_pending, next_own_check = True, time.monotonic() + 30.0
            try:
                r = self.step()
            except redis.RedisError as exc:
                log.warning("history: Redis unavailable (%s); retrying", exc)
                r = StepResult(error=str(exc))
            if r.error:
                stop.wait(backoff)
                backoff = min(backoff * 2, self.backoff_s[1])
                continue
            backoff = self.backoff_s[0]
            if self.estimates_every_s > 0 and time.monotonic() >= next_estimates:
                next_estimates = time.monotonic() + self.estimates_every_s
                try:
                    est = refresh_estimates(self.engine, self.allocator)
                    if on_estimates:
                        on_estimates(est)
                except (SQLAlchemyError, redis.RedisError) as exc:
                    log.warning("history: estimates not refreshed: %s", exc)

    def close(self) -> None:
        """Leaves the consumer group if this consumer holds nothing unacknowledged, so restarts
        (consumer names are unique per process) do not pile up idle consumers."""
        try:
            mine = self.redis.xpending_range(self.keys.events, self.group, "-", "+", 1, consumername=self.consumer)
            if not mine:
                self.redis.xgroup_delconsumer(self.keys.events, self.group, self.consumer)
        except redis.RedisError as exc:
            log.debug("recorder close: %s", exc)

    def start(self) -> tuple[threading.Thread, threading.Event]:
        """Runs the loop in a daemon thread (how ``allocator scheduler`` embeds it)."""
        stop = threading.Event()
        t = threading.Thread(target=self.run, args=(stop,), name=f"recorder-{self.namespace}", daemon=True)
        t.start()
        return t, stop


def _age(stream_id: str) -> float:
    return max(0.0, time.time() - int(stream_id.split("-")[0]) / 1000)


def start_recorder(
    allocator: Allocator, database_url: str | None = None, **kwargs: Any
) -> tuple[Recorder, threading.Thread, threading.Event]:
    """Starts a recorder thread for ``allocator``'s namespace (how a scheduler process embeds it).

    ``database_url`` None means ``ALLOCATOR_DATABASE_URL``, and unset that the SQLite fallback.
    Set the returned event to stop it.
    """
    from ..config import Settings
    from .migrate import open_engine

    rec = Recorder(allocator, open_engine(database_url or Settings.from_env().database_url), **kwargs)
    thread, stop = rec.start()
    return rec, thread, stop
