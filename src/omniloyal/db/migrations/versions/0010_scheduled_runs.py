"""scheduled runs: one process per round of each scheduled job

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-23 16:50:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import omniloyal.db.types

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "scheduled_runs",
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("started_at", omniloyal.db.types.UTCDateTime(), nullable=False),
        sa.Column("finished_at", omniloyal.db.types.UTCDateTime(), nullable=True),
        sa.Column("error", sa.String(length=2000), nullable=True),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_scheduled_runs")),
    )


def downgrade() -> None:
    op.drop_table("scheduled_runs")
