"""edit_events (the append-only audit trail) and api_keys

Revision ID: 0003
Revises: 0002
Create Date: 2025-01-03
"""

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_PG_FUNCTION = """
CREATE FUNCTION edit_events_append_only() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'edit_events is append-only';
END;
$$ LANGUAGE plpgsql
"""


def upgrade() -> None:
    ts = sa.DateTime(timezone=True)
    op.create_table(
        "edit_events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("edit_id", sa.String(32), sa.ForeignKey("edits.id", name="fk_edit_events_edit_id"),
                  nullable=False),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("actor", sa.String(255), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("request_id", sa.String(128), nullable=True),
        sa.Column("at", ts, nullable=False),
        sa.Column("details", sa.JSON(), nullable=True),
    )
    op.create_index("ix_edit_events_edit_id", "edit_events", ["edit_id"])
    op.create_index("ix_edit_events_actor", "edit_events", ["actor"])
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("key_sha256", sa.String(64), nullable=False),
        sa.Column("created_at", ts, nullable=False),
        sa.Column("revoked_at", ts, nullable=True),
        sa.UniqueConstraint("name", name="uq_api_keys_name"),
        sa.UniqueConstraint("key_sha256", name="uq_api_keys_key_sha256"),
    )

    # Edits made before the trail began get one event: the state they were found in.
    edits = sa.table("edits", sa.column("id", sa.String), sa.column("status", sa.String),
                     sa.column("updated_at", ts))
    events = sa.table("edit_events", sa.column("edit_id", sa.String), sa.column("event", sa.String),
                      sa.column("status", sa.String), sa.column("actor", sa.String), sa.column("at", ts),
                      sa.column("reason", sa.Text))
    conn = op.get_bind()
    rows = conn.execute(sa.select(edits.c.id, edits.c.status, edits.c.updated_at).order_by(edits.c.id)).all()
    if rows:
        conn.execute(events.insert(), [
            {"edit_id": i, "event": "imported", "status": s, "actor": "migration", "at": at or datetime.now(UTC),
             "reason": "recorded before the audit trail existed"} for i, s, at in rows
        ])

    # The database itself refuses to change a recorded event.
    if conn.dialect.name == "postgresql":
        op.execute(_PG_FUNCTION)
        op.execute("CREATE TRIGGER edit_events_no_update BEFORE UPDATE ON edit_events "
                   "FOR EACH ROW EXECUTE FUNCTION edit_events_append_only()")
    elif conn.dialect.name == "sqlite":
        op.execute("CREATE TRIGGER edit_events_no_update BEFORE UPDATE ON edit_events "
                   "BEGIN SELECT RAISE(ABORT, 'edit_events is append-only'); END")


def downgrade() -> None:
    conn = op.get_bind()
    if conn.dialect.name in ("postgresql", "sqlite"):
        op.execute("DROP TRIGGER IF EXISTS edit_events_no_update" +
                   (" ON edit_events" if conn.dialect.name == "postgresql" else ""))
    if conn.dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS edit_events_append_only()")
    op.drop_table("api_keys")
    op.drop_index("ix_edit_events_actor", table_name="edit_events")
    op.drop_index("ix_edit_events_edit_id", table_name="edit_events")
    op.drop_table("edit_events")
