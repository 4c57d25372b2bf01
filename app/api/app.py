"""The app factory. Settings, database, queue and model are built in the lifespan, never at import."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.routing import APIRoute

from app.api.bodylimit import BodyLimit
from app.api.docs import install_docs
from app.api.errors import install_error_handlers
from app.api.metrics import Metrics
from app.api.ratelimit import RateLimit
from app.api.requestid import RequestId
from app.api.routes import api_router
from app.api.service import Service
from app.console import install_console
from app.models import LoadedModel
from app.settings import Settings, get_settings


def create_app(settings: Settings | None = None, loaded_model: LoadedModel | None = None,
               on_fatal: Callable[[str], None] | None = None) -> FastAPI:
    """``loaded_model`` replaces loading ``settings.model`` (tests pass a tiny model).
    ``on_fatal(reason)`` is called when the model cannot be served at all (see ``Service``)."""
    settings = settings or get_settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service = await Service.start(settings, loaded_model, on_fatal, metrics=metrics)
        app.state.service = service
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(
        title="SCEN model-editing service",
        version="0.1.0",
        description="Post a correction; seconds later the live model answers with it. "
                    "Every edit is audited and can be rolled back.\n\n"
                    "Authenticate with `Authorization: Bearer KEY` (roles reader < editor < admin) "
                    "unless the service runs open. Every error has the body `{\"error\", \"error_type\"}`.",
        lifespan=lifespan,
        docs_url=None, redoc_url=None,
        # Operation ids are the handlers' names: create_edit, list_edits, ...
        generate_unique_id_function=_operation_id,
    )
    install_docs(app)
    install_error_handlers(app)
    if settings.rate_limit_per_minute:
        app.add_middleware(RateLimit, per_minute=settings.rate_limit_per_minute)
    # Added last, so it runs first: a refused body is never read, whoever the client is.
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    # Outside the limits, so refusals (413, 429) are counted too.
    metrics.instrument(app)
    # Outermost: every answer, refusals included, carries the request's id.
    app.add_middleware(RequestId)
    app.include_router(api_router)
    install_console(app)
    return app


def _operation_id(route: APIRoute) -> str:
    return route.name
