"""edits table

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    ts = sa.DateTime(timezone=True)
    op.create_table(
        "edits",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("target", sa.Text(), nullable=False),
        sa.Column("rephrases", sa.JSON(), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.Column("idempotency_key", sa.String(255), nullable=True),
        sa.Column("created_at", ts, nullable=False),
        sa.Column("updated_at", ts, nullable=False),
        sa.Column("started_at", ts, nullable=True),
        sa.Column("activated_at", ts, nullable=True),
        sa.Column("finished_at", ts, nullable=True),
        sa.Column("rolled_back_at", ts, nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("worker", sa.String(255), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=True),
        sa.Column("expert_path", sa.String(512), nullable=True),
        sa.Column("expert_sha256", sa.String(64), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.UniqueConstraint("idempotency_key", name="uq_edits_idempotency_key"),
    )
    op.create_index("ix_edits_status", "edits", ["status"])
    op.create_index("ix_edits_created_at", "edits", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_edits_created_at", table_name="edits")
    op.drop_index("ix_edits_status", table_name="edits")
    op.drop_table("edits")
