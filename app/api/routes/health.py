from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.api.deps import ServiceDep
from app.api.schemas import Health, Ready
from app.queue import MemoryQueue

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health)
def health() -> Health:
    """The process is alive."""
    return Health(status="ok")


@router.get("/ready", response_model=Ready, responses={503: {"description": "Not ready"}})
def ready(service: ServiceDep) -> Ready:
    """The model is loaded and the database and queue answer."""
    live = service.check_ready()
    return Ready(
        status="ready",
        model=live.model_name,
        model_version=live.editor.version,
        live_edits=len(live.editor.edit_ids),
        queue="memory" if isinstance(service.queue, MemoryQueue) else "redis",
        worker="embedded" if service.settings.run_embedded_worker else "external",
    )


@router.get("/metrics", include_in_schema=False)
def metrics(service: ServiceDep) -> Response:
    m = service.metrics
    if service.live is not None:
        m.live_edits.set(len(service.live.editor.edit_ids))
        m.model_version.set(service.live.editor.version)
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
