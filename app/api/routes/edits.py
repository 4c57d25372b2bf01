from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Path, Query, Response, status
from fastapi.exceptions import RequestValidationError
from pydantic import AfterValidator, AwareDatetime

from app.api.auth import Admin, Editor, Reader, require_admin, require_editor
from app.api.deps import EditServiceDep, JsonBody, ServiceDep, audit_of, get_served
from app.api.errors import errors
from app.api.inputs import storable_text
from app.api.schemas import (
    MAX_LIST_LIMIT,
    MAX_LIST_OFFSET,
    MAX_TEXT_CHARS,
    EditBatchCreate,
    EditBatchPublic,
    EditCreate,
    EditEventsPublic,
    EditPublic,
    EditsPublic,
    RestoreRequest,
    RollbackRequest,
)
from app.db.edits import EditFilter
from app.db.models import EditStatus

router = APIRouter(prefix="/edits", tags=["edits"])

# Item i of a batch is stored under KEY#i, within the column's 255 characters.
MAX_BATCH_KEY_CHARS = 240

# Ids and search text reach SQL; they must be storable text like everything else.
EditId = Annotated[str, Path(), AfterValidator(storable_text)]
SearchText = Annotated[str, Query(max_length=MAX_TEXT_CHARS), AfterValidator(storable_text)]


def _metadata_filter(value: str) -> str:
    storable_text(value)
    if not value.partition(":")[0]:
        raise ValueError("must be KEY or KEY:VALUE with a non-empty KEY")
    return value


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=EditPublic,
             dependencies=[Depends(require_editor), JsonBody, Depends(get_served)],
             responses={200: {"description": "Replay of an earlier post with the same Idempotency-Key"},
                        **errors(e409="Idempotency-Key reused for a different edit (idempotency_conflict), "
                                      "or a waiting or active edit already makes this change "
                                      "(duplicate_edit, with its edit_id)",
                                 e422="Invalid request (validation_error) or an edit the engine cannot train "
                                      "(invalid_edit)")})
def create_edit(
    principal: Editor,
    body: EditCreate,
    edits: EditServiceDep,
    response: Response,
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=255)] = None,
) -> EditPublic:
    """Queue an edit (role editor). Training starts within moments; poll ``GET /edits/{id}`` until
    ``active``. Once active it supersedes the active edit of the same prompt, if any."""
    edit, created = edits.create(body, idempotency_key, audit_of(principal))
    if not created:
        response.status_code = status.HTTP_200_OK
        response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = f"/edits/{edit.id}"
    return edit


@router.post("/batch", status_code=status.HTTP_202_ACCEPTED, response_model=EditBatchPublic,
             dependencies=[Depends(require_editor), JsonBody, Depends(get_served)],
             responses={200: {"description": "Replay of an earlier batch with the same Idempotency-Key"},
                        **errors(e409="An item repeats a waiting or active edit (duplicate_edit, with its edit_id), "
                                      "or the Idempotency-Key was used for another batch (idempotency_conflict); "
                                      "`index` names the item",
                                 e422="An item is invalid (validation_error) or cannot be trained (invalid_edit), "
                                      "or there are more than SCEN_MAX_BATCH_EDITS; `index` names the item")})
def create_edits(
    principal: Editor,
    body: EditBatchCreate,
    edits: EditServiceDep,
    service: ServiceDep,
    response: Response,
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=MAX_BATCH_KEY_CHARS)] = None,
) -> EditBatchPublic:
    """Queue several edits at once (role editor), under the rules of ``POST /edits`` for each.
    Every item is checked before any is written: one refused item refuses the batch, and the
    error names it (``index``). Workers train them in the order given, one after another."""
    limit = service.settings.max_batch_edits
    if len(body.edits) > limit:
        raise RequestValidationError([{"loc": ("body", "edits"), "type": "too_long",
                                       "msg": f"at most {limit} edits per batch (SCEN_MAX_BATCH_EDITS), "
                                              f"not {len(body.edits)}"}])
    batch, created = edits.create_batch(body.edits, idempotency_key, audit_of(principal))
    if not created:
        response.status_code = status.HTTP_200_OK
        response.headers["Idempotent-Replayed"] = "true"
    return batch


@router.get("", response_model=EditsPublic)
def list_edits(
    principal: Reader,
    edits: EditServiceDep,
    status_: Annotated[EditStatus | None, Query(alias="status")] = None,
    q: Annotated[SearchText | None, Query(description="Substring of prompt or target, any case")] = None,
    actor: Annotated[SearchText | None, Query(description="Edits with an event by this key name "
                                                          "(`anonymous` in open mode, `worker`)")] = None,
    created_after: Annotated[AwareDatetime | None, Query(description="Created at or after (ISO 8601 with zone)")
                             ] = None,
    created_before: Annotated[AwareDatetime | None, Query(description="Created before (ISO 8601 with zone)")
                              ] = None,
    metadata: Annotated[list[Annotated[str, AfterValidator(_metadata_filter)]] | None,
                        Query(max_length=8, description="`KEY:VALUE` (top-level metadata key holding VALUE, "
                                                        "compared as text) or `KEY` (present); repeat for all of "
                                                        "several")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIST_LIMIT)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_LIST_OFFSET)] = 0,
) -> EditsPublic:
    """Edits, newest first (role reader); every filter given must hold."""
    pairs = []
    for item in metadata or []:
        key, sep, value = item.partition(":")
        pairs.append((key, value if sep else None))
    where = EditFilter(status=status_, q=q, actor=actor, created_after=_utc(created_after),
                       created_before=_utc(created_before), metadata=tuple(pairs))
    return edits.search(where, limit, offset)


def _utc(value: datetime | None) -> datetime | None:
    return None if value is None else value.astimezone(UTC)


@router.get("/{edit_id}", response_model=EditPublic, responses=errors(e404="Unknown edit"))
def get_edit(principal: Reader, edit_id: EditId, edits: EditServiceDep) -> EditPublic:
    """One edit (role reader)."""
    return edits.get(edit_id)


@router.get("/{edit_id}/events", response_model=EditEventsPublic, responses=errors(e404="Unknown edit"))
def list_edit_events(principal: Reader, edit_id: EditId, edits: EditServiceDep) -> EditEventsPublic:
    """Every state change of the edit, oldest first, with who asked for it, why and in which
    request (role reader). Events are only ever added."""
    return edits.events(edit_id)


@router.post("/{edit_id}/rollback", response_model=EditPublic, dependencies=[Depends(require_admin), JsonBody],
             responses=errors(e404="Unknown edit", e409="The edit failed; there is nothing to roll back"))
def rollback_edit(principal: Admin, edit_id: EditId, body: RollbackRequest, edits: EditServiceDep) -> EditPublic:
    """Stop routing to an edit at once (or cancel it if not trained yet); the edits it superseded
    serve again (role admin; ``reason`` required). Repeating it is harmless."""
    return edits.rollback(edit_id, body.reason, audit_of(principal))


@router.post("/{edit_id}/restore", response_model=EditPublic, dependencies=[Depends(require_admin), JsonBody],
             responses=errors(e404="Unknown edit",
                              e409="Only a rolled-back edit can be restored (this one failed or is superseded)"))
def restore_edit(principal: Admin, edit_id: EditId, edits: EditServiceDep,
                 body: RestoreRequest | None = None) -> EditPublic:
    """Bring a rolled-back edit back (role admin): active again with its expert file, superseding
    the active edit of its prompt; or queued to train again when it was never trained or its file
    is gone. Repeating it is harmless."""
    return edits.restore(edit_id, body.reason if body else None, audit_of(principal))
