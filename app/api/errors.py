"""Every error response has the body ``{"error": message, "error_type": kind}``, plus
structured fields where a client needs more than the kind (``edit_id`` of ``duplicate_edit``).

Handlers raise typed exceptions; this module alone maps them to status codes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, cast

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from app.api.auth import Forbidden, Unauthorized
from app.db.edits import DuplicateEdit, EditConflict, EditNotFound, IdempotencyConflict, ItemRefused, RepeatedItem
from app.queue import QueueUnavailable
from app.scen import InvalidEditError, UnknownEditError
from app.scen.chats import UnsupportedChat

log = logging.getLogger(__name__)


class NotReady(Exception):
    """The model is still loading, or a dependency is down."""


class ModelNotFound(Exception):
    """An OpenAI-style request names a model this service does not serve."""


class UnsupportedMediaType(Exception):
    """A body that is not JSON sent to a route that reads JSON."""


class ErrorBody(BaseModel):
    """The body of every error response."""

    model_config = ConfigDict(extra="allow", json_schema_extra={
        "examples": [{"error": "prompt: String should have at least 1 character", "error_type": "validation_error"}]})

    error: str = Field(description="What went wrong, for a person")
    error_type: str = Field(description="What went wrong, for a program: validation_error, not_found, "
                                        "unauthorized, forbidden, conflict, duplicate_edit, ...")
    edit_id: str | None = Field(default=None, description="duplicate_edit only: the edit this post repeats")
    index: int | None = Field(default=None, description="POST /edits/batch only: the item refused (from 0)")


# What each status means on every route that can answer it; routes add their own descriptions.
STANDARD_ERRORS = {
    401: "No API key, or one that is not valid (error_type unauthorized; WWW-Authenticate: Bearer)",
    403: "The key's role does not allow this (error_type forbidden)",
    413: "The body is over SCEN_MAX_BODY_BYTES (body_too_large)",
    415: "The body is not JSON (unsupported_media_type)",
    422: "The request is not valid (validation_error)",
    429: "Too many changes from this client (rate_limited; Retry-After)",
    503: "The model, the database or the queue is not available (not_ready, database_unavailable, "
         "queue_unavailable; Retry-After)",
}


def errors(**described: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries with the service's error body, e.g. ``errors(e404="Unknown edit")``."""
    return {int(code.removeprefix("e")): {"model": ErrorBody, "description": text} for code, text in described.items()}


# Most specific first: the first isinstance match wins.
_MAPPING: list[tuple[type[Exception], int, str]] = [
    (Unauthorized, 401, "unauthorized"),
    (Forbidden, 403, "forbidden"),
    (UnsupportedMediaType, 415, "unsupported_media_type"),
    (IdempotencyConflict, 409, "idempotency_conflict"),
    (DuplicateEdit, 409, "duplicate_edit"),
    (EditConflict, 409, "conflict"),
    (EditNotFound, 404, "not_found"),
    (UnknownEditError, 404, "not_found"),
    (InvalidEditError, 422, "invalid_edit"),
    (ModelNotFound, 404, "not_found"),
    (UnsupportedChat, 422, "validation_error"),
    (RepeatedItem, 422, "validation_error"),
    (NotReady, 503, "not_ready"),
    (QueueUnavailable, 503, "queue_unavailable"),
    (OperationalError, 503, "database_unavailable"),
]


_HEADERS = {503: {"Retry-After": "2"}, 401: {"WWW-Authenticate": "Bearer"}}

# Driver messages name hosts and ports; clients learn only which dependency failed (the log has the rest).
_UNREACHABLE = {"database_unavailable": "the database is unreachable", "queue_unavailable": "the queue is unreachable"}


def error_response(status: int, message: str, kind: str, headers: Mapping[str, str] | None = None,
                   fields: Mapping[str, Any] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "error_type": kind, **(fields or {})}, status_code=status,
                        headers=headers)


def _fields(exc: BaseException) -> dict[str, Any]:
    # The edit a duplicate repeats: the client can read, or roll back, that one.
    return {"edit_id": exc.edit_id} if isinstance(exc, DuplicateEdit) else {}


def _message(exc: BaseException) -> str:
    # KeyError subclasses repr their argument; the plain argument reads better.
    return str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)


async def _typed(request: Request, exc: Exception) -> JSONResponse:
    # A batch item's refusal answers as the refusal itself would, naming the item.
    item = exc if isinstance(exc, ItemRefused) else None
    cause = item.error if item is not None else exc
    for kind_cls, status, kind in _MAPPING:
        if isinstance(cause, kind_cls):
            headers = _HEADERS.get(status)
            message = _UNREACHABLE.get(kind) or _message(cause)
            if kind in _UNREACHABLE:
                log.warning("%s on %s %s: %s", message, request.method, request.url.path, cause)
            fields = _fields(cause)
            if item is not None:
                message, fields = f"edits[{item.index}]: {message}", {**fields, "index": item.index}
            return error_response(status, message, kind, headers, fields)
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal error", "internal_error")


async def _validation(request: Request, exc: Exception) -> JSONResponse:
    parts = []
    indexes = []
    for err in cast(RequestValidationError, exc).errors():
        loc = tuple(err.get("loc", ()))
        where = ".".join(str(p) for p in loc if p != "body")
        parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        if loc[:2] == ("body", "edits") and len(loc) > 2 and isinstance(loc[2], int):
            indexes.append(loc[2])
    # A batch says which item is wrong first.
    fields = {"index": min(indexes)} if indexes else None
    return error_response(422, "; ".join(parts) or "invalid request", "validation_error", fields=fields)


async def _http(request: Request, exc: Exception) -> JSONResponse:
    http = cast(StarletteHTTPException, exc)
    if http.status_code == 400:
        # FastAPI answers 400 for a body it cannot decode (bad UTF-8, nesting past the parser's
        # recursion limit); like malformed JSON, that is an invalid request.
        return error_response(422, "the body is not valid JSON", "validation_error")
    headers = dict(http.headers or {})
    if http.status_code == 405:
        headers["Allow"] = _allowed_methods(request)
    kind = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(http.status_code, "http_error")
    return error_response(http.status_code, str(http.detail), kind, headers)


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def _allowed_methods(request: Request) -> str:
    """Every method some route serves at this path. Starlette names only the first matching
    route's, and GET /edits and POST /edits are two routes."""
    allowed = []
    for method in _METHODS:
        probe = {**request.scope, "method": method}
        if any(route.matches(probe)[0] == Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    return ", ".join(allowed)


def install_error_handlers(app: FastAPI) -> None:
    # Starlette types every handler's argument as Exception, hence the casts in the handlers
    # registered here for one class each.
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    for kind_cls, _, _ in _MAPPING:
        app.add_exception_handler(kind_cls, _typed)
    app.add_exception_handler(ItemRefused, _typed)
    app.add_exception_handler(Exception, _typed)
