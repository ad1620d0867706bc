"""ledger schema changes after the initial schema (owned by the ledger package).

* points amounts keep 4 places instead of 2, so a currency's precision may be 0..4;
* ``reservations.entry_id`` links a confirmed reservation to its write-off (repeated confirms).

Revision ID: 0004
Revises: 0003
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import omniloyal.db.types  # noqa: F401

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# (table, column) of every points amount.
_AMOUNTS = (
    ("ledger_entries", "amount"),
    ("lots", "amount"),
    ("lots", "remaining"),
    ("postings", "amount"),
    ("reservations", "amount"),
)


def _rescale(old: int, new: int) -> None:
    if op.get_bind().dialect.name == "sqlite":
        # SQLite keeps amounts as scaled integers (see db.types.Amount): the column type stays
        # BIGINT, only the stored integers move by the scale difference.
        for table, column in _AMOUNTS:
            if new > old:
                op.execute(f'UPDATE "{table}" SET "{column}" = "{column}" * {10 ** (new - old)}')
            else:
                op.execute(f'UPDATE "{table}" SET "{column}" = "{column}" / {10 ** (old - new)}')
        return
    for table, column in _AMOUNTS:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.alter_column(
                column,
                existing_type=sa.Numeric(20, old),
                type_=sa.Numeric(20, new),
                existing_nullable=False,
            )


def upgrade() -> None:
    _rescale(2, 4)
    with op.batch_alter_table("reservations", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("entry_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True)
        )
        batch_op.create_foreign_key(
            batch_op.f("fk_reservations_entry_id_ledger_entries"), "ledger_entries", ["entry_id"], ["id"]
        )


def downgrade() -> None:
    with op.batch_alter_table("reservations", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_reservations_entry_id_ledger_entries"), type_="foreignkey")
        batch_op.drop_column("entry_id")
    _rescale(4, 2)
