"""Reads and state transitions of edits.

Every transition is a conditional UPDATE (compare-and-set on the status), so two
workers racing on one edit, or a rollback racing a worker, cannot both win.

At most one edit per prompt is active: activating an edit supersedes the active
edit of the same normalised prompt, and rolling it back restores that edit. Both
lock the prompt's rows first (``_lock_prompt``), so two activations of one prompt,
or an activation and a rollback, cannot both miss each other's change.
"""

from __future__ import annotations

import hashlib
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


class DuplicateEdit(EditConflict):
    """A waiting or active edit already makes the same change."""

    def __init__(self, existing: Edit):
        super().__init__(f"edit {existing.id} ({existing.status}) already makes this change; "
                         "roll it back first to post it again")
        self.edit_id = existing.id


@dataclass(frozen=True)
class Activated:
    """An activation that won, and the active edits of the same prompt it superseded."""

    superseded: list[str]


@dataclass(frozen=True)
class RolledBack:
    edit: Edit
    # False when the edit was already rolled back.
    changed: bool
    # Edits it had superseded, active again.
    restored: list[str]


@dataclass(frozen=True)
class LiveRecord:
    id: str
    expert_path: str
    expert_sha256: str | None


def new_id() -> str:
    return uuid.uuid4().hex


def normalise(text: str) -> str:
    """What two texts must share to state the same thing: case and runs of whitespace aside."""
    return " ".join(text.casefold().split())


def prompt_key(prompt: str) -> str:
    """The indexed key of a prompt. Migration 0002 fills existing rows with a copy of this function."""
    return hashlib.sha256(normalise(prompt).encode()).hexdigest()


def create_edit(
    session: Session,
    prompt: str,
    target: str,
    rephrases: Sequence[str] = (),
    meta: dict | None = None,
    idempotency_key: str | None = None,
    *,
    subject: str | None = None,
) -> tuple[Edit, bool]:
    """Insert a queued edit and commit. Returns (edit, created); an existing key returns its edit.

    Raises ``DuplicateEdit`` when a queued, training or active edit already makes the same
    change. Two identical posts racing past this check both insert; the later to activate
    supersedes the other, so the live model still serves one of them.
    """
    if idempotency_key is not None:
        existing = _by_key(session, idempotency_key)
        if existing is not None:
            return _same_request(existing, prompt, target, rephrases, subject), False
    key = prompt_key(prompt)
    duplicate = _duplicate(session, key, target, subject)
    if duplicate is not None:
        raise DuplicateEdit(duplicate)
    now = utcnow()
    edit = Edit(
        id=new_id(), status=S.queued.value, prompt=prompt, target=target, subject=subject, prompt_key=key,
        rephrases=list(rephrases), meta=dict(meta or {}), idempotency_key=idempotency_key,
        created_at=now, updated_at=now, attempts=0,
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
        return _same_request(existing, prompt, target, rephrases, subject), False
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


def activate(
    session: Session, edit_id: str, metrics: dict, expert_path: str, expert_sha256: str
) -> Activated | None:
    """training -> active, and every other active edit of the same prompt -> superseded, in one
    transaction. None if someone else finished or cancelled it meanwhile."""
    key = session.scalar(select(Edit.prompt_key).where(Edit.id == edit_id))
    if key is None:
        return None
    _lock_prompt(session, key)
    now = utcnow()
    won = _compare_and_set(
        session, edit_id, [S.training],
        status=S.active.value, metrics=metrics, expert_path=expert_path, expert_sha256=expert_sha256,
        activated_at=now, finished_at=now, updated_at=now, error=None,
    )
    superseded: list[str] = []
    if won:
        superseded = list(session.scalars(
            select(Edit.id).where(Edit.prompt_key == key, Edit.status == S.active.value, Edit.id != edit_id)
        ))
        for older in superseded:
            _compare_and_set(session, older, [S.active], status=S.superseded.value, superseded_by=edit_id,
                             updated_at=now)
    session.commit()
    return Activated(superseded) if won else None


def fail(session: Session, edit_id: str, reason: str, attempts: int | None = None) -> bool:
    """queued/training -> failed; ``attempts``, when given, is the final count of deliveries
    (an edit abandoned after deliveries that never reached the database)."""
    now = utcnow()
    counted = {} if attempts is None else {"attempts": attempts}
    return _transition(
        session, edit_id, [S.queued, S.training],
        status=S.failed.value, error=reason, finished_at=now, updated_at=now, **counted,
    )


def note_error(session: Session, edit_id: str, error: str) -> None:
    """Remember why an attempt broke, for the failure reason if no later attempt succeeds."""
    _transition(session, edit_id, [S.training], error=error, updated_at=utcnow())


def rollback(session: Session, edit_id: str) -> RolledBack:
    """queued/training/active/superseded -> rolled_back; twice is harmless.

    The edits it superseded become active again in the same transaction. Rolling back an
    edit that is itself superseded hands the edits it superseded to its successor, so that
    rolling the successor back later restores the newest edit nobody rolled back.
    """
    edit = get_edit(session, edit_id)
    if edit.status == S.rolled_back.value:
        return RolledBack(edit, False, [])
    if edit.status == S.failed.value:
        raise EditConflict(f"edit {edit_id} failed and was never live; there is nothing to roll back")
    _lock_prompt(session, edit.prompt_key)
    now = utcnow()
    changed = _compare_and_set(
        session, edit_id, [S.queued, S.training, S.active, S.superseded],
        status=S.rolled_back.value, rolled_back_at=now, updated_at=now,
    )
    restored: list[str] = []
    if changed:
        # Read after the update, under its lock: superseded_by is what it was when it changed.
        successor = session.scalar(select(Edit.superseded_by).where(Edit.id == edit_id))
        replaced = list(session.scalars(
            select(Edit.id).where(Edit.superseded_by == edit_id, Edit.status == S.superseded.value)
        ))
        for older in replaced:
            if successor is None:
                _compare_and_set(session, older, [S.superseded], status=S.active.value, superseded_by=None,
                                 updated_at=now)
                restored.append(older)
            else:
                _compare_and_set(session, older, [S.superseded], superseded_by=successor, updated_at=now)
    session.commit()
    session.expire_all()
    edit = get_edit(session, edit_id)
    if not changed and edit.status != S.rolled_back.value:
        # It failed between our read and the update.
        raise EditConflict(f"edit {edit_id} is {edit.status}; there is nothing to roll back")
    return RolledBack(edit, changed, restored)


def _transition(session: Session, edit_id: str, sources: Iterable[EditStatus], **values) -> bool:
    changed = _compare_and_set(session, edit_id, sources, **values)
    session.commit()
    return changed


def _compare_and_set(session: Session, edit_id: str, sources: Iterable[EditStatus], **values) -> bool:
    """One conditional update, left uncommitted for the caller's transaction."""
    # An UPDATE answers with a cursor result, the kind that carries a row count.
    result = cast(CursorResult[Any], session.execute(
        update(Edit)
        .where(Edit.id == edit_id, Edit.status.in_([s.value for s in sources]))
        .values(**values)
        .execution_options(synchronize_session=False)
    ))
    return result.rowcount == 1


def _lock_prompt(session: Session, key: str) -> None:
    """Lock every row of one prompt until the transaction ends, always in id order so two
    lockers cannot deadlock. Without it two activations of one prompt, each uncommitted,
    would not see the other active and both stay active. SQLite renders no FOR UPDATE; its
    writers are serialised by the database lock the transaction's first UPDATE takes (the
    rows are read to the end so no open SQLite statement pins an older snapshot meanwhile)."""
    session.execute(select(Edit.id).where(Edit.prompt_key == key).order_by(Edit.id).with_for_update()).all()


def _duplicate(session: Session, key: str, target: str, subject: str | None) -> Edit | None:
    """A queued, training or active edit of the same prompt with the same target and, when
    ``subject`` is given, the same subject (as given to it, or as the engine inferred it)."""
    candidates = session.scalars(
        select(Edit)
        .where(Edit.prompt_key == key, Edit.status.in_([S.queued.value, S.training.value, S.active.value]))
        .order_by(Edit.created_at, Edit.id)
    )
    for edit in candidates:
        if normalise(edit.target) != normalise(target):
            continue
        if subject is not None:
            theirs = edit.subject if edit.subject is not None else (edit.metrics or {}).get("subject")
            if not isinstance(theirs, str) or normalise(theirs) != normalise(subject):
                continue
        return edit
    return None


def _by_key(session: Session, key: str) -> Edit | None:
    return session.scalars(select(Edit).where(Edit.idempotency_key == key)).first()


def _same_request(edit: Edit, prompt: str, target: str, rephrases: Sequence[str], subject: str | None) -> Edit:
    if (edit.prompt, edit.target, list(edit.rephrases), edit.subject) != (prompt, target, list(rephrases), subject):
        raise IdempotencyConflict("this Idempotency-Key was already used for a different edit")
    return edit
