"""The durable history schema (SQLAlchemy 2 declarative models).

Three tables, each keyed by the ledger namespace first so several fleets (or test runs) can share
one database:

- ``events``: append-only copy of the outbox stream, primary key (namespace, stream_id); a replay
  of the stream inserts nothing twice. Unknown event types are kept here too.
- ``allocations``: one row per allocation, folded from its events (request, placement, times,
  outcome). Wait and run time are derived columns kept up to date by the recorder.
- ``placements``: each interval an allocation held resources (several after preemption); usage
  (GPU-hours) adds these up.
- ``hosts``: the last known inventory and state of every host.

The Alembic migrations (``allocator/history/migrations``) must produce exactly these tables; a
test compares them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Index, Integer, MetaData, SmallInteger, String
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from .db import UTCDateTime

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

JSONType = JSON().with_variant(JSONB(), "postgresql")



class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Event(Base):
    """One outbox entry, exactly once."""

    __tablename__ = "events"

    namespace: Mapped[str] = mapped_column(String(64), primary_key=True)
    stream_id: Mapped[str] = mapped_column(String(40), primary_key=True, doc="Redis stream id '<ms>-<seq>'")
    stream_ms: Mapped[int] = mapped_column(BigInteger, doc="ms part of the stream id (ordering)")
    stream_seq: Mapped[int] = mapped_column(Integer, doc="sequence part of the stream id (ordering)")
    type: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(String(256), doc="the entry's id field: allocation, host or task id")
    ts: Mapped[datetime | None] = mapped_column(UTCDateTime, doc="ledger time of the change")
    data: Mapped[Any] = mapped_column(JSONType, doc="the entry's data field, parsed")
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (
        Index(None, "namespace", "stream_ms", "stream_seq"),
        Index(None, "namespace", "subject"),
        Index(None, "namespace", "type", "ts"),
    )


class AllocationRow(Base):
    """One allocation's whole life: request, placement, timestamps, durations, outcome."""

    __tablename__ = "allocations"

    namespace: Mapped[str] = mapped_column(String(64), primary_key=True)
    allocation_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    task_id: Mapped[str | None] = mapped_column(String(256))
    task_type: Mapped[str | None] = mapped_column(String(256))
    owner: Mapped[str | None] = mapped_column(String(256))
    priority: Mapped[int | None] = mapped_column(SmallInteger, doc="0 low .. 3 critical")
    strategy: Mapped[str | None] = mapped_column(String(32))
    kind: Mapped[str | None] = mapped_column(String(16), doc="lease (direct allocation) or task (queued job)")
    state: Mapped[str] = mapped_column(String(16), doc="pending, active, released, failed, cancelled")
    release_reason: Mapped[str | None] = mapped_column(String(64), doc="released, expired, host_removed, preempted, ...")
    outcome: Mapped[str | None] = mapped_column(
        String(32), doc="job outcome: ok, failed (a timeout too), stopped, retry, lost, or the RQ status left")
    host_id: Mapped[str | None] = mapped_column(String(128))
    host_gen: Mapped[int | None] = mapped_column(Integer)
    gpus: Mapped[Any] = mapped_column(JSONType, doc="grants [{pos, index, uuid, model, memory_mb}]")
    gpu_count: Mapped[int] = mapped_column(Integer, default=0)
    gpu_memory_mb: Mapped[int] = mapped_column(BigInteger, default=0, doc="sum over the granted GPUs")
    cores: Mapped[Any] = mapped_column(JSONType, doc="exclusive core ids")
    cpu_millis: Mapped[int] = mapped_column(Integer, default=0, doc="exclusive cores x 1000 + shared millicores")
    ram_mb: Mapped[int] = mapped_column(BigInteger, default=0)
    ttl_ms: Mapped[int | None] = mapped_column(BigInteger)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    request: Mapped[Any] = mapped_column(JSONType)
    meta: Mapped[Any] = mapped_column("metadata", JSONType)
    submitted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    placed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, doc="when the job reported its outcome")
    released_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    wait_ms: Mapped[int | None] = mapped_column(BigInteger, doc="placed - submitted (0 without a queue wait)")
    run_ms: Mapped[int | None] = mapped_column(BigInteger, doc="released - started (or - placed)")
    requeues: Mapped[int] = mapped_column(Integer, default=0, doc="times preempted and put back in line")
    first_event_id: Mapped[str | None] = mapped_column(String(40))
    last_event_id: Mapped[str | None] = mapped_column(String(40))
    state_event_id: Mapped[str | None] = mapped_column(
        String(40), doc="the event that set state: an event older than it changes no state (out-of-order delivery)")
    updated_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (
        Index(None, "namespace", "state"),
        Index(None, "namespace", "placed_at"),
        Index(None, "namespace", "task_type", "released_at"),
        Index(None, "namespace", "owner", "placed_at"),
        Index(None, "namespace", "host_id", "placed_at"),
    )


class PlacementRow(Base):
    """One placement of an allocation: the interval its resources were held, for usage.

    An allocation that is preempted and requeued is placed again under the same id, so it can
    have several placements; GPU-hours add them all up. The key uses the placement time in ms,
    which both the ``allocated`` event (its ts) and the ``released`` event (data.activated) carry,
    so either may arrive first.
    """

    __tablename__ = "placements"

    namespace: Mapped[str] = mapped_column(String(64), primary_key=True)
    allocation_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    placed_ms: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    host_id: Mapped[str | None] = mapped_column(String(128))
    owner: Mapped[str | None] = mapped_column(String(256))
    task_type: Mapped[str | None] = mapped_column(String(256))
    gpu_count: Mapped[int] = mapped_column(Integer, default=0)
    gpu_memory_mb: Mapped[int] = mapped_column(BigInteger, default=0)
    gpu_share_milli: Mapped[int | None] = mapped_column(
        Integer, nullable=True, doc="thousandths of a GPU held: 1000 a whole GPU, a slice its share of the GPU's memory; "
                                    "null for rows recorded before (counted as gpu_count whole GPUs)")
    cpu_millis: Mapped[int] = mapped_column(Integer, default=0)
    ram_mb: Mapped[int] = mapped_column(BigInteger, default=0)
    placed_at: Mapped[datetime] = mapped_column(UTCDateTime)
    released_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    release_reason: Mapped[str | None] = mapped_column(String(64))

    __table_args__ = (
        Index(None, "namespace", "placed_at"),
        Index(None, "namespace", "released_at"),
    )


class HostRow(Base):
    """A host's last known inventory and state."""

    __tablename__ = "hosts"

    namespace: Mapped[str] = mapped_column(String(64), primary_key=True)
    host_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), doc="ready, draining, removed, or what the ledger says")
    drained_by: Mapped[str | None] = mapped_column(
        String(16), nullable=True, doc="who drains it, operator or agent; null when it does not drain (a lost host keeps who drained it)")
    state_event_id: Mapped[str | None] = mapped_column(
        String(40), nullable=True, doc="the event that set whether it is up, lost or removed (events may arrive out of order)")
    drain_event_id: Mapped[str | None] = mapped_column(
        String(40), nullable=True, doc="the event that set whether it drains (a drain, resume, loss or removal)")
    labels: Mapped[Any] = mapped_column(JSONType)
    spec: Mapped[Any] = mapped_column(JSONType, doc="the inventory as last registered")
    gpu_count: Mapped[int] = mapped_column(Integer, default=0)
    gpu_memory_mb: Mapped[int] = mapped_column(BigInteger, default=0)
    cpu_cores: Mapped[int] = mapped_column(Integer, default=0)
    ram_mb: Mapped[int] = mapped_column(BigInteger, default=0)
    registered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    removed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_event_id: Mapped[str | None] = mapped_column(String(40))


events = Event.__table__
allocations = AllocationRow.__table__
placements = PlacementRow.__table__
hosts = HostRow.__table__
