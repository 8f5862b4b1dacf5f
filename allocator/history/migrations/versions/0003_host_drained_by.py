"""hosts.drained_by: who drained a host, "operator" or "agent".

``allocator recover`` re-applies a drain from the history. An agent's own drain (taken as it
stops) must come back as the agent's, which its next start resumes; an operator's must stay
until the operator resumes it. Rows drained before this revision do not say, and are read as an
operator's (what recover did until now).

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


def downgrade() -> None:
    with op.batch_alter_table("hosts") as batch:
        batch.drop_column("drained_by")
