"""Typed dependencies: a route's signature says what it needs."""

from __future__ import annotations

from typing import Annotated, Iterator

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.api.service import Service
from app.settings import Settings
from workers.runtime import Live


def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


def get_settings_dep(service: ServiceDep) -> Settings:
    return service.settings


def get_session(service: ServiceDep) -> Iterator[Session]:
    with service.db.session() as session:
        yield session


def get_live(service: ServiceDep) -> Live:
    return service.require_live()


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
SessionDep = Annotated[Session, Depends(get_session)]
LiveDep = Annotated[Live, Depends(get_live)]
