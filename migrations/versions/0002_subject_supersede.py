"""edits: subject, prompt key, superseded_by

Revision ID: 0002
Revises: 0001
Create Date: 2025-01-02
"""

import hashlib

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _prompt_key(prompt: str) -> str:
    # Frozen here so that this revision always writes the keys it wrote when it was released;
    # it must equal app.db.edits.prompt_key (casefold, collapse whitespace, strip, sha256).
    return hashlib.sha256(" ".join(prompt.casefold().split()).encode()).hexdigest()


def upgrade() -> None:
    # Batch mode: SQLite cannot add a foreign key or make a column NOT NULL in place, so the
    # table is rebuilt there; PostgreSQL alters it directly.
    with op.batch_alter_table("edits") as batch:
        batch.add_column(sa.Column("subject", sa.Text(), nullable=True))
        batch.add_column(sa.Column("prompt_key", sa.String(64), nullable=True))
        batch.add_column(sa.Column("superseded_by", sa.String(32), nullable=True))
        batch.create_foreign_key("fk_edits_superseded_by", "edits", ["superseded_by"], ["id"])

    edits = sa.table("edits", sa.column("id", sa.String), sa.column("prompt", sa.Text),
                     sa.column("prompt_key", sa.String))
    conn = op.get_bind()
    for edit_id, prompt in conn.execute(sa.select(edits.c.id, edits.c.prompt)).all():
        conn.execute(edits.update().where(edits.c.id == edit_id).values(prompt_key=_prompt_key(prompt)))

    with op.batch_alter_table("edits") as batch:
        batch.alter_column("prompt_key", existing_type=sa.String(64), nullable=False)
    op.create_index("ix_edits_prompt_key", "edits", ["prompt_key"])
    op.create_index("ix_edits_superseded_by", "edits", ["superseded_by"])


def downgrade() -> None:
    # The older schema has no superseded status; such edits were not live, and rolled_back
    # keeps them out of the live set there too.
    edits = sa.table("edits", sa.column("status", sa.String), sa.column("rolled_back_at", sa.DateTime),
                     sa.column("updated_at", sa.DateTime))
    op.get_bind().execute(
        edits.update().where(edits.c.status == "superseded")
        .values(status="rolled_back", rolled_back_at=edits.c.updated_at)
    )
    op.drop_index("ix_edits_superseded_by", table_name="edits")
    op.drop_index("ix_edits_prompt_key", table_name="edits")
    with op.batch_alter_table("edits") as batch:
        batch.drop_constraint("fk_edits_superseded_by", type_="foreignkey")
        batch.drop_column("superseded_by")
        batch.drop_column("prompt_key")
        batch.drop_column("subject")
