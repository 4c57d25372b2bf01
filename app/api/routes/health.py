from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST

from app.api.deps import ServiceDep
from app.api.errors import errors
from app.api.schemas import Health, Ready

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health)
def health() -> Health:
    """The process is alive."""
    return Health(status="ok")


@router.get("/ready", response_model=Ready, responses=errors(e503="Not ready: the body says which part"))
def ready(service: ServiceDep) -> Ready:
    """The model is loaded and the database and queue answer. Status ``degraded``: some active
    edits are not served (their expert files cannot be loaded); every other prompt is."""
    served = service.check_ready()
    unserved = served.sync.unserved
    return Ready(
        status="degraded" if unserved else "ready",
        unserved_edits=unserved,
        detail=f"{len(unserved)} active edits are not served: their expert files cannot be loaded"
        if unserved else None,
        model=served.model_name,
        model_version=served.editor.version,
        live_edits=len(served.editor.edit_ids),
        queue=service.queue.kind,
        worker="embedded" if service.settings.run_embedded_worker else "external",
    )


@router.get("/metrics", include_in_schema=False)
def metrics(service: ServiceDep) -> Response:
    return Response(service.metrics.render(service.served), media_type=CONTENT_TYPE_LATEST)
