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
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, String, case, delete, func, or_, select, update
from sqlalchemy import cast as sql_cast
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from app.db.models import Edit, EditEvent, EditStatus, StoredExpert, StoredRouting, utcnow

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


class ItemRefused(Exception):
    """One item of a batch cannot be accepted (``error`` says why); nothing of the batch was written."""

    def __init__(self, index: int, error: Exception):
        super().__init__(f"edits[{index}]: {error}")
        self.index = index
        self.error = error


class RepeatedItem(ValueError):
    """A batch states the same change twice."""


@dataclass(frozen=True)
class NewEdit:
    """One edit of a batch, as posted."""

    prompt: str
    target: str
    rephrases: Sequence[str] = ()
    meta: dict | None = None
    subject: str | None = None


@dataclass(frozen=True)
class Audit:
    """Who asks for a change, recorded with it in ``edit_events``."""

    actor: str
    request_id: str | None = None


# The worker's transitions; which worker is in the event's details.
WORKER = Audit("worker")


@dataclass(frozen=True)
class EditFilter:
    """``GET /edits`` filters; every one given must hold."""

    status: EditStatus | None = None
    q: str | None = None
    # Edits with at least one event by this actor.
    actor: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    # Top-level metadata keys, each with the value it must have (compared as text), or None: present.
    metadata: tuple[tuple[str, str | None], ...] = ()


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
class Restored:
    edit: Edit
    # False when the edit was already waiting or active.
    changed: bool
    # Active edits of the same prompt it superseded when it came back.
    superseded: list[str]


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
    audit: Audit = Audit("anonymous"),
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
    try:
        session.add(edit)
        session.flush()  # the edit's row before its event's
        _record(session, edit.id, "created", S.queued, audit, at=now)
        session.commit()
    except sa_exc.IntegrityError:
        # A concurrent post with the same key won the insert.
        session.rollback()
        existing = _by_key(session, idempotency_key) if idempotency_key else None
        if existing is None:
            raise
        return _same_request(existing, prompt, target, rephrases, subject), False
    return edit, True


def create_edits(session: Session, items: Sequence[NewEdit], idempotency_key: str | None = None, *,
                 audit: Audit = Audit("anonymous")) -> tuple[list[Edit], bool]:
    """Insert every item as a queued edit in one transaction, or none. Returns (edits, created).

    The rules of ``create_edit`` hold for each item; ``ItemRefused`` names the first item that
    breaks one. With ``idempotency_key`` item ``i`` is stored under ``KEY#i``: a retry of the same
    batch returns its edits, and the key used for any other batch is an ``IdempotencyConflict``.
    """
    keys = [None if idempotency_key is None else f"{idempotency_key}#{i}" for i in range(len(items))]
    if idempotency_key is not None:
        replay = _batch_replay(session, items, idempotency_key)
        if replay is not None:
            return replay, False
    now = utcnow()
    edits: list[Edit] = []
    seen: dict[tuple[str, str], int] = {}
    for index, (item, key) in enumerate(zip(items, keys)):
        pkey = prompt_key(item.prompt)
        earlier = seen.setdefault((pkey, normalise(item.target)), index)
        if earlier != index:
            raise ItemRefused(index, RepeatedItem(f"makes the same change as edits[{earlier}]"))
        duplicate = _duplicate(session, pkey, item.target, item.subject)
        if duplicate is not None:
            raise ItemRefused(index, DuplicateEdit(duplicate))
        edits.append(Edit(
            id=new_id(), status=S.queued.value, prompt=item.prompt, target=item.target, subject=item.subject,
            prompt_key=pkey, rephrases=list(item.rephrases), meta=dict(item.meta or {}), idempotency_key=key,
            # One microsecond apart: listings and activation keep the batch's order.
            created_at=now + timedelta(microseconds=index), updated_at=now, attempts=0,
        ))
    try:
        session.add_all(edits)
        session.flush()
        for edit in edits:
            _record(session, edit.id, "created", S.queued, audit, at=edit.created_at,
                    details={"batch": len(edits)})
        session.commit()
    except sa_exc.IntegrityError:
        # A concurrent retry of the same batch won the insert.
        session.rollback()
        replay = _batch_replay(session, items, idempotency_key) if idempotency_key else None
        if replay is None:
            raise
        return replay, False
    return edits, True


def _batch_replay(session: Session, items: Sequence[NewEdit], key: str) -> list[Edit] | None:
    """The edits of an earlier batch posted with ``key``; None when the key is unused."""
    names = [f"{key}#{i}" for i in range(len(items) + 1)]
    found = {e.idempotency_key: e for e in session.scalars(select(Edit).where(Edit.idempotency_key.in_(names)))}
    if not found:
        return None
    if len(found) != len(items) or names[-1] in found:
        raise IdempotencyConflict("this Idempotency-Key was already used for a different batch")
    replay = []
    for index, item in enumerate(items):
        try:
            replay.append(_same_request(found[names[index]], item.prompt, item.target, item.rephrases, item.subject))
        except IdempotencyConflict as exc:
            raise ItemRefused(index, exc) from None
    return replay


def delete_edits(session: Session, edit_ids: Sequence[str]) -> None:
    """Undo a batch whose queue messages could not all be sent: its edits and their events, at once."""
    session.rollback()
    session.execute(delete(EditEvent).where(EditEvent.edit_id.in_(edit_ids)))
    session.execute(delete(Edit).where(Edit.id.in_(edit_ids)))
    session.commit()


def delete_edit(session: Session, edit_id: str) -> None:
    """Undo a create whose queue message could not be sent."""
    edit = session.get(Edit, edit_id)
    if edit is not None:
        # The request is refused: its created event goes with it (the one delete of events).
        session.execute(delete(EditEvent).where(EditEvent.edit_id == edit_id))
        session.delete(edit)
        session.commit()


def get_edit(session: Session, edit_id: str) -> Edit:
    edit = session.get(Edit, edit_id)
    if edit is None:
        raise EditNotFound(edit_id)
    return edit


def list_edits(session: Session, where: EditFilter | None = None, limit: int = 50, offset: int = 0
               ) -> tuple[list[Edit], int]:
    where = where or EditFilter()
    query = select(Edit)
    if where.status is not None:
        query = query.where(Edit.status == where.status.value)
    if where.q:
        needle = where.q.lower()
        query = query.where(or_(func.lower(Edit.prompt).contains(needle, autoescape=True),
                                func.lower(Edit.target).contains(needle, autoescape=True)))
    if where.actor is not None:
        query = query.where(Edit.id.in_(select(EditEvent.edit_id).where(EditEvent.actor == where.actor)))
    if where.created_after is not None:
        query = query.where(Edit.created_at >= where.created_after)
    if where.created_before is not None:
        query = query.where(Edit.created_at < where.created_before)
    for key, value in where.metadata:
        query = query.where(_metadata_matches(session, key, value))
    total = session.scalar(select(func.count()).select_from(query.subquery()))
    items = session.scalars(query.order_by(Edit.created_at.desc(), Edit.id.desc()).limit(limit).offset(offset))
    return list(items), int(total or 0)


def _metadata_matches(session: Session, key: str, value: str | None) -> ColumnElement[bool]:
    """A top-level metadata key present (``value`` None) or holding ``value``, compared as JSON
    scalars written as text (``7``, ``true``, ``OPS-1``) on both databases."""
    if session.get_bind().dialect.name == "postgresql":
        text = Edit.meta[key].as_string()  # ->>: scalars as text, true as 'true'
        return Edit.meta[key].is_not(None) if value is None else text == value
    path = '$."' + key.replace('"', '\\"') + '"'
    kind = func.json_type(Edit.meta, path)
    if value is None:
        return kind.is_not(None)
    # json_extract answers numbers as numbers and booleans as 1/0: written out as PostgreSQL does.
    text = case((kind == "true", "true"), (kind == "false", "false"),
                else_=sql_cast(func.json_extract(Edit.meta, path), String))
    return text == value


def events_of(session: Session, edit_id: str) -> list[EditEvent]:
    """The edit's history, oldest first. Raises ``EditNotFound``."""
    get_edit(session, edit_id)
    return list(session.scalars(select(EditEvent).where(EditEvent.edit_id == edit_id).order_by(EditEvent.id)))


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


def active_edits(session: Session) -> list[Edit]:
    """Active edits in the order they went live (as ``live_records``), whole."""
    return list(session.scalars(
        select(Edit).where(Edit.status == S.active.value).order_by(Edit.activated_at, Edit.id)
    ))


@dataclass(frozen=True)
class ImportedEdit:
    """An active edit brought from another deployment, with its expert file already in place here."""

    id: str
    prompt: str
    target: str
    subject: str | None
    rephrases: list[str]
    meta: dict
    metrics: dict | None
    created_at: datetime
    expert_path: str
    expert_sha256: str
    details: dict[str, Any]


@dataclass(frozen=True)
class ImportOutcome:
    imported: list[str]
    # Edits not imported, with the reason: already here (a re-import), or a duplicate of a local edit.
    skipped: dict[str, str]
    # Local active edits of an imported prompt, now superseded by the imported edit.
    superseded: list[str]


def import_active(session: Session, items: Sequence[ImportedEdit], audit: Audit) -> ImportOutcome:
    """Insert ``items`` as active edits, in order, in one transaction: each goes live after every
    edit already here and supersedes the active edit of its prompt, as an activation does. An id
    already here, or a change a waiting or active edit already makes, is skipped."""
    now = utcnow()
    imported: list[str] = []
    skipped: dict[str, str] = {}
    superseded: list[str] = []
    for index, item in enumerate(items):
        existing = session.get(Edit, item.id)
        if existing is not None:
            skipped[item.id] = f"already here ({existing.status})"
            continue
        key = prompt_key(item.prompt)
        _lock_prompt(session, key)
        duplicate = _duplicate(session, key, item.target, item.subject)
        if duplicate is not None:
            skipped[item.id] = f"edit {duplicate.id} ({duplicate.status}) already makes this change"
            continue
        at = now + timedelta(microseconds=index)
        session.add(Edit(
            id=item.id, status=S.active.value, prompt=item.prompt, target=item.target, subject=item.subject,
            prompt_key=key, rephrases=list(item.rephrases), meta=dict(item.meta), idempotency_key=None,
            created_at=item.created_at, updated_at=at, activated_at=at, finished_at=at, attempts=0,
            metrics=item.metrics, expert_path=item.expert_path, expert_sha256=item.expert_sha256,
        ))
        session.flush()
        _record(session, item.id, "imported", S.active, audit, at=at, details=item.details)
        superseded += _supersede_others(session, key, item.id, audit, at)
        imported.append(item.id)
    session.commit()
    return ImportOutcome(imported, skipped, superseded)


def count_by_status(session: Session) -> dict[str, int]:
    return {status: int(n) for status, n in session.execute(select(Edit.status, func.count()).group_by(Edit.status))}


def oldest_waiting(session: Session) -> datetime | None:
    """When the oldest queued edit (not yet taken by a worker) was posted; None: none waits."""
    return session.scalar(select(func.min(Edit.created_at)).where(Edit.status == S.queued.value))


def request_id_of(session: Session, edit_id: str) -> str | None:
    """The id of the request that last queued the edit (its post, or a restore that retrains it)."""
    return session.scalar(
        select(EditEvent.request_id)
        .where(EditEvent.edit_id == edit_id, EditEvent.status == S.queued.value, EditEvent.request_id.is_not(None))
        .order_by(EditEvent.id.desc()).limit(1)
    )


def waiting_since(session: Session, before: datetime) -> list[str]:
    """Queued or training edits last changed before ``before``."""
    rows = session.scalars(
        select(Edit.id)
        .where(Edit.status.in_([S.queued.value, S.training.value]), Edit.updated_at < before)
        .order_by(Edit.created_at)
    )
    return list(rows)


def start_training(session: Session, edit_id: str, deliveries: int, worker: str,
                   audit: Audit = WORKER) -> Edit | None:
    """queued/training -> training. None when the edit is gone, cancelled or already finished."""
    now = utcnow()
    changed = _transition(
        session, edit_id, [S.queued, S.training],
        event=("training", S.training, audit, None, {"worker": worker, "delivery": deliveries}),
        status=S.training.value, attempts=deliveries, worker=worker, started_at=now, updated_at=now,
    )
    return session.get(Edit, edit_id, populate_existing=True) if changed else None


def activate(
    session: Session, edit_id: str, metrics: dict, expert_path: str, expert_sha256: str, audit: Audit = WORKER
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
        _record(session, edit_id, "activated", S.active, audit, at=now)
        superseded = _supersede_others(session, key, edit_id, audit, now)
    session.commit()
    return Activated(superseded) if won else None


def _supersede_others(session: Session, key: str, edit_id: str, audit: Audit, now: datetime) -> list[str]:
    """Every other active edit of the prompt -> superseded by ``edit_id``; the caller holds the prompt's lock."""
    others = list(session.scalars(
        select(Edit.id).where(Edit.prompt_key == key, Edit.status == S.active.value, Edit.id != edit_id)
    ))
    for older in others:
        if _compare_and_set(session, older, [S.active], status=S.superseded.value, superseded_by=edit_id,
                            updated_at=now):
            _record(session, older, "superseded", S.superseded, audit, at=now, details={"superseded_by": edit_id})
    return others


def fail(session: Session, edit_id: str, reason: str, attempts: int | None = None, audit: Audit = WORKER) -> bool:
    """queued/training -> failed; ``attempts``, when given, is the final count of deliveries
    (an edit abandoned after deliveries that never reached the database)."""
    now = utcnow()
    counted = {} if attempts is None else {"attempts": attempts}
    return _transition(
        session, edit_id, [S.queued, S.training], event=("failed", S.failed, audit, reason, None),
        status=S.failed.value, error=reason, finished_at=now, updated_at=now, **counted,
    )


def note_error(session: Session, edit_id: str, error: str) -> None:
    """Remember why an attempt broke, for the failure reason if no later attempt succeeds."""
    _transition(session, edit_id, [S.training], error=error, updated_at=utcnow())


def rollback(session: Session, edit_id: str, reason: str | None = None, audit: Audit = Audit("system")
             ) -> RolledBack:
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
        _record(session, edit_id, "rolled_back", S.rolled_back, audit, reason=reason, at=now)
        # Read after the update, under its lock: superseded_by is what it was when it changed.
        successor = session.scalar(select(Edit.superseded_by).where(Edit.id == edit_id))
        replaced = list(session.scalars(
            select(Edit.id).where(Edit.superseded_by == edit_id, Edit.status == S.superseded.value)
        ))
        for older in replaced:
            if successor is None:
                if _compare_and_set(session, older, [S.superseded], status=S.active.value, superseded_by=None,
                                    updated_at=now):
                    _record(session, older, "reinstated", S.active, audit, at=now,
                            reason=f"edit {edit_id}, which superseded it, was rolled back")
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


def restore(session: Session, edit_id: str, reason: str | None, audit: Audit, reuse_expert: bool = True) -> Restored:
    """rolled_back -> active (it has a trained expert, and ``reuse_expert``: the file is there),
    superseding the active edits of its prompt; or rolled_back -> queued, to be trained again.
    An edit already waiting or active is returned unchanged; a failed or superseded one is a conflict."""
    session.expire_all()  # the session may hold an older read of it
    edit = get_edit(session, edit_id)
    if edit.status in (S.queued.value, S.training.value, S.active.value):
        return Restored(edit, False, [])
    if edit.status != S.rolled_back.value:
        raise EditConflict(f"edit {edit_id} is {edit.status}; only a rolled-back edit can be restored")
    _lock_prompt(session, edit.prompt_key)
    now = utcnow()
    trained = reuse_expert and edit.expert_path is not None and edit.activated_at is not None
    superseded: list[str] = []
    if trained:
        # Its activation time is kept: the live model orders edits by it (see LiveSync).
        changed = _compare_and_set(session, edit_id, [S.rolled_back], status=S.active.value, rolled_back_at=None,
                                   superseded_by=None, updated_at=now)
        if changed:
            _record(session, edit_id, "restored", S.active, audit, reason=reason, at=now,
                    details={"expert_path": edit.expert_path})
            superseded = _supersede_others(session, edit.prompt_key, edit_id, audit, now)
    else:
        changed = _compare_and_set(session, edit_id, [S.rolled_back], status=S.queued.value, rolled_back_at=None,
                                   superseded_by=None, error=None, attempts=0, worker=None, started_at=None,
                                   activated_at=None, finished_at=None, expert_path=None, expert_sha256=None,
                                   metrics=None, updated_at=now)
        if changed:
            _record(session, edit_id, "restored", S.queued, audit, reason=reason, at=now,
                    details={"retrain": True})
    session.commit()
    session.expire_all()
    edit = get_edit(session, edit_id)
    if not changed and edit.status not in (S.queued.value, S.training.value, S.active.value):
        raise EditConflict(f"edit {edit_id} is {edit.status}; only a rolled-back edit can be restored")
    return Restored(edit, changed, superseded)


_Event = tuple[str, EditStatus, Audit, str | None, dict[str, Any] | None]


def _transition(session: Session, edit_id: str, sources: Iterable[EditStatus], event: _Event | None = None,
                **values) -> bool:
    changed = _compare_and_set(session, edit_id, sources, **values)
    if changed and event is not None:
        name, status, audit, reason, details = event
        _record(session, edit_id, name, status, audit, reason=reason, details=details, at=values.get("updated_at"))
    session.commit()
    return changed


def _record(session: Session, edit_id: str, event: str, status: EditStatus, audit: Audit, *,
            reason: str | None = None, details: dict[str, Any] | None = None, at: datetime | None = None) -> None:
    """Append one event to the edit's history, in the caller's transaction."""
    session.add(EditEvent(edit_id=edit_id, event=event, status=status.value, actor=audit.actor, reason=reason,
                          request_id=audit.request_id, at=at or utcnow(), details=details))


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


# Experts kept in the database (app.live.experts.ExpertRows). Each call is its own transaction:
# a row is there whole, committed, or not at all.

def store_expert(session: Session, edit_id: str, data: bytes, sha256: str, routing: bytes | None = None) -> str:
    """Insert one attempt's edit file (and its routing part) under a new id, and return the id."""
    expert_id = uuid.uuid4().hex
    session.add(StoredExpert(id=expert_id, edit_id=edit_id, sha256=sha256, size=len(data), data=data,
                             created_at=utcnow()))
    if routing is not None:
        session.add(StoredRouting(expert_id=expert_id, routing=routing))
    session.commit()
    return expert_id


def stored_expert_data(session: Session, expert_id: str) -> tuple[bytes, str] | None:
    """(bytes, sha256 recorded with them), or None when there is no such row."""
    row = session.execute(select(StoredExpert.data, StoredExpert.sha256).where(StoredExpert.id == expert_id)).first()
    return (bytes(row.data), row.sha256) if row is not None else None


# Ids per IN (...) list: well within SQLite's and PostgreSQL's limits on bound parameters.
_IN_CHUNK = 500


def stored_routing(session: Session, expert_ids: Sequence[str]) -> dict[str, bytes]:
    """The routing part of each of ``expert_ids`` found; a row stored without one gives its
    whole edit file. Ids with no row are left out."""
    found: dict[str, bytes] = {}
    ids = list(expert_ids)
    for start in range(0, len(ids), _IN_CHUNK):
        chunk = ids[start : start + _IN_CHUNK]
        rows = session.execute(select(StoredRouting.expert_id, StoredRouting.routing)
                               .where(StoredRouting.expert_id.in_(chunk)))
        found |= {expert_id: bytes(routing) for expert_id, routing in rows}
        whole = [expert_id for expert_id in chunk if expert_id not in found]
        if whole:
            files = session.execute(select(StoredExpert.id, StoredExpert.data).where(StoredExpert.id.in_(whole)))
            found |= {expert_id: bytes(data) for expert_id, data in files}
    return found


def delete_stored_expert(session: Session, expert_id: str) -> None:
    session.execute(delete(StoredRouting).where(StoredRouting.expert_id == expert_id))
    session.execute(delete(StoredExpert).where(StoredExpert.id == expert_id))
    session.commit()


def delete_stored_experts(session: Session, edit_id: str, keep: str | None = None) -> list[str]:
    """Delete every row of ``edit_id`` but ``keep``; returns the ids deleted."""
    where = [StoredExpert.edit_id == edit_id]
    if keep is not None:
        where.append(StoredExpert.id != keep)
    ids = list(session.scalars(delete(StoredExpert).where(*where).returning(StoredExpert.id)))
    if ids:
        session.execute(delete(StoredRouting).where(StoredRouting.expert_id.in_(ids)))
    session.commit()
    return ids
