"""hosts.drained_by: who drains a host, "operator" or "agent"; hosts.state_event_id and
drain_event_id: the events that set its state.

``allocator recover`` re-applies a drain from the history. An agent's own drain (taken as it
stops) must come back as the agent's, which its next start resumes; an operator's must stay
until the operator resumes it. Rows draining before this revision do not say, and are taken as
an operator's (what recover did until now).

A host's state follows the newest events that set it, as an allocation's does (revision 0002),
in two parts: up, lost or removed, and whether it drains. A re-registration moved
last_event_id, and a drain event claimed late from a dead consumer was then ignored. Existing
rows take their last_event_id for both.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("hosts") as batch:
        batch.add_column(sa.Column("drained_by", sa.String(16), nullable=True))
        batch.add_column(sa.Column("state_event_id", sa.String(40), nullable=True))
        batch.add_column(sa.Column("drain_event_id", sa.String(40), nullable=True))
    op.execute("UPDATE hosts SET state_event_id = last_event_id, drain_event_id = last_event_id")
    op.execute("UPDATE hosts SET drained_by = 'operator' WHERE state = 'draining'")


def downgrade() -> None:
    with op.batch_alter_table("hosts") as batch:
        batch.drop_column("drain_event_id")
        batch.drop_column("state_event_id")
        batch.drop_column("drained_by")
