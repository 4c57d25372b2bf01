"""Reads and state transitions of edits.

Every transition is a conditional UPDATE (compare-and-set on the status), so two
workers racing on one edit, or a rollback racing a worker, cannot both win.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import CursorResult, func, or_, select, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from app.db.models import Edit, EditStatus, utcnow

S = EditStatus


class EditNotFound(LookupError):
    def __init__(self, edit_id: str):
        super().__init__(f"no edit with id {edit_id!r}")
        self.edit_id = edit_id


class EditConflict(Exception):
    """The edit is in a state that does not allow the request."""


class IdempotencyConflict(EditConflict):
    """An Idempotency-Key was reused with a different request body."""


@dataclass(frozen=True)
class LiveRecord:
    id: str
    expert_path: str
    expert_sha256: str | None


def new_id() -> str:
    return uuid.uuid4().hex


def create_edit(
    session: Session,
    prompt: str,
    target: str,
    rephrases: Sequence[str] = (),
    meta: dict | None = None,
    idempotency_key: str | None = None,
) -> tuple[Edit, bool]:
    """Insert a queued edit and commit. Returns (edit, created); an existing key returns its edit."""
    if idempotency_key is not None:
        existing = _by_key(session, idempotency_key)
        if existing is not None:
            return _same_request(existing, prompt, target, rephrases), False
    now = utcnow()
    edit = Edit(
        id=new_id(), status=S.queued.value, prompt=prompt, target=target, rephrases=list(rephrases),
        meta=dict(meta or {}), idempotency_key=idempotency_key, created_at=now, updated_at=now, attempts=0,
    )
    session.add(edit)
    try:
        session.commit()
    except sa_exc.IntegrityError:
        # A concurrent post with the same key won the insert.
        session.rollback()
        existing = _by_key(session, idempotency_key) if idempotency_key else None
        if existing is None:
            raise
        return _same_request(existing, prompt, target, rephrases), False
    return edit, True


def delete_edit(session: Session, edit_id: str) -> None:
    """Undo a create whose queue message could not be sent."""
    edit = session.get(Edit, edit_id)
    if edit is not None:
        session.delete(edit)
        session.commit()


def get_edit(session: Session, edit_id: str) -> Edit:
    edit = session.get(Edit, edit_id)
    if edit is None:
        raise EditNotFound(edit_id)
    return edit


def list_edits(
    session: Session, status: EditStatus | None = None, q: str | None = None, limit: int = 50, offset: int = 0
) -> tuple[list[Edit], int]:
    query = select(Edit)
    if status is not None:
        query = query.where(Edit.status == status.value)
    if q:
        needle = q.lower()
        query = query.where(or_(func.lower(Edit.prompt).contains(needle, autoescape=True),
                                func.lower(Edit.target).contains(needle, autoescape=True)))
    total = session.scalar(select(func.count()).select_from(query.subquery()))
    items = session.scalars(query.order_by(Edit.created_at.desc(), Edit.id.desc()).limit(limit).offset(offset))
    return list(items), int(total or 0)


def live_records(session: Session) -> list[LiveRecord]:
    """Active edits in the order they went live: the wanted state of every live model."""
    rows = session.execute(
        select(Edit.id, Edit.expert_path, Edit.expert_sha256)
        .where(Edit.status == S.active.value)
        .order_by(Edit.activated_at, Edit.id)
    )
    # activate() sets the path in the same update as the status; were it missing, the empty
    # path would fail to load and be reported like any unreadable file.
    return [LiveRecord(edit_id, path or "", sha) for edit_id, path, sha in rows]


def waiting_since(session: Session, before: datetime) -> list[str]:
    """Queued or training edits last changed before ``before``."""
    rows = session.scalars(
        select(Edit.id)
        .where(Edit.status.in_([S.queued.value, S.training.value]), Edit.updated_at < before)
        .order_by(Edit.created_at)
    )
    return list(rows)


def start_training(session: Session, edit_id: str, deliveries: int, worker: str) -> Edit | None:
    """queued/training -> training. None when the edit is gone, cancelled or already finished."""
    now = utcnow()
    changed = _transition(
        session, edit_id, [S.queued, S.training],
        status=S.training.value, attempts=deliveries, worker=worker, started_at=now, updated_at=now,
    )
    return session.get(Edit, edit_id, populate_existing=True) if changed else None


def activate(session: Session, edit_id: str, metrics: dict, expert_path: str, expert_sha256: str) -> bool:
    """training -> active; False if someone else finished or cancelled it meanwhile."""
    now = utcnow()
    return _transition(
        session, edit_id, [S.training],
        status=S.active.value, metrics=metrics, expert_path=expert_path, expert_sha256=expert_sha256,
        activated_at=now, finished_at=now, updated_at=now, error=None,
    )


def fail(session: Session, edit_id: str, reason: str) -> bool:
    now = utcnow()
    return _transition(
        session, edit_id, [S.queued, S.training],
        status=S.failed.value, error=reason, finished_at=now, updated_at=now,
    )


def note_error(session: Session, edit_id: str, error: str) -> None:
    """Remember why an attempt broke, for the failure reason if no later attempt succeeds."""
    _transition(session, edit_id, [S.training], error=error, updated_at=utcnow())


def rollback(session: Session, edit_id: str) -> tuple[Edit, bool]:
    """queued/training/active -> rolled_back. Returns (edit, changed); twice is harmless."""
    edit = get_edit(session, edit_id)
    if edit.status == S.rolled_back.value:
        return edit, False
    if edit.status == S.failed.value:
        raise EditConflict(f"edit {edit_id} failed and was never live; there is nothing to roll back")
    now = utcnow()
    changed = _transition(
        session, edit_id, [S.queued, S.training, S.active],
        status=S.rolled_back.value, rolled_back_at=now, updated_at=now,
    )
    session.expire_all()
    edit = get_edit(session, edit_id)
    if not changed and edit.status != S.rolled_back.value:
        # It failed between our read and the update.
        raise EditConflict(f"edit {edit_id} is {edit.status}; there is nothing to roll back")
    return edit, changed


def _transition(session: Session, edit_id: str, sources: Iterable[EditStatus], **values) -> bool:
    # An UPDATE answers with a cursor result, the kind that carries a row count.
    result = cast(CursorResult[Any], session.execute(
        update(Edit)
        .where(Edit.id == edit_id, Edit.status.in_([s.value for s in sources]))
        .values(**values)
        .execution_options(synchronize_session=False)
    ))
    session.commit()
    return result.rowcount == 1


def _by_key(session: Session, key: str) -> Edit | None:
    return session.scalars(select(Edit).where(Edit.idempotency_key == key)).first()


def _same_request(edit: Edit, prompt: str, target: str, rephrases: Sequence[str]) -> Edit:
    if (edit.prompt, edit.target, list(edit.rephrases)) != (prompt, target, list(rephrases)):
        raise IdempotencyConflict("this Idempotency-Key was already used for a different edit")
    return edit
