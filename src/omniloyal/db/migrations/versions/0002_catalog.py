"""catalog schema changes after the initial schema (owned by the catalog package).

* at most one default legal entity (partial unique index);
* product group membership looked up by product (the groups of a cheque line).

Revision ID: 0002
Revises: 0001
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import omniloyal.db.types  # noqa: F401

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("legal_entities", schema=None) as batch_op:
        batch_op.create_index(
            "uq_legal_entities_one_default",
            ["is_default"],
            unique=True,
            sqlite_where=sa.text("is_default"),
            postgresql_where=sa.text("is_default"),
        )
    with op.batch_alter_table("product_group_items", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_product_group_items_product_id"), ["product_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("product_group_items", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_product_group_items_product_id"))
    with op.batch_alter_table("legal_entities", schema=None) as batch_op:
        batch_op.drop_index("uq_legal_entities_one_default")
