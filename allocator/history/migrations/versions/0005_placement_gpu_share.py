"""placements.gpu_share_milli: how much of a GPU a placement holds, for GPU-hours.

A grant of a GPU memory slice counted as a whole GPU in GPU-hours, so four 8 GiB slices of one
40 GiB GPU made four GPU-hours an hour. A slice now counts its share of its GPU's memory (slices
carry their GPU's total since this revision). Rows recorded before stay null and count as
before (each GPU whole).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("placements") as batch:
        batch.add_column(sa.Column("gpu_share_milli", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("placements") as batch:
        batch.drop_column("gpu_share_milli")
