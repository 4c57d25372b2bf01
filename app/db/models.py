"""ORM models. The schema itself comes only from the Alembic migrations."""

from __future__ import annotations

import enum
from datetime import UTC, datetime

from sqlalchemy import JSON, DateTime, ForeignKey, Integer, LargeBinary, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


class EditStatus(enum.StrEnum):
    queued = "queued"
    training = "training"
    active = "active"
    failed = "failed"
    rolled_back = "rolled_back"
    # Replaced by a newer active edit of the same prompt (``superseded_by``); rolling that
    # one back makes this one active again.
    superseded = "superseded"


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    pass


class Edit(Base):
    __tablename__ = "edits"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    prompt: Mapped[str] = mapped_column(Text)
    target: Mapped[str] = mapped_column(Text)
    # The entity the fact is about, as the client wrote it in the prompt; None: the engine infers it.
    subject: Mapped[str | None] = mapped_column(Text)
    # sha256 of the normalised prompt (app.db.edits.prompt_key): edits of the same prompt
    # are found by an indexed equality, whatever the prompt's length.
    prompt_key: Mapped[str] = mapped_column(String(64), index=True)
    rephrases: Mapped[list] = mapped_column(JSON, default=list)
    # "metadata" is reserved on declarative classes.
    meta: Mapped[dict] = mapped_column("metadata", JSON, default=dict)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), unique=True)

    created_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    activated_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    rolled_back_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    # Deliveries of the queue message so far; a reclaimed message counts again.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(255))
    metrics: Mapped[dict | None] = mapped_column(JSON)
    # Where its expert is kept: a path relative to the data directory, or "db:" and the id of a
    # stored_experts row (app.live.experts).
    expert_path: Mapped[str | None] = mapped_column(String(512))
    expert_sha256: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    # The edit whose activation replaced this one. Kept after a rollback of this edit, as a record.
    superseded_by: Mapped[str | None] = mapped_column(
        String(32), ForeignKey("edits.id", name="fk_edits_superseded_by"), index=True
    )


class EditEvent(Base):
    """One state change of an edit. Rows are only ever inserted (migration 0003 makes the
    database refuse updates), in the transaction of the change they record."""

    __tablename__ = "edit_events"

    # Increasing in commit order of the inserts of one edit: the order of its history.
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    edit_id: Mapped[str] = mapped_column(String(32), ForeignKey("edits.id", name="fk_edit_events_edit_id"),
                                         index=True)
    # What happened: created, training, activated, failed, superseded, rolled_back, reinstated, restored, imported.
    event: Mapped[str] = mapped_column(String(32))
    # The edit's status after the change.
    status: Mapped[str] = mapped_column(String(16))
    # The API key's name, "anonymous" in open mode, "worker" for a worker's transitions.
    actor: Mapped[str] = mapped_column(String(255), index=True)
    reason: Mapped[str | None] = mapped_column(Text)
    request_id: Mapped[str | None] = mapped_column(String(128))
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    details: Mapped[dict | None] = mapped_column(JSON)


class ApiKey(Base):
    """A key created with ``scen keys create``; only the sha256 of the key is stored."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    key_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class StoredExpert(Base):
    """An edit file (expert, neuron, keys) kept in the database, for ``SCEN_EXPERT_STORE=database``.

    One row per training attempt, like one file per attempt: a worker presumed dead that still
    finishes writes a row of its own and never touches the one another worker committed.
    """

    __tablename__ = "stored_experts"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    # No foreign key: an import writes its experts before the edits that name them, as it
    # writes files, and discards them if the edits are not recorded.
    edit_id: Mapped[str] = mapped_column(String(32), index=True)
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(Integer)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # On SQLite the table also keeps migration 0005's ``routing`` column, unused since 0006
    # (dropping it would rewrite every expert): StoredRouting holds the routing parts.


class StoredRouting(Base):
    """The routing part of a ``stored_experts`` row (app.scen.store.routing_bytes): what a
    starting process reads of every live edit. A table of its own because SQLite keeps a row's
    columns in one chain of pages: a column stored after ``data`` is reached only by reading
    through the expert's bytes. A row stored before migration 0005 has none and is read whole.
    """

    __tablename__ = "stored_routing"

    # Deleted with its row by app.db.edits, in the same transaction.
    expert_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    routing: Mapped[bytes] = mapped_column(LargeBinary)
