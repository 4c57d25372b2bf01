from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Header, Query, Response, status

from app.api.deps import LiveDep, ServiceDep, SessionDep
from app.api.schemas import MAX_LIST_LIMIT, MAX_TEXT_CHARS, EditCreate, EditPublic, EditsPublic
from app.db import edits as repo
from app.db.models import EditStatus
from app.queue import EDIT_CHANGED, QueueUnavailable

log = logging.getLogger(__name__)

router = APIRouter(prefix="/edits", tags=["edits"])

_ERRORS = {404: {"description": "Unknown edit"}, 422: {"description": "Invalid request"}}


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=EditPublic,
             responses={200: {"description": "Replay of an earlier post with the same Idempotency-Key"},
                        409: {"description": "Idempotency-Key reused for a different edit"},
                        422: {"description": "Invalid edit"}, 503: {"description": "Not ready"}})
def create_edit(
    body: EditCreate,
    session: SessionDep,
    live: LiveDep,
    service: ServiceDep,
    response: Response,
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=255)] = None,
) -> EditPublic:
    """Queue an edit. Training starts within moments; poll ``GET /edits/{id}`` until ``active``."""
    # Refuse untrainable edits before anything is written.
    live.editor.validate(body.prompt, body.target, body.rephrases)
    edit, created = repo.create_edit(session, body.prompt, body.target, body.rephrases, body.metadata,
                                     idempotency_key)
    if created:
        try:
            service.queue.enqueue(edit.id)
        except QueueUnavailable:
            # Nothing may remain of a rejected request.
            repo.delete_edit(session, edit.id)
            raise
        service.metrics.edits_created.inc()
        log.info("edit %s queued", edit.id)
    else:
        response.status_code = status.HTTP_200_OK
        response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = f"/edits/{edit.id}"
    return EditPublic.of(edit, service.live_ids())


@router.get("", response_model=EditsPublic)
def read_edits(
    session: SessionDep,
    service: ServiceDep,
    status_: Annotated[EditStatus | None, Query(alias="status")] = None,
    q: Annotated[str | None, Query(max_length=MAX_TEXT_CHARS, description="Substring of prompt or target")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIST_LIMIT)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> EditsPublic:
    """Edits, newest first."""
    items, total = repo.list_edits(session, status_, q, limit, offset)
    live_ids = service.live_ids()
    return EditsPublic(items=[EditPublic.of(e, live_ids) for e in items], total=total)


@router.get("/{edit_id}", response_model=EditPublic, responses=_ERRORS)
def read_edit(edit_id: str, session: SessionDep, service: ServiceDep) -> EditPublic:
    return EditPublic.of(repo.get_edit(session, edit_id), service.live_ids())


@router.post("/{edit_id}/rollback", response_model=EditPublic,
             responses={**_ERRORS, 409: {"description": "The edit failed; there is nothing to roll back"}})
def rollback_edit(edit_id: str, session: SessionDep, service: ServiceDep) -> EditPublic:
    """Stop routing to an edit at once (or cancel it if not trained yet). Repeating it is harmless."""
    edit, changed = repo.rollback(session, edit_id)
    if changed:
        log.info("edit %s rolled back", edit_id)
        if service.live is not None:
            service.live.sync.reconcile()
        service.queue.publish({"type": EDIT_CHANGED, "id": edit_id, "status": "rolled_back"})
    return EditPublic.of(edit, service.live_ids())
