"""allocations.state_event_id: the event that set an allocation's state.

Events can reach the recorder out of stream order (a dead consumer's entries claimed by another
after newer ones were written). A change of state then applies only when its event is newer than
the one that set the state, which the row's last_event_id cannot tell: started and finished move
it too, and a late "allocated" after "started" left a running job recorded as pending. Existing
rows take their last_event_id, the rule the recorder used until now.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("allocations") as batch:
        batch.add_column(sa.Column("state_event_id", sa.String(40), nullable=True))
    op.execute("UPDATE allocations SET state_event_id = last_event_id")


def downgrade() -> None:
    with op.batch_alter_table("allocations") as batch:
        batch.drop_column("state_event_id")
