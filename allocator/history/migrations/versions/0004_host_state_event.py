"""hosts.state_event_id and drain_event_id: the events that set a host's state.

A host's state follows the newest events that set it, as an allocation's does (revision 0002),
in two parts: up, lost or removed, and whether it drains. A re-registration moved
last_event_id, and a drain event claimed late from a dead consumer was then ignored. Existing
rows take their last_event_id for both, and a draining row that does not say who drained it is
an operator's (what ``allocator recover`` reads it as).

One release shipped these columns inside revision 0003; a database it upgraded is at 0003 and
already has them, so this revision adds only the columns that are missing and fills only the
values that are empty.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NEW_COLUMNS = ("state_event_id", "drain_event_id")


def upgrade() -> None:
    have = {c["name"] for c in sa.inspect(op.get_bind()).get_columns("hosts")}
    missing = [name for name in NEW_COLUMNS if name not in have]
    if missing:
        with op.batch_alter_table("hosts") as batch:
            for name in missing:
                batch.add_column(sa.Column(name, sa.String(40), nullable=True))
    op.execute("UPDATE hosts SET state_event_id = last_event_id WHERE state_event_id IS NULL")
    op.execute("UPDATE hosts SET drain_event_id = last_event_id WHERE drain_event_id IS NULL")
    op.execute("UPDATE hosts SET drained_by = 'operator' WHERE state = 'draining' AND drained_by IS NULL")


def downgrade() -> None:
    with op.batch_alter_table("hosts") as batch:
        batch.drop_column("drain_event_id")
        batch.drop_column("state_event_id")
