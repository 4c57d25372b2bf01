"""stored_experts: edit files kept in the database (SCEN_EXPERT_STORE=database)

Revision ID: 0004
Revises: 0003
Create Date: 2025-01-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "stored_experts",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("edit_id", sa.String(32), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        # bytea on PostgreSQL, BLOB on SQLite.
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_stored_experts_edit_id", "stored_experts", ["edit_id"])


def downgrade() -> None:
    # Edits whose expert is a row lose it with the table: they stay active, reported unserved.
    op.drop_index("ix_stored_experts_edit_id", table_name="stored_experts")
    op.drop_table("stored_experts")
