"""stored_experts.routing: each stored edit's routing part, readable without its expert

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Null on rows stored before: a live model reads those whole (app.live.experts), as before.
    with op.batch_alter_table("stored_experts") as batch:
        batch.add_column(sa.Column("routing", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("stored_experts") as batch:
        batch.drop_column("routing")
