"""Typed dependencies: a route's signature says what it needs."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from sqlalchemy.orm import Session

from app.api.auth import Principal
from app.api.errors import UnsupportedMediaType
from app.api.requestid import current_request_id
from app.api.service import Service
from app.api.services.edits import EditService
from app.db.edits import Audit
from app.live import ServedModel


def get_service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


ServiceDep = Annotated[Service, Depends(get_service)]


def get_session(service: ServiceDep) -> Iterator[Session]:
    with service.db.session() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def get_served(service: ServiceDep) -> ServedModel:
    """503 while the model loads. Routes that need the model list it among their dependencies,
    which FastAPI solves before reading the body: a client hears "not ready" first."""
    return service.require_served()


ServedDep = Annotated[ServedModel, Depends(get_served)]


def get_edit_service(service: ServiceDep, session: SessionDep) -> EditService:
    return EditService(service, session)


EditServiceDep = Annotated[EditService, Depends(get_edit_service)]


def require_json(request: Request) -> None:
    """415 for a body that is not JSON. A body without a Content-Type is read as JSON."""
    content_type = request.headers.get("content-type")
    if content_type is None:
        return
    media = content_type.split(";", 1)[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        raise UnsupportedMediaType(f"the body must be JSON (Content-Type: application/json), not {media or 'empty'}")


# Listed first among a route's dependencies after the key check: FastAPI solves them before
# validating the body, so a text body is told 415, not a confusing 422.
JsonBody = Depends(require_json)


def audit_of(principal: Principal) -> Audit:
    """Who an edit event is recorded for: the key's name, and the request's id."""
    return Audit(principal.name, current_request_id())


def reject_unknown_query(request: Request) -> None:
    """A query parameter the route does not take is refused (422), not ignored: a misspelt
    filter (``?stauts=active``) would otherwise answer as if no filter had been given."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute) or not request.query_params:
        return
    known = _query_names(route.dependant)
    unknown = [name for name in request.query_params if name not in known]
    if unknown:
        raise RequestValidationError([
            {"type": "extra_forbidden", "loc": ("query", name or "''"), "msg": "unknown query parameter"}
            for name in unknown
        ])


def _query_names(dependant: Dependant) -> set[str]:
    names = {field.alias for field in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names
