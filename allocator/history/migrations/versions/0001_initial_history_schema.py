"""Initial history schema: events (the outbox, exactly once), allocations, placements, hosts.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def TS() -> sa.DateTime:  # noqa: N802 - reads like a type in the column lists below
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "events",
        sa.Column("namespace", sa.String(64), nullable=False),
        sa.Column("stream_id", sa.String(40), nullable=False),
        sa.Column("stream_ms", sa.BigInteger(), nullable=False),
        sa.Column("stream_seq", sa.Integer(), nullable=False),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("subject", sa.String(256), nullable=False),
        sa.Column("ts", TS(), nullable=True),
        sa.Column("data", JSON, nullable=False),
        sa.Column("recorded_at", TS(), nullable=False),
        sa.PrimaryKeyConstraint("namespace", "stream_id", name=op.f("pk_events")),
    )
    op.create_index(op.f("ix_events_namespace_stream_ms_stream_seq"), "events", ["namespace", "stream_ms", "stream_seq"])
    op.create_index(op.f("ix_events_namespace_subject"), "events", ["namespace", "subject"])
    op.create_index(op.f("ix_events_namespace_type_ts"), "events", ["namespace", "type", "ts"])

    op.create_table(
        "allocations",
        sa.Column("namespace", sa.String(64), nullable=False),
        sa.Column("allocation_id", sa.String(128), nullable=False),
        sa.Column("task_id", sa.String(256), nullable=True),
        sa.Column("task_type", sa.String(256), nullable=True),
        sa.Column("owner", sa.String(256), nullable=True),
        sa.Column("priority", sa.SmallInteger(), nullable=True),
        sa.Column("strategy", sa.String(32), nullable=True),
        sa.Column("kind", sa.String(16), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("release_reason", sa.String(64), nullable=True),
        sa.Column("outcome", sa.String(32), nullable=True),
        sa.Column("host_id", sa.String(128), nullable=True),
        sa.Column("host_gen", sa.Integer(), nullable=True),
        sa.Column("gpus", JSON, nullable=False),
        sa.Column("gpu_count", sa.Integer(), nullable=False),
        sa.Column("gpu_memory_mb", sa.BigInteger(), nullable=False),
        sa.Column("cores", JSON, nullable=False),
        sa.Column("cpu_millis", sa.Integer(), nullable=False),
        sa.Column("ram_mb", sa.BigInteger(), nullable=False),
        sa.Column("ttl_ms", sa.BigInteger(), nullable=True),
        sa.Column("expires_at", TS(), nullable=True),
        sa.Column("request", JSON, nullable=False),
        sa.Column("metadata", JSON, nullable=False),
        sa.Column("submitted_at", TS(), nullable=True),
        sa.Column("placed_at", TS(), nullable=True),
        sa.Column("started_at", TS(), nullable=True),
        sa.Column("finished_at", TS(), nullable=True),
        sa.Column("released_at", TS(), nullable=True),
        sa.Column("wait_ms", sa.BigInteger(), nullable=True),
        sa.Column("run_ms", sa.BigInteger(), nullable=True),
        sa.Column("requeues", sa.Integer(), nullable=False),
        sa.Column("first_event_id", sa.String(40), nullable=True),
        sa.Column("last_event_id", sa.String(40), nullable=True),
        sa.Column("updated_at", TS(), nullable=True),
        sa.PrimaryKeyConstraint("namespace", "allocation_id", name=op.f("pk_allocations")),
    )
    op.create_index(op.f("ix_allocations_namespace_state"), "allocations", ["namespace", "state"])
    op.create_index(op.f("ix_allocations_namespace_placed_at"), "allocations", ["namespace", "placed_at"])
    op.create_index(op.f("ix_allocations_namespace_task_type_released_at"), "allocations", ["namespace", "task_type", "released_at"])
    op.create_index(op.f("ix_allocations_namespace_owner_placed_at"), "allocations", ["namespace", "owner", "placed_at"])
    op.create_index(op.f("ix_allocations_namespace_host_id_placed_at"), "allocations", ["namespace", "host_id", "placed_at"])

    op.create_table(
        "placements",
        sa.Column("namespace", sa.String(64), nullable=False),
        sa.Column("allocation_id", sa.String(128), nullable=False),
        sa.Column("placed_ms", sa.BigInteger(), nullable=False),
        sa.Column("host_id", sa.String(128), nullable=True),
        sa.Column("owner", sa.String(256), nullable=True),
        sa.Column("task_type", sa.String(256), nullable=True),
        sa.Column("gpu_count", sa.Integer(), nullable=False),
        sa.Column("gpu_memory_mb", sa.BigInteger(), nullable=False),
        sa.Column("cpu_millis", sa.Integer(), nullable=False),
        sa.Column("ram_mb", sa.BigInteger(), nullable=False),
        sa.Column("placed_at", TS(), nullable=False),
        sa.Column("released_at", TS(), nullable=True),
        sa.Column("release_reason", sa.String(64), nullable=True),
        sa.PrimaryKeyConstraint("namespace", "allocation_id", "placed_ms", name=op.f("pk_placements")),
    )
    op.create_index(op.f("ix_placements_namespace_placed_at"), "placements", ["namespace", "placed_at"])
    op.create_index(op.f("ix_placements_namespace_released_at"), "placements", ["namespace", "released_at"])

    op.create_table(
        "hosts",
        sa.Column("namespace", sa.String(64), nullable=False),
        sa.Column("host_id", sa.String(128), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("labels", JSON, nullable=False),
        sa.Column("spec", JSON, nullable=False),
        sa.Column("gpu_count", sa.Integer(), nullable=False),
        sa.Column("gpu_memory_mb", sa.BigInteger(), nullable=False),
        sa.Column("cpu_cores", sa.Integer(), nullable=False),
        sa.Column("ram_mb", sa.BigInteger(), nullable=False),
        sa.Column("registered_at", TS(), nullable=True),
        sa.Column("updated_at", TS(), nullable=True),
        sa.Column("removed_at", TS(), nullable=True),
        sa.Column("last_event_id", sa.String(40), nullable=True),
        sa.PrimaryKeyConstraint("namespace", "host_id", name=op.f("pk_hosts")),
    )


def downgrade() -> None:
    op.drop_table("hosts")
    op.drop_table("placements")
    op.drop_table("allocations")
    op.drop_table("events")
