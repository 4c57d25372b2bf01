from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Query, Response, status
from pydantic import AfterValidator

from app.api.deps import EditServiceDep, get_served
from app.api.inputs import storable_text
from app.api.schemas import MAX_LIST_LIMIT, MAX_LIST_OFFSET, MAX_TEXT_CHARS, EditCreate, EditPublic, EditsPublic
from app.db.models import EditStatus

router = APIRouter(prefix="/edits", tags=["edits"])

# Ids and search text reach SQL; they must be storable text like everything else.
EditId = Annotated[str, Path(), AfterValidator(storable_text)]

_ERRORS: dict[int | str, dict[str, Any]] = {404: {"description": "Unknown edit"},
                                            422: {"description": "Invalid request"}}


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=EditPublic, dependencies=[Depends(get_served)],
             responses={200: {"description": "Replay of an earlier post with the same Idempotency-Key"},
                        409: {"description": "Idempotency-Key reused for a different edit (idempotency_conflict), "
                                             "or a waiting or active edit already makes this change "
                                             "(duplicate_edit, with its edit_id)"},
                        422: {"description": "Invalid edit"}, 503: {"description": "Not ready"}})
def create_edit(
    body: EditCreate,
    edits: EditServiceDep,
    response: Response,
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=255)] = None,
) -> EditPublic:
    """Queue an edit. Training starts within moments; poll ``GET /edits/{id}`` until ``active``.
    Once active it supersedes the active edit of the same prompt, if any."""
    edit, created = edits.create(body, idempotency_key)
    if not created:
        response.status_code = status.HTTP_200_OK
        response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = f"/edits/{edit.id}"
    return edit


@router.get("", response_model=EditsPublic)
def read_edits(
    edits: EditServiceDep,
    status_: Annotated[EditStatus | None, Query(alias="status")] = None,
    q: Annotated[str | None, Query(max_length=MAX_TEXT_CHARS, description="Substring of prompt or target"),
                 AfterValidator(storable_text)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIST_LIMIT)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_LIST_OFFSET)] = 0,
) -> EditsPublic:
    """Edits, newest first."""
    return edits.search(status_, q, limit, offset)


@router.get("/{edit_id}", response_model=EditPublic, responses=_ERRORS)
def read_edit(edit_id: EditId, edits: EditServiceDep) -> EditPublic:
    return edits.get(edit_id)


@router.post("/{edit_id}/rollback", response_model=EditPublic,
             responses={**_ERRORS, 409: {"description": "The edit failed; there is nothing to roll back"}})
def rollback_edit(edit_id: EditId, edits: EditServiceDep) -> EditPublic:
    """Stop routing to an edit at once (or cancel it if not trained yet); the edits it superseded
    serve again. Repeating it is harmless."""
    return edits.rollback(edit_id)
