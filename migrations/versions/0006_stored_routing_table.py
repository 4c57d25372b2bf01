"""stored_routing: the routing parts of stored experts, out of stored_experts

Reading every live edit's routing part at start-up read through each row's expert bytes on
SQLite, which keeps a row's columns in one chain of pages.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def _drops_columns_in_place() -> bool:
    # SQLite drops a column by rewriting the table: with 100,000 stored experts (14.5 GB) that
    # took 12 minutes and 56 GB of disk. There the old column stays, no longer read or written.
    return op.get_bind().dialect.name != "sqlite"


def upgrade() -> None:
    op.create_table(
        "stored_routing",
        sa.Column("expert_id", sa.String(32), primary_key=True),
        sa.Column("routing", sa.LargeBinary(), nullable=False),
    )
    op.execute("INSERT INTO stored_routing (expert_id, routing) "
               "SELECT id, routing FROM stored_experts WHERE routing IS NOT NULL")
    if _drops_columns_in_place():
        op.drop_column("stored_experts", "routing")


def downgrade() -> None:
    if _drops_columns_in_place():
        op.add_column("stored_experts", sa.Column("routing", sa.LargeBinary(), nullable=True))
    op.execute("UPDATE stored_experts SET routing = "
               "(SELECT routing FROM stored_routing WHERE stored_routing.expert_id = stored_experts.id)")
    op.drop_table("stored_routing")
