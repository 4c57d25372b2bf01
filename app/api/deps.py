"""Typed dependencies: a route's signature says what it needs."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.api.service import Service
from app.api.services.edits import EditService
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
